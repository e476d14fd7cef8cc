"""Lookup tables (codebooks) for 4-bit and 8-bit blockwise quantization.

A codebook maps a small integer code to a value in [-1, 1]; a block of weights is stored as
codes plus one scale (its absolute maximum). The tables here are bit-for-bit those of
bitsandbytes, so codes and constants produced by :mod:`deltatune.quant.nf4` compare equal to
``bitsandbytes.functional.quantize_4bit``.

* NF4 (NormalFloat4): the 16 quantiles of N(0, 1) from Dettmers et al., "QLoRA: Efficient
  Finetuning of Quantized LLMs" (2023), Appendix E, normalised to [-1, 1].
* FP4: a float with 1 sign, 2 exponent and 1 mantissa bit, in bit-pattern order, divided by its
  largest magnitude (12).
* The signed "dynamic" 8-bit map of Dettmers, "8-Bit Approximations for Parallelism in Deep
  Learning" (2015), used to quantize the per-block absmax constants (double quantization).
"""
from __future__ import annotations

import functools

import torch

# QLoRA, Appendix E. Sorted, so the code of a value is its rank among these levels.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# E2M1 values indexed by bit pattern (sign bit = 8); bitsandbytes' exponent bias is 2.
FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

QUANT_TYPES = ("nf4", "fp4")


@functools.lru_cache(maxsize=None)
def _code_4bit_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4_LEVELS, dtype=torch.float32)
    if quant_type == "fp4":
        raw = torch.tensor(FP4_RAW, dtype=torch.float32)
        return raw / raw.abs().max()  # fp32 division, as bitsandbytes does
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def code_4bit(quant_type: str) -> torch.Tensor:
    """The 16 levels of a 4-bit type, indexed by code.

    Args:
        quant_type: ``"nf4"`` or ``"fp4"``.

    Returns:
        A new float32 tensor of shape (16,) on the CPU.

    Raises:
        ValueError: if ``quant_type`` is not a known 4-bit type.
    """
    return _code_4bit_cpu(quant_type).clone()


@functools.lru_cache(maxsize=None)
def _bounds_4bit_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = _code_4bit_cpu(quant_type)
    # FP4 codes are not sorted by value, so rank in sorted order and map back through `order`.
    order = torch.argsort(code)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    return midpoints, order


def bounds_4bit(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rounding boundaries of a 4-bit type.

    A normalised value x gets code ``order[k]`` where k is the number of ``midpoints`` strictly
    below x (ties round to the lower level, as in bitsandbytes).

    Args:
        quant_type: ``"nf4"`` or ``"fp4"``.

    Returns:
        ``(midpoints (15,) float32, order (16,) int64)``, on the CPU.
    """
    midpoints, order = _bounds_4bit_cpu(quant_type)
    return midpoints.clone(), order.clone()


def byte_pairs_4bit(quant_type: str) -> torch.Tensor:
    """Both levels of every packed byte, as one int64 per byte.

    Byte ``b`` holds two codes, the high nibble first. Entry ``b`` of the result is the pair
    ``(code[b >> 4], code[b & 15])`` as two float32 values, reinterpreted as a single int64, so
    that dequantizing is one gather of 8-byte elements followed by a free ``view(float32)``; this
    is several times faster on CPU than gathering the two nibbles separately.

    Args:
        quant_type: ``"nf4"`` or ``"fp4"``.

    Returns:
        int64 tensor of shape (256,) on the CPU.
    """
    code = _code_4bit_cpu(quant_type)
    byte = torch.arange(256)
    pairs = torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous()  # (256, 2)
    return pairs.view(torch.int64).view(256)


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    # Dettmers (2015): each exponent 10^-(e) gets a linear grid of fractions; the number of
    # fraction bits shrinks as the exponent grows. Same float32 arithmetic as bitsandbytes.
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data += [0.0, 1.0]
    if len(data) != 2**total_bits:
        raise AssertionError(f"dynamic map has {len(data)} entries, expected {2**total_bits}")
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic map (256 sorted levels in [-0.993, 1]).

    Returns:
        A new float32 tensor of shape (256,) on the CPU.
    """
    return _dynamic_map_cpu().clone()


# bitsandbytes' CPU kernel rounds to the 8-bit map through a 65536-entry table indexed by a
# 16-bit fixed-point version of the normalised value, not by exact nearest level. Reproducing
# that table is what makes our nested absmax codes equal to bitsandbytes' on every input.
LUT_SIZE = 65536


@functools.lru_cache(maxsize=None)
def _dynamic_lut_cpu() -> torch.Tensor:
    code = _dynamic_map_cpu()
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / (LUT_SIZE - 1)
    # entry i = number of midpoints strictly below grid value i
    return torch.searchsorted(midpoints, grid, right=False).to(torch.uint8)


def dynamic_lut() -> torch.Tensor:
    """Table from a 16-bit grid index to the nearest dynamic-map code (uint8, (65536,), CPU)."""
    return _dynamic_lut_cpu().clone()
