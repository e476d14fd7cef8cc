"""peft's ``peft.helpers`` utilities that users call directly (``from peft import cast_mixed_precision_params``)."""
from __future__ import annotations

import torch
from torch import nn


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every frozen parameter of ``model`` to ``dtype`` and every trainable one to float32, in place
    (peft's helper of the same name, same semantics).

    For mixed-precision training (fp16/bf16 autocast): the frozen base weights take half the memory,
    while the adapter weights stay in full precision, so ``GradScaler`` can unscale their gradients
    ("Attempting to unscale FP16 gradients") and small updates are not rounded away.

    Args:
        model: any module, e.g. a :class:`~deltatune.PeftModel` or a model with injected adapters.
        dtype: the dtype of the frozen parameters, usually ``torch.float16`` or ``torch.bfloat16``.
    """
    for p in model.parameters():
        p.data = p.to(dtype) if not p.requires_grad else p.to(torch.float32)


__all__ = ["cast_mixed_precision_params"]
