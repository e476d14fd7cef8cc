"""Turning on activation (gradient) checkpointing across transformers versions."""
from __future__ import annotations

from typing import Any


def enable_activation_checkpointing(model: Any, kwargs: dict | None = None) -> None:
    """``model.activation_checkpointing_enable`` (transformers >= 5), else the older
    ``gradient_checkpointing_enable``: the old name still works in 5.x but warns, and goes in v6."""
    kwargs = {"use_reentrant": False, **(kwargs or {})}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
