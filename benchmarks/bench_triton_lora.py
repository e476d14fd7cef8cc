"""The mixed-LoRA update alone on CUDA: the Triton shrink/expand pair against the pure-torch bmm path.

Times y_i += (x_i A_iᵀ) B̃_i for every row (each row its own adapter, r = 16) with Triton's
``do_bench`` (GPU time, median), for a small model's layer (512), a 7B-sized one (4096 -> 4096 and
4096 -> 11008) and a decode step, in fp32 and bf16, and for the shrink's row-block sizes.

    python benchmarks/bench_triton_lora.py
"""
from __future__ import annotations

import torch
import triton.testing

from deltatune.serving import kernels, triton_lora

SHAPES = [  # (rows, length, in, out)
    (32, 128, 512, 512),
    (32, 128, 4096, 4096),
    (32, 128, 4096, 11008),
    (64, 1, 4096, 4096),
]


def _torch(y, x, A, Bt):
    with triton_lora.switched(False):
        return kernels.mixed_lora_(y, x, A, Bt)


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    print("| rows x length | in -> out | dtype | torch bmm (us) | Triton, row block 16 / 32 / 64 (us) | best Triton / torch |")
    print("|---|---|---|---|---|---|")
    for rows, length, n_in, n_out in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, length, n_in, device="cuda", dtype=dtype)
            A = torch.randn(rows, 16, n_in, device="cuda", dtype=dtype) / n_in**0.5
            Bt = torch.randn(rows, n_out, 16, device="cuda", dtype=dtype).transpose(1, 2)
            y = torch.randn(rows, length, n_out, device="cuda", dtype=dtype)
            t_torch = triton.testing.do_bench(lambda: _torch(y, x, A, Bt), return_mode="median") * 1e3
            t_tri = [
                triton.testing.do_bench(lambda: triton_lora.mixed_lora_triton_(y, x, A, Bt, block_l=bl), return_mode="median") * 1e3
                for bl in (16, 32, 64)
            ]
            print(f"| {rows}x{length} | {n_in} -> {n_out} | {str(dtype)[6:]} | {t_torch:.1f} | "
                  f"{' / '.join(f'{t:.1f}' for t in t_tri)} | {min(t_tri) / t_torch:.2f} |", flush=True)


if __name__ == "__main__":
    main()
