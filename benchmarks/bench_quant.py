"""Benchmark deltatune.quant against fp32 nn.Linear and bitsandbytes, in one run.

Prints markdown tables:

1. bits per parameter of the stored weight state (ours vs bitsandbytes' QuantState tensors);
2. forward time of a 4096x4096 layer at 8 and 1024 input rows, as a ratio to fp32 nn.Linear
   measured in the same run (repetitions interleaved across variants, median reported);
3. time to quantize a 4096x4096 weight, ours vs bitsandbytes.

Usage: python benchmarks/bench_quant.py [--reps N] [--size 4096] [--threads 2] [--rows 8,1024] [--no-compile]

The load average is printed before and after: on a shared machine, other processes stall the
synchronisation points of multi-threaded ops, which penalises many small ops (tiles) much more
than one big matmul; ``--threads 1`` gives ratios that are robust to that.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from deltatune.quant import Linear4bit, Linear8bit, QuantConfig, cached_dequant, quantize_4bit


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb


def bnb_linear4bit(bnb, lin: nn.Linear, double_quant: bool = True):
    layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant)
    layer.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")


def bnb_bits(bnb, w: torch.Tensor, double_quant: bool) -> float:
    q, st = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    n = q.numel() + st.absmax.numel() * st.absmax.element_size()
    if double_quant:
        n += st.state2.absmax.numel() * 4 + 4  # nested absmax + offset
    return 8 * n / w.numel()


def bits_table(w: torch.Tensor, bnb) -> list[str]:
    rows = ["| format | ours (bits/param) | bitsandbytes (bits/param) |", "|---|---|---|"]
    formats = [("NF4 + double quant", "nf4", True), ("NF4", "nf4", False), ("FP4 + double quant", "fp4", True)]
    for name, qt, dq in formats:
        ours = quantize_4bit(w, qt, 64, dq).bits_per_param()
        ref = f"{bnb_bits(bnb, w, dq):.4f}" if bnb is not None and qt == "nf4" else "-"
        rows.append(f"| {name} | {ours:.4f} | {ref} |")
    int8 = Linear8bit.from_linear(nn.Linear(w.shape[1], w.shape[0], bias=False)).quant_state.bits_per_param()
    rows.append(f"| int8 row-wise | {int8:.4f} | - |")
    return rows


def interleaved_medians(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds per call of each fn; one call of every fn per repetition, order rotated."""
    times = {k: [] for k in fns}
    names = list(fns)
    for f in fns.values():  # warm-up (and compilation)
        f()
    for r in range(reps):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def forward_table(size: int, rows_list: list[int], reps: int, compile: bool, bnb) -> list[str]:
    torch.manual_seed(0)
    lin = nn.Linear(size, size)
    variants = {"fp32 nn.Linear": lin, "ours NF4 (eager tiles)": Linear4bit.from_linear(lin)}
    if compile:
        variants["ours NF4 (torch.compile tiles)"] = Linear4bit.from_linear(lin, QuantConfig(compile=True))
    cached = Linear4bit.from_linear(lin)
    variants["ours NF4 (cached_dequant, 2nd+ call)"] = cached
    variants["ours int8"] = Linear8bit.from_linear(lin, QuantConfig(bits=8))
    if bnb is not None:
        variants["bitsandbytes Linear4bit NF4"] = bnb_linear4bit(bnb, lin)
    out = ["| layer | " + " | ".join(f"{r} rows: ms (ratio to fp32)" for r in rows_list) + " |",
           "|---|" + "---|" * len(rows_list)]
    results = {}
    with torch.no_grad(), cached_dequant(cached):
        for r in rows_list:
            x = torch.randn(r, size)
            fns = {k: (lambda m=m: m(x)) for k, m in variants.items()}
            results[r] = interleaved_medians(fns, reps if r <= 64 else max(3, reps // 3))
    for k in variants:
        cells = [f"{results[r][k] * 1e3:.1f} ({results[r][k] / results[r]['fp32 nn.Linear']:.2f}x)" for r in rows_list]
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    return out


def quantize_table(size: int, bnb) -> list[str]:
    w = torch.randn(size, size) * 0.02
    fns = {"ours quantize_4bit": lambda: quantize_4bit(w, "nf4", 64, True)}
    if bnb is not None:
        fns["bitsandbytes quantize_4bit"] = lambda: bnb.functional.quantize_4bit(
            w, blocksize=64, compress_statistics=True, quant_type="nf4")
    med = interleaved_medians(fns, 5)
    return ["| quantize 4096x4096 NF4+DQ | ms |", "|---|---|"] + [f"| {k} | {v * 1e3:.0f} |" for k, v in med.items()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--rows", default="8,1024", help="input row counts, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bnb = _bnb()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"bitsandbytes {getattr(bnb, '__version__', 'not installed')}, "
          f"load average at start {os.getloadavg()[0]:.1f}\n")
    print("\n".join(bits_table(torch.randn(args.size, args.size) * 0.02, bnb)) + "\n")
    print("\n".join(forward_table(args.size, [int(r) for r in args.rows.split(",")], args.reps, not args.no_compile, bnb)) + "\n")
    print("\n".join(quantize_table(args.size, bnb)))
    print(f"\nload average at end {os.getloadavg()[0]:.1f} (cores: {os.cpu_count()})")


if __name__ == "__main__":
    main()
