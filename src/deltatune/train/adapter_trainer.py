"""The Trainer of ``deltatune train``: fused loss, adapter-only checkpoints, a stop on a non-finite loss.

transformers' ``Trainer`` saves a model it does not know (ours is not peft's ``PeftModel``) as its
full state dict, base weights included, and cannot load it back. :class:`AdapterTrainer` writes
checkpoints as the adapter alone, in peft's format (so every ``checkpoint-N`` folder is also a
loadable adapter), and restores it in place on ``resume_from_checkpoint``; the Trainer itself
still saves and restores the optimizer, the scheduler, the RNG states and its own state.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from deltatune.surgery.partitioned import gathered
from deltatune.methods.lora import merged_inference
from deltatune.train.loss import causal_lm_loss
from deltatune.train.trainer import FusedLossTrainer


class NonFiniteLossError(RuntimeError):
    """The training loss (or, at a checkpoint, a trainable parameter) became NaN or infinite."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step
        """The optimizer step (1-based) at which it happened."""


def nonfinite_parameters(model: nn.Module, limit: int = 3) -> list[str]:
    """Names of up to ``limit`` trainable parameters holding NaN or inf."""
    bad = []
    for name, p in model.named_parameters():
        if p.requires_grad and not torch.isfinite(p.detach()).all():
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad


class AdapterTrainer(FusedLossTrainer):
    """``FusedLossTrainer`` for a deltatune ``PeftModel`` (see the module docstring).

    Also: a NaN/inf training loss raises :class:`NonFiniteLossError` before the optimizer step
    (so the weights and the last checkpoint stay good); the eval loss uses the fused loss too
    (only supervised positions are projected onto the vocabulary), without AdaLoRA's training
    penalty. Every method trains through the fused loss: :func:`causal_lm_loss` runs prompt and
    prefix tuning's virtual tokens and adds AdaLoRA's orthogonality penalty, as the model's forward does.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.resumable_when_sharded()

    def resumable_when_sharded(self) -> None:
        """Checkpoint the optimizer of a model that transformers sharded at load time (FSDP2), after all.

        transformers refuses such checkpoints unless ``save_only_model`` (their optimizer state would be
        sharded DTensors it cannot save). An adapter attached after sharding is a set of plain tensors,
        replicated on every rank, so its optimizer state is whole on rank 0 and saves and loads exactly
        as in one process: that is what ``deltatune train`` asks for, and resuming on any number of
        processes then works. A sharded trainable parameter keeps transformers' refusal.
        """
        # (transformers < 5.19 has no such models: no attribute)
        if not (getattr(self, "is_distributed_loading_by_transformers", False) and self.args.save_only_model):
            return
        from torch.distributed.tensor import DTensor

        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if trainable and not any(isinstance(p, DTensor) for p in trainable):
            self.args.save_only_model = False

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            step = self.state.global_step + 1
            raise NonFiniteLossError(f"the training loss is {loss.item()} at step {step}", step)
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if not prediction_loss_only or "labels" not in inputs:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        # whole rows: merged LoRA weights pay; the run's autocast, as in training (see FusedLossTrainer)
        with merged_inference(model), self.compute_loss_context_manager(), self.accelerator.autocast():
            # The plain language-model loss: AdaLoRA's orthogonality penalty is for training only.
            loss, _ = causal_lm_loss(model, **inputs, regularize=False)
        return loss.detach(), None, None

    # ---- checkpoints: the adapter only -----------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # DeepSpeed ZeRO-3: the Trainer calls this on every rank, and each holds a partition of the adapter;
        # all gather it, rank 0 writes it (state_dict, the Trainer's own gather, is keyed for its format).
        with gathered(p for p in self.model.parameters() if p.requires_grad):
            if not self.args.should_save:
                return
            bad = nonfinite_parameters(self.model)
            if bad:
                step = self.state.global_step
                raise NonFiniteLossError(f"trainable parameters {bad} are NaN or inf after step {step}", step)
            os.makedirs(output_dir, exist_ok=True)
            self.model.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        model = model if model is not None else self.model
        folder = Path(resume_from_checkpoint)
        if not (folder / "adapter_config.json").is_file():
            raise ValueError(f"{folder} holds no adapter (adapter_config.json); it is not a deltatune checkpoint.")
        name = model.active_adapter
        model._load_weights(folder, name)  # in place and all or nothing; requires_grad is kept

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """After the saved optimizer and schedule are restored, apply a learning rate or weight decay that
        the resumed run changed (``--resume train.lr=...``), and say so. Without this the checkpoint's
        values win silently: the scheduler's saved ``base_lrs`` and the optimizer's saved groups."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.optimizer is None:
            return
        lr, decay = self.args.learning_rate, self.args.weight_decay
        old_lr = getattr(self.lr_scheduler, "base_lrs", [None])[0]
        groups = self.optimizer.param_groups
        old_decay = max(g.get("weight_decay", 0.0) for g in groups)
        if old_lr is not None and old_lr != lr:
            ratio = lr / old_lr  # every group scales alike: LoRA+'s B groups keep their multiple of lr
            self.lr_scheduler.base_lrs = [base * ratio for base in self.lr_scheduler.base_lrs]
            for g in groups:
                g["initial_lr"], g["lr"] = g.get("initial_lr", old_lr) * ratio, g["lr"] * ratio  # current factor, new peak
            self.note(f"resume: learning rate {old_lr:g} -> {lr:g} (the schedule continues at the new peak)")
        if old_decay != decay and old_decay > 0:  # groups without decay (biases, norms) keep 0
            for g in groups:
                if g.get("weight_decay", 0.0) > 0:
                    g["weight_decay"] = decay
            self.note(f"resume: weight decay {old_decay:g} -> {decay:g}")

    note = staticmethod(print)  # where resume changes are reported; TrainingSession sets its own log

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
