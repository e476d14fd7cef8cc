"""QLoRA against fp32 LoRA: training-step time on the small LLaMA benchmark model, and peak memory of
loading SmolLM2-135M-Instruct into 4 bits plus one training step on it.

Every measurement runs in its own process (peak RSS is per process); step times are the median of
interleaved repetitions: the fp32-LoRA and QLoRA workers alternate, so machine noise hits both alike.

    python benchmarks/bench_qlora.py [--reps 5] [--bf16] [--dropout 0.05]

--bf16 runs the steps under bf16 autocast on the CPU, as ``deltatune train`` does where the CPU has
native bf16 (QLoRA's dequantized tiles are then bf16 too).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss() -> int:
    """Peak resident memory since the last :func:`reset_peak` (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    """Free what the allocator holds, then restart the peak counter at the current RSS, so building
    the model (QLoRA quantizes an fp32 model first) does not count towards a step's peak."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def small_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                        num_attention_heads=8, num_key_value_heads=8))


def peft_model(model, quantized: bool, dropout: float = 0.0):
    import deltatune as dt
    from deltatune.quant import QuantConfig, quantize_model

    if quantized:
        model = quantize_model(model, QuantConfig(bits=4, quant_type="nf4", double_quant=True))
    return dt.get_peft_model(model, dt.LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=TARGETS)).train()


def train_steps(model, ids, n: int, bf16: bool = False) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def worker_step(kind: str, reps: int, bf16: bool = False, dropout: float = 0.0) -> dict:
    warm_up(kind)
    model = peft_model(small_llama(), quantized=kind == "qlora", dropout=dropout)
    ids = torch.randint(0, 32000, (4, 256), generator=torch.Generator().manual_seed(0))
    reset_peak()
    before = current()
    times = train_steps(model, ids, reps + 1, bf16)[1:]  # first step warms up
    return {"median_s": statistics.median(times), "step_peak": rss() - before}


def warm_up(kind: str) -> None:
    """Run the same code path once on a tiny model: the first use of a kernel faults in pages of
    libtorch (hundreds of MB of shared library code), which must not count as model memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=4))
    train_steps(peft_model(tiny, quantized=kind == "qlora"), torch.randint(0, 256, (2, 16)), 1)


def worker_smollm(kind: str) -> dict:
    from deltatune.models import load_model_and_tokenizer, resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct")
    warm_up(kind)
    reset_peak()
    base_rss = current()
    t0 = time.perf_counter()
    if kind == "qlora":
        from deltatune.quant import QuantConfig, load_quantized

        model = load_quantized(str(path), QuantConfig(bits=4, quant_type="nf4", double_quant=True))
    else:
        model, _ = load_model_and_tokenizer(str(path))
    # transformers maps the fp32 checkpoint and reads its pages on first use: read every weight once, so
    # "resident" is the weights' real footprint for both kinds (before: fp32 53 MB "resident")
    for t in [*model.parameters(), *model.buffers()]:
        t.float().sum()
    load_s = time.perf_counter() - t0
    load_peak = rss() - base_rss
    model = peft_model(model, quantized=False)  # already quantized when kind == "qlora"
    ids = torch.randint(0, 49152, (4, 256), generator=torch.Generator().manual_seed(0))
    reset_peak()
    before = current()
    train_steps(model, ids, 1)
    return {"load_s": load_s, "load_peak": load_peak, "resident": before - base_rss, "step_peak": rss() - before}


def run_worker(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="alternating worker rounds per kind")
    ap.add_argument("--worker", nargs="+")
    ap.add_argument("--bf16", action="store_true", help="steps under bf16 autocast (both kinds)")
    ap.add_argument("--dropout", type=float, default=0.0, help="lora_dropout of the step benchmark (both kinds)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.worker:
        kind, what = args.worker[0], args.worker[1]
        res = worker_step(kind, args.reps, args.bf16, args.dropout) if what == "step" else worker_smollm(kind)
        print(json.dumps(res))
        return
    steps: dict[str, list[float]] = {"lora": [], "qlora": []}
    for _ in range(args.rounds):
        for kind in ("lora", "qlora"):
            flags = ["--reps", str(args.reps), "--dropout", str(args.dropout), *(["--bf16"] if args.bf16 else [])]
            steps[kind].append(run_worker([kind, "step", *flags])["median_s"])
    mem = {kind: run_worker([kind, "smollm"]) for kind in ("lora", "qlora")}
    lora, qlora = statistics.median(steps["lora"]), statistics.median(steps["qlora"])
    mode = ("bf16 autocast" if args.bf16 else "fp32") + f", lora_dropout {args.dropout}"
    print(f"\nsteps in {mode}, 2 threads, wall clock, median of {args.reps} steps x {args.rounds} alternating worker rounds")
    print("\n| measurement | LoRA (fp32 weights) | QLoRA (NF4 + double quant) | QLoRA / LoRA |")
    print("|---|---|---|---|")
    print(f"| training step, LLaMA h512 x 8 layers, batch 4x256, r=16 all 7 proj. | {lora:.2f} s | {qlora:.2f} s | {qlora / lora:.2f}x |")
    ml, mq = mem["lora"], mem["qlora"]
    print(f"| SmolLM2-135M: load, peak RSS above baseline | {ml['load_peak'] / 2**20:.0f} MB | {mq['load_peak'] / 2**20:.0f} MB | {mq['load_peak'] / ml['load_peak']:.2f}x |")
    print(f"| SmolLM2-135M: model resident after load (weights read once) | {ml['resident'] / 2**20:.0f} MB | {mq['resident'] / 2**20:.0f} MB | {mq['resident'] / ml['resident']:.2f}x |")
    print(f"| SmolLM2-135M: one training step (4x256), peak above resident | {ml['step_peak'] / 2**20:.0f} MB | {mq['step_peak'] / 2**20:.0f} MB | {mq['step_peak'] / ml['step_peak']:.2f}x |")
    print(f"| SmolLM2-135M: load time | {ml['load_s']:.1f} s | {mq['load_s']:.1f} s | {mq['load_s'] / ml['load_s']:.2f}x |")


if __name__ == "__main__":
    main()
