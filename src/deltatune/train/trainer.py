"""A transformers ``Trainer`` whose causal-LM training loss never materialises the full logits."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer

from deltatune.train.loss import causal_lm_loss


class FusedLossTrainer(Trainer):
    """``Trainer`` that computes the training loss with :func:`deltatune.train.loss.causal_lm_loss`.

    Normalisation matches the standard causal-LM path. When the model accepts loss kwargs (every
    transformers 5.x CausalLM does), Trainer counts the supervised tokens of the whole accumulated
    batch (``labels[..., 1:] != -100``) and passes that count as ``num_items_in_batch``; the summed
    loss is divided by it and ``training_step`` does not divide again by the accumulation steps.
    Without it the loss is a per-batch mean and ``training_step`` divides. Trainer's default
    ``loss_is_scaled_for_ga=None`` rule ("scaled iff num_items_in_batch was given") describes this
    exactly, so it is left unset.

    Evaluation (``return_outputs=True`` needs logits), label smoothing, a ``compute_loss_func`` and
    batches without labels go to ``Trainer.compute_loss`` unchanged.
    """

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, torch.Tensor | Any], return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        has_labels = "labels" in inputs or "shift_labels" in inputs
        if return_outputs or self.label_smoother is not None or self.compute_loss_func is not None or not has_labels:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # accelerate applies mixed precision by wrapping the model's forward in autocast; the fused loss runs
        # the trunk itself, so it enters the same autocast here (a no-op without bf16/fp16)
        with self.accelerator.autocast():
            loss, _ = causal_lm_loss(model, **inputs, num_items_in_batch=num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # As in Trainer.compute_loss: the count was summed over ranks while DDP averages the
            # gradients over them, so the per-rank loss is scaled back up by the rank count.
            ranks = self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
            loss = loss * ranks
        return loss
