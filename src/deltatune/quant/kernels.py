"""A ``torch.compile``-d 4-bit dequantize kernel (opt-in: ``QuantConfig(compile=True)``).

In eager mode a tile is rebuilt by three passes over memory (index conversion, table gather,
scaling). Inductor fuses them into one loop over the packed bytes: each byte indexes a (256, 2)
table holding both of its levels, times the block's absmax. The values are identical to the eager
kernel (the same float32 product ``level * absmax``).

Measured on a 2-core AVX2 CPU (benchmarks/bench_quant.py) this is no faster than the eager
kernel, whose int64 "pair" gather is already a single pass; unpacking nibbles separately and
compiling that was 2x slower. It is kept for devices where fusing matters more (CUDA, via Triton).
Compilation happens once per tile shape (~10 s on CPU the first time, cached on disk by Inductor
afterwards) and needs a C++ compiler on CPU.
"""
from __future__ import annotations

import functools

import torch

from deltatune.quant.codebooks import byte_pairs_4bit
from deltatune.quant.nf4 import QuantState, absmax_float, dequantize_range


def _dequant_tile(packed: torch.Tensor, absmax: torch.Tensor, pairs: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Whole blocks only: ``packed`` (n/2,) uint8, ``absmax`` (n / blocksize,), ``pairs`` (256, 2)
    float32 levels of each byte (high nibble first) -> (n,) float32."""
    levels = pairs[packed.long()].view(-1, blocksize)  # (n_blocks, blocksize)
    return (levels * absmax[:, None]).view(-1)


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(_dequant_tile, dynamic=False)


@functools.lru_cache(maxsize=8)
def byte_levels(quant_type: str, device: torch.device) -> torch.Tensor:
    """(256, 2) float32: the two levels coded by each byte value, high nibble first."""
    return byte_pairs_4bit(quant_type).view(torch.float32).view(256, 2).to(device)


def compiled_dequant_rows(state: QuantState, in_features: int, dtype: torch.dtype):
    """Tile function ``rows(start, stop) -> (stop - start, in_features)`` using the compiled kernel.

    Args:
        state: the quantized weight (out_features, in_features).
        in_features: columns of the weight.
        dtype: dtype of the returned tiles.

    Returns:
        The tile function. A tile that ends inside a block (only possible for the last tile when
        ``out * in`` is not a multiple of ``blocksize``) falls back to the eager kernel.
    """
    kernel, pairs, bs = _compiled(), byte_levels(state.quant_type, state.packed.device), state.blocksize

    def rows(start: int, stop: int) -> torch.Tensor:
        a, b = start * in_features, stop * in_features
        absmax = absmax_float(state, a // bs, -(-b // bs))
        if b % bs:
            w = dequantize_range(state.packed, absmax, state.quant_type, bs, a, b)
        else:
            w = kernel(state.packed[a // 2:b // 2], absmax, pairs, bs)
        return w.view(stop - start, in_features).to(dtype)

    return rows
