"""Memory per rank of LoRA training under DDP and FSDP2 (2 processes) against one process, on CPU (gloo).

Model: LLaMA-shaped, hidden 512, 8 layers, intermediate 1408, vocab 32000 (the small LLaMA of
bench_train_step.py); LoRA r=16 on every linear layer; AdamW; 3 steps of 4 x 256 tokens per rank, in
transformers' Trainer as ``deltatune train`` runs it (``FusedLossTrainer``; FSDP2 from transformers'
``DistributedConfig``, the way ``train.distributed=fsdp`` loads).

Per rank it reports what the process holds (bytes of the local parameter shards, the adapter's
gradients and AdamW state) and its RSS above the RSS after imports: after loading, the peak during
training (sampled every 2 ms), and the process's peak (``ru_maxrss``, loading included). ``--loss own`` uses the
model's own loss (full logits) instead of the fused one, to show the fused loss's saving under each
engine. Every configuration runs in fresh processes, one at a time.

    python benchmarks/bench_distributed_memory.py [--steps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def worker(model_dir: str, engine: str, loss: str, steps: int, out: str) -> None:
    import datasets
    import torch
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from transformers.distributed import DistributedConfig

    import deltatune as dt
    from deltatune.train.trainer import FusedLossTrainer

    base_rss = _rss_mb()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    kwargs = {"distributed_config": DistributedConfig(fsdp_size=world)} if engine == "fsdp" else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model = dt.get_peft_model(model, dt.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"))
    ids = torch.randint(3, 32000, (4 * world * steps, 256), generator=torch.Generator().manual_seed(0)).tolist()
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, max_steps=steps,
                             use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=steps,
                             ddp_find_unused_parameters=False, dataloader_num_workers=0)
    cls = FusedLossTrainer if loss == "fused" else Trainer
    trainer = cls(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"input_ids": ids, "labels": ids}))
    loaded = _rss_mb() - base_rss
    peak, done = [0.0], threading.Event()

    def sample() -> None:  # ru_maxrss would include loading; this is training's own peak
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    trainer.train()
    done.set()
    sampler.join()

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    params = sum(local(p).numel() * p.element_size() for p in model.parameters())
    params += sum(local(b).numel() * b.element_size() for b in model.buffers())
    # the Trainer frees the gradients after the last step; each trainable parameter had one of its own size
    grads = sum(local(p).numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = sum(local(v).numel() * v.element_size() for s in trainer.optimizer.state.values()
                for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{out}.{rank}").write_text(json.dumps({
        "params_mb": params / 2**20, "grads_mb": grads / 2**20, "optim_mb": state / 2**20, "loaded_mb": loaded,
        "train_peak_mb": peak[0] - base_rss,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(model_dir: str, engine: str, loss: str, steps: int, tmp: Path) -> list[dict]:
    out = tmp / f"{engine}-{loss}"
    me = [str(Path(__file__).resolve()), "--worker", model_dir, engine, loss, str(steps), str(out)]
    if engine == "single":
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), *me]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return [json.loads(p.read_text()) for p in sorted(tmp.glob(f"{out.name}.*"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", nargs=5, metavar=("MODEL", "ENGINE", "LOSS", "STEPS", "OUT"))
    a = parser.parse_args()
    if a.worker:
        model_dir, engine, loss, steps, out = a.worker
        worker(model_dir, engine, loss, int(steps), out)
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(tmp / "model")
    print(f"small LLaMA (hidden 512, 8 layers, vocab 32000), LoRA r=16 all-linear, AdamW, {a.steps} steps of 4 x 256 "
          "tokens per rank, CPU gloo\n")
    print("| engine | loss | ranks | params+buffers per rank (MB) | adapter grads (MB) | AdamW state (MB) "
          "| RSS after loading (MB) | peak RSS in training (MB) | peak RSS of the process (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for engine, loss in [("single", "fused"), ("single", "own"), ("ddp", "fused"), ("ddp", "own"),
                         ("fsdp", "fused"), ("fsdp", "own")]:
        ranks = run(str(tmp / "model"), engine, loss, a.steps, tmp)
        r = ranks[0]
        print(f"| {engine} | {loss} | {len(ranks)} | {r['params_mb']:.1f} | {r['grads_mb']:.2f} | {r['optim_mb']:.2f} "
              f"| {max(x['loaded_mb'] for x in ranks):.0f} | {max(x['train_peak_mb'] for x in ranks):.0f} "
              f"| {max(x['max_rss_mb'] for x in ranks):.0f} |", flush=True)


if __name__ == "__main__":
    main()
