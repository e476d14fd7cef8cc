"""What the fused-loss workers of test_fsdp.py and test_deepspeed.py share (each runs on every rank of a torchrun)."""
from __future__ import annotations

import torch


def count_kernel_calls() -> list[int]:
    """Make ``deltatune.train.loss`` record each call of its chunked kernel; returns the list the calls append to.

    The fused loss must run that kernel: the head's own forward would materialise the logits.
    """
    from deltatune.train import loss as loss_module

    calls: list[int] = []
    kernel = loss_module.fused_linear_cross_entropy
    loss_module.fused_linear_cross_entropy = lambda *a, **k: calls.append(1) or kernel(*a, **k)
    return calls


def lora_config():
    """The adapter both workers train: LoRA r=4 on q/v, initialised non-zero so every factor gets a gradient."""
    import deltatune as dt

    return dt.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                         init_lora_weights=False, task_type="CAUSAL_LM")


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of 2 rows x 16 tokens of the tiny model's vocabulary, the first 5 positions unsupervised."""
    ids = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :5] = -100
    return ids, labels
