"""Blockwise 4-bit quantization (NF4 and FP4) with optional double quantization.

Implements the storage format of Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs"
(2023), and reproduces bitsandbytes' ``quantize_4bit`` / ``dequantize_4bit`` exactly:

1. Flatten the tensor in row-major order and cut it into blocks of ``blocksize`` values (the last
   block may be partial).
2. Per block, ``absmax = max |w|``; normalise ``u = clamp(w * (1 / absmax), -1, 1)``.
3. Round ``u`` to the nearest of the 16 levels (ties to the lower level); store the level's
   4-bit code, two codes per byte, the element with the even index in the high nibble.
4. Double quantization (QLoRA Section 3): subtract the mean of the absmax constants, then quantize
   them to 8 bits in blocks of 256 with the dynamic map (:mod:`deltatune.quant.dynamic8`).

Dequantization is ``level[code] * absmax[block]`` in float32.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from deltatune.quant.codebooks import QUANT_TYPES, _bounds_4bit_cpu, byte_pairs_4bit
from deltatune.quant.dynamic8 import dequantize_dynamic8, quantize_dynamic8
from deltatune.quant.tilepool import run_single_threaded, run_split

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
# Rounding boundaries as Python floats (exact float32 values), so no device sync is needed.
_MIDPOINTS = {q: _bounds_4bit_cpu(q)[0].tolist() for q in QUANT_TYPES}
# Quantize this many values at a time so temporaries stay a few MB whatever the tensor size.
_CHUNK = 1 << 18


@dataclasses.dataclass(frozen=True, eq=False)
class QuantState:
    """A 4-bit quantized tensor: packed codes plus what is needed to undo the quantization.

    Attributes:
        packed: uint8, shape (ceil(numel / 2),); two codes per byte, even element in the high nibble.
        absmax: per-block scales, shape (n_blocks,): float32, or uint8 dynamic-map codes of
            ``absmax - nested_offset`` when double-quantized.
        shape: shape of the original tensor.
        dtype: dtype of the original tensor (the default dtype to dequantize to).
        quant_type: ``"nf4"`` or ``"fp4"``.
        blocksize: values per block.
        nested_absmax: float32 (ceil(n_blocks / 256),), the scale of each block of 256 absmax
            codes; None without double quantization (bitsandbytes' ``state2.absmax``).
        nested_offset: float32 0-dim tensor, the mean subtracted from absmax before quantizing it;
            None without double quantization (bitsandbytes' ``offset``).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    quant_type: str
    blocksize: int
    nested_absmax: torch.Tensor | None = None
    nested_offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        """Whether the absmax constants are themselves quantized."""
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        """Number of quantized values."""
        return self.shape.numel()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (what counts towards memory and goes to disk)."""
        out = {"packed": self.packed, "absmax": self.absmax}
        if self.double_quant:
            out["nested_absmax"] = self.nested_absmax
            out["nested_offset"] = self.nested_offset
        return out

    def nbytes(self) -> int:
        """Bytes taken by the stored tensors (codebooks are constants and not counted)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bits_per_param(self) -> float:
        """Storage cost in bits per quantized value (about 4.127 for NF4, block 64, double quant)."""
        return 8.0 * self.nbytes() / self.numel

    def to(self, device: torch.device | str) -> "QuantState":
        """A copy with every tensor on ``device`` (dtypes unchanged)."""
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return dataclasses.replace(
            self, packed=moved["packed"], absmax=moved["absmax"],
            nested_absmax=moved.get("nested_absmax"), nested_offset=moved.get("nested_offset"),
        )


def check_blocksize(blocksize: int) -> None:
    """Raise a ValueError unless ``blocksize`` is one bitsandbytes supports."""
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES} (as in bitsandbytes), got {blocksize!r}")


def check_quant_type(quant_type: str) -> None:
    """Raise a ValueError unless ``quant_type`` is a known 4-bit type."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


@functools.lru_cache(maxsize=32)
def _table(name: str, quant_type: str, device: torch.device):
    # Codebooks are built on the CPU once, so codes are identical on every device.
    if name == "order":
        return _bounds_4bit_cpu(quant_type)[1].to(device)
    if name == "pairs":
        return byte_pairs_4bit(quant_type).to(device)
    raise KeyError(name)


def _codes_4bit(chunk: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, one per value, padded to whole blocks) and absmax of a flat float32 chunk."""
    n = chunk.numel()
    n_blocks = -(-n // blocksize)
    blocks = torch.nn.functional.pad(chunk, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    unit = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp_(-1.0, 1.0)
    # rank = number of midpoints strictly below u (= torch.bucketize), as 15 vectorised compares:
    # several times faster on CPU than bucketize's per-element binary search.
    rank = torch.zeros(unit.shape, dtype=torch.uint8, device=chunk.device)
    for m in _MIDPOINTS[quant_type]:
        rank += unit > m  # m is a float32 value, so the comparison is exact
    if quant_type == "nf4":  # NF4 levels are sorted: the rank is the code
        return rank.view(-1), absmax
    order = _table("order", quant_type, chunk.device)
    return order[rank.long()].to(torch.uint8).view(-1), absmax


def quantize_4bit(
    tensor: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> QuantState:
    """Quantize a float tensor to 4 bits, blockwise (see the module docstring for the steps).

    Args:
        tensor: float32, float16, bfloat16 or float64 tensor of any shape and device.
        quant_type: ``"nf4"`` (NormalFloat, best for normally distributed weights) or ``"fp4"``.
        blocksize: values sharing one absmax scale.
        double_quant: also quantize the absmax constants to 8 bits (saves ~0.37 bits/param).

    Returns:
        The :class:`QuantState`; its tensors are on ``tensor``'s device.

    Raises:
        ValueError: on a non-float or empty tensor, non-finite values, or an unknown
            ``quant_type`` / ``blocksize``.
    """
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    if not tensor.is_floating_point():
        raise ValueError(f"can only quantize floating-point tensors, got dtype {tensor.dtype}")
    if tensor.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(tensor.shape)})")
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    step = max(blocksize, _CHUNK - _CHUNK % blocksize)

    def run(starts):  # chunks are independent: several may run on worker threads (tilepool)
        out = []
        for start in starts:
            codes, am = _codes_4bit(flat[start:start + step].float(), blocksize, quant_type)
            codes = codes[: min(step, n - start) + 1 & ~1]  # keep an even count; the pad codes a zero
            out.append(((codes[0::2] << 4) | codes[1::2], am))
        return out

    chunks = [c for group in run_split(run, range(0, n, step), flat.device) for c in group]

    def assemble() -> QuantState:
        absmax = torch.cat([c[1] for c in chunks])
        if not torch.isfinite(absmax).all():
            raise ValueError("cannot quantize a tensor with NaN or infinite values; check the weights for overflow")
        return QuantState(torch.cat([c[0] for c in chunks]), absmax, tensor.shape, tensor.dtype, quant_type,
                          blocksize)

    state = run_single_threaded(assemble, flat.device)
    if not double_quant:
        return state
    # The mean's float32 rounding depends on how many threads reduce it; take it in the caller's
    # thread, as bitsandbytes does, so the offset (and every nested code) matches it bit for bit.
    offset = state.absmax.mean()
    return run_single_threaded(lambda: _double_quantize(state, offset), flat.device)


def quantize_nf4(tensor: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> QuantState:
    """NF4 quantization; shorthand for ``quantize_4bit(tensor, "nf4", blocksize, double_quant)``."""
    return quantize_4bit(tensor, "nf4", blocksize, double_quant)


def quantize_fp4(tensor: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> QuantState:
    """FP4 quantization; shorthand for ``quantize_4bit(tensor, "fp4", blocksize, double_quant)``."""
    return quantize_4bit(tensor, "fp4", blocksize, double_quant)


def _double_quantize(state: QuantState, offset: torch.Tensor) -> QuantState:
    """QLoRA double quantization of ``state.absmax`` around ``offset`` (their 0-dim float32 mean)."""
    codes, scales = quantize_dynamic8(state.absmax - offset, NESTED_BLOCKSIZE)
    return dataclasses.replace(state, absmax=codes, nested_absmax=scales, nested_offset=offset)


def absmax_float(state: QuantState, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Float32 absmax of blocks ``[start, stop)`` of ``state``, undoing double quantization if used.

    Only the nested blocks of 256 that cover the range are dequantized, so a tile of a layer costs
    work proportional to the tile, not the layer.
    """
    stop = state.absmax.numel() if stop is None else stop
    if not state.double_quant:
        return state.absmax[start:stop].float()
    nb = NESTED_BLOCKSIZE
    first, last = start // nb, -(-stop // nb)  # nested blocks covering [start, stop)
    values = dequantize_dynamic8(state.absmax[first * nb:last * nb], state.nested_absmax[first:last], nb)
    return (values + state.nested_offset)[start - first * nb:stop - first * nb]


def dequantize_range(
    packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int, start: int, stop: int
) -> torch.Tensor:
    """Dequantize the flat values ``[start, stop)`` of a packed 4-bit tensor to float32.

    This is the kernel behind :func:`dequantize` and the tiled matmul of ``Linear4bit``.

    Args:
        packed: uint8 packed codes of the whole tensor.
        absmax: float32 absmax of the blocks the range covers, from block ``start // blocksize``
            on (see :func:`absmax_float`).
        quant_type: ``"nf4"`` or ``"fp4"``.
        blocksize: values per block.
        start: first value; must be a multiple of ``blocksize``.
        stop: one past the last value.

    Returns:
        float32 tensor of shape (stop - start,).
    """
    if start % blocksize:
        raise ValueError(f"start={start} must be a multiple of blocksize={blocksize}")
    pairs = _table("pairs", quant_type, packed.device)
    # one 8-byte gather per byte gives both levels; view(float32) splits them, high nibble first
    levels = pairs.index_select(0, packed[start // 2:(stop + 1) // 2].int()).view(torch.float32)
    n = stop - start
    n_blocks = -(-n // blocksize)
    scale = absmax[:n_blocks]
    if levels.numel() == n_blocks * blocksize:  # fast path: whole blocks, no padding copies
        return levels.view(n_blocks, blocksize).mul_(scale[:, None]).view(-1)[:n]
    levels = torch.nn.functional.pad(levels[:n], (0, n_blocks * blocksize - n))
    return levels.view(n_blocks, blocksize).mul_(scale[:, None]).view(-1)[:n]


def dequantize(state: QuantState, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize a :class:`QuantState` back to a dense tensor of its original shape.

    Args:
        state: the quantized tensor.
        dtype: result dtype; values are computed in float32 and rounded once to ``dtype``.

    Returns:
        Tensor of shape ``state.shape`` on the state's device.
    """
    absmax = absmax_float(state)
    flat = dequantize_range(state.packed, absmax, state.quant_type, state.blocksize, 0, state.numel)
    return flat.view(state.shape).to(dtype)
