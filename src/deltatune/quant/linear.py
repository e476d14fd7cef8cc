"""Linear4bit and Linear8bit: frozen quantized drop-in replacements for ``nn.Linear``.

Both expose the protocol the LoRA code relies on (found by type, never by attribute sniffing):

* ``dequantize_weight(dtype=None) -> Tensor`` of shape (out_features, in_features);
* ``requantize_(weight)``: replace the stored weight by the quantization of a dense one
  (used to merge an adapter into a quantized base);
* ``from_linear(linear, config)``: quantize an ``nn.Linear``.

State-dict keys (besides ``bias``, kept in full precision as a Parameter):

====================  =========  ==============================  ==================================
key                   dtype      shape                           meaning
====================  =========  ==============================  ==================================
Linear4bit:
``qweight``           uint8      (ceil(out*in / 2),)             two 4-bit codes per byte, row-major
                                                                 W, even element in the high nibble
``absmax``            float32    (n_blocks,)                     per-block max|w| (no double quant)
``absmax``            uint8      (n_blocks,)                     8-bit codes of absmax - offset
                                                                 (double quant)
``nested_absmax``     float32    (ceil(n_blocks / 256),)         scale per 256 absmax codes (DQ only)
``nested_offset``     float32    ()                              mean of absmax (DQ only)
Linear8bit:
``qweight``           int8       (out, in)                       round(w * 127 / max|row|)
``row_absmax``        float32    (out,)                          max|row|
====================  =========  ==============================  ==================================

``n_blocks = ceil(out * in / blocksize)``. After :func:`deltatune.quant.fsdp.prepare_for_fsdp`, a 4-bit
``qweight`` is a frozen ``nn.Parameter`` (so FSDP shards it), possibly stored as float bytes
(``quant_storage``); the other keys stay buffers. The codes and constants equal bitsandbytes'
(``quantize_4bit(..., compress_statistics=double_quant)`` and ``int8_vectorwise_quant``). The
level tables are constants (see :mod:`deltatune.quant.codebooks`) and are not stored.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.native.dequant import dequantize_4bit, linear_4bit
from deltatune.quant.codebooks import code_4bit, dynamic_map
from deltatune.quant.config import QuantConfig
from deltatune.quant.int8 import INV_127, Int8State, dequantize_int8, quantize_int8
from deltatune.quant.kernels import compiled_dequant_rows
from deltatune.quant.matmul import quant_linear, tile_rows
from deltatune.quant.nf4 import (
    NESTED_BLOCKSIZE, QuantState, absmax_float, check_blocksize, check_quant_type, dequantize_range, quantize_4bit,
)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FEW_ROWS = 16  # rows up to which a CPU Linear4bit forward without autograd runs linear_4bit (W decoded in registers)


class _QuantLinear(nn.Module):
    """What Linear4bit and Linear8bit share: bias, compute dtype, forward, caching, device moves."""

    _QUANT_BUFFERS: tuple[str, ...] = ()
    use_compile = False  # only Linear4bit has a compiled kernel

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype,
                 device, bias_dtype: torch.dtype | None):
        super().__init__()
        if compute_dtype not in _DTYPES:
            raise ValueError(f"compute_dtype must be one of {_DTYPES}, got {compute_dtype}")
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.bias = None
        if bias:
            b = torch.zeros(out_features, device=device, dtype=bias_dtype or torch.float32)
            self.bias = nn.Parameter(b)  # an ordinary parameter, as in nn.Linear
        # When True, forward dequantizes once and reuses the dense weight until clear_cache();
        # see cached_dequant().
        self.cache_weight = False
        self._weight_cache: torch.Tensor | None = None

    # --- protocol, implemented by subclasses --------------------------------------------------
    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def requantize_(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def _make_dequant_rows(self, dtype: torch.dtype):
        """The tile function of :func:`quant_linear`: rows ``start:stop`` of W, dequantized to ``dtype``."""
        raise NotImplementedError

    def _few_rows(self, x2: torch.Tensor) -> torch.Tensor | None:
        """x2 · Wᵀ for few rows with no gradient to x2 (decoding) by a kernel, or None: the tiled path."""
        return None

    def _out_scale(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Per-output-feature factor applied after the matmul (row-wise formats), in ``dtype``, or None."""
        return None

    # --- shared -------------------------------------------------------------------------------
    def _check_weight(self, weight: torch.Tensor) -> None:
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(f"weight has shape {tuple(weight.shape)}, this layer needs {expected} (out, in)")

    def clear_cache(self) -> None:
        """Drop the cached dense weight (if any)."""
        self._weight_cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features in its last dim, this layer expects {self.in_features}")
        lead = x.shape[:-1]
        device = x.device.type
        # Under autocast (a bf16 run) the tiles are dequantized straight to the autocast dtype and the whole
        # layer runs in it with autocast off: autocast would otherwise cast inside the tiled kernel, and its
        # in-place backward cannot mix dtypes.
        autocast = device in ("cpu", "cuda") and torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else self.compute_dtype
        with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
            x2 = x.reshape(-1, self.in_features).to(dtype)  # (N, in)
            if self.cache_weight:
                if self._weight_cache is None or self._weight_cache.device != x.device or self._weight_cache.dtype != dtype:
                    self._weight_cache = self.dequantize_weight(dtype)
                y = F.linear(x2, self._weight_cache)
            else:
                y = None if torch.is_grad_enabled() and x2.requires_grad else self._few_rows(x2)
                if y is None:
                    # torch.compile-d kernels are not safe to call from several threads at once
                    y = quant_linear(x2, lambda: self._make_dequant_rows(dtype), self.out_features, self.tile_rows,
                                     self._out_scale(dtype), parallel=not self.use_compile)  # (N, out)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features).to(dtype if autocast else x.dtype)

    def _quant_tensor(self, name: str) -> torch.Tensor | None:
        """Quantized tensor ``name``: a buffer, or a frozen parameter once prepared for FSDP."""
        t = self._buffers.get(name)
        return self._parameters.get(name) if t is None else t

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() would round the fp32 quantization constants (and reinterpret
        # float-stored packed bytes); keep their dtype and apply only the device part of the move.
        quant = {id(b) for k in self._QUANT_BUFFERS if (b := self._quant_tensor(k)) is not None}

        def keep_dtype(t):
            out = fn(t)
            if id(t) in quant and out.dtype != t.dtype:
                return t.to(device=out.device)
            return out

        self._weight_cache = None
        return super()._apply(keep_dtype, recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # load_state_dict would silently cast e.g. float32 absmax into our uint8 buffer.
        for k in self._QUANT_BUFFERS:
            mine, theirs = self._quant_tensor(k), state_dict.get(prefix + k)
            if mine is not None and theirs is not None and theirs.dtype != mine.dtype:
                error_msgs.append(
                    f"{prefix}{k} is {theirs.dtype} in the checkpoint but {mine.dtype} in this "
                    f"{type(self).__name__}: it was quantized with different settings (e.g. double_quant); "
                    "rebuild the model with the QuantConfig used to save it."
                )
                return
        self._weight_cache = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _copy_bias_from(self, linear: nn.Linear) -> None:
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)

    def num_quantized_parameters(self) -> int:
        """What parameter counts (``get_nb_trainable_parameters``, ``plan``) add to ``parameters()`` to
        count this layer's weight as its logical out * in elements, as peft does for bitsandbytes layers:
        out * in while the packed weight is a buffer, minus the packed elements once it is a parameter
        (after ``prepare_for_fsdp``; a DTensor's numel is its global one, so sharding changes nothing)."""
        packed = self._parameters.get("qweight")
        return self.in_features * self.out_features - (0 if packed is None else packed.numel())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"compute_dtype={self.compute_dtype}")


def quantized_parameter_count(model: nn.Module) -> int:
    """The logical weight elements of ``model``'s quantized layers that ``parameters()`` misses (see
    ``num_quantized_parameters``)."""
    return sum(m.num_quantized_parameters() for m in model.modules() if isinstance(m, _QuantLinear))


class Linear4bit(_QuantLinear):
    """A frozen Linear layer whose weight is stored blockwise in 4 bits (NF4 or FP4), QLoRA-style.

    Args:
        in_features: input size.
        out_features: output size.
        bias: keep a full-precision bias.
        quant_type: ``"nf4"`` or ``"fp4"``.
        blocksize: values per absmax scale.
        double_quant: quantize the absmax constants too (QLoRA double quantization).
        compute_dtype: dtype of the matmul; inputs are cast to it and outputs back.
        use_compile: dequantize tiles with a ``torch.compile``-d kernel (see :mod:`.kernels`).
        device (torch.device | str | None): where the buffers live.
        bias_dtype: dtype of the bias (float32 by default).
    """

    _QUANT_BUFFERS = ("qweight", "absmax", "nested_absmax", "nested_offset")
    quant_storage = torch.uint8
    """dtype ``qweight`` is stored in; other than uint8 only after ``prepare_for_fsdp(..., quant_storage)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                 use_compile: bool = False, device=None, bias_dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, compute_dtype, device, bias_dtype)
        check_quant_type(quant_type)
        check_blocksize(blocksize)
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.use_compile = use_compile
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        self.register_buffer("qweight", torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device))
        absmax_dtype = torch.uint8 if double_quant else torch.float32
        self.register_buffer("absmax", torch.zeros(n_blocks, dtype=absmax_dtype, device=device))
        if double_quant:
            n_nested = -(-n_blocks // NESTED_BLOCKSIZE)
            self.register_buffer("nested_absmax", torch.zeros(n_nested, dtype=torch.float32, device=device))
            self.register_buffer("nested_offset", torch.zeros((), dtype=torch.float32, device=device))
        self.tile_rows = tile_rows(in_features, out_features, blocksize)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig | None = None) -> "Linear4bit":
        """Quantize ``linear`` (its weight is read, not modified) with ``config``'s 4-bit settings."""
        config = config or QuantConfig()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, quant_type=config.quant_type,
                    blocksize=config.blocksize, double_quant=config.double_quant,
                    compute_dtype=config.torch_compute_dtype, use_compile=config.compile, device=linear.weight.device)
        layer._copy_bias_from(linear)
        layer.requantize_(linear.weight)
        return layer

    @property
    def packed_weight(self) -> torch.Tensor:
        """The packed codes as uint8 (ceil(out*in / 2),), sharing memory with ``qweight`` whatever its storage dtype."""
        q = self.qweight
        if q.dtype == torch.uint8:
            return q
        if q.dtype != self.quant_storage:
            raise RuntimeError(
                f"{type(self).__name__}.qweight holds packed 4-bit codes stored as {self.quant_storage} but is now "
                f"{q.dtype}: something cast it (e.g. FSDP MixedPrecisionPolicy(param_dtype={q.dtype}) on a float "
                "storage). Use prepare_for_fsdp(model, quant_storage=torch.uint8), which is never cast, or a "
                "quant_storage equal to param_dtype.")
        return q.view(torch.uint8)[: (self.qweight_numel + 1) // 2]

    @property
    def quant_state(self) -> QuantState:
        """The stored weight as a :class:`QuantState` (shares memory with the buffers)."""
        dq = self.double_quant
        return QuantState(self.packed_weight, self.absmax, torch.Size((self.out_features, self.in_features)),
                          self.compute_dtype, self.quant_type, self.blocksize,
                          self.nested_absmax if dq else None, self.nested_offset if dq else None)

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> None:
        """Replace the stored weight by the 4-bit quantization of the dense ``weight`` (out, in)."""
        self._check_weight(weight)
        state = quantize_4bit(weight.to(self.qweight.device), self.quant_type, self.blocksize, self.double_quant)
        for name, t in state.tensors().items():
            (self.packed_weight if name == "packed" else getattr(self, name)).copy_(t)
        self._weight_cache = None

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight (out, in) in ``dtype`` (default: the compute dtype): all rows of one tile."""
        return self._rows(dtype or self.compute_dtype)(0, self.out_features)

    @property
    def qweight_numel(self) -> int:
        """Number of quantized weight values (out * in)."""
        return self.in_features * self.out_features

    def _few_rows(self, x2: torch.Tensor) -> torch.Tensor | None:
        if x2.shape[0] > FEW_ROWS or x2.device.type != "cpu":
            return None
        st = self.quant_state
        dq = {} if not st.double_quant else dict(nested=st.nested_absmax, offset=float(st.nested_offset),
                                                 levels=dynamic_map())
        return linear_4bit(x2, st.packed, st.absmax, code_4bit(st.quant_type), self.out_features, st.blocksize, **dq)

    def _make_dequant_rows(self, dtype: torch.dtype):
        if self.use_compile:
            return compiled_dequant_rows(self.quant_state, self.in_features, dtype)
        return self._rows(dtype)

    def _rows(self, dtype: torch.dtype):
        state, n_in, code = self.quant_state, self.in_features, code_4bit(self.quant_type)

        def rows(start: int, stop: int) -> torch.Tensor:
            a, b = start * n_in, stop * n_in  # flat value range; a is block-aligned (tile_rows)
            absmax = absmax_float(state, a // state.blocksize, -(-b // state.blocksize))
            # one compiled pass where it runs (native/dequant.py), the same bits as the torch path
            w = dequantize_4bit(state.packed, absmax, code, a, b, state.blocksize, dtype)
            if w is None:
                w = dequantize_range(state.packed, absmax, state.quant_type, state.blocksize, a, b)
            return w.view(stop - start, n_in).to(dtype)  # (rows, in)

        return rows

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", quant_type={self.quant_type}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}")


class Linear8bit(_QuantLinear):
    """A frozen Linear layer whose weight is stored as row-wise absmax int8 (LLM.int8() weights).

    Args: as :class:`Linear4bit`, without the 4-bit options.
    """

    _QUANT_BUFFERS = ("qweight", "row_absmax")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 compute_dtype: torch.dtype = torch.float32, device=None, bias_dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, compute_dtype, device, bias_dtype)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("row_absmax", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.tile_rows = tile_rows(in_features, out_features, 1)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig | None = None) -> "Linear8bit":
        """Quantize ``linear`` (its weight is read, not modified) to int8."""
        config = config or QuantConfig(bits=8)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    compute_dtype=config.torch_compute_dtype, device=linear.weight.device)
        layer._copy_bias_from(linear)
        layer.requantize_(linear.weight)
        return layer

    @property
    def quant_state(self) -> Int8State:
        """The stored weight as an :class:`Int8State` (shares memory with the buffers)."""
        return Int8State(self.qweight, self.row_absmax, self.compute_dtype)

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> None:
        """Replace the stored weight by the int8 quantization of the dense ``weight`` (out, in)."""
        self._check_weight(weight)
        state = quantize_int8(weight.to(self.qweight.device))
        self.qweight.copy_(state.codes)
        self.row_absmax.copy_(state.row_absmax)
        self._weight_cache = None

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight (out, in) in ``dtype`` (default: the compute dtype)."""
        return dequantize_int8(self.quant_state, dtype or self.compute_dtype)

    def _make_dequant_rows(self, dtype: torch.dtype):
        q = self.qweight

        def rows(start: int, stop: int) -> torch.Tensor:
            return q[start:stop].to(dtype)  # (rows, in); int8 values are exact in every float dtype

        return rows

    def _out_scale(self, dtype: torch.dtype) -> torch.Tensor:
        # W = Q diag(s) row-wise, so x W^T = (x Q^T) * s: the scale moves out of the tiles
        return (self.row_absmax * INV_127).to(dtype)


QuantLinear = (Linear4bit, Linear8bit)
"""The quantized layer types, for ``isinstance`` checks."""


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, _QuantLinear]]:
    """``(qualified name, layer)`` for every Linear4bit / Linear8bit in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name, module


@contextlib.contextmanager
def cached_dequant(model: nn.Module):
    """Within the block, each quantized layer dequantizes its weight once and reuses it.

    Trades memory (a dense copy of every quantized weight, in the compute dtype) for speed: use
    it around one optimizer step with gradient accumulation, or around ``generate``, when the
    dense weights fit. The copies are dropped on exit.
    """
    layers = [m for _, m in quantized_layers(model)]
    for m in layers:
        m.cache_weight = True
    try:
        yield model
    finally:
        for m in layers:
            m.cache_weight = False
            m.clear_cache()
