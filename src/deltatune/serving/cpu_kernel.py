"""The compiled CPU paths of mixed-adapter serving: ``csrc/mixed_lora.c`` (fp32) and
``csrc/mixed_lora_bf16.c`` (bf16), each built on first use.

Why a C kernel: on the CPU the per-row low-rank update is two thin GEMMs, and the first of them
(x·Aᵀ, an output only r = 16 wide) is a shape for which MKL's ``bmm`` reaches about 60% of the
throughput it gets on the base layer's own GEMM. A hand-written AVX2/FMA tile (6 tokens × 16
columns) runs it at about base-GEMM throughput and adds each tile's update into y while those rows
are still in L1. With ``init`` it writes y = init + update without reading y, which lets
:mod:`deltatune.serving.routing` run the base GEMM afterwards, accumulating into that y. Measured
per layer (b = 32 rows × 128 tokens, r = 16, 2 threads): 512 -> 512 1.16 -> 0.97 ms, 1408 -> 512
2.70 -> 1.96 ms (``benchmarks/bench_cpu_kernel.py``; ``bench_serving.py`` has the model-level numbers).
The bf16 kernel does the same with AVX512-BF16's pairwise dot products (VDPBF16PS) on bf16 tensors,
for bf16 models, where the base GEMM runs ~2x faster than in fp32 and torch's bf16 ``bmm`` at r = 16
would weigh twice as much.

How it starts: the first CPU fp32 (bf16) request with adapter_names calls :func:`library`, which
builds the source through :class:`deltatune.native.build.Library` (the system C compiler; ``-O3 -mavx2 -mfma
-fopenmp``, plus ``-mavx512f -mavx512bw -mavx512vl -mavx512bf16`` for bf16; well under a second; cached
in ``$DELTATUNE_CACHE_DIR``, written atomically) and loads it with ctypes.

When it runs: CPU, fp32 or bf16, no autograd, and where :func:`deltatune.native.build.platform_problem`
finds nothing missing (x86-64 Linux, AVX2 or better, torch's threads on GNU OpenMP, whose ``libgomp``
the kernel shares); for bf16 also a CPU torch reports AVX512-BF16 on. Anything else, a failed build
included, takes the pure-torch path in :mod:`deltatune.serving.kernels`; :func:`unavailable_reason`
says why. ``DELTATUNE_CPU_KERNEL=0`` turns it off.
"""
from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from deltatune.native.build import BASE_FLAGS, Library

MAX_RANK = 256  # DT_MAX_R in the source: the per-tile h buffer lives on the stack


@dataclass(frozen=True)
class _Kernel:
    """One compiled variant: its exported symbols."""

    symbol: str  # the update, dt_mixed_lora's signature
    max_rank: str  # returns DT_MAX_R

    def declare(self, lib: ctypes.CDLL) -> str | None:
        entry = getattr(lib, self.symbol)
        entry.restype = ctypes.c_int
        entry.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 11 + [ctypes.c_void_p, ctypes.c_int]
        if getattr(lib, self.max_rank)() != MAX_RANK:
            return f"{self.symbol} and cpu_kernel.py disagree on the largest rank"
        return None


def _bf16_problem() -> str | None:
    try:
        native = torch.cpu._is_avx512_bf16_supported()
    except (AttributeError, RuntimeError):  # a torch without the query: no claim, so no kernel
        native = False
    return None if native else "bf16 needs a CPU with AVX512-BF16 (torch does not report it here)"


_CSRC = Path(__file__).with_name("csrc")
KERNELS = {
    torch.float32: _Kernel("dt_mixed_lora", "dt_max_rank"),
    torch.bfloat16: _Kernel("dt_mixed_lora_bf16", "dt_max_rank_bf16"),
}
# The fp32 kernel is written for AVX2/FMA, so it keeps those flags on AVX-512 CPUs too.
LIBRARIES = {
    torch.float32: Library(_CSRC / "mixed_lora.c", KERNELS[torch.float32].declare, flags=BASE_FLAGS),
    torch.bfloat16: Library(_CSRC / "mixed_lora_bf16.c", KERNELS[torch.bfloat16].declare,
                            flags=(*BASE_FLAGS, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"),
                            problem=_bf16_problem),
}


def library(dtype: torch.dtype = torch.float32) -> ctypes.CDLL | None:
    """The loaded kernel for ``dtype`` (fp32 or bf16), building it on the first call; None where it cannot
    run (or is switched off)."""
    return LIBRARIES[dtype].get() if dtype in LIBRARIES else None


def unavailable_reason(dtype: torch.dtype = torch.float32) -> str | None:
    """Why :func:`library` is None for ``dtype``, or None when the kernel is in use."""
    if dtype not in LIBRARIES:
        return f"no compiled kernel for {dtype}"
    return LIBRARIES[dtype].unavailable_reason()


@contextlib.contextmanager
def switched(on: bool) -> Iterator[None]:
    """Turn both kernels on or off within the block (benchmarks and tests compare the two paths)."""
    with contextlib.ExitStack() as stack:
        for lib in LIBRARIES.values():
            stack.enter_context(lib.switched(on))
        yield


def wants(t: torch.Tensor) -> bool:
    """Whether factors stored like ``t`` will be served by the kernel (so ranks get padded to 8)."""
    return t.device.type == "cpu" and library(t.dtype) is not None


def usable(y: torch.Tensor, x: torch.Tensor, A_rows: torch.Tensor, Bt_rows: torch.Tensor) -> bool:
    """Whether :func:`mixed_lora_cpu_` can take this call (else the caller runs the torch path)."""
    if not (y.device.type == x.device.type == A_rows.device.type == Bt_rows.device.type == "cpu"):
        return False
    if not (y.dtype == x.dtype == A_rows.dtype == Bt_rows.dtype) or library(y.dtype) is None:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (y, x, A_rows, Bt_rows)):
        return False  # in-place, and outside autograd
    b, L, n_in = x.shape
    r, n_out = Bt_rows.shape[1], y.shape[-1]
    rows_ok = (L == 1 or (x.stride(1) == n_in and y.stride(1) == n_out)) and x.stride(2) == y.stride(2) == 1
    return rows_ok and A_rows.stride(1) == 1 and Bt_rows.stride(2) == 1 and r % 8 == 0 and 0 < r <= MAX_RANK


def mixed_lora_cpu_(
    y: torch.Tensor, x: torch.Tensor, A_rows: torch.Tensor, Bt_rows: torch.Tensor, init: torch.Tensor | None = None
) -> torch.Tensor:
    """y_i += (x_i A_iᵀ) B̃_i in place; the shapes of :func:`deltatune.serving.kernels.mixed_lora_`.

    A_rows (b, r, in) must have unit stride along r (the bank's transposed storage), Bt_rows
    (b, r, out) unit stride along out; :func:`usable` checks all of it. With ``init`` (out,), a
    contiguous vector in y's dtype, y is overwritten instead, never read: y_i = init + (x_i A_iᵀ) B̃_i.
    Every tensor is fp32, or every one bf16 (then each product is rounded to bf16, as torch's bmm does).
    """
    b, L, n_in = x.shape
    r, n_out = Bt_rows.shape[1], y.shape[-1]
    if init is not None and not (init.shape == (n_out,) and init.is_contiguous() and init.dtype == y.dtype):
        raise ValueError(f"init must be a contiguous {y.dtype} vector of {n_out}, got {tuple(init.shape)} {init.dtype}")
    kernel = KERNELS[y.dtype]
    rc = getattr(library(y.dtype), kernel.symbol)(
        y.data_ptr(), x.data_ptr(), A_rows.data_ptr(), Bt_rows.data_ptr(),
        b, L, n_in, n_out, r, x.stride(0), y.stride(0), A_rows.stride(0), A_rows.stride(2),
        Bt_rows.stride(0), Bt_rows.stride(1), None if init is None else init.data_ptr(), torch.get_num_threads(),
    )
    if rc != 0:
        raise RuntimeError(f"{kernel.symbol} refused r={r} (needs a multiple of 8 up to {MAX_RANK})")
    return y
