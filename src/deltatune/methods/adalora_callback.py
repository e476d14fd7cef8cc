"""AdaLoRA's transformers Trainer callback (kept apart: transformers' trainer modules are slow to import,
and only training needs them)."""
from __future__ import annotations

import warnings

from transformers.trainer_callback import TrainerCallback

from deltatune.methods.adalora_config import AdaLoraConfig


def trainable_adalora(model) -> list[str]:
    """The names of ``model``'s trainable AdaLoRA adapters (a PeftModel's ``peft_config``)."""
    configs = getattr(model, "peft_config", None) or {}
    return [n for n, c in configs.items() if isinstance(c, AdaLoraConfig) and not c.inference_mode]


class AdaLoraCallback(TrainerCallback):
    """Runs ``model.update_and_allocate(state.global_step)`` once per optimizer step.

    transformers' Trainer (5.x ``_inner_training_loop``) does, per optimizer step: backward ->
    gradient clipping -> ``on_pre_optimizer_step`` -> ``optimizer.step()`` -> ``on_optimizer_step`` ->
    ``lr_scheduler.step()`` -> ``model.zero_grad()`` -> ``global_step += 1`` -> ``on_step_end``.
    ``on_optimizer_step`` is the point peft documents (after ``optimizer.step()``, before ``zero_grad()``):
    gradients are still there for the sensitivity, the masked λ stay zero for the next forward (masking
    in ``on_pre_optimizer_step`` would let this step's update revive them), and ``state.global_step`` is
    still the 0-based index of the step just taken, which is what peft's training loop passes.
    ``on_step_end`` would be too late: the gradients are gone.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        names = trainable_adalora(model)
        if not names:
            raise ValueError("AdaLoraCallback needs a deltatune PeftModel with a trainable AdaLoRA adapter as the Trainer's model")
        total = model.peft_config[names[0]].total_step
        if state.max_steps and state.max_steps != total:
            warnings.warn(
                f"AdaLoraConfig.total_step={total} but the Trainer will run {state.max_steps} optimizer steps; the "
                "rank budget schedule assumes total_step steps. Set total_step to the Trainer's step count.",
                stacklevel=2,
            )

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.update_and_allocate(state.global_step)
