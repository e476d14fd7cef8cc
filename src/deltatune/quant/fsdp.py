"""Making 4-bit layers shardable by FSDP (FSDP-QLoRA).

FSDP shards parameters only, and a :class:`~deltatune.quant.linear.Linear4bit` keeps its packed
codes in a buffer, so under ``fully_shard`` every rank would hold the whole 4-bit base. Following
answer.ai's fsdp_qlora and bitsandbytes' ``Params4bit(quant_storage=...)``,
:func:`prepare_for_fsdp` turns each layer's packed weight into a frozen ``nn.Parameter``
(``requires_grad=False``) that FSDP flattens and shards like any other:

* ``quant_storage=torch.uint8`` (the default) keeps the bytes as they are. FSDP2
  (``torch.distributed.fsdp.fully_shard``) shards it along its one dimension and never casts it,
  since ``MixedPrecisionPolicy`` only casts floating-point parameters.
* a float ``quant_storage`` (bitsandbytes' ``bnb_4bit_quant_storage``) reinterprets the bytes as
  that dtype, padded to whole elements: FSDP1 puts all of a unit's parameters in one flat
  parameter of a single dtype, so the packed weight must share the model's dtype. Under mixed
  precision it must also equal ``param_dtype``, or the cast would scramble the codes (the layer
  then refuses to run and says so).

Between forwards the parameter is a shard (a ``DTensor`` under FSDP2); inside ``forward`` FSDP has
all-gathered it, so the layer reads its full codes. Its backward rebuilds the weight from the
codes again, inside FSDP's pre-backward all-gather. The quantization constants (``absmax``,
``nested_absmax``, ``nested_offset``) stay buffers, replicated on every rank: about 1/32 of the
packed bytes at blocksize 64 with double quantization (out*in/64 bytes against out*in/2), and
keeping them out of FSDP keeps a float ``param_dtype`` from rounding the float32 ones.

8-bit layers (:class:`~deltatune.quant.linear.Linear8bit`) are left as they are (replicated).
"""
from __future__ import annotations

import torch
from torch import nn

from deltatune.quant.linear import Linear4bit, quantized_layers

STORAGE_DTYPES = {"uint8": torch.uint8, "bfloat16": torch.bfloat16, "float16": torch.float16,
                  "float32": torch.float32}


def storage_dtype(quant_storage: torch.dtype | str) -> torch.dtype:
    """``quant_storage`` (a torch dtype or its name, e.g. ``"bfloat16"``) as a checked ``torch.dtype``."""
    name = str(quant_storage).removeprefix("torch.")
    if name not in STORAGE_DTYPES:
        raise ValueError(f"quant_storage must be one of {sorted(STORAGE_DTYPES)} (or the torch dtype), "
                         f"got {quant_storage!r}")
    return STORAGE_DTYPES[name]


@torch.no_grad()
def packed_as_parameter(layer: Linear4bit, quant_storage: torch.dtype | str = torch.uint8) -> None:
    """Store ``layer``'s packed codes as a frozen parameter of dtype ``quant_storage``, in place.

    The bytes are unchanged (a uint8 weight is moved, not copied); a float storage is the same bytes
    viewed as that dtype, zero-padded to a whole number of elements. Calling it again with the same
    storage does nothing.
    """
    dtype = storage_dtype(quant_storage)
    if "qweight" in layer._parameters:
        if layer.quant_storage != dtype:
            raise ValueError(f"this layer's packed weight is already a parameter stored as {layer.quant_storage}; "
                             f"it cannot be re-stored as {dtype}")
        return
    packed = layer._buffers.pop("qweight")  # (ceil(out*in / 2),) uint8
    if dtype != torch.uint8:
        size = torch.empty((), dtype=dtype).element_size()
        padded = torch.zeros(-(-packed.numel() // size) * size, dtype=torch.uint8, device=packed.device)
        padded[: packed.numel()] = packed
        packed = padded.view(dtype)  # (ceil(bytes / size),)
    layer.quant_storage = dtype
    layer.qweight = nn.Parameter(packed, requires_grad=False)
    layer.clear_cache()


def prepare_for_fsdp(model: nn.Module, quant_storage: torch.dtype | str = torch.uint8) -> nn.Module:
    """Make ``model``'s 4-bit layers shardable: call before ``fully_shard`` (FSDP2) or FSDP1 wrapping.

    Nothing else changes: forward values are bit for bit those of the unprepared model, state-dict
    keys stay the same (``qweight`` keeps its dtype with the default uint8 storage), and parameter
    counts still count each quantized weight once as out * in.

    Args:
        model: a model quantized by ``quantize_model`` / ``load_quantized`` (adapters may be on it).
        quant_storage: dtype of the packed weight: ``torch.uint8`` for FSDP2; for FSDP1, the dtype of
            the model's other parameters (``torch.bfloat16`` / ``torch.float32``).

    Returns:
        ``model``, modified in place.

    Raises:
        ValueError: on an unknown ``quant_storage``, or if ``model`` holds no 4-bit layer.
    """
    layers = [m for _, m in quantized_layers(model) if isinstance(m, Linear4bit)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear4bit layer to prepare for FSDP; quantize it first "
                         "(quantize_model(model, QuantConfig(bits=4)) or load_quantized)")
    for layer in layers:
        packed_as_parameter(layer, quant_storage)
    return model


def packed_weight_bytes(model: nn.Module) -> int:
    """Bytes of 4-bit packed codes this process holds: the local shard under FSDP2, else the whole."""
    dtensor = ()
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor  # lazily: only FSDP2 runs have DTensors
        dtensor = DTensor
    total = 0
    for _, layer in quantized_layers(model):
        if isinstance(layer, Linear4bit):
            q = layer.qweight
            local = q.to_local() if isinstance(q, dtensor) else q  # a DTensor's own shard
            total += local.numel() * local.element_size()
    return total
