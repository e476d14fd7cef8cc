"""FusedLossTrainer trains like the standard Trainer: same losses, same weights, with gradient
accumulation over batches with different numbers of supervised tokens (num_items_in_batch)."""
import pytest
import torch
from transformers import Trainer, TrainingArguments

import deltatune.train.loss as loss_mod
from deltatune.train.trainer import FusedLossTrainer
from tiny import input_ids, tiny_llama
from tolerances import assert_close


class _Rows(torch.utils.data.Dataset):
    """Eight fixed-length rows whose prompts (label -100) have different lengths."""

    def __init__(self):
        ids = input_ids(batch=8, seq=12, seed=3)
        self.rows = []
        for i in range(8):
            labels = ids[i].clone()
            labels[: 2 + i] = -100
            self.rows.append(dict(input_ids=ids[i], attention_mask=torch.ones_like(ids[i]), labels=labels))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _train(trainer_cls, tmp_path):
    model = tiny_llama(seed=0)
    args = TrainingArguments(
        output_dir=str(tmp_path / trainer_cls.__name__), max_steps=3, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = trainer_cls(model=model, args=args, train_dataset=_Rows())
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return losses, model


def test_fused_trainer_matches_standard_trainer(tmp_path, monkeypatch):
    fused_calls = []
    real = loss_mod.fused_linear_cross_entropy
    monkeypatch.setattr(loss_mod, "fused_linear_cross_entropy", lambda *a, **k: fused_calls.append(1) or real(*a, **k))
    fused_losses, fused_model = _train(FusedLossTrainer, tmp_path)
    std_losses, std_model = _train(Trainer, tmp_path)
    assert len(fused_calls) == 6  # 3 steps x 2 micro-batches, none fell back to full logits
    assert len(fused_losses) == len(std_losses) == 3
    assert fused_losses[0] == pytest.approx(std_losses[0], abs=1e-5)
    assert fused_losses == pytest.approx(std_losses, abs=1e-4)
    for p, q in zip(fused_model.parameters(), std_model.parameters()):
        # Adam divides by sqrt(second moment), so 1e-7 gradient differences grow over three steps
        # (3e-6 observed at lr 1e-2)
        assert_close(p, q, scale=10.0)
