"""peft's default ``target_modules`` per model type, for LoRA (and the layer methods that share its table),
IA³ and AdaLoRA: what ``get_peft_model`` fills in when a config leaves ``target_modules`` as None.

The data is copied from peft 0.21.2 (``peft/utils/constants.py``: ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``,
``..._IA3_TARGET_MODULES_MAPPING`` with ``..._IA3_FEEDFORWARD_MODULES_MAPPING``, ``..._ADALORA_TARGET_MODULES_MAPPING``);
deltatune does not import peft. tests/test_default_targets.py checks every row against the installed peft and
wraps every architecture that builds from a tiny config with both libraries. A value is a tuple of names (suffix
match on the module path) or, as peft has it for gemma4, one regex matched against the full path. A transformers
model type with no LoRA row gets LoRA's default from its architecture (``surgery.targets.derived_attention_targets``:
its attention's query and value projections); one in no IA³ or AdaLoRA table keeps target_modules required there.
"""
from __future__ import annotations

from typing import Any, Sequence, Union

from torch import nn

from deltatune.surgery.targets import name_matches

Targets = Union[tuple[str, ...], str]
"""Module names (suffix match) or one regex matched against the full dotted path."""

# peft's LoRA table (also BOFT, LoHa, LoKr, OFT, VeRA, ... in peft, with a few per-method changes).
_PEFT_LORA: dict[str, Targets] = {
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "bart": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "bloom": ("query_key_value",),
    "blip-2": ("q", "v", "q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"),
    "gptj": ("q_proj", "v_proj"),
    "gpt_neox": ("query_key_value",),
    "gpt_neo": ("q_proj", "v_proj"),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"),
    "deberta-v2": ("query_proj", "value_proj"),
    "deberta": ("in_proj",),
    "layoutlm": ("query", "value"),
    "llama": ("q_proj", "v_proj"),
    "llama4": ("q_proj", "v_proj"),
    "chatglm": ("query_key_value",),
    "gpt_bigcode": ("c_attn",),
    "mpt": ("Wqkv",),
    "RefinedWebModel": ("query_key_value",),
    "RefinedWeb": ("query_key_value",),
    "falcon": ("query_key_value",),
    "btlm": ("c_proj", "c_attn"),
    "codegen": ("qkv_proj",),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "stablelm": ("q_proj", "v_proj"),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "rwkv": ("key", "value", "receptance", "output"),
    "rwkv7": ("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
}

LORA_EXTRA_TARGETS: dict[str, Targets] = {"phi3": ("qkv_proj",)}
"""deltatune's own rows, for model types peft has no LoRA default for (phi3's fused attention projection)."""

LORA_DEFAULT_TARGETS: dict[str, Targets] = {**_PEFT_LORA, **LORA_EXTRA_TARGETS}

# IA³: (target_modules, feedforward_modules); peft keeps the two in separate tables with the same keys.
IA3_DEFAULT_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "t5": (("k", "v", "wo"), ("wo",)),
    "mt5": (("k", "v", "wi_1"), ()),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "bloom": (("query_key_value", "mlp.dense_4h_to_h"), ("mlp.dense_4h_to_h",)),
    "roberta": (("key", "value", "output.dense"), ("output.dense",)),
    "opt": (("q_proj", "k_proj", "fc2"), ("fc2",)),
    "gptj": (("q_proj", "v_proj", "fc_out"), ("fc_out",)),
    "gpt_neox": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "gpt_neo": (("q_proj", "v_proj", "c_proj"), ("c_proj",)),
    "bart": (("q_proj", "v_proj", "fc2"), ("fc2",)),
    "gpt_bigcode": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "llama4": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mixtral": (("k_proj", "v_proj", "w2"), ("w2",)),
    "bert": (("key", "value", "output.dense"), ("output.dense",)),
    "deberta-v2": (("key_proj", "value_proj", "output.dense"), ("output.dense",)),
    "deberta": (("in_proj", "output.dense"), ("output.dense",)),
    "RefinedWebModel": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "RefinedWeb": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "falcon": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "phi": (("q_proj", "v_proj", "fc2"), ("fc2",)),
    "gemma": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma3_text": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen3": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
}

# AdaLoRA: differs from LoRA's for t5, mt5, bart, opt, roberta, deberta-v2; no xlm-roberta, electra, layoutlm,
# mistral, phi, falcon, ... rows (peft has none).
ADALORA_DEFAULT_TARGETS: dict[str, Targets] = {
    "t5": ("q", "k", "v", "o", "wi", "wo"),
    "mt5": ("q", "k", "v", "o", "wi_0", "wi_1", "wo"),
    "bart": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "gpt2": ("c_attn",),
    "bloom": ("query_key_value",),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "gptj": ("q_proj", "v_proj"),
    "gpt_neox": ("query_key_value",),
    "gpt_neo": ("q_proj", "v_proj"),
    "llama": ("q_proj", "v_proj"),
    "llama4": ("q_proj", "v_proj"),
    "bert": ("query", "value"),
    "roberta": ("query", "key", "value", "dense"),
    "deberta-v2": ("query_proj", "key_proj", "value_proj", "dense"),
    "gpt_bigcode": ("c_attn",),
    "deberta": ("in_proj",),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
}


def model_type(model: nn.Module) -> str | None:
    """``model.config.model_type``, or None for a model without a transformers config."""
    return getattr(getattr(model, "config", None), "model_type", None)


def present(model: nn.Module, targets: Any) -> Any:
    """``targets`` without the names that match no module of ``model``.

    peft skips a default entry that names nothing (blip-2's row lists both ``q`` and ``q_proj``), while
    deltatune rejects an explicit ``target_modules`` entry that matches nothing; the default written into the
    config keeps only the entries that exist. A regex, or a list of which nothing matches, is returned unchanged
    (then the usual error names the layers that exist).
    """
    if isinstance(targets, str):
        return targets
    names = [name for name, _ in model.named_modules()]
    kept = tuple(t for t in targets if any(name_matches(n, t) for n in names))
    return kept if kept else tuple(targets)


def for_config(targets: Targets | Sequence[str]) -> Any:
    """A table value as a config field: a regex stays a string; names become a tuple."""
    return targets if isinstance(targets, str) else tuple(targets)
