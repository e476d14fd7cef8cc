"""Getting a quantized model ready for (QLoRA) training."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.models.checkpointing import enable_activation_checkpointing
from deltatune.quant.linear import quantized_layers


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Freeze the base model and make training on top of quantized layers stable and memory-lean.

    Same protocol as peft's function of the same name:

    1. freeze every parameter (adapters added afterwards are the only trainable ones);
    2. cast float16/bfloat16 parameters (norms, embeddings, head, biases; the quantized weights are
       buffers, or packed bytes after ``prepare_for_fsdp``, and untouched) to float32, since
       low-precision norms and heads make training unstable (QLoRA keeps them in higher precision);
    3. with ``use_gradient_checkpointing``: make the input embeddings' output require grad (so the
       gradient reaches adapters inside checkpointed blocks whose inputs are otherwise frozen) and
       turn on gradient checkpointing, non-reentrant by default.

    Args:
        model: a transformers ``PreTrainedModel`` (quantized or not).
        use_gradient_checkpointing: enable gradient checkpointing and input gradients.
        gradient_checkpointing_kwargs: passed to ``torch.utils.checkpoint``; default
            ``{"use_reentrant": False}``.

    Returns:
        ``model``, modified in place.

    Raises:
        ValueError: if gradient checkpointing is asked for on a model that does not support it.
    """
    for param in model.parameters():
        param.requires_grad = False
    packed = {id(layer.qweight) for _, layer in quantized_layers(model)}  # codes, not numbers
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and id(param) not in packed:
            param.data = param.data.to(torch.float32)
    if not use_gradient_checkpointing:
        return model
    kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing; "
                         "call prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)")
    model.enable_input_require_grads()
    enable_activation_checkpointing(model, kwargs)
    return model
