"""The mixed-adapter low-rank update of one layer on the CPU: compiled kernel vs the torch path.

Times ``deltatune.serving.kernels.mixed_lora_`` (y_i += (x_i A_iᵀ) B̃_i for every row i, in place)
with the compiled kernel on and switched off, on the layer shapes of the serving benchmark's model
(hidden 512, intermediate 1408, r = 16), for prefill (128 tokens per row) and decode (1 token), and
``single_lora_`` (one adapter for every row). Both paths get the same tensors in the bank's layout
(A stored transposed, Bᵀ row-major), interleaved, median of --rounds calls each; for scale, the
base layer's own matmul on the same input.

    python benchmarks/bench_cpu_kernel.py [--rounds 50] [--threads 2] [--dtype bfloat16]

With ``--dtype bfloat16`` every tensor is bf16: the kernel is then the AVX512-BF16 one
(``csrc/mixed_lora_bf16.c``) and the torch path bf16 ``bmm``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from deltatune.serving import cpu_kernel
from deltatune.serving.kernels import mixed_lora_, single_lora_

SHAPES = [(512, 512), (512, 1408), (1408, 512)]  # q/k/v/o, gate/up, down


def _time(calls: dict, rounds: int) -> dict[str, float]:
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def _off(fn):
    def run():
        with cpu_kernel.switched(False):
            fn()
    return run


def _row(call: str, x: torch.Tensor, W: torch.Tensor, update, rounds: int) -> None:
    """Time the base matmul and ``update(y, x)`` with the kernel off and on; print one table row."""
    y = F.linear(x, W)
    res = _time({
        "base": lambda: F.linear(x, W),
        "torch": _off(lambda: update(y, x)),
        "kernel": lambda: update(y, x),
    }, rounds)
    rows, tokens, n_in = x.shape
    print(f"| {call} | {rows}x{tokens} | {n_in} -> {W.shape[0]} | {res['base']:.3f} | {res['torch']:.3f} | "
          f"{res['kernel']:.3f} | {res['kernel'] / res['torch']:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dt = getattr(torch, args.dtype)
    print(f"compiled CPU kernel ({args.dtype}): {cpu_kernel.unavailable_reason(dt) or 'in use'}; "
          f"{args.threads} threads, r={args.rank}")
    print("| call | rows x tokens | in -> out | base matmul (ms) | torch path (ms) | kernel (ms) | kernel / torch |")
    print("|---|---|---|---|---|---|---|")
    r = args.rank
    with torch.no_grad():
        for rows, tokens in ((32, 128), (32, 1)):
            for n_in, n_out in SHAPES:
                A = torch.randn(rows, n_in, r, dtype=dt).transpose(1, 2)  # (b, r, in), stored (b, in, r) as in the bank
                Bt = torch.randn(rows, r, n_out, dtype=dt) / r
                x, W = torch.randn(rows, tokens, n_in, dtype=dt), torch.randn(n_out, n_in, dtype=dt) / n_in**0.5
                _row("mixed", x, W, lambda y, x, A=A, Bt=Bt: mixed_lora_(y, x, A, Bt), args.rounds)
        for n_in, n_out in SHAPES:
            A, Bt = torch.randn(n_in, r, dtype=dt).T, torch.randn(r, n_out, dtype=dt) / r
            x, W = torch.randn(32, 128, n_in, dtype=dt), torch.randn(n_out, n_in, dtype=dt) / n_in**0.5
            _row("single", x, W, lambda y, x, A=A, Bt=Bt: single_lora_(y, x, A, Bt), args.rounds)


if __name__ == "__main__":
    main()
