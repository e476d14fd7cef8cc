"""Exact truncated SVD of low-rank sums, and peft's split/clamp of the resulting factors.

Re-factorising a combination of LoRA adapters needs the rank-k truncated SVD of

    dW = sum_i c_i B_i A_i,   B_i: (out, r_i),  A_i: (r_i, in),  c_i = w_i * scaling_i.

peft forms dW densely and runs a full SVD, O(out * in * min(out, in)) per module. dW has rank at
most R = sum_i r_i, so the same SVD comes from two thin QRs and an R x R SVD:

    B' = [c_1 B_1 | ... | c_n B_n]   (out, R)      B'  = Q_B R_B
    A' = [A_1; ...; A_n]             (R, in)       A'^T = Q_A R_A
    dW = B' A' = Q_B (R_B R_A^T) Q_A^T,            R_B R_A^T = U_c S V_c^T
    =>  U = Q_B U_c,  Vh = V_c^T Q_A^T

which costs O((out + in) R^2 + R^3) and never allocates an (out, in) matrix.

Singular vectors are unique only up to sign per pair (and up to rotation within repeated singular
values). We fix the sign so that the largest-magnitude entry of each right singular vector is
positive, so both paths here (low-rank and dense) return the same factors.

peft's factor convention (``LoraModel._svd_generalized_task_arithmetic_weighted_adapter``, after
kohya-ss' ``svd_merge_lora``): ``B = U_k diag(S_k)``, ``A = Vh_k`` -- all of S goes into B -- and an
optional ``svd_clamp`` quantile q clamps both factors to [-h, h] with h the q-quantile of the
*signed* entries of B and A together.
"""
from __future__ import annotations

import torch
from torch import Tensor

_QUANTILE_MAX = 1 << 24  # torch.quantile refuses larger inputs; we then use kthvalue


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (LAPACK has no half-precision SVD/QR)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def canonicalize_signs(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Flip singular-vector pairs so each row of ``Vh`` has its largest-magnitude entry positive.

    ``U[:, j] Vh[j]`` is unchanged by flipping both, so products are unaffected.

    Args:
        U: (out, k) left singular vectors (possibly scaled by S).
        Vh: (k, in) right singular vectors.

    Returns:
        ``(U, Vh)`` with the sign convention applied.
    """
    if Vh.shape[0] == 0:
        return U, Vh
    idx = Vh.abs().argmax(dim=1, keepdim=True)  # (k, 1)
    sign = torch.gather(Vh, 1, idx).sign()  # (k, 1)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign.T, Vh * sign


def lowrank_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of the product ``B @ A`` without forming it.

    Args:
        B: (out, R).
        A: (R, in).

    Returns:
        ``(U, S, Vh)`` with U (out, m), S (m,), Vh (m, in), m = min(out, in, R), S descending,
        ``U diag(S) Vh == B @ A`` up to round-off, signs canonicalised. Computed in float32 (or
        float64 if an input is float64).
    """
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"lowrank_svd needs B (out, R) and A (R, in), got B {tuple(B.shape)} and A {tuple(A.shape)}.")
    dt = _compute_dtype(B, A)
    Q_B, R_B = torch.linalg.qr(B.to(dt))  # (out, p), (p, R), p = min(out, R)
    Q_A, R_A = torch.linalg.qr(A.to(dt).T)  # (in, q), (q, R), q = min(in, R)
    core = R_B @ R_A.T  # (p, q): B @ A = Q_B core Q_A^T
    U_c, S, Vh_c = torch.linalg.svd(core, full_matrices=False)  # (p, m), (m,), (m, q)
    U = Q_B @ U_c  # (out, m)
    Vh = Vh_c @ Q_A.T  # (m, in)
    U, Vh = canonicalize_signs(U, Vh)
    return U, S, Vh


def dense_svd(delta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of a dense matrix, with the same sign convention as :func:`lowrank_svd`.

    Args:
        delta: (out, in).

    Returns:
        ``(U, S, Vh)``: U (out, m), S (m,), Vh (m, in), m = min(out, in).
    """
    if delta.dim() != 2:
        raise ValueError(f"dense_svd needs a 2-D (out, in) matrix, got shape {tuple(delta.shape)}.")
    d = delta.to(_compute_dtype(delta))
    if d.shape[0] < d.shape[1]:
        # LAPACK is several times slower on wide matrices (measured 35 s vs 9.6 s on a 576 x 49152
        # embedding delta); factor the tall transpose instead: Dᵀ = U' S V'ᵀ  =>  D = V' S U'ᵀ.
        Ut, S, Vht = torch.linalg.svd(d.T, full_matrices=False)
        U, Vh = Vht.T, Ut.T
    else:
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    U, Vh = canonicalize_signs(U, Vh)
    return U, S, Vh


def quantile(values: Tensor, q: float) -> Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) for inputs of any size.

    torch.quantile refuses more than 2**24 elements; beyond that we select the two neighbouring
    order statistics with ``kthvalue`` (O(n)) and interpolate the same way.
    """
    flat = values.reshape(-1)
    if flat.numel() <= _QUANTILE_MAX:
        return torch.quantile(flat, q)
    pos = q * (flat.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, flat.numel() - 1)
    v_lo = torch.kthvalue(flat, lo + 1).values
    v_hi = torch.kthvalue(flat, hi + 1).values
    return torch.lerp(v_lo, v_hi, torch.tensor(pos - lo, dtype=flat.dtype))


def quantile_clamp(B: Tensor, A: Tensor, q: float) -> tuple[Tensor, Tensor]:
    """peft's ``svd_clamp``: clamp both factors to [-h, h], h = q-quantile of their signed entries.

    The quantile is taken over the signed entries of B and A pooled, not over magnitudes, so the
    result depends on the singular-vector sign convention (as it does in peft).

    Args:
        B: (out, k) factor holding the singular values.
        A: (k, in) factor.
        q: Quantile in [0, 1].

    Returns:
        The clamped ``(B, A)``.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"svd_clamp is a quantile and must be in [0, 1], got {q}; e.g. svd_clamp=0.99.")
    hi = quantile(torch.cat([B.reshape(-1), A.reshape(-1)]), q)
    return B.clamp(-hi, hi), A.clamp(-hi, hi)


def split_factors(
    U: Tensor, S: Tensor, Vh: Tensor, rank: int, clamp: float | None = None
) -> tuple[Tensor, Tensor]:
    """Truncate an SVD to ``rank`` and split it into LoRA factors the way peft does.

    ``B = U_k diag(S_k)``, ``A = Vh_k``; then the optional quantile clamp. If ``rank`` exceeds
    the number of singular triplets m, the factors are zero-padded to ``rank`` (the missing
    singular values are exactly 0, so ``B @ A`` is unchanged).

    Args:
        U: (out, m). S: (m,). Vh: (m, in).
        rank: Target rank k >= 1.
        clamp: Optional ``svd_clamp`` quantile.

    Returns:
        ``(B, A)``: B (out, rank), A (rank, in).
    """
    if rank < 1:
        raise ValueError(f"svd rank must be >= 1, got {rank}.")
    k = min(rank, S.numel())
    B = U[:, :k] * S[:k]  # (out, k) == U_k @ diag(S_k)
    A = Vh[:k]  # (k, in)
    if k < rank:
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])], dim=0)
    if clamp is not None:
        B, A = quantile_clamp(B, A, clamp)
    return B, A


def lowrank_svd_factors(B: Tensor, A: Tensor, rank: int, clamp: float | None = None) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` LoRA factors of ``B @ A`` via :func:`lowrank_svd` (never forms ``B @ A``)."""
    U, S, Vh = lowrank_svd(B, A)
    return split_factors(U, S, Vh, rank, clamp)


def dense_svd_factors(delta: Tensor, rank: int, clamp: float | None = None) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` LoRA factors of a dense (out, in) ``delta`` via :func:`dense_svd`."""
    U, S, Vh = dense_svd(delta)
    return split_factors(U, S, Vh, rank, clamp)
