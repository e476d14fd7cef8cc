"""transformers names and layouts -> the names and layouts llama.cpp expects in a GGUF file.

llama.cpp reads LLaMA-family weights under its own names (``blk.0.attn_q.weight`` for
``model.layers.0.self_attn.q_proj.weight``); the ``gguf`` package's :class:`TensorNameMap` holds that
table, so we use it rather than keep a copy. One layout difference matters: llama.cpp's HF converter
(``convert_hf_to_gguf.py``, ``LlamaModel.permute``) reorders the rows of the query and key weights of
``llama``-architecture models, because llama.cpp applies rotary embeddings to interleaved pairs
(GPT-J style) where transformers rotates the two halves of each head (NeoX style). Every GGUF of a
LLaMA or Mistral model carries Q and K permuted, and so must anything added to them: a merged weight,
or a LoRA's B matrix (the rows of ``B @ A`` are the rows of B). Qwen2 uses NeoX rotary in llama.cpp
too, so its weights are written as they are.

``gguf`` is imported inside the functions: ``import deltatune`` must not pay for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Arch:
    """How one transformers ``model_type`` is written for llama.cpp."""

    gguf_name: str
    """llama.cpp's architecture name, the ``general.architecture`` value and key prefix."""
    permute_qk: bool
    """Whether Q/K rows are permuted (see the module docstring)."""


ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch("llama", True),
    "mistral": Arch("llama", True),  # convert_hf_to_gguf registers MistralForCausalLM as LlamaModel
    "qwen2": Arch("qwen2", False),
}
"""transformers ``model_type`` -> llama.cpp architecture. These share the LLaMA layout (RMSNorm,
rotary attention with grouped KV heads, SwiGLU MLP); others are refused rather than written wrong."""


def arch_for(config: Any) -> Arch:
    """The llama.cpp architecture of a transformers config.

    Raises:
        ValueError: the model type is not one deltatune writes as GGUF.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"GGUF export supports the LLaMA family ({', '.join(sorted(ARCHITECTURES))}); this model is "
            f"{model_type!r}. Export a transformers folder instead (deltatune export without --format gguf) and "
            "convert it with llama.cpp's convert_hf_to_gguf.py, which knows more architectures."
        )
    return ARCHITECTURES[model_type]


def gguf_tensor_name(hf_name: str, arch: Arch, n_layers: int) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` (also ``.bias``).

    Raises:
        ValueError: llama.cpp has no tensor of that name for this architecture.
    """
    import gguf

    arch_enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch.gguf_name)
    mapped = gguf.get_tensor_name_map(arch_enum, n_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise ValueError(f"{hf_name} has no llama.cpp counterpart in the {arch.gguf_name!r} architecture, so it "
                         "cannot be written to GGUF")
    return mapped


def permute_rows(weight: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: within each head, rows (h0, h1, ..., h_{d/2}, ...) become
    interleaved pairs. Works on any tensor whose first dimension is the output features: a weight
    ``(out, in)``, a bias ``(out,)`` or a LoRA B ``(out, r)``."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    out = weight.shape[0]
    return (weight.reshape(n_head, 2, out // n_head // 2, *weight.shape[1:])  # (heads, half, d/2, ...)
            .swapaxes(1, 2)  # (heads, d/2, half, ...): row 2i, 2i+1 = the pair rotated together
            .reshape(weight.shape))


def to_llama_cpp_layout(gguf_name: str, tensor: torch.Tensor, arch: Arch, config: Any) -> torch.Tensor:
    """``tensor`` (a weight, bias or LoRA B of ``gguf_name``) in llama.cpp's row order."""
    if not arch.permute_qk:
        return tensor
    heads = config.num_attention_heads
    if gguf_name.startswith("blk.") and ".attn_q." in gguf_name:
        return permute_rows(tensor, heads, heads)
    if gguf_name.startswith("blk.") and ".attn_k." in gguf_name:
        return permute_rows(tensor, heads, getattr(config, "num_key_value_heads", None) or heads)
    return tensor
