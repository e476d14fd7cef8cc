"""Whether a run uses bf16 autocast: ``train.bf16`` true, false, or ``auto`` (the device decides).

``auto`` turns bf16 on where the device multiplies bf16 matrices natively, so it is faster than
fp32: CUDA GPUs that support bf16, and CPUs with AVX512-BF16 or AMX (measured on a Zen 5 core:
``F.linear`` at SmolLM2's shapes runs ~4.5x faster in bf16). Elsewhere (e.g. AVX2-only CPUs, where
bf16 is converted in software and runs slower than fp32) it stays off. The CPU check is torch's own
(``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported``, the flags oneDNN dispatches on).
Adapters and optimizer state stay fp32 either way: autocast changes the matmuls, not the weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    """The choice and the reason printed with it."""

    bf16: bool
    reason: str

    def __str__(self) -> str:
        return f"bf16 autocast: {'on' if self.bf16 else 'off'} ({self.reason})"


def _cpu_bf16_feature() -> str | None:
    """'amx_bf16' or 'avx512_bf16' if this CPU multiplies bf16 natively, else None."""
    cpu = getattr(torch, "cpu", None)
    try:
        if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
            return "amx_bf16"
        if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
            return "avx512_bf16"
    except RuntimeError:  # a build without the CPU feature queries: no claim either way, so off
        return None
    return None


def choose_precision(setting: bool | str, cuda: bool | None = None) -> Precision:
    """What ``train.bf16`` means on this machine (see the module docstring)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if setting != "auto":
        return Precision(bool(setting), "set by train.bf16")
    if cuda:
        if torch.cuda.is_bf16_supported():
            return Precision(True, "CUDA with bf16")
        return Precision(False, "this GPU has no bf16")
    feature = _cpu_bf16_feature()
    if feature is not None:
        return Precision(True, f"CPU {feature}")
    return Precision(False, "CPU without AVX512-BF16 or AMX: bf16 would be slower than fp32; set train.bf16=true to force")
