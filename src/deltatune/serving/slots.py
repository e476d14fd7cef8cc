"""What one adapter contributes to one layer, in the bank's terms (see :mod:`deltatune.serving.kernels`).

Adapters are recognised by type (:class:`LoraLinear`, :class:`LoraEmbedding`, :class:`IA3Scale`),
never by parameter names. Each becomes a :class:`SlotWeights`: LoRA factors, a scaling, and optional
per-feature input scale, output scale and output shift.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltatune.methods.base import Adapter, dense_weight, layer_dims
from deltatune.methods.ia3 import IA3Scale
from deltatune.methods.lora import LoraEmbedding, LoraLinear, dora_weight_norm

SERVABLE = "LoRA, rsLoRA, DoRA (on Linear/Conv1D/4-bit layers), LoRA on embeddings, and IA³"


@dataclass
class SlotWeights:
    """One adapter at one layer: ``y = (base(x ⊙ in_scale) + scaling · x Aᵀ Bᵀ) ⊙ out_scale + out_shift``.

    Every field but the shape may be None, meaning "not used" (zero factors, unit scales, no shift).
    """

    out_features: int
    """Output size of the layer (embedding dimension for an embedding)."""
    in_features: int
    """Input size of the layer (vocabulary size for an embedding)."""
    embedding: bool = False
    """True when the layer is an ``nn.Embedding`` (its input is token ids)."""
    A: torch.Tensor | None = None
    """(r, in) LoRA down-projection."""
    B: torch.Tensor | None = None
    """(out, r) LoRA up-projection, without the scaling."""
    scaling: float = 0.0
    """alpha / r (or alpha / sqrt(r) for rsLoRA)."""
    in_scale: torch.Tensor | None = None
    """(in,) per-feature input scale (IA³ on feed-forward layers)."""
    out_scale: torch.Tensor | None = None
    """(out,) per-feature output scale (IA³ vector, or DoRA's m / ‖W + s B A‖_row)."""
    out_shift: torch.Tensor | None = None
    """(out,) added after the scale (DoRA with a bias: b ⊙ (1 - out_scale), so the bias is not scaled)."""

    @property
    def rank(self) -> int:
        return 0 if self.A is None else self.A.shape[0]


@torch.no_grad()
def slot_weights(adapter: Adapter, base_layer: nn.Module, where: str = "") -> SlotWeights:
    """Convert one trained adapter into bank form. The base layer is read (DoRA's norm), never changed.

    Raises:
        ValueError: the adapter's type cannot be served in a mixed batch.
    """
    out_f, in_f = layer_dims(base_layer)
    if isinstance(adapter, LoraLinear):
        A, B = adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone()
        slot = SlotWeights(out_f, in_f, A=A, B=B, scaling=float(adapter.scaling))
        if adapter.lora_B_bias is not None:  # peft's lora_bias: s·b on every row (never with DoRA)
            slot.out_shift = adapter.lora_B_bias.detach().to(A.dtype) * adapter.scaling
        if adapter.use_dora:
            W = dense_weight(base_layer, A.dtype)
            norm = dora_weight_norm(W, A, B, adapter.scaling).to(A.dtype)  # (out,), frozen at inference
            scale = adapter.lora_magnitude_vector.detach().to(A.dtype) / norm
            slot.out_scale = scale
            bias = getattr(base_layer, "bias", None)
            if isinstance(bias, torch.Tensor):
                slot.out_shift = bias.detach().to(A.dtype) * (1 - scale)  # DoRA scales W x, not the bias
        return slot
    if isinstance(adapter, LoraEmbedding):
        A, B = adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone()
        return SlotWeights(out_f, in_f, embedding=True, A=A, B=B, scaling=float(adapter.scaling))
    if isinstance(adapter, IA3Scale):
        vector = adapter.vector.detach().clone()
        if adapter.feedforward:
            return SlotWeights(out_f, in_f, in_scale=vector)
        return SlotWeights(out_f, in_f, out_scale=vector)  # scales W x + b, bias included
    raise ValueError(
        f"{where or 'a layer'}: a {type(adapter).__name__} adapter cannot be served in a mixed-adapter batch; "
        f"supported are {SERVABLE}. Serve this adapter alone (set_adapter) instead."
    )
