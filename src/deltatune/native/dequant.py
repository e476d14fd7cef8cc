"""4-bit weights on the CPU, compiled (``csrc/dequant4.c``):

- :func:`dequantize_4bit` — a tile of ``Linear4bit``'s weight in one pass, the same bits as the torch path in
  :func:`deltatune.quant.nf4.dequantize_range`;
- :func:`linear_4bit` — x · Wᵀ for few rows of x (decoding), W decoded in registers and read once as its codes.

Why: the torch path is four passes per tile (widen the codes, gather both levels of each byte, scale by the
block's absmax, cast to the compute dtype), each a fork/join of torch's threads. That made a 4096 x 4096
``Linear4bit`` at 8 input rows cost 2x an fp32 ``nn.Linear`` once a parallel op ran before it (libgomp's
threads spin after one, against the tile pool's workers). At a few rows a dense layer is bound by reading its
weight, so reading 4-bit codes instead makes the 4-bit layer the faster one (0.34-0.44x at 1-8 rows).
Measurements: docs/benchmarks.md, "QLoRA".

How it starts: the first CPU forward of a ``Linear4bit`` builds the library
(:class:`deltatune.native.build.Library`); where it cannot run, or with ``DELTATUNE_CPU_KERNEL=0``, both
return None and the caller takes the torch path.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from deltatune.native.build import Library

SOURCE = Path(__file__).with_name("csrc") / "dequant4.c"
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _declare(lib: ctypes.CDLL) -> None:
    ptr, n = ctypes.c_void_p, ctypes.c_int64
    for suffix in _DTYPES.values():
        fn = getattr(lib, f"dt_dequant4_{suffix}")
        fn.argtypes, fn.restype = [ptr, ptr, ptr, n, n, ptr, ctypes.c_int], None
        fn = getattr(lib, f"dt_linear4_{suffix}")
        fn.argtypes, fn.restype = [ptr] * 6 + [ctypes.c_float] + [ptr] * 3 + [n] * 4 + [ctypes.c_int], None


LIBRARY = Library(SOURCE, _declare)
library, unavailable_reason, switched = LIBRARY.get, LIBRARY.unavailable_reason, LIBRARY.switched


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, start: int, stop: int,
                    blocksize: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Values ``[start, stop)`` of a packed 4-bit tensor as a flat ``dtype`` tensor; None where not applicable.

    Args:
        packed: the whole tensor's uint8 codes, two per byte, high nibble first.
        absmax: float32 absmax of the blocks from ``start // blocksize`` on.
        code: the 16 float32 levels.
        start: first value, a multiple of ``blocksize`` (so of 2).
        stop: one past the last value.
        blocksize: values per block.
        dtype: float32 or bfloat16 (rounded to nearest-even from the fp32 product).
    """
    if dtype not in _DTYPES or start % blocksize or packed.dtype != torch.uint8:
        return None
    n = stop - start
    tensors = (packed, absmax, code)
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in tensors) or code.numel() != 16:
        return None
    if absmax.dtype != torch.float32 or code.dtype != torch.float32 or absmax.numel() < -(-n // blocksize):
        return None
    lib = library()
    if lib is None:
        return None
    out = torch.empty(n, dtype=dtype)
    getattr(lib, f"dt_dequant4_{_DTYPES[dtype]}")(
        packed.data_ptr() + start // 2, absmax.data_ptr(), code.data_ptr(), n, blocksize, out.data_ptr(),
        torch.get_num_threads())
    return out


def linear_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, out_features: int,
                blocksize: int, nested: torch.Tensor | None = None, offset: float = 0.0,
                levels: torch.Tensor | None = None) -> torch.Tensor | None:
    """x · Wᵀ (no bias) for few rows of x, W's 4-bit codes decoded in registers and never stored; None where
    not applicable (then the caller runs the tiled path).

    Args:
        x: (N, in) fp32 or bf16, contiguous, ``in`` a multiple of 32; the result has its dtype.
        packed: W's uint8 codes, (out × in) values, two per byte, high nibble first.
        absmax: every block's absmax: float32, or with double quantization its uint8 codes, decoded in the
            kernel as ``levels[code] * nested[block // 256] + offset`` (the bits of
            :func:`deltatune.quant.nf4.absmax_float`).
        code: the 16 float32 levels.
        out_features: rows of W.
        blocksize: values per block (a power of two ≥ 32).
        nested, offset, levels: double quantization's float32 scale per 256 blocks, its offset and the 256
            float32 levels of the dynamic 8-bit map; only with uint8 ``absmax``.
    """
    n, n_in = x.shape
    if x.dtype not in _DTYPES or n_in % 32 or blocksize % 32 or packed.dtype != torch.uint8 or code.numel() != 16:
        return None
    double = absmax.dtype == torch.uint8
    extra = (nested, levels) if double else ()
    if double and (nested is None or levels is None or levels.numel() != 256 or nested.numel() * 256 < absmax.numel()):
        return None
    tensors = (x, packed, absmax, code, *extra)
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return None
    if any(t.dtype != torch.float32 for t in (code, *extra)) or not (double or absmax.dtype == torch.float32):
        return None
    if packed.numel() * 2 < out_features * n_in or absmax.numel() * blocksize < out_features * n_in:
        return None
    lib = library()
    if lib is None:
        return None
    y = torch.empty(n, out_features, dtype=x.dtype)
    scratch = torch.empty(n, n_in) if x.dtype == torch.bfloat16 else None  # x widened to fp32 once
    getattr(lib, f"dt_linear4_{_DTYPES[x.dtype]}")(
        x.data_ptr(), packed.data_ptr(), None if double else absmax.data_ptr(), absmax.data_ptr() if double else None,
        levels.data_ptr() if double else None, nested.data_ptr() if double else None, offset, code.data_ptr(),
        y.data_ptr(), None if scratch is None else scratch.data_ptr(), n, n_in, out_features, blocksize,
        torch.get_num_threads())
    return y
