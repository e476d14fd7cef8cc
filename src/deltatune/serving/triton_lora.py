"""An opt-in Triton path for mixed-adapter LoRA on CUDA: y_i += (x_i A_iᵀ) B̃_i for every row i, in two launches.

The same contract as :func:`deltatune.serving.kernels.mixed_lora_` (which stays the path on CPU,
under autograd, and wherever Triton is missing): y (b, L, out), x (b, L, in), each row's A (b, r, in)
and scaled Bᵀ (b, r, out), any strides. As in Punica's SGMV (Chen et al., 2023, arXiv:2310.18547),
the work is split into a *shrink* (h = x Aᵀ, r wide, written once in fp32) and an *expand*
(y += h B̃, tiled over out), so each launch has enough programs to fill the GPU; the expand adds into
y where it is read, instead of writing a separate product that a later kernel adds.

fp32 products run with ``input_precision="ieee"`` (no TF32), so fp32 outputs match the bmm path to
fp32 rounding; bf16/fp16 inputs multiply in their dtype and accumulate in fp32.

Off by default: measured on an H100 (``benchmarks/bench_triton_lora.py``, r = 16), cuBLAS's batched
GEMMs behind the torch path were faster in 7 of 8 shapes (Triton/torch 0.91x-3.6x; the one win is
bf16 4096 -> 11008), and in a whole small-model forward the two extra launches per layer cost more
than they save. ``DELTATUNE_TRITON=1`` (or ``triton_lora.ENABLED = True``) turns it on.

Importing this module never fails: :data:`AVAILABLE` says whether Triton is installed.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

try:  # optional: Triton comes with CUDA builds of PyTorch, not with the CPU wheel
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

AVAILABLE = triton is not None
ENABLED = AVAILABLE and os.environ.get("DELTATUNE_TRITON", "0") == "1"

if triton is not None:

    @triton.jit
    def _shrink(
        x_ptr, a_ptr, h_ptr, L, K, R,
        sxb, sxl, sxk, sab, sar, sak, shb, shl,
        BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, IEEE: tl.constexpr,
    ):
        b, lb = tl.program_id(0), tl.program_id(1)
        ls = lb * BLOCK_L + tl.arange(0, BLOCK_L)
        rs = tl.arange(0, R_PAD)
        acc = tl.zeros((BLOCK_L, R_PAD), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + b * sxb + ls[:, None] * sxl + ks[None, :] * sxk,
                        mask=(ls[:, None] < L) & (ks[None, :] < K), other=0.0)
            a = tl.load(a_ptr + b * sab + rs[None, :] * sar + ks[:, None] * sak,
                        mask=(rs[None, :] < R) & (ks[:, None] < K), other=0.0)  # Aᵀ tile (BLOCK_K, R_PAD)
            if IEEE:
                acc += tl.dot(x, a.to(x.dtype), input_precision="ieee")
            else:
                acc += tl.dot(x, a.to(x.dtype))
        tl.store(h_ptr + b * shb + ls[:, None] * shl + rs[None, :], acc, mask=ls[:, None] < L)

    @triton.jit
    def _expand(
        h_ptr, bt_ptr, y_ptr, L, N, R,
        shb, shl, sbb, sbr, sbn, syb, syl, syn,
        BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, IEEE: tl.constexpr,
    ):
        b, lb, nb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        ls = lb * BLOCK_L + tl.arange(0, BLOCK_L)
        ns = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        rs = tl.arange(0, R_PAD)
        h = tl.load(h_ptr + b * shb + ls[:, None] * shl + rs[None, :], mask=ls[:, None] < L, other=0.0)
        bt = tl.load(bt_ptr + b * sbb + rs[:, None] * sbr + ns[None, :] * sbn,
                     mask=(rs[:, None] < R) & (ns[None, :] < N), other=0.0)
        y_ptrs = y_ptr + b * syb + ls[:, None] * syl + ns[None, :] * syn
        mask = (ls[:, None] < L) & (ns[None, :] < N)
        y = tl.load(y_ptrs, mask=mask, other=0.0)
        if IEEE:
            upd = tl.dot(h, bt.to(tl.float32), input_precision="ieee")
        else:  # half-precision factors: multiply in their dtype, accumulate in fp32
            upd = tl.dot(h.to(bt.dtype), bt)
        tl.store(y_ptrs, (y.to(tl.float32) + upd).to(y.dtype), mask=mask)


@contextlib.contextmanager
def switched(on: bool) -> Iterator[None]:
    """Within the block, the Triton path is on (when Triton is installed) or off, whatever ENABLED was."""
    global ENABLED
    was, ENABLED = ENABLED, on and AVAILABLE
    try:
        yield
    finally:
        ENABLED = was


def usable(y: torch.Tensor, x: torch.Tensor, A_rows: torch.Tensor, Bt_rows: torch.Tensor) -> bool:
    """Whether :func:`mixed_lora_triton_` takes this call (switched on, CUDA, one float dtype, no autograd)."""
    return (
        ENABLED
        and y.is_cuda
        and y.dtype == x.dtype == A_rows.dtype == Bt_rows.dtype
        and y.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and not (torch.is_grad_enabled() and (y.requires_grad or x.requires_grad))
    )


def mixed_lora_triton_(
    y: torch.Tensor, x: torch.Tensor, A_rows: torch.Tensor, Bt_rows: torch.Tensor, block_l: int | None = None
) -> torch.Tensor:
    """y_i += (x_i A_iᵀ) Bt_i in place; shapes as in :func:`deltatune.serving.kernels.mixed_lora_`."""
    b, L, K = x.shape
    R, N = Bt_rows.shape[1], Bt_rows.shape[2]
    r_pad = max(16, triton.next_power_of_2(R))  # tl.dot needs every dimension >= 16
    block_l = block_l or (16 if L <= 16 else 64)
    ieee = y.dtype == torch.float32
    h = torch.empty(b, L, r_pad, device=y.device, dtype=torch.float32)
    _shrink[(b, triton.cdiv(L, block_l))](
        x, A_rows, h, L, K, R,
        x.stride(0), x.stride(1), x.stride(2), A_rows.stride(0), A_rows.stride(1), A_rows.stride(2),
        h.stride(0), h.stride(1),
        BLOCK_L=block_l, BLOCK_K=64, R_PAD=r_pad, IEEE=ieee,
    )
    block_n = 64
    _expand[(b, triton.cdiv(L, block_l), triton.cdiv(N, block_n))](
        h, Bt_rows, y, L, N, R,
        h.stride(0), h.stride(1), Bt_rows.stride(0), Bt_rows.stride(1), Bt_rows.stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        BLOCK_L=block_l, BLOCK_N=block_n, R_PAD=r_pad, IEEE=ieee,
    )
    return y
