"""peft's ``lora_bias=True``: a trainable bias b on lora_B, so the layer computes W x + b₀ + s·(B A x + b).

peft builds lora_B as ``nn.Linear(r, out, bias=True)`` and saves the bias as ``<layer>.lora_B.bias``;
the whole LoRA branch, bias included, is multiplied by s = alpha/r. Merging therefore adds s·B·A to the
weight and s·b to the base layer's bias, which must exist (peft raises the same). peft allows it on
linear layers (and convolutions), with ``init_lora_weights`` True or False, not with DoRA; deltatune
allows it on linear layers (dense, Conv1D, 4-bit/8-bit) and refuses convolutions and embeddings.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from deltatune.methods.lora_conv import CONV_TYPES
from deltatune.surgery.adapter import adapter_dtype, layer_dims


def check_lora_bias_target(base_layer: nn.Module, module_name: str) -> None:
    """Refuse the layer types lora_bias is not implemented for; warn where merging will not be possible.

    Raises:
        ValueError: an embedding (peft refuses it too) or a convolution (peft supports it, deltatune does not).
    """
    if isinstance(base_layer, nn.Embedding):
        raise ValueError(f"{module_name}: lora_bias=True is not supported on Embedding layers (nor in peft); exclude it")
    if isinstance(base_layer, CONV_TYPES):
        raise ValueError(
            f"{module_name}: lora_bias=True on {type(base_layer).__name__} layers is not implemented in deltatune; "
            "exclude convolutions from target_modules or train without lora_bias"
        )
    if getattr(base_layer, "bias", None) is None:
        warnings.warn(
            f"{module_name}: lora_bias=True on a layer without a bias: the adapter works, but merging it will not be "
            "possible (as in peft)", stacklevel=4,
        )


def lora_bias_for(config, base_layer: nn.Module, module_name: str, r: int) -> nn.Parameter | None:
    """lora_B's bias (out,) for one layer, None without ``config.lora_bias``: zero for
    ``init_lora_weights=True``, as peft; for False the uniform draw of ``nn.Linear(r, out)``'s default
    init (so tests see it).

    Raises:
        ValueError: the layer type is refused (:func:`check_lora_bias_target`).
    """
    if not config.lora_bias:
        return None
    check_lora_bias_target(base_layer, module_name)
    bias = torch.zeros(layer_dims(base_layer)[0], dtype=adapter_dtype(base_layer))  # (out,)
    if config.init_lora_weights is False:
        bound = 1 / math.sqrt(r)
        nn.init.uniform_(bias, -bound, bound)
    return nn.Parameter(bias)


@torch.no_grad()
def fold_lora_bias(adapter: nn.Module, base_layer: nn.Module, sign: int) -> None:
    """base bias += sign · s · b (merge with +1, unmerge with -1); nothing for an adapter without a bias.

    Called before the weight is merged, so a refusal leaves the layer as it was.

    Raises:
        ValueError: the adapter has a bias and the base layer has none.
    """
    b = getattr(adapter, "lora_B_bias", None)
    if b is None:
        return
    base_bias = getattr(base_layer, "bias", None)
    if base_bias is None:
        raise ValueError(
            f"cannot merge a LoRA with lora_bias=True into a {type(base_layer).__name__} that has no bias (peft refuses "
            "it too); keep the adapter unmerged"
        )
    base_bias.add_((sign * adapter.scaling * b.float()).to(base_bias.dtype))
