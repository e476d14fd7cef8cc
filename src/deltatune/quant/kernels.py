"""A ``torch.compile``-d 4-bit dequantize kernel (opt-in: ``QuantConfig(compile=True)``).

In eager mode a tile is rebuilt by three passes over memory (gather, scale, cast). Inductor fuses
unpacking the nibbles, the table lookup and the scaling into one loop, which on CPU roughly halves
the dequantize time (numbers in benchmarks/bench_quant.py). The values are identical: the same
float32 product ``level * absmax``. Compilation happens once per tile shape (~10 s on CPU the first
time, cached on disk by Inductor afterwards); it needs a C++ compiler on CPU and Triton on CUDA.
"""
from __future__ import annotations

import functools

import torch

from deltatune.quant.codebooks import _code_4bit_cpu
from deltatune.quant.nf4 import dequantize_range


def _dequant_tile(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Whole blocks only: ``packed`` (n/2,) uint8, ``absmax`` (n / blocksize,) -> (n,) float32."""
    hi = (packed >> 4).long()
    lo = (packed & 15).long()
    levels = torch.stack([code[hi], code[lo]], dim=-1).view(-1, blocksize)  # (n_blocks, blocksize)
    return (levels * absmax[:, None]).view(-1)


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(_dequant_tile, dynamic=False)


@functools.lru_cache(maxsize=8)
def _code(quant_type: str, device: torch.device) -> torch.Tensor:
    return _code_4bit_cpu(quant_type).to(device)


def compiled_dequant_rows(packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int,
                          in_features: int, dtype: torch.dtype):
    """Tile function ``rows(start, stop) -> (stop - start, in_features)`` using the compiled kernel.

    Args:
        packed: uint8 packed codes of the whole weight.
        absmax: float32 per-block absmax of the whole weight.
        quant_type: ``"nf4"`` or ``"fp4"``.
        blocksize: values per block.
        in_features: columns of the weight.
        dtype: dtype of the returned tiles.

    Returns:
        The tile function. A tile that ends inside a block (only possible for the last tile when
        ``out * in`` is not a multiple of ``blocksize``) falls back to the eager kernel.
    """
    kernel, code = _compiled(), _code(quant_type, packed.device)

    def rows(start: int, stop: int) -> torch.Tensor:
        a, b = start * in_features, stop * in_features
        if b % blocksize:
            w = dequantize_range(packed, absmax, quant_type, blocksize, a, b)
        else:
            w = kernel(packed[a // 2:b // 2], absmax[a // blocksize:b // blocksize], code, blocksize)
        return w.view(stop - start, in_features).to(dtype)

    return rows
