"""DDP on CPU (gloo): 2 processes x batch b train the same adapter as 1 process x batch 2b.

Both runs use the same seed, dropout 0 and data order (Trainer's seeded random sampler is shared by
all ranks, and rank i takes the i-th slice of each global batch), and SGD, so a difference in the
gradients would show up linearly in the weights. The DDP side is launched with
``python -m torch.distributed.run`` exactly as ``torchrun`` does; the single-process side runs
in-process. Tolerance: the project's fp32 table widened 10x for 3 steps of a whole-model backward
(measured differences are ~1e-8: the all-reduce only changes the order of a 2-term sum).

This file is also the DDP worker: ``torchrun --nproc_per_node 2 tests/test_distributed.py OUT B STEPS``.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
STEPS = 3


def train_tiny(out: str, batch: int, steps: int = STEPS) -> None:
    """A deltatune LoRA on a tiny LLaMA in a plain transformers ``Trainer`` (the worker of the DDP test)."""
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    import deltatune as dt

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0)
    config = dt.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                           init_lora_weights=False, task_type="CAUSAL_LM")
    model = dt.get_peft_model(LlamaForCausalLM(cfg), config)
    ids = torch.randint(3, 96, (16, 12), generator=torch.Generator().manual_seed(1)).tolist()
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", seed=0, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
        ddp_find_unused_parameters=False, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"input_ids": ids, "labels": ids}))
    trainer.train()
    if trainer.is_world_process_zero():
        model.save_pretrained(out)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        Path(out, "run.json").write_text(json.dumps({"world_size": args.world_size, "losses": losses}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], cwd: Path, nproc: int = 2) -> None:
    """``torchrun --nproc_per_node nproc ARGS``, one CPU thread per process; fails the test with its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def _assert_same_adapter(ddp: dict, single: dict, initial: dict | None = None) -> None:
    from tolerances import assert_close

    assert ddp.keys() == single.keys() and ddp
    if initial is not None:  # training really moved the adapter, so the comparison means something
        assert max((single[k] - initial[k]).abs().max().item() for k in single) > 1e-2
    for k in single:
        assert_close(ddp[k], single[k], tier="reordered")


CLI_CONFIG = """\
model: {model}
data: {{source: {data}, eval_size: 4, max_length: 64}}
method: {{name: lora, r: 4, lora_alpha: 8, lora_dropout: 0.0, target_modules: [q_proj, v_proj]}}
train: {{max_steps: 3, lr: 0.05, optim: sgd, scheduler: constant, warmup_ratio: 0.0, logging_steps: 1,
        eval_steps: 0, save_steps: 0, tensorboard: false, plot: false, progress_bar: false, num_threads: 1,
        bf16: false}}
eval: {{accuracy: false}}
"""


def test_deltatune_train_under_torchrun_matches_one_process(tmp_path):
    # fp32 (train.bf16: false above): 2 ranks x 2 rows against 1 x 4 must agree to fp32's 1e-5; in bf16 the
    # matmuls round differently for the two batch shapes (measured 1e-4 on these losses), which would
    # hide a real difference of that size
    from deltatune.cli.main import main
    from support_cli_generate import write_tiny_model
    from support_data import chat_rows, write_jsonl

    write_tiny_model(tmp_path / "tiny")
    write_jsonl(tmp_path / "data.jsonl", chat_rows(24))
    (tmp_path / "run.yaml").write_text(CLI_CONFIG.format(model=tmp_path / "tiny", data=tmp_path / "data.jsonl"))
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert main(["train", "run.yaml", "output_dir=single", "train.batch_size=4"]) == 0
    finally:
        os.chdir(cwd)
    torchrun(["-m", "deltatune.cli.main", "train", "run.yaml", "output_dir=ddp", "train.batch_size=2"], tmp_path)
    _assert_same_adapter(_adapter(tmp_path / "ddp" / "adapter"), _adapter(tmp_path / "single" / "adapter"))
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())["train"]["train_loss"]
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())["train"]["train_loss"]
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(single), atol=1e-5, rtol=1e-5)


if __name__ == "__main__":  # the DDP worker
    train_tiny(sys.argv[1], int(sys.argv[2]))


def test_the_train_command_ends_its_process_group_even_when_it_fails(monkeypatch):
    # left to the interpreter's exit, the gloo group's threads were torn down in no set order and one rank of
    # a finished ZeRO-3 run aborted now and then (SIGABRT): `deltatune train` ends the group itself
    import torch.distributed as dist

    from deltatune.cli import train_run

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(train_run, "_main", lambda args: (_ for _ in ()).throw(ValueError("a bad config")))
        with pytest.raises(ValueError, match="a bad config"):
            train_run.main(None)
        assert not dist.is_initialized()
        train_run.end_process_group()  # no group: nothing to do, no error
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
