"""LoRA and DoRA on nn.Conv1d, nn.Conv2d and nn.Conv3d, with peft's semantics and on-disk keys.

As in peft (``peft.tuners.lora.layer._ConvNd``), A is a convolution with the base layer's kernel size,
stride and padding (no dilation, one group) from ``in_channels`` to ``r`` channels, and B a 1×…×1
convolution from ``r`` to ``out_channels`` with the base layer's groups:

    y = conv(x, W) + s · conv₁(conv_A(dropout(x))),   s = alpha / r (rsLoRA: alpha / sqrt(r)).

On disk: ``lora_A.weight`` (r, in, *kernel), ``lora_B.weight`` (out, r / groups, 1, …), and for DoRA
``lora_magnitude_vector`` (1, out, 1, …), the shape peft gives it. DoRA's norm is the per-output-channel
norm of W + s·ΔW over every other axis, detached in backward (Liu et al., 2024, section 4.3).

Merging (W += s·ΔW, ΔW = B·A reshaped to the kernel) is defined for groups == 1 only, as in peft.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.methods.lora_init import init_factors
from deltatune.surgery.adapter import Adapter, adapter_dtype

CONV_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The convolution layers LoRA/DoRA can wrap (transposed convolutions are not, as in peft)."""

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoraConv(Adapter):
    """LoRA/rsLoRA/DoRA on an nn.Conv1d/2d/3d: A a convolution like the base's, B a 1×…×1 convolution."""

    peft_keys = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude_vector": "lora_magnitude_vector"}

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, use_rslora: bool, use_dora: bool) -> None:
        super().__init__()
        groups = base_layer.groups
        if r % groups != 0:
            raise ValueError(
                f"Targeting a {type(base_layer).__name__} with groups={groups} and rank {r}: the rank must be "
                "divisible by groups (as in peft). Choose another rank (rank_pattern) or do not target this layer"
            )
        nd = base_layer.weight.dim() - 2
        dtype = adapter_dtype(base_layer)
        self.r, self.lora_alpha, self.use_dora, self.groups = r, alpha, use_dora, groups
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout_p = dropout
        self._conv = _CONV_FN[nd]
        self._ones = (1,) * nd
        out_c, in_c = base_layer.out_channels, base_layer.in_channels
        self.lora_A = nn.Parameter(torch.zeros(r, in_c, *base_layer.kernel_size, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_c, r // groups, *self._ones, dtype=dtype))
        self.lora_magnitude_vector = nn.Parameter(torch.ones(1, out_c, *self._ones, dtype=dtype)) if use_dora else None
        self._merge_factor: torch.Tensor | None = None

    def init_magnitude(self, base_layer: nn.Module) -> None:
        """DoRA starts with m = ‖W + s ΔW‖ per output channel, so the wrapped layer initially equals the base."""
        if self.use_dora:
            with torch.no_grad():
                W = base_layer.weight
                self.lora_magnitude_vector.copy_(self._norm(W, self._lora_weight(W).to(W.device)).to(self.lora_magnitude_vector.dtype))

    def _lora_weight(self, W: torch.Tensor) -> torch.Tensor:
        # B·A reshaped to the base kernel: ΔW/s for groups == 1; for groups > 1 this is peft's reading too (its norm).
        return (self.lora_B.reshape(-1, self.r) @ self.lora_A.reshape(self.r, -1)).reshape(W.shape)

    def _norm(self, W: torch.Tensor, lora_weight: torch.Tensor) -> torch.Tensor:
        """‖W + s·lora_weight‖ over all but the output-channel axis, shaped (1, out, 1, …) like the magnitude."""
        w = W.detach().to(lora_weight.dtype) + self.scaling * lora_weight.detach()
        return torch.linalg.vector_norm(w, dim=tuple(range(1, w.dim())), keepdim=True).transpose(0, 1)

    def _lora_branch(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        after_a = self._conv(x, self.lora_A, None, base.stride, base.padding)
        return self._conv(after_a, self.lora_B, None, 1, 0, 1, self.groups) * self.scaling

    def forward(self, x: torch.Tensor, base_layer: nn.Module, base_out: torch.Tensor | None) -> torch.Tensor:
        """base_out + s·B(A(dropout(x))); DoRA: rescaled per output channel by m / ‖W + s ΔW‖."""
        if base_out is None:
            base_out = base_layer(x)
        dropping = self.training and self.dropout_p > 0
        xd = F.dropout(x, self.dropout_p, self.training).to(self.lora_A.dtype)
        lora = self._lora_branch(xd, base_layer)
        if not self.use_dora:
            return base_out + lora.to(base_out.dtype)
        W = base_layer.weight.to(self.lora_A.dtype)
        scale = self.lora_magnitude_vector / self._norm(W, self._lora_weight(W))  # (1, out, 1, ...)
        if dropping:  # the base term sees the same dropped input as the LoRA term (peft)
            base_part = self._conv(xd, W, None, base_layer.stride, base_layer.padding, base_layer.dilation, base_layer.groups)
        else:
            bias = base_layer.bias
            base_part = base_out if bias is None else base_out - bias.view(1, -1, *(1,) * (base_out.dim() - 2))
        return base_out + ((scale - 1) * base_part + scale * lora).to(base_out.dtype)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """s·ΔW in the base kernel's shape (out, in, *kernel), not an (out, in) matrix.

        Raises:
            NotImplementedError: the base has groups > 1 (peft does not merge those either).
        """
        if self.groups > 1:
            raise NotImplementedError(
                "merging LoRA into a convolution with groups > 1 is not supported (nor by peft); keep the adapter unmerged"
            )
        return self.scaling * self._lora_weight(base_layer.weight)

    @torch.no_grad()
    def merge(self, base_layer: nn.Module) -> None:
        """W ← W + s·ΔW; DoRA: W ← m/‖W + s·ΔW‖ · (W + s·ΔW) per output channel."""
        W = base_layer.weight
        delta = self.delta_weight(base_layer).to(torch.float32)
        new = W.float() + delta
        if self.use_dora:
            factor = (self.lora_magnitude_vector.float() / self._norm(W.float(), delta / self.scaling)).reshape(-1, *(1,) * (W.dim() - 1))
            self._merge_factor = factor  # unmerge divides by exactly what merge multiplied by
            new = factor * new
        W.copy_(new.to(W.dtype))

    @torch.no_grad()
    def unmerge(self, base_layer: nn.Module) -> None:
        """Undo :meth:`merge`."""
        W = base_layer.weight
        delta = self.delta_weight(base_layer).to(torch.float32)
        w = W.float()
        if self.use_dora:
            w = w / self._merge_factor
            self._merge_factor = None
        W.copy_((w - delta).to(W.dtype))


def make_lora_conv(config, base_layer: nn.Module, r: int, alpha: float) -> LoraConv:
    """Build and initialise a :class:`LoraConv` for ``base_layer`` from a ``LoraConfig``.

    Raises:
        ValueError: ``init_lora_weights`` is not True, False or "gaussian" (peft rejects the others on convs),
            or the rank is not divisible by the layer's groups.
    """
    how = config.init_lora_weights
    if not (how is True or how is False or how == "gaussian"):
        raise ValueError(
            f"init_lora_weights={how!r} is not supported on {type(base_layer).__name__} layers (as in peft); "
            "use True, False or 'gaussian' for convolutions, or exclude them from target_modules"
        )
    adapter = LoraConv(base_layer, r, alpha, config.lora_dropout, config.use_rslora, config.use_dora)
    init_factors(adapter, base_layer, how)
    adapter.init_magnitude(base_layer)
    return adapter
