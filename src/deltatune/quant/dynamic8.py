"""Blockwise 8-bit quantization with the dynamic map (used for QLoRA's double quantization).

Double quantization (Dettmers et al., "QLoRA", 2023, Section 3) stores the fp32 absmax of every
4-bit block as 8 bits: subtract their mean, then quantize them in blocks of 256 with the signed
dynamic 8-bit map, keeping one fp32 scale per 256 constants. These functions reproduce
bitsandbytes' ``quantize_blockwise`` / ``dequantize_blockwise`` on the CPU bit for bit.
"""
from __future__ import annotations

import torch

from deltatune.quant.codebooks import LUT_SIZE, _dynamic_lut_cpu, _dynamic_map_cpu


def quantize_dynamic8(values: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 1-D float tensor to 8-bit dynamic-map codes, one absmax scale per block.

    Steps (as bitsandbytes' CPU kernel): per block, ``s = max|v|``; ``u = clamp(v * (1/s), -1, 1)``;
    the 16-bit grid index ``trunc((u + 1) * 0.5 * 65535 + 0.5)`` picks the code from a table of
    nearest levels. A block of zeros gets scale 0 and code 0.

    Args:
        values: float32 tensor, any shape (flattened in row-major order).
        blocksize: values per block; the last block may be partial.

    Returns:
        ``(codes uint8 with values' shape, scales float32 of shape (ceil(n / blocksize),))``.
    """
    flat = values.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    scales = padded.abs().amax(dim=1)  # (n_blocks,)
    # a zero block would give 0 * inf = NaN; its codes are forced to 0 below anyway
    inv = torch.where(scales == 0, torch.zeros_like(scales), 1.0 / scales)
    unit = (padded * inv[:, None]).clamp_(-1.0, 1.0)
    # Each step rounds to float32 separately (the kernel uses no fused multiply-add).
    grid = ((unit + 1.0) * 0.5) * float(LUT_SIZE - 1) + 0.5
    lut = _dynamic_lut_cpu().to(values.device)
    codes = lut[grid.to(torch.int32).long()]
    codes = torch.where(scales[:, None] == 0, torch.zeros_like(codes), codes)
    return codes.view(-1)[:n].view(values.shape), scales


def dequantize_dynamic8(codes: torch.Tensor, scales: torch.Tensor, blocksize: int = 256) -> torch.Tensor:
    """Inverse of :func:`quantize_dynamic8`: ``level[code] * scale[block]`` in float32.

    Args:
        codes: uint8 tensor, any shape (flattened in row-major order).
        scales: float32 tensor of shape (ceil(n / blocksize),).
        blocksize: values per block.

    Returns:
        float32 tensor with ``codes``' shape.
    """
    n = codes.numel()
    n_blocks = scales.numel()
    levels = _dynamic_map_cpu().to(codes.device)[codes.reshape(-1).long()]
    levels = torch.nn.functional.pad(levels, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    return (levels * scales.float()[:, None]).view(-1)[:n].view(codes.shape)
