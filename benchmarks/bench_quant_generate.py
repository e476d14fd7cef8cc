"""Greedy generation with SmolLM2-135M-Instruct: fp32 weights against 4-bit NF4 (double quant) weights, with
deltatune's compiled 4-bit code (deltatune/native) on and off, in one process, shuffled rounds.

Decoding runs every linear layer on one row per step, where a 4-bit layer decodes its weight in registers
(docs/benchmarks.md, "QLoRA"). Prints generated tokens/s (wall clock, the default 2 threads) and whether the
4-bit model generates the same tokens with the compiled code on and off.

    python benchmarks/bench_quant_generate.py [--tokens 32] [--rounds 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings

import torch

from deltatune.models import load_model_and_tokenizer, resolve_model_path
from deltatune.native import dequant
from deltatune.quant import QuantConfig, load_quantized


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    path = resolve_model_path("smollm2-135m-instruct")
    dense, tok = load_model_and_tokenizer(str(path))
    quantized = load_quantized(str(path), QuantConfig(bits=4, quant_type="nf4", double_quant=True))
    ids = tok("The capital of France is", return_tensors="pt").input_ids

    def generate(model, compiled: bool = True):
        with torch.no_grad(), dequant.switched(compiled):
            return model.eval().generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)

    runs = {"fp32": lambda: generate(dense), "NF4, compiled": lambda: generate(quantized),
            "NF4, compiled code off": lambda: generate(quantized, compiled=False)}
    outputs = {k: f() for k, f in runs.items()}  # warm-up, and the tokens compared below
    times: dict = {k: [] for k in runs}
    for _ in range(args.rounds):
        for k in random.sample(list(runs), len(runs)):
            t0 = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - t0)
    base = args.tokens / statistics.median(times["fp32"])
    print(f"\nSmolLM2-135M-Instruct, greedy, {args.tokens} new tokens, {torch.get_num_threads()} threads, wall clock, "
          f"median of {args.rounds} shuffled rounds\n")
    print("| weights | tokens/s | / fp32 |\n|---|---|---|")
    for k, v in times.items():
        rate = args.tokens / statistics.median(v)
        print(f"| {k} | {rate:.1f} | {rate / base:.2f}x |")
    same = torch.equal(outputs["NF4, compiled"], outputs["NF4, compiled code off"])
    print(f"\nNF4 generates the same tokens with the compiled code on and off: {same}")


if __name__ == "__main__":
    main()
