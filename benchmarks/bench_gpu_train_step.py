"""Training-step cost on a CUDA GPU: deltatune against peft, as a ratio to the frozen-base floor.

The same step as ``bench_train_step.py`` (forward + backward + AdamW; the floor lets gradients flow
through the activations only), on a model big enough that an H100 is not waiting on kernel launches:
LLaMA-shaped, hidden 2048, 16 layers, intermediate 5632, vocab 32000, batch 8 x 512, LoRA r = 16 on
all seven projections. ``--dtype bfloat16`` casts the base to bf16 (adapters stay fp32, both
libraries' default); ``float32`` runs with TF32 off.

Time: every config lives in one process, timed interleaved (one step of each, round robin) with CUDA
events; the table shows medians. Memory: ``torch.cuda.max_memory_allocated`` over one step of each
config, measured one config at a time after the others were freed.

    python benchmarks/bench_gpu_train_step.py [--dtype bfloat16] [--reps 10] [--only lora,dora]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import warnings

import torch

from bench_train_step import CLASS, CONFIGS, step

warnings.filterwarnings("ignore")


def build_base(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).to("cuda", dtype)


def build(impl: str, config: str, dtype: torch.dtype):
    model = build_base(dtype)
    if config == "floor":
        model.requires_grad_(False)
    else:
        lib = __import__("peft" if impl == "peft" else "deltatune")
        model = lib.get_peft_model(model, getattr(lib, CLASS[config])(**CONFIGS[config]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    return model.train(), opt


def timed_step(model, opt, ids, floor: bool) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step(model, opt, ids, floor)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--only", default="lora,dora")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    ids = torch.randint(0, 32000, (8, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    names = ["floor"] + [(impl, c) for c in args.only.split(",") for impl in ("peft", "deltatune")]
    peaks = {}
    for name in names:  # memory, one config at a time
        impl, config = ("-", "floor") if name == "floor" else name
        model, opt = build(impl, config, dtype)
        step(model, opt, ids, config == "floor")  # optimizer state exists from here on
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(model, opt, ids, config == "floor")
        peaks[name] = torch.cuda.max_memory_allocated() / 2**20
        del model, opt
        gc.collect()
        torch.cuda.empty_cache()
    built = {n: build(*(("-", "floor") if n == "floor" else n), dtype) for n in names}
    times: dict = {n: [] for n in names}
    for _ in range(2):  # warm-up
        for n, (m, o) in built.items():
            step(m, o, ids, n == "floor")
    for _ in range(args.reps):
        for n, (m, o) in built.items():
            times[n].append(timed_step(m, o, ids, n == "floor"))
    floor = statistics.median(times["floor"])
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, batch 8x512, floor step {floor:.1f} ms, peak {peaks['floor']:.0f} MiB")
    print("| config | peft / floor | deltatune / floor | deltatune / peft | peak MiB peft | peak MiB deltatune |")
    print("|---|---|---|---|---|---|")
    for c in args.only.split(","):
        p, d = statistics.median(times[("peft", c)]), statistics.median(times[("deltatune", c)])
        print(f"| {c} | {p / floor:.3f} | {d / floor:.3f} | {d / p:.3f} | {peaks[('peft', c)]:.0f} | {peaks[('deltatune', c)]:.0f} |")


if __name__ == "__main__":
    main()
