"""Tiled dequantize-and-multiply: ``x @ W.T`` without ever materialising the dense W.

The weight is rebuilt a tile of output rows at a time (about 2 MB of float32), multiplied, and
dropped, so a forward holds a tile or two instead of a full-precision copy of the layer. The
tile stays in the CPU's cache between being written and being read by the matmul, which is what
makes this faster than dequantizing the whole weight first (the approach of bitsandbytes on CPU).
On CPU the tiles of a call with many tiles or few input rows are shared out between single-threaded
workers (:mod:`.tilepool`; :func:`_pool_pays` says why not the others).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from deltatune.quant.tilepool import run_split

# Rows of W to rebuild at a time: about this many values (2 MB of float32).
TILE_VALUES = 1 << 19

# dequant_rows(start_row, stop_row) -> dense rows (stop_row - start_row, in_features)
DequantRows = Callable[[int, int], torch.Tensor]

# When the tiles go to the worker pool (:mod:`.tilepool`): with at least this many tiles, or at most
# this many input rows. See :func:`_pool_pays`.
POOL_MIN_TILES = 8
POOL_MAX_ROWS = 64


def _pool_pays(tiles: int, rows: int) -> bool:
    """Whether a call of ``tiles`` tiles on ``rows`` input rows should use the worker pool.

    The pool saves one fork/join of torch's threads per op per tile, which pays when there are many
    tiles or each tile's work is small (few rows: decoding). But while its workers run, the caller's
    OpenMP threads keep spinning for a while after the caller's last parallel op (libgomp's default
    wait policy) and hold cores, so a call of a few large tiles runs at about half speed. Measured on
    this project's 2-core CPU (2026-12-05), bf16, a parallel op before each call as in a model:
    512 -> 1408 on 1,024 rows (2 tiles) 8.3 ms with the pool, 4.2 ms without (dense: 3.5-3.9 ms), and
    the QLoRA training step of ``benchmarks/bench_qlora.py --bf16`` 1.56x LoRA's with the pool, 1.07-1.17x
    without; 4096 -> 4096 (32 tiles) on 1,024 rows 104 vs 133 ms, on 8 rows 15 vs 33 ms, in favour of the pool.
    """
    return tiles >= POOL_MIN_TILES or rows <= POOL_MAX_ROWS


def tile_rows(in_features: int, out_features: int, blocksize: int, tile_values: int = TILE_VALUES) -> int:
    """Rows per tile: close to ``tile_values / in_features`` and aligned to quantization blocks.

    A tile must start at a block (and byte) boundary of the flattened weight, so its row count is
    a multiple of ``blocksize / gcd(in_features, blocksize)``.

    Args:
        in_features: columns of W.
        out_features: rows of W.
        blocksize: quantization block size (1 for row-wise formats).
        tile_values: target number of values per tile.

    Returns:
        Rows per tile, at least the alignment and at most ``out_features`` (rounded up to it).
    """
    align = blocksize // math.gcd(in_features, blocksize)
    rows = max(align, (tile_values // max(in_features, 1)) // align * align)
    return min(rows, -(-out_features // align) * align)


def _ranges(out_features: int, rows: int) -> list[tuple[int, int]]:
    return [(start, min(start + rows, out_features)) for start in range(0, out_features, rows)]


def tiled_linear(x: torch.Tensor, dequant_rows: DequantRows, out_features: int, rows: int,
                 parallel: bool = True) -> torch.Tensor:
    """``x @ W.T`` with W rebuilt ``rows`` rows at a time.

    Args:
        x: (N, in_features) input, in the dtype of the tiles.
        dequant_rows: returns rows ``[start, stop)`` of W.
        out_features: rows of W.
        rows: rows per tile.
        parallel: may split the tiles across worker threads (see :mod:`.tilepool`).

    Returns:
        (N, out_features).
    """
    if rows >= out_features:
        return x @ dequant_rows(0, out_features).t()
    out = torch.empty(x.shape[0], out_features, dtype=x.dtype, device=x.device)  # (N, out)

    def run(ranges):
        for start, stop in ranges:
            torch.mm(x, dequant_rows(start, stop).t(), out=out[:, start:stop])  # (N, rows)

    ranges = _ranges(out_features, rows)
    run_split(run, ranges, x.device, parallel and _pool_pays(len(ranges), x.shape[0]))
    return out


def tiled_linear_grad_input(grad: torch.Tensor, dequant_rows: DequantRows, in_features: int, rows: int,
                            parallel: bool = True) -> torch.Tensor:
    """``grad @ W`` (the input gradient of ``x @ W.T``), W rebuilt ``rows`` rows at a time.

    Args:
        grad: (N, out_features) gradient of the output.
        dequant_rows: returns rows ``[start, stop)`` of W.
        in_features: columns of W.
        rows: rows per tile.
        parallel: may split the tiles across worker threads (see :mod:`.tilepool`).

    Returns:
        (N, in_features).
    """
    out_features = grad.shape[1]
    if rows >= out_features:
        return grad @ dequant_rows(0, out_features)

    def run(ranges):
        dx = torch.zeros(grad.shape[0], in_features, dtype=grad.dtype, device=grad.device)  # (N, in)
        for start, stop in ranges:
            dx.addmm_(grad[:, start:stop], dequant_rows(start, stop))  # (N, rows) @ (rows, in)
        return dx

    ranges = _ranges(out_features, rows)
    partial = run_split(run, ranges, grad.device, parallel and _pool_pays(len(ranges), grad.shape[0]))
    return partial[0] if len(partial) == 1 else torch.stack(partial).sum(0)


class QuantLinearFunction(torch.autograd.Function):
    """``y = (x W^T) * c`` for a frozen quantized W rebuilt tile by tile in both passes.

    ``c`` is an optional per-output-feature scale (row-wise formats such as int8 factor their
    scale out of W this way, so a tile is only a dtype conversion); without it ``c = 1``.

    Forward: ``y[:, t] = (x @ W_t^T) * c_t`` for each tile t of output rows (:func:`tiled_linear`).

    Backward: W is frozen, so only the input gets a gradient. From ``y = (x W^T) diag(c)``,
    ``dL/dx = (dL/dy · diag(c)) · W = Σ_t (dL/dy[:, t] * c_t) · W_t`` (sum over tiles of output
    rows), which :func:`tiled_linear_grad_input` computes by rebuilding each tile again. Nothing is
    saved for backward but a way to rebuild W from the quantized weight the layer stores anyway:
    no dense copy of W, no per-block constants, and not x, since ``dL/dW`` is never needed.
    """

    @staticmethod
    def forward(ctx, x, make_dequant_rows, out_features, rows, out_scale, parallel):
        ctx.make_dequant_rows, ctx.rows, ctx.in_features = make_dequant_rows, rows, x.shape[1]
        ctx.out_scale, ctx.parallel = out_scale, parallel
        y = tiled_linear(x, make_dequant_rows(), out_features, rows, parallel)
        return y if out_scale is None else y.mul_(out_scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dx = None
        if ctx.needs_input_grad[0]:
            grad = grad if ctx.out_scale is None else grad * ctx.out_scale
            dx = tiled_linear_grad_input(grad.contiguous(), ctx.make_dequant_rows(), ctx.in_features, ctx.rows,
                                         ctx.parallel)
        return dx, None, None, None, None, None


def quant_linear(x: torch.Tensor, make_dequant_rows: Callable[[], DequantRows], out_features: int, rows: int,
                 out_scale: torch.Tensor | None = None, parallel: bool = True) -> torch.Tensor:
    """Differentiable (w.r.t. ``x``) ``(x @ W.T) * out_scale``; see :class:`QuantLinearFunction`.

    Args:
        x: (N, in_features) input in the compute dtype.
        make_dequant_rows: called once per pass; returns the tile function (so per-call constants,
            such as dequantized absmax, are built once per pass and not kept between passes).
        out_features: rows of W.
        rows: rows per tile.
        out_scale: optional (out_features,) scale of the outputs, in the compute dtype.
        parallel: may split the tiles across worker threads (see :mod:`.tilepool`).

    Returns:
        (N, out_features).
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return QuantLinearFunction.apply(x, make_dequant_rows, out_features, rows, out_scale, parallel)
    y = tiled_linear(x, make_dequant_rows(), out_features, rows, parallel)
    return y if out_scale is None else y.mul_(out_scale)
