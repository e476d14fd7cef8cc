"""The batched math of mixed-adapter serving: every row of a batch with its own adapter, in one pass.

A bank holds S adapters for one layer, stacked and zero-padded to the largest rank r:
A (S, r, in), B (S, out, r), scaling (S,). A batch of b rows carries slot ids (b,). For row i with
slot k = ids[i], a layer computes

    y_i = ((W (x_i ⊙ g_k) + b) + s_k · (x_i A_kᵀ) B_kᵀ) ⊙ o_k + t_k

which is LoRA/rsLoRA (g = o = 1, t = 0; Hu et al., 2021, arXiv:2106.09685), DoRA with its column
norm frozen at inference (o = m / ‖W + s B A‖_row and t = b ⊙ (1 - o); Liu et al., 2024,
arXiv:2402.09353), IA³ on outputs (A = B = 0, o = l) or on inputs (g = l; Liu et al., 2022,
arXiv:2205.05638), and the base model (slot 0: everything zero or one).

Why gather + ``torch.bmm`` rather than one matmul per distinct adapter (peft's loop over
sub-batches): measured on this machine's CPU (1 thread, CPU time, best of 15; x (b, 128, in), r = 16,
hidden 512 / intermediate 1408), the low-rank part over a layer's base matmul costs

    rows × distinct   layer         gather+bmm   segment (index_select, 2 matmuls, index_add_)
    8 × 8             512 → 512     +12%         +23%
    8 × 8             512 → 1408    +9%          +21%
    32 × 32           512 → 1408    +10%         +13%
    32 × 32           1408 → 512    +8–18%       +13%
    32 × 8            1408 → 512    +12%         +16%

The segment path copies every row's activations twice (select in, add back: T·(in + out) floats per
row) and pays two Python-level matmuls per adapter; the gather copies only each row's factors
(r·(in + out) floats, T/r = 8 times fewer) and is a single batched matmul whatever the number of
adapters, and the gather itself is under 0.5% of the layer. The factors are gathered once per
request (see :class:`deltatune.serving.bank.RowPlan`), so generation's decode steps never gather.
A single adapter for the whole batch takes plain 2-D matmuls.

A Triton kernel (one launch doing the gather inside the matmul, as in Punica's SGMV) would help on
GPUs; it is not included: this project has no GPU to test it on, and the pure-torch path runs on
CUDA as it is.
"""
from __future__ import annotations

import torch


def gather_rows(bank: torch.Tensor, ids: torch.Tensor, rank: int) -> torch.Tensor:
    """Each row's factor, cut to ``rank``: A (S, r, in) -> (b, rank, in); B is passed as (S, r, out)."""
    return bank[:, :rank].index_select(0, ids)  # a contiguous copy of only the used ranks


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
    xa = torch.bmm(x.to(A_rows.dtype), A_rows.transpose(1, 2))  # (b, L, r)
    if xa.dtype == y.dtype and _can_write(y):
        return y.baddbmm_(xa, Bt_rows)  # (b, L, out)
    return y + torch.bmm(xa, Bt_rows).to(y.dtype)


def single_lora_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor) -> torch.Tensor:
    """y += (x Aᵀ) B̃ for one adapter shared by every row; x (..., in), A (r, in), Bt (r, out) scaled."""
    xa = x.reshape(-1, x.shape[-1]).to(A.dtype) @ A.T  # (N, r)
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


def _can_write(y: torch.Tensor) -> bool:
    # Writing into the base output is safe unless autograd is recording through it.
    return not (torch.is_grad_enabled() and y.requires_grad)
