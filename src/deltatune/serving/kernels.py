"""The batched math of mixed-adapter serving: every row of a batch with its own adapter, in one pass.

A bank holds S adapters for one layer, stacked and zero-padded to the largest rank r:
A (S, r, in), Bᵀ (S, r, out) (stored times its scaling s_k). A batch of b rows carries slot ids (b,). For row i with
slot k = ids[i], a layer computes

    y_i = ((W (x_i ⊙ g_k) + b) + s_k · (x_i A_kᵀ) B_kᵀ) ⊙ o_k + t_k

which is LoRA/rsLoRA (g = o = 1, t = 0; Hu et al., 2021, arXiv:2106.09685), DoRA with its column
norm frozen at inference (o = m / ‖W + s B A‖_row and t = b ⊙ (1 - o); Liu et al., 2024,
arXiv:2402.09353), IA³ on outputs (A = B = 0, o = l) or on inputs (g = l; Liu et al., 2022,
arXiv:2205.05638), and the base model (slot 0: everything zero or one).

Why gather + ``torch.bmm`` rather than one matmul per distinct adapter (peft's loop over
sub-batches): measured on this project's CPU (1 thread, CPU time, best of 9-51 runs, r = 16; the
machine was shared, so single figures move by a few points), the low-rank part costs, on top of the
layer's base matmul:

    prefill, x (b, 128, in)         gathered bmm   segment by id (index_select, 2 mm, index_add_)
    8 rows × 8 adapters, 512→512    +26%           +31%
    8 × 8, 512→1408 / 1408→512      +16% / +7%     +14% / +11%
    32 × 8, 512→1408 / 1408→512     +9% / +12%     +10% / +14%
    32 × 32, 512→1408 / 1408→512    +12% / +12%    +13% / +11%

    decode, x (b, 1, 512), 512→1408  base 271 µs (8 rows), 628 µs (32), 769 µs (32 × 32 adapters)
    8 × 8                            +58 µs         +263 µs
    32 × 8                           +446 µs        +694 µs
    32 × 32                          +373 µs        +1860 µs

In prefill the two are within noise of each other (the segment path copies every row's activations
twice, T·(in + out) floats per row; the gather copies only each row's factors, r·(in + out) floats,
and costs under 0.5% of the layer). In decode, the segment path pays two Python-level matmuls per
distinct adapter per layer per token, which is 2-5x the gathered path, so we gather. The factors
are gathered once per request (:meth:`deltatune.serving.bank.LayerBank.plan`), so decode steps
never gather. A single adapter for the whole batch takes plain 2-D matmuls.

Two compiled paths take inference calls where they can, and this module's torch path runs everywhere
else (under autograd, fp16, bf16 on CPUs without AVX512-BF16, on other hardware):
- on x86-64 CPUs in fp32, a fused C kernel (on by default; :mod:`deltatune.serving.cpu_kernel`),
  which runs the thin x·Aᵀ product at about the base GEMM's throughput where ``bmm`` gets ~60%; in
  bf16, its AVX512-BF16 variant;
- on CUDA, a Triton shrink/expand pair (opt-in, ``DELTATUNE_TRITON=1``:
  :mod:`deltatune.serving.triton_lora` says why it is off by default).
"""
from __future__ import annotations

import torch

from deltatune.serving import cpu_kernel


def gather_rows(bank: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """Each row's slot of ``bank`` (S, ...) -> (b, ...), in the bank's layout.

    Rows that name consecutive slots (k, k+1, ..., as a server that fills slots in arrival order
    gives a batch of distinct adapters, or one adapter for the whole batch) get a view of the bank:
    no copy at all. Otherwise a copy (of only what ``bank`` shows: pass it cut to the used rank).
    """
    if slots == list(range(slots[0], slots[0] + len(slots))):
        return bank[slots[0] : slots[0] + len(slots)]
    return bank.index_select(0, torch.tensor(slots, device=bank.device))


def mixed_lora_(y: torch.Tensor, x: torch.Tensor, A_rows: torch.Tensor, Bt_rows: torch.Tensor) -> torch.Tensor:
    """y_i += (x_i A_iᵀ) B_iᵀ for every row i, in place when autograd allows it.

    Args:
        y: (b, L, out) base output.
        x: (b, L, in) layer input.
        A_rows: (b, r, in) each row's A.
        Bt_rows: (b, r, out) each row's Bᵀ, already multiplied by its scaling.

    Returns:
        y with the low-rank terms added (the same tensor when updated in place).
    """
    if y.is_cuda:
        from deltatune.serving import triton_lora  # imported on first CUDA use: Triton is optional

        if triton_lora.usable(y, x, A_rows, Bt_rows):
            return triton_lora.mixed_lora_triton_(y, x, A_rows, Bt_rows)
    elif _can_write(y) and cpu_kernel.usable(y, x, A_rows, Bt_rows):
        return cpu_kernel.mixed_lora_cpu_(y, x, A_rows, Bt_rows)
    # The bank stores A transposed, so Aᵀ (b, in, r) is row-major: x·Aᵀ reads it with unit stride.
    # Measured on this project's CPU (b=32, 512 -> 16): as fast as A·xᵀ with a row-major A at L=128
    # and 1.6-5x faster than A·xᵀ on the transposed storage for decode (L=1..7).
    xa = torch.bmm(x.to(A_rows.dtype), A_rows.transpose(1, 2))  # (b, L, r)
    Bt_rows = _like(Bt_rows, xa)
    if xa.dtype == y.dtype and _can_write(y):
        return y.baddbmm_(xa, Bt_rows)  # (b, L, out)
    return y + torch.bmm(xa, Bt_rows).to(y.dtype)


def single_lora_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor) -> torch.Tensor:
    """y += (x Aᵀ) B̃ for one adapter shared by every row; x (..., in), A (r, in), Bt (r, out) scaled."""
    if y.device.type == "cpu" and _can_write(y) and y.is_contiguous():
        # every token as one long row: the compiled kernel beats MKL's thin mm here too
        # (N = 4096 tokens, r = 16: 512 -> 512 1.29 -> 0.97 ms, 1408 -> 512 3.19 -> 1.80 ms)
        x1, y1 = x.reshape(1, -1, x.shape[-1]), y.view(1, -1, y.shape[-1])
        if cpu_kernel.usable(y1, x1, A[None], Bt[None]):
            cpu_kernel.mixed_lora_cpu_(y1, x1, A[None], Bt[None])
            return y
    xa = x.reshape(-1, x.shape[-1]).to(A.dtype) @ A.T  # (N, r)
    Bt = _like(Bt, xa)
    if xa.dtype == y.dtype and _can_write(y) and y.is_contiguous():
        y.view(-1, y.shape[-1]).addmm_(xa, Bt)  # (N, out)
        return y
    return y + (xa @ Bt).to(y.dtype).view(y.shape)


def mixed_embedding_lora(
    y: torch.Tensor, tokens: torch.Tensor, ids: torch.Tensor, A: torch.Tensor, Bt_rows: torch.Tensor
) -> torch.Tensor:
    """LoRA on an embedding, per row: y_i += A_k[:, tokens_i]ᵀ B̃_i.

    Args:
        y: (b, L, out) base embeddings.
        tokens: (b, L) token ids.
        ids: (b,) slot per row.
        A: (S, r, vocab) the bank's A, cut to the used rank.
        Bt_rows: (b, r, out) each row's scaled Bᵀ.
    """
    after_a = A[ids[:, None], :, tokens.reshape(tokens.shape[0], -1)]  # (b, L, r)
    return y + torch.bmm(after_a, Bt_rows).view(y.shape).to(y.dtype)


def scale_rows(t: torch.Tensor, per_row: torch.Tensor) -> torch.Tensor:
    """t_i ⊙ v_i for t (b, L, n) and per_row (b, n), in t's dtype (computed in per_row's)."""
    return (t.to(per_row.dtype) * per_row[:, None, :]).to(t.dtype)


def affine_rows(y: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
    """y_i ⊙ scale_i + shift_i for y (b, L, out), scale and shift (b, out) or None."""
    if scale is not None:
        y = scale_rows(y, scale)
    if shift is not None:
        y = y + shift[:, None, :].to(y.dtype)
    return y


def _like(factor: torch.Tensor, xa: torch.Tensor) -> torch.Tensor:
    """``factor`` in ``xa``'s dtype. Under autocast (bf16 serving on CPUs with native bf16) the first
    product ran in autocast's dtype, and the in-place second one is not autocast: both factors must
    be cast the same way, or it mixes bf16 and fp32. Elsewhere the dtypes already agree (a no-op)."""
    return factor if factor.dtype == xa.dtype else factor.to(xa.dtype)


def _can_write(y: torch.Tensor) -> bool:
    # Writing into the base output is safe unless autograd is recording through it.
    return not (torch.is_grad_enabled() and y.requires_grad)
