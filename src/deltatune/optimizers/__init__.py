"""Optimizers built for adapter models, under peft's import path (``from deltatune.optimizers import ...``)."""
from __future__ import annotations

from deltatune.optimizers.loraplus import create_loraplus_optimizer

__all__ = ["create_loraplus_optimizer"]
