"""Row-wise absmax int8 quantization of weight matrices (LLM.int8() weights, no outliers).

Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale" (2022),
Section 3.1: each output row is scaled by ``127 / max|row|`` and rounded to int8. The codes and
scales equal ``bitsandbytes.functional.int8_vectorwise_quant(w)`` (threshold 0).
"""
from __future__ import annotations

import dataclasses

import torch

# bitsandbytes multiplies by this float literal rather than dividing by 127
INV_127 = 7.874015718698502e-3


@dataclasses.dataclass(frozen=True, eq=False)
class Int8State:
    """An int8 row-wise quantized matrix.

    Attributes:
        codes: int8, shape (rows, cols).
        row_absmax: float32, shape (rows,); ``max |w[i, :]|`` (bitsandbytes' ``SCB``).
        dtype: dtype of the original matrix.
    """

    codes: torch.Tensor
    row_absmax: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        """Shape of the quantized matrix."""
        return self.codes.shape

    def nbytes(self) -> int:
        """Bytes taken by the stored tensors."""
        return self.codes.numel() + 4 * self.row_absmax.numel()

    def bits_per_param(self) -> float:
        """Storage cost in bits per quantized value (8 + 32 / cols)."""
        return 8.0 * self.nbytes() / self.codes.numel()


def quantize_int8(weight: torch.Tensor) -> Int8State:
    """Quantize a 2-D float matrix row-wise to int8: ``round(w * 127 / max|row|)``.

    Args:
        weight: float tensor of shape (rows, cols).

    Returns:
        The :class:`Int8State`. A row of zeros gets scale 0 and codes 0.

    Raises:
        ValueError: if ``weight`` is not a 2-D float tensor or has non-finite values.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"int8 quantization needs a 2-D float matrix, got {tuple(weight.shape)} {weight.dtype}")
    w = weight.detach().float()
    row_absmax = w.abs().amax(dim=1)  # (rows,)
    if not torch.isfinite(row_absmax).all():
        raise ValueError("cannot quantize a matrix with NaN or infinite values; check the weights for overflow")
    safe = torch.where(row_absmax == 0, torch.ones_like(row_absmax), row_absmax)
    codes = torch.round(w * (127.0 / safe)[:, None]).to(torch.int8)
    return Int8State(codes, row_absmax, weight.dtype)


def dequantize_int8(state: Int8State, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes * row_absmax / 127`` (computed in float32, then cast to ``dtype``)."""
    return (state.codes * state.row_absmax[:, None] * INV_127).to(dtype)
