"""IA³ on nn.Conv1d, nn.Conv2d and nn.Conv3d, with peft's semantics and on-disk shape.

As in peft (``peft.tuners.ia3.layer._ConvNd``), the vector scales channels: the output channels,
``l ⊙ conv(x, W, b)``, or for a feed-forward module the input channels, ``conv(l ⊙ x, W, b)``. On disk
it is ``<module>.ia3_l`` shaped ``(1, n, 1, …)`` with one trailing 1 per spatial axis (n = out_channels,
or in_channels for a feed-forward module), exactly what peft writes for both cases.

Merging folds l into the kernel W (out, in / groups, *kernel): output scaling multiplies W's output
channels and the bias; input scaling multiplies W's input channels, which with ``groups > 1`` means
the input channel ``g·(in/groups) + j`` of group g is W[o, j] for the out/groups channels o of that group
(peft's ``_get_ia3_scaling_for_weight``).

peft 0.21 wraps only Conv2d and Conv3d with IA³; deltatune also wraps Conv1d with the same math, and
such an adapter loads in deltatune only (peft refuses the layer type).
"""
from __future__ import annotations

import torch
from torch import nn

from deltatune.surgery.adapter import Adapter

CONV_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The convolutions IA³ can wrap (transposed convolutions are not, as in peft)."""


# ---- functional core -------------------------------------------------------------------------------
def ia3_conv_scale(h: torch.Tensor, l: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """l ⊙ h along the channel axis of h (B, n, *spatial) or unbatched (n, *spatial), for l (n,).

    Computed in l's dtype and returned in h's. The vector is shaped (n, 1, …) so broadcasting also
    leaves an unbatched input unbatched (peft's (1, n, 1, …) would add a batch axis).
    """
    return (h.to(l.dtype) * l.reshape(-1, *(1,) * spatial_dims)).to(h.dtype)  # (B, n, *spatial)


def ia3_conv_weight_factor(l: torch.Tensor, feedforward: bool, groups: int, out_channels: int, kernel_dims: int) -> torch.Tensor:
    """The factor that merging multiplies a kernel W (out, in / groups, *kernel) by, broadcastable to W.

    Output scaling: l (out,) over W's first axis. Input scaling: l (in,) over W's second axis; with
    groups > 1 output channel o belongs to group g = o // (out / groups) and sees only that group's
    slice l[g·(in/groups) : (g+1)·(in/groups)], so the factor is expanded to (out, in / groups) as peft does.
    """
    ones = (1,) * kernel_dims
    if not feedforward:
        return l.reshape(-1, 1, *ones)  # (out, 1, 1, …)
    if groups == 1:
        return l.reshape(1, -1, *ones)  # (1, in, 1, …)
    per_group = l.reshape(groups, 1, -1)  # (groups, 1, in/g)
    full = per_group.expand(groups, out_channels // groups, per_group.shape[-1])  # (groups, out/g, in/g)
    return full.reshape(out_channels, -1, *ones)  # (out, in/g, 1, …)


# ---- module ----------------------------------------------------------------------------------------
class IA3Conv(Adapter):
    """One IA³ vector on one nn.Conv1d/2d/3d: scales its output channels, or its input channels when ``feedforward``."""

    peft_keys = {"ia3_l": "ia3_l"}

    def __init__(self, base_layer: nn.Module, feedforward: bool, init_ones: bool = True, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.feedforward = feedforward
        self.groups = base_layer.groups
        self.out_channels = base_layer.out_channels
        self.spatial_dims = base_layer.weight.dim() - 2
        n = base_layer.in_channels if feedforward else base_layer.out_channels
        shape = (1, n, *(1,) * self.spatial_dims)  # peft's on-disk shape, for both cases
        self.ia3_l = nn.Parameter((torch.ones(shape) if init_ones else 1 + 0.5 * torch.randn(shape)).to(dtype))
        # The kernel and bias as they were before a merge whose l has zeros, which division cannot restore.
        self._saved: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @property
    def vector(self) -> torch.Tensor:
        """The learned scaling vector l, flattened: ``(out_channels,)``, or ``(in_channels,)`` for a feed-forward layer."""
        return self.ia3_l.flatten()  # (n,)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return ia3_conv_scale(x, self.vector, self.spatial_dims) if self.feedforward else x

    def forward(self, x: torch.Tensor, base_layer: nn.Module, base_out: torch.Tensor | None) -> torch.Tensor:
        if base_out is None:
            base_out = base_layer(self.transform_input(x))
        return base_out if self.feedforward else ia3_conv_scale(base_out, self.vector, self.spatial_dims)

    def _factor(self) -> torch.Tensor:
        return ia3_conv_weight_factor(self.vector.float(), self.feedforward, self.groups, self.out_channels, self.spatial_dims)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """What merging adds to the kernel, in its shape (out, in / groups, *kernel): W·(l - 1) per channel (the bias is scaled too)."""
        W = base_layer.weight.float()
        return W * self._factor() - W

    @torch.no_grad()
    def merge(self, base_layer: nn.Module) -> None:
        """Fold l into the kernel (and, for output scaling, the bias); a copy is kept if l has zeros, so :meth:`unmerge` is exact."""
        W, bias = base_layer.weight, base_layer.bias
        scales_bias = not self.feedforward and bias is not None
        if (self.vector == 0).any():
            self._saved = (W.detach().clone(), bias.detach().clone() if scales_bias else None)
        W.copy_((W.float() * self._factor()).to(W.dtype))
        if scales_bias:
            bias.copy_((bias.float() * self.vector.float()).to(bias.dtype))

    @torch.no_grad()
    def unmerge(self, base_layer: nn.Module) -> None:
        """Divide what :meth:`merge` multiplied back out (or restore the copy it kept when l had zeros)."""
        W, bias = base_layer.weight, base_layer.bias
        scales_bias = not self.feedforward and bias is not None
        if self._saved is not None:
            saved_w, saved_b = self._saved
            W.copy_(saved_w)
            if saved_b is not None:
                bias.copy_(saved_b)
            self._saved = None
            return
        W.copy_((W.float() / self._factor()).to(W.dtype))
        if scales_bias:
            bias.copy_((bias.float() / self.vector.float()).to(bias.dtype))
