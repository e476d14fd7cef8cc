"""Whether a run uses bf16 autocast: ``train.bf16`` true, false, or ``auto`` (the device decides).

``auto`` turns bf16 on where the device multiplies bf16 matrices natively, so it is faster than
fp32: CUDA GPUs that support bf16, and CPUs with AVX512-BF16 or AMX (measured on a Zen 5 core:
``F.linear`` at SmolLM2's shapes runs ~4.5x faster in bf16). Elsewhere (e.g. AVX2-only CPUs, where
bf16 is converted in software and runs slower than fp32) it stays off. The CPU check is torch's own
(``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported``, the flags oneDNN dispatches on).
Adapters and optimizer state stay fp32 either way: autocast changes the matmuls, not the weights.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from deltatune.train.attention import register as register_attention


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


def inference_autocast(precision: Precision, device: str = "cpu") -> contextlib.AbstractContextManager:
    """The context accuracy scoring and evaluation run in: bf16 autocast when the run chose bf16 (the
    same matmuls as training, ~2x faster on this CPU), else nothing."""
    return torch.autocast(device, torch.bfloat16) if precision.bf16 else contextlib.nullcontext()


@contextlib.contextmanager
def training_attention(model: Any, precision: Precision, cuda: bool | None = None) -> Iterator[str | None]:
    """Train a transformers model with the attention kernel that is fastest for ``precision``; yields the
    implementation used while training (None: the model's own), restoring the model's afterwards.

    On a CPU under bf16 autocast, torch's fused SDPA kernel has a slow backward at training shapes
    (SmolLM2-135M, 8 x 110 tokens: 15 ms per layer, ~30% of the step), and eager attention (plain matmuls
    and softmax, which autocast runs in bf16) trains faster: measured 430 vs 326 tokens/s
    (benchmarks/bench_default_job.py). The eager arithmetic runs as ``deltatune_eager``
    (train/attention.py), which recomputes the probabilities in backward instead of saving them.
    Inference keeps SDPA, which is the faster one there. Elsewhere (fp32, CUDA) nothing changes.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    setter = getattr(model, "set_attn_implementation", None)
    if not precision.bf16 or cuda or current != "sdpa" or setter is None:
        yield None
        return
    name = register_attention()
    setter(name)
    try:
        yield name
    finally:
        setter(current)
