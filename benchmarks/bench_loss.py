"""Fused vs standard causal-LM loss at SmolLM2 shapes: time and peak memory of forward + backward.

Standard: ``logits = h @ W.T`` (N, V) then ``F.cross_entropy``. Fused:
``deltatune.train.loss.fused_linear_cross_entropy``. Each measurement runs in its own subprocess,
so one configuration's freed memory cannot hide another's peak; repetitions are interleaved across
configurations so background load hits them alike, and the table reports medians as ratios
against the standard path with the same weight setting, measured in the same run.

Peak memory is the process's peak RSS (``ru_maxrss``, its high-water mark reset once the inputs
exist) minus the RSS at that point: the loss's activations and the weight gradient, not the inputs.

    python benchmarks/bench_loss.py            # N = 4 x 256, H = 576, V = 49152, fp32
    python benchmarks/bench_loss.py --reps 5 --dtype bf16
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = [
    # (label, path, weight trainable, chunk_size or None for the default budget, recompute)
    ("standard, W trainable", "standard", True, None, False),
    ("fused, W trainable", "fused", True, None, False),
    ("fused recompute, W trainable", "fused", True, None, True),
    ("standard, W frozen (LoRA)", "standard", False, None, False),
    ("fused, W frozen (LoRA)", "fused", False, None, False),
    ("fused recompute, W frozen", "fused", False, None, True),
    ("fused chunk=128, W frozen", "fused", False, 128, False),
    ("fused chunk=1024, W frozen", "fused", False, 1024, False),
]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets the high-water mark to the current RSS, so import and
    # set-up transients do not mask the loss's peak. Elsewhere the set-up avoids transients instead.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def worker(spec: dict) -> dict:
    """One configuration in a fresh process: peak extra RSS and median seconds per fwd+bwd."""
    import torch
    import torch.nn.functional as F

    from deltatune.train.loss import chunk_size_for_budget, fused_linear_cross_entropy

    torch.set_num_threads(2)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    g = torch.Generator().manual_seed(0)
    # filled in place: no temporaries that would raise the high-water mark before the baseline
    h = torch.empty(spec["tokens"], spec["hidden"], dtype=dtype).normal_(generator=g).requires_grad_()  # (N, H)
    w = torch.empty(spec["vocab"], spec["hidden"], dtype=dtype).normal_(std=0.02, generator=g)  # (V, H)
    w.requires_grad_(spec["w_grad"])
    y = torch.randint(0, spec["vocab"], (spec["tokens"],), generator=g)  # (N,)
    chunk = spec["chunk"] or chunk_size_for_budget(spec["vocab"], dtype)
    _reset_peak_rss()
    base = _peak_rss_mb()

    def step():
        if spec["path"] == "standard":
            loss = F.cross_entropy((h @ w.T).float(), y)  # (N, V) logits materialised
        else:
            loss = fused_linear_cross_entropy(h, w, y, chunk_size=chunk, recompute=spec["recompute"])
        loss.backward()
        h.grad = w.grad = None

    times = []
    for _ in range(spec["iters"] + 1):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    # The first iteration pays page faults on fresh memory; time the rest.
    return {"seconds": statistics.median(times[1:]), "peak_mb": _peak_rss_mb() - base, "chunk": chunk}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4 * 256)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--reps", type=int, default=3, help="subprocesses per configuration, interleaved")
    ap.add_argument("--iters", type=int, default=2, help="timed iterations inside each subprocess")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    results: dict[str, list[dict]] = {c[0]: [] for c in CONFIGS}
    for rep in range(args.reps):
        order = CONFIGS[rep % len(CONFIGS):] + CONFIGS[:rep % len(CONFIGS)]  # rotate the order each round
        for label, path, w_grad, chunk, recompute in order:
            spec = dict(path=path, w_grad=w_grad, chunk=chunk, recompute=recompute, tokens=args.tokens,
                        hidden=args.hidden, vocab=args.vocab, dtype=args.dtype, iters=args.iters)
            out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=_worker_env(),
                                 check=True, capture_output=True, text=True).stdout
            results[label].append(json.loads(out.strip().splitlines()[-1]))
            print(f"rep {rep + 1}/{args.reps} {label}: {results[label][-1]}", file=sys.stderr)
    _print_table(args, results)


def _worker_env() -> dict:
    # glibc raises its mmap threshold (up to 32 MiB) after large frees, after which freed chunk
    # buffers stay resident in the heap and RSS overstates live tensors. A fixed 4 MiB threshold
    # returns every large tensor to the OS on free, for both paths alike.
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(4 * 2**20)}


def _print_table(args, results) -> None:
    med = {k: (statistics.median(r["seconds"] for r in v), statistics.median(r["peak_mb"] for r in v), v[0]["chunk"])
           for k, v in results.items()}
    logits_mb = args.tokens * args.vocab * 4 / 2**20
    print(f"\nN={args.tokens} H={args.hidden} V={args.vocab} {args.dtype}, 2 threads, median of {args.reps} "
          f"subprocesses x {args.iters} iters; fp32 logits alone = {logits_mb:.0f} MiB\n")
    print("| config | chunk | fwd+bwd s | time vs standard | peak extra MiB | memory vs standard |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, path, w_grad, _, _ in CONFIGS:
        ref = med["standard, W trainable" if w_grad else "standard, W frozen (LoRA)"]
        sec, mb, chunk = med[label]
        chunk_txt = "-" if path == "standard" else str(chunk)
        print(f"| {label} | {chunk_txt} | {sec:.2f} | {sec / ref[0]:.2f}x | {mb:.0f} | {mb / ref[1]:.2f}x |")


if __name__ == "__main__":
    main()
