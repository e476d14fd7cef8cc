"""Target presets: the one table of named target sets per model family, read by ``inspect`` and ``plan``.

A preset is a ``target_modules`` list. The four presets follow the usual progression (Hu et al., 2021,
section 7.1 trains W_q and W_v; QLoRA, Dettmers et al., 2023, found every linear layer necessary to
match full fine-tuning):

* ``qv``: the query and value projections (peft's default; fused QKV layers for GPT-2, Falcon, BLOOM),
* ``attention``: every attention projection,
* ``attention+mlp``: attention plus the feed-forward layers,
* ``all-linear``: every Linear/Conv1D except the output head.

``mlp`` (the feed-forward layers alone) is ``attention+mlp`` without ``attention``. Names that occur in
both attention and MLP (GPT-2's ``c_proj``, Falcon's ``dense``) are written with their parent
(``attn.c_proj``), which the suffix rule of ``target_modules`` matches exactly. For a family not in
:data:`FAMILY_PRESETS`, :data:`GENERIC_PRESETS` lists the usual layer names, to be filtered to the
names a model has.
"""
from __future__ import annotations

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

_GENERIC_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn", "query",
                      "key", "value", "Wqkv", "out_proj", "Wo")
_GENERIC_MLP = ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3",
                "dense_h_to_4h", "dense_4h_to_h")

GENERIC_PRESETS: dict[str, tuple[str, ...] | str] = {
    "all-linear": "all-linear",
    "attention": _GENERIC_ATTENTION,
    "qv": ("q_proj", "v_proj", "query", "value", "c_attn", "qkv_proj", "query_key_value", "Wqkv"),
    "mlp": _GENERIC_MLP,
    "attention+mlp": _GENERIC_ATTENTION + _GENERIC_MLP,
}
"""Preset name -> the usual last names of its layers, for families without an entry in
:data:`FAMILY_PRESETS`; each list is filtered to the layer names a given model has."""


def presets_for(model_type: str) -> dict[str, tuple[str, ...] | str]:
    """The presets known for ``model_type``, in :data:`PRESET_NAMES` order; always includes ``all-linear``."""
    known = FAMILY_PRESETS.get(model_type, {})
    out: dict[str, tuple[str, ...] | str] = {name: known[name] for name in PRESET_NAMES if name in known}
    out["all-linear"] = "all-linear"
    return out


def family_preset(model_type: str | None, name: str) -> tuple[str, ...] | None:
    """The family's ``target_modules`` for preset ``name`` (``mlp`` included), or None if the family or the
    preset is not in :data:`FAMILY_PRESETS` (``all-linear`` is no family's: it is the same everywhere)."""
    known = FAMILY_PRESETS.get(model_type or "", {})
    if name == "mlp" and "attention+mlp" in known:
        attention = set(known.get("attention", ()))
        return tuple(t for t in known["attention+mlp"] if t not in attention)
    return known.get(name)
