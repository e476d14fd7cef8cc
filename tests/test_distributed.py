"""DDP on CPU (gloo): 2 processes x batch b train the same LoRA adapter as 1 process x batch 2b.

The worker is a plain transformers ``Trainer`` run on a deltatune ``PeftModel``, launched by
``python -m torch.distributed.run`` exactly as ``torchrun`` would. Same seed, dropout 0, same data
order (Trainer's seeded random sampler is shared by all ranks; rank i takes the i-th slice of
each global batch), SGD so a difference in gradients shows up linearly in the weights.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tolerances import assert_close

pytestmark = pytest.mark.slow

WORKER = r'''
import json, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
import datasets
import deltatune as dt

out, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0)
model = dt.get_peft_model(LlamaForCausalLM(cfg), dt.LoraConfig(
    r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
    task_type="CAUSAL_LM"))
g = torch.Generator().manual_seed(1)
ids = torch.randint(3, 96, (16, 12), generator=g).tolist()
data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
args = TrainingArguments(
    output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=0.5, optim="sgd",
    lr_scheduler_type="constant", seed=0, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
    ddp_find_unused_parameters=False, dataloader_num_workers=0, disable_tqdm=True,
)
trainer = Trainer(model=model, args=args, train_dataset=data)
trainer.train()
if trainer.is_world_process_zero():
    model.save_pretrained(out)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    json.dump({"world_size": args.world_size, "losses": losses}, open(out + "/run.json", "w"))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    steps = 3
    _run([sys.executable, str(worker), str(tmp_path / "single"), "4", str(steps)], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
          str(worker), str(tmp_path / "ddp"), "2", str(steps)], tmp_path)
    single = json.loads((tmp_path / "single" / "run.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert (single["world_size"], ddp["world_size"]) == (1, 2)
    # Logged losses are the mean over the global batch in both runs.
    assert len(single["losses"]) == len(ddp["losses"]) == steps
    assert_close(torch.tensor(ddp["losses"]), torch.tensor(single["losses"]), scale=10)
    a = load_file(tmp_path / "single" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ddp" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 12
    start = load_file_initial()
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert moved > 1e-2  # training really changed the adapter
    # fp32 gradients all-reduced in another order differ by rounding only: the project's fp32 tolerance,
    # widened 10x for 3 steps of a whole-model backward.
    for k in a:
        assert_close(b[k], a[k], scale=10)


def load_file_initial() -> dict[str, torch.Tensor]:
    """The adapter before training (same seed as the worker), to check that training moved it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import deltatune as dt

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0)
    model = dt.get_peft_model(LlamaForCausalLM(cfg), dt.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
    task_type="CAUSAL_LM"))
    return {k: v.detach().clone() for k, v in model.get_adapter_state_dict("default").items()}
