"""Target presets per model family, and the exact number of LoRA parameters each one trains.

A preset is a ``target_modules`` list for :class:`deltatune.LoraConfig`. The four presets follow the
usual progression (Hu et al., 2021, section 7.1 trains W_q and W_v; QLoRA, Dettmers et al., 2023,
found every linear layer necessary to match full fine-tuning):

* ``qv``: the query and value projections (peft's default; fused QKV layers for GPT-2, Falcon, BLOOM),
* ``attention``: every attention projection,
* ``attention+mlp``: attention plus the feed-forward layers,
* ``all-linear``: every Linear/Conv1D except the output head.

Names that occur in both attention and MLP (GPT-2's ``c_proj``, Falcon's ``dense``) are written
with their parent (``attn.c_proj``), which the suffix rule of ``target_modules`` matches exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from deltatune.config import LoraConfig
from deltatune.methods.base import layer_dims
from deltatune.surgery.targets import pattern_value, resolve_targets

PRESET_NAMES = ("qv", "attention", "attention+mlp", "all-linear")
"""Preset names, smallest first."""

_LLAMA = {
    "qv": ("q_proj", "v_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "attention+mlp": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def _fused_qkv(attention_out: str) -> dict[str, tuple[str, ...]]:
    """Falcon, BLOOM (``self_attention.dense``) and GPT-NeoX (``attention.dense``): one fused
    query_key_value projection per block."""
    return {
        "qv": ("query_key_value",),
        "attention": ("query_key_value", attention_out),
        "attention+mlp": ("query_key_value", attention_out, "dense_h_to_4h", "dense_4h_to_h"),
    }


FAMILY_PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    "gemma": _LLAMA, "gemma2": _LLAMA,
    "gpt2": {
        "qv": ("c_attn",),
        "attention": ("c_attn", "attn.c_proj"),
        "attention+mlp": ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    },
    "phi": {
        "qv": ("q_proj", "v_proj"),
        "attention": ("q_proj", "k_proj", "v_proj", "self_attn.dense"),
        "attention+mlp": ("q_proj", "k_proj", "v_proj", "self_attn.dense", "fc1", "fc2"),
    },
    "phi3": {
        "qv": ("qkv_proj",),
        "attention": ("qkv_proj", "o_proj"),
        "attention+mlp": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    },
    "falcon": _fused_qkv("self_attention.dense"), "bloom": _fused_qkv("self_attention.dense"),
    "gpt_neox": _fused_qkv("attention.dense"),
    "opt": {
        "qv": ("q_proj", "v_proj"),
        "attention": ("q_proj", "k_proj", "v_proj", "out_proj"),
        "attention+mlp": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    },
    "bert": {
        "qv": ("query", "value"),
        "attention": ("query", "key", "value", "attention.output.dense"),
        # "output.dense" also matches attention.output.dense, which this preset includes anyway.
        "attention+mlp": ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
    },
}
FAMILY_PRESETS["roberta"] = FAMILY_PRESETS["bert"]
"""model_type -> preset name -> ``target_modules``. ``all-linear`` applies to every family."""


def presets_for(model_type: str) -> dict[str, tuple[str, ...] | str]:
    """The presets known for ``model_type``, in :data:`PRESET_NAMES` order; always includes ``all-linear``."""
    known = FAMILY_PRESETS.get(model_type, {})
    out: dict[str, tuple[str, ...] | str] = {name: known[name] for name in PRESET_NAMES if name in known}
    out["all-linear"] = "all-linear"
    return out


def lora_parameter_count(model: nn.Module, config: LoraConfig, targets: Sequence[str] | None = None) -> int:
    """Exact number of LoRA parameters ``config`` adds to ``model``: sum over targets of r·(in + out),
    with per-module ranks from ``rank_pattern``, plus the DoRA magnitude (out) per target.

    An embedding's LoRA is (r × vocab) and (dim × r), the same r·(in + out) with in = vocab.
    ``model`` may live on the meta device. ``modules_to_save`` copies are not counted here.
    """
    names = resolve_targets(model, config) if targets is None else targets
    total = 0
    for name in names:
        layer = model.get_submodule(name)
        fan_out, fan_in = layer_dims(getattr(layer, "base_layer", layer))
        r = pattern_value(config.rank_pattern, name, config.r)
        total += r * (fan_in + fan_out) + (fan_out if config.use_dora and not isinstance(layer, nn.Embedding) else 0)
    return total


@dataclass(frozen=True)
class PresetRow:
    """One preset applied to one model."""

    name: str
    """Preset name (see :data:`PRESET_NAMES`)."""
    target_modules: tuple[str, ...] | str
    """What goes into ``LoraConfig(target_modules=...)``."""
    modules: int
    """How many modules it wraps; 0 when it does not apply (see :attr:`error`)."""
    trainable: int
    """LoRA parameters at the requested rank."""
    error: str | None
    """Why the preset does not apply to this model, or None."""


def preset_table(model: nn.Module, model_type: str, r: int) -> list[PresetRow]:
    """Every known preset for ``model_type`` with its module count and exact LoRA size at rank ``r``."""
    rows = []
    for name, targets in presets_for(model_type).items():
        config = LoraConfig(r=r, target_modules=targets)
        try:
            chosen = resolve_targets(model, config)
        except ValueError as err:
            rows.append(PresetRow(name, targets, 0, 0, str(err)))
            continue
        rows.append(PresetRow(name, targets, len(chosen), lora_parameter_count(model, config, chosen), None))
    return rows


def targets_config(targets: str | None = None, regex: str | None = None, **fields: Any) -> LoraConfig:
    """A LoraConfig from command-line style targets.

    Args:
        targets: a comma list of module names (``"q_proj,v_proj"``), ``"all-linear"``, or None for the
            family default. Expand preset names first with :func:`expand_preset`.
        regex: a regular expression matched against full module paths, instead of ``targets``.
        **fields: other LoraConfig fields (``r``, ``exclude_modules``, ``layers_to_transform``...).
    """
    if regex is not None:
        return LoraConfig(target_modules=regex, **fields)
    if targets is None or targets == "all-linear":
        return LoraConfig(target_modules=targets, **fields)
    return LoraConfig(target_modules=tuple(t.strip() for t in targets.split(",") if t.strip()), **fields)


def expand_preset(targets: str, model_type: str) -> str:
    """Turn a preset name into the comma list for ``model_type``; other values pass through.

    Raises:
        ValueError: ``targets`` names a preset that has no entry for this model family.
    """
    if targets not in PRESET_NAMES or targets == "all-linear":
        return targets
    known = presets_for(model_type)
    if targets not in known:
        raise ValueError(
            f"preset {targets!r} is not defined for model type {model_type!r} (presets are known for "
            f"{', '.join(sorted(FAMILY_PRESETS))}); pass module names instead, e.g. --targets q_proj,v_proj, "
            "or --targets all-linear"
        )
    return ",".join(known[targets])
