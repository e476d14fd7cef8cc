"""The protocol every layer-level adapter implements, and the weight helpers it merges with.

An :class:`Adapter` is one adapter for one base layer. It never owns the base layer: the hosting
:class:`deltatune.surgery.layer.AdaptedLayer` passes it in, so the same adapter object can be moved,
saved or deleted without touching the base weights. Methods subclass it (:mod:`deltatune.methods`);
surgery only calls it.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.quant import quantized_linear_types


class Adapter(nn.Module):
    """One adapter attached to one base layer.

    Subclasses implement :meth:`forward`; mergeable ones also :meth:`delta_weight` (or override
    :meth:`merge`/:meth:`unmerge`). :attr:`peft_keys` is the explicit mapping from our parameter names
    to the suffix peft writes on disk, e.g. ``{"lora_A": "lora_A.weight"}``.
    """

    mergeable: ClassVar[bool] = True
    # True if forward(x, base_layer, None) computes the base output itself (a fused kernel).
    fuses_base: ClassVar[bool] = False
    peft_keys: dict[str, str]

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """Change the layer's input before the base layer runs (IA³ on feed-forward layers)."""
        return x

    def forward(self, x: torch.Tensor, base_layer: nn.Module, base_out: torch.Tensor | None) -> torch.Tensor:
        """Return the layer output with this adapter applied on top of ``base_out``."""
        raise NotImplementedError

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """The change to the base weight, as an (out, in) matrix, that merging adds."""
        raise NotImplementedError(f"{type(self).__name__} does not define delta_weight")

    @torch.no_grad()
    def merge(self, base_layer: nn.Module) -> None:
        set_dense_weight(base_layer, dense_weight(base_layer) + self.delta_weight(base_layer))

    @torch.no_grad()
    def unmerge(self, base_layer: nn.Module) -> None:
        set_dense_weight(base_layer, dense_weight(base_layer) - self.delta_weight(base_layer))

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under peft's on-disk suffixes."""
        return {disk: getattr(self, ours) for ours, disk in self.peft_keys.items() if getattr(self, ours, None) is not None}


def _stores_transposed(layer: nn.Module) -> bool:
    # Conv1D (GPT-2) stores (in, out); an Embedding, read as a linear map from one-hot ids, does too.
    return isinstance(layer, (Conv1D, nn.Embedding))


def dense_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The layer's weight as a dense (out, in) matrix: transposed for Conv1D/Embedding, dequantized for
    4-bit/8-bit layers (which implement ``dequantize_weight``)."""
    if hasattr(layer, "dequantize_weight"):
        w = layer.dequantize_weight()
    else:
        w = layer.weight.T if _stores_transposed(layer) else layer.weight
    return w if dtype is None else w.to(dtype)


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a layer as the linear map the math sees: nn.Linear and quantized linears (their
    ``out/in_features``), GPT-2's Conv1D (stored (in, out)), nn.Embedding (one-hot ids to vectors: (dim,
    vocab)), a convolution's (out, in) channels. Reads shapes only, so meta-device models work."""
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return int(layer.out_features), int(layer.in_features)
    if isinstance(layer, nn.Embedding):
        return int(layer.embedding_dim), int(layer.num_embeddings)
    if hasattr(layer, "in_channels") and hasattr(layer, "out_channels"):
        # A grouped convolution's weight is (out, in / groups, *kernel); its channels are the real sizes.
        return int(layer.out_channels), int(layer.in_channels)
    shape = layer.weight.shape
    return (int(shape[1]), int(shape[0])) if _stores_transposed(layer) else (int(shape[0]), int(shape[1]))


@torch.no_grad()
def adapter_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a new adapter on ``layer`` is created in: the layer's float weight dtype, or a quantized
    layer's compute dtype. (PeftModel then stores half-precision adapters in fp32: autocast_adapter_dtype.)"""
    w = getattr(layer, "weight", None)
    if w is not None and w.is_floating_point():
        return w.dtype
    return getattr(layer, "compute_dtype", torch.float32)


def set_dense_weight(layer: nn.Module, w: torch.Tensor) -> None:
    """Write an (out, in) matrix back into the layer's own storage layout (requantizing if needed)."""
    if hasattr(layer, "requantize_"):
        layer.requantize_(w)
        return
    target = layer.weight
    target.data.copy_((w.T if _stores_transposed(layer) else w).to(target.dtype))


def linear_layer_types() -> tuple[type, ...]:
    """Layers with an (out, in) weight that adapter methods wrap: nn.Linear, transformers' Conv1D and
    our quantized linears (their ``dense_weight`` dequantizes)."""
    return (nn.Linear, Conv1D, *quantized_linear_types())
