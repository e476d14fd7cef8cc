"""Merging a dense weight delta (e.g. LoRA's ``B @ A * scaling``) into a quantized layer.

A quantized base cannot hold ``W + ΔW`` exactly: merging means dequantize, add, requantize, which
rounds ``W + ΔW`` to the 4-bit grid again. :func:`merge_delta_into_4bit` does that and measures the
rounding it adds on the layer's outputs, so the caller can decide whether merging is acceptable
or the adapter should stay separate.
"""
from __future__ import annotations

import dataclasses

import torch

from deltatune.quant.linear import Linear4bit, Linear8bit


@dataclasses.dataclass(frozen=True)
class MergeReport:
    """Error added by requantizing after a merge, measured on a probe batch."""

    mean_abs_error: float
    """Mean |y_merged - y_exact| over the probe outputs, where y_exact uses the float weight
    ``dequant(W) + ΔW`` and y_merged the requantized one (bias excluded: it is unchanged)."""

    max_abs_error: float
    """Max of the same difference."""

    mean_abs_output: float
    """Mean |y_exact|, to read the errors relative to the output scale."""

    weight_max_abs_error: float
    """Max |W_merged - (dequant(W) + ΔW)| over the weight entries."""


@torch.no_grad()
def merge_delta_into_4bit(layer: Linear4bit | Linear8bit, delta: torch.Tensor,
                          probe: torch.Tensor | None = None) -> MergeReport:
    """``layer.W <- quantize(dequantize(layer.W) + delta)``, and report the rounding this adds.

    Args:
        layer: the quantized layer (Linear8bit works too), modified in place.
        delta: dense (out_features, in_features) weight delta, any float dtype.
        probe: (N, in_features) inputs to measure the output error on; default 64 standard-normal
            rows from a fixed seed.

    Returns:
        A :class:`MergeReport`.

    Raises:
        ValueError: if ``delta`` or ``probe`` has the wrong shape.
    """
    shape = (layer.out_features, layer.in_features)
    if tuple(delta.shape) != shape:
        raise ValueError(f"delta has shape {tuple(delta.shape)}, the layer's weight is {shape} (out, in)")
    exact = layer.dequantize_weight(torch.float32) + delta.to(layer.qweight.device, torch.float32)
    layer.requantize_(exact)
    merged = layer.dequantize_weight(torch.float32)
    if probe is None:
        gen = torch.Generator().manual_seed(0)
        probe = torch.randn(64, layer.in_features, generator=gen)
    if probe.dim() != 2 or probe.shape[1] != layer.in_features:
        raise ValueError(f"probe must have shape (N, {layer.in_features}), got {tuple(probe.shape)}")
    probe = probe.to(merged.device, torch.float32)
    y_exact, y_merged = probe @ exact.t(), probe @ merged.t()  # (N, out)
    err = (y_merged - y_exact).abs()
    return MergeReport(err.mean().item(), err.max().item(), y_exact.abs().mean().item(),
                       (merged - exact).abs().max().item())
