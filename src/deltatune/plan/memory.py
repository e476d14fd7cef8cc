"""placeholder"""
from __future__ import annotations

from typing import Any

from deltatune.plan.setup import TrainSetup


def resolve_loss(setup: TrainSetup, config: Any) -> str:
    if setup.loss != "auto":
        return setup.loss
    from deltatune.train.loss import SUPPORTED_MODEL_TYPES

    model_type = getattr(config, "model_type", None)
    if setup.is_prompt_learning or model_type not in SUPPORTED_MODEL_TYPES:
        return "standard"
    return "fused"
