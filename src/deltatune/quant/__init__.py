"""4-bit (NF4/FP4, QLoRA) and 8-bit quantization of Linear layers, in plain PyTorch (CPU and CUDA).

Codes and constants are bit-for-bit those of bitsandbytes; bitsandbytes itself is not needed.
"""
from deltatune.quant.config import QuantConfig
from deltatune.quant.fsdp import packed_weight_bytes, prepare_for_fsdp
from deltatune.quant.int8 import Int8State, dequantize_int8, quantize_int8
from deltatune.quant.linear import Linear4bit, Linear8bit, QuantLinear, cached_dequant, quantized_layers
from deltatune.quant.loading import load_quantized, save_quantized
from deltatune.quant.merge import MergeReport, merge_delta_into_4bit
from deltatune.quant.model import plan_quantization, quantize_model
from deltatune.quant.nf4 import QuantState, dequantize, quantize_4bit, quantize_fp4, quantize_nf4
from deltatune.quant.prepare import prepare_model_for_kbit_training

__all__ = [
    "Int8State", "Linear4bit", "Linear8bit", "MergeReport", "QuantConfig", "QuantLinear", "QuantState",
    "cached_dequant", "dequantize", "dequantize_int8", "load_quantized", "merge_delta_into_4bit",
    "packed_weight_bytes", "plan_quantization", "prepare_for_fsdp", "prepare_model_for_kbit_training",
    "quantize_4bit", "quantize_fp4", "quantize_int8", "quantize_model", "quantize_nf4", "quantized_layers",
    "save_quantized",
]


def quantized_linear_types() -> tuple[type, ...]:
    """The layer types adapter methods may wrap as quantized linears (they implement
    ``dequantize_weight`` / ``requantize_``, see :mod:`deltatune.methods.base`)."""
    return tuple(QuantLinear)
