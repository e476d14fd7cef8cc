"""TRL's trainers and accelerate treat a deltatune model and config as peft's.

accelerate decides "is this an adapter model" in ``accelerate.utils.modeling.is_peft_model``
(``isinstance`` on peft's ``PeftModel``). TRL imports that function by name into each trainer, and
imports ``PeftConfig``, ``BaseTunerLayer`` and ``get_peft_model`` from peft. With a model it does not
recognise, TRL's SFT and DPO trainers treat ``model.base_model`` as the transformer trunk (a
deltatune ``PeftModel``'s ``base_model`` is the adapter holder, so the fused LM head crashes) and DPO
tries to load a reference model from the hub; a deltatune config is refused by type.

TRL offers no registration point, so :func:`install` rebinds those names in accelerate's and TRL's
modules (see :mod:`deltatune.integrations.recognition`). TRL then takes its peft path with a
deltatune model: the fused LM head patches ``model.get_base_model()``, DPO's reference pass runs
with ``model.disable_adapter()`` or a frozen ``"ref"`` copy of the adapter, and a deltatune config
given as ``peft_config=`` is applied with ``deltatune.get_peft_model``.
"""
from __future__ import annotations

from deltatune.integrations.hooks import patch_module
from deltatune.integrations.recognition import widen_peft_names

_ACCELERATE = ("accelerate.utils.modeling", "accelerate.utils", "accelerate.utils.fsdp_utils")
_TRL = (
    "trl.trainer.utils",
    "trl.trainer.sft_trainer",
    "trl.trainer.dpo_trainer",
    "trl.trainer.kto_trainer",
    "trl.trainer.reward_trainer",
    "trl.trainer.grpo_trainer",
    "trl.trainer.rloo_trainer",
    "trl.trainer.distillation_trainer",
    "trl.generation.vllm_generation",
    "trl.models.utils",
)


def install() -> None:
    """Patch accelerate's and TRL's modules loaded now, and the others when they load. Idempotent."""
    for name in _ACCELERATE + _TRL:
        patch_module(name, widen_peft_names)
