"""Per-module math of peft's ``LoraModel.add_weighted_adapter``, on plain tensors.

Given the LoRA factors one module holds for several adapters, build the factors of one new
adapter. The combination types and their semantics are peft's (checked by the parity tests):

* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` combine the A factors
  and the B factors *separately* with the registered merge method of the same name. Adapter i's
  coefficient c_i = w_i * scaling_i is split as sqrt(|c_i|) on both sides with its sign on A only,
  so a single adapter is reproduced exactly; with several, the cross terms B_i A_j make it an
  approximation. All adapters need the same rank.
* ``cat`` stacks the ranks: A = [c_1 A_1; ...; c_n A_n], B = [B_1 | ... | B_n]; exact, rank sum r_i.
* ``svd`` re-factorises dW = sum_i c_i B_i A_i to rank k by an exact truncated SVD, computed from
  thin QRs of the stacked factors (never forming dW, see :mod:`deltatune.combine.svd`).
* ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd`` must prune the dense
  per-adapter deltas s_i B_i A_i, so they form them (one module at a time), merge them with the
  registered method, and take the dense truncated SVD.

In every case the new adapter's factors already include all scaling: its own scaling is 1, and
:func:`plan_combination` gives the rank and ``lora_alpha`` its config needs.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .algorithms import SIGN_METHODS, SignMethod, check_density, get_merge_method
from .svd import dense_svd_factors, lowrank_svd_factors

# combination type -> (registered merge method, how the factors are combined)
_TYPES: dict[str, tuple[str | None, str]] = {
    "linear": ("linear", "separate"),
    "ties": ("ties", "separate"),
    "dare_linear": ("dare_linear", "separate"),
    "dare_ties": ("dare_ties", "separate"),
    "magnitude_prune": ("magnitude_prune", "separate"),
    "cat": (None, "cat"),
    "svd": ("linear", "svd"),
    "ties_svd": ("ties", "svd"),
    "dare_linear_svd": ("dare_linear", "svd"),
    "dare_ties_svd": ("dare_ties", "svd"),
    "magnitude_prune_svd": ("magnitude_prune", "svd"),
}
COMBINATION_TYPES: tuple[str, ...] = tuple(_TYPES)
MIXED_RANK_TYPES: tuple[str, ...] = tuple(t for t, (_, kind) in _TYPES.items() if kind != "separate")
_PRUNING_METHODS = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}


@dataclass(frozen=True, eq=False)
class LoraFactors:
    """One adapter's LoRA factors in one module; the module's delta is ``scaling * B @ A``.

    Conventions are peft's parameter shapes. For ``nn.Linear`` and GPT-2's ``Conv1D``: A is
    ``lora_A.weight`` (r, in), B is ``lora_B.weight`` (out, r). For ``nn.Embedding``: A is
    ``lora_embedding_A`` (r, num_embeddings), B is ``lora_embedding_B`` (embedding_dim, r), so
    in = num_embeddings, out = embedding_dim, and ``fan_in_fan_out=True`` because the base weight
    is stored (num_embeddings, embedding_dim). For conv layers: A (r, in, *kernel), B (out, r, 1, ...).
    """

    A: Tensor
    """(r, in) down-projection (or (r, in, *kernel) for convolutions)."""
    B: Tensor
    """(out, r) up-projection (or (out, r, 1, ..., 1) for convolutions)."""
    scaling: float = 1.0
    """The adapter's scaling in this module: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    fan_in_fan_out: bool = False
    """True when the base weight is stored (in, out) (GPT-2 Conv1D, embeddings). It only sets the
    layout in which the dense ``*_svd`` types prune, which matters for DARE's random draws."""
    use_dora: bool = False
    """True for a DoRA adapter. Such adapters are refused by :func:`combine_lora_factors`."""

    def __post_init__(self) -> None:
        A, B = self.A, self.B
        if A.dim() < 2 or B.dim() < 2:
            raise ValueError(f"LoRA factors must be at least 2-D, got A {tuple(A.shape)} and B {tuple(B.shape)}.")
        if B.shape[1] != A.shape[0] or any(s != 1 for s in B.shape[2:]):
            raise ValueError(
                f"LoRA factors do not chain: B {tuple(B.shape)} must be (out, r[, 1...]) with r = A.shape[0] "
                f"for A {tuple(A.shape)}; pass A = lora_A.weight (r, in) and B = lora_B.weight (out, r)."
            )

    @property
    def r(self) -> int:
        """The rank."""
        return self.A.shape[0]

    def delta_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense ``scaling * B @ A`` as an (out, in) matrix (conv kernels flattened into in)."""
        dt = dtype or self.A.dtype
        return (self.B.reshape(self.B.shape[0], self.r).to(dt) @ self.A.reshape(self.r, -1).to(dt)) * self.scaling


@dataclass(frozen=True)
class CombinationPlan:
    """What the combined adapter's config must say, decided once for the whole model."""

    combination_type: str
    """The type to run; peft switches to ``linear`` when only one adapter is combined."""
    r: int
    """The new adapter's rank."""
    lora_alpha: float
    """The new adapter's lora_alpha, chosen so its scaling is 1 (the factors carry all scaling)."""


def plan_combination(
    combination_type: str, ranks: Sequence[int], *, svd_rank: int | None = None, use_rslora: bool = False
) -> CombinationPlan:
    """Decide the combined adapter's rank and lora_alpha, as peft's ``_check_add_weighted_adapter``.

    Args:
        combination_type: One of :data:`COMBINATION_TYPES`.
        ranks: Each adapter's rank (with a rank_pattern, its largest rank, as peft does).
        svd_rank: Target rank of the ``*_svd`` types; defaults to ``max(ranks)``.
        use_rslora: Whether the new adapter's config uses rsLoRA scaling (lora_alpha / sqrt(r)).

    Returns:
        The plan. ``r``: linear family -> the common rank; ``cat`` -> ``sum(ranks)``; ``*_svd`` ->
        ``svd_rank or max(ranks)``. ``lora_alpha`` is ``r`` (peft's choice, scaling 1); with
        rsLoRA it is ``sqrt(r)`` so the scaling stays 1. (peft 0.21 keeps ``lora_alpha = r`` even
        then, which scales the combined delta by an unintended sqrt(r).)

    Raises:
        ValueError: for an unknown type, no adapters, or mixed ranks where they are unsupported.
    """
    _check_type(combination_type)
    if len(ranks) == 0:
        raise ValueError("no adapters to combine; pass at least one rank.")
    if len(ranks) == 1:
        combination_type = "linear"  # peft: a single adapter is only ever rescaled
    kind = _TYPES[combination_type][1]
    if kind == "separate":
        if len(set(ranks)) != 1:
            raise ValueError(_mixed_rank_message(combination_type, list(ranks)))
        r = ranks[0]
    elif kind == "cat":
        r = sum(ranks)
    else:
        r = svd_rank or max(ranks)
    return CombinationPlan(combination_type, r, math.sqrt(r) if use_rslora else float(r))


def combine_lora_factors(
    factors: Sequence[LoraFactors],
    weights: Sequence[float],
    combination_type: str,
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    density: float | None = None,
    majority_sign_method: SignMethod = "total",
    generator: torch.Generator | None = None,
) -> LoraFactors:
    """Combine one module's LoRA factors from several adapters into one adapter's factors.

    Pass only the adapters present in this module, in the caller's adapter order, and the type
    from :func:`plan_combination` (which switches a single adapter to ``linear`` model-wide).
    Random types draw in a fixed order -- per adapter, all A's then all B's (or one dense delta per
    adapter for ``*_svd``) -- so one ``generator`` threaded through the modules in ``named_modules``
    order, seeded like the global RNG, reproduces peft's draws.

    Args:
        factors: Each adapter's factors in this module.
        weights: One weight per adapter; negative weights subtract.
        combination_type: One of :data:`COMBINATION_TYPES`.
        svd_rank: Rank of the ``*_svd`` result; default the largest input rank. Pass
            ``plan.r`` so every module gets the config's rank.
        svd_clamp: Optional quantile for peft's clamp of the SVD factors (``*_svd`` only).
        density: Fraction of entries kept, in [0, 1]; required by the ties, dare and
            magnitude_prune types.
        majority_sign_method: ``"total"`` or ``"frequency"``, for the ties types.
        generator: Randomness for the dare types; ``None`` uses torch's global RNG.

    Returns:
        The new factors, with ``scaling=1.0``, in the dtype of ``factors[0].A``. Rank: the common
        rank (linear family), ``sum(r_i)`` (cat), ``svd_rank`` (svd types).

    Raises:
        ValueError: for an unknown type, mismatched shapes or weights, mixed ranks with a linear
            family type, DoRA adapters, or a missing/invalid ``density``.
    """
    kind = _validate(factors, weights, combination_type, majority_sign_method)
    method_name = _TYPES[combination_type][0]
    prunes = method_name in _PRUNING_METHODS
    _warn_unused(combination_type, kind, prunes, density, svd_rank, svd_clamp)
    kw = dict(majority_sign_method=majority_sign_method, generator=generator)
    if prunes:
        kw["density"] = check_density(density, combination_type)
    coeffs = [float(w) * f.scaling for w, f in zip(weights, factors)]  # c_i = w_i * s_i
    dtype = factors[0].A.dtype
    if kind == "cat":
        # cat: dW = sum_i B_i (c_i A_i), exact; the rank is the sum of the ranks.
        A = torch.cat([f.A * c for f, c in zip(factors, coeffs)], dim=0)  # (sum r_i, in)
        B = torch.cat([f.B for f in factors], dim=1)  # (out, sum r_i)
        return LoraFactors(A.to(dtype), B.to(dtype), 1.0, factors[0].fan_in_fan_out)
    if kind == "separate":
        return _combine_separately(factors, coeffs, get_merge_method(method_name), kw, dtype)
    rank = svd_rank or max(f.r for f in factors)
    if combination_type == "svd":
        # Plain weighted sum: exact low-rank SVD from the stacked factors.
        Bs = torch.cat([_flat_B(f) * c for f, c in zip(factors, coeffs)], dim=1)  # (out, R)
        As = torch.cat([_flat_A(f) for f in factors], dim=0)  # (R, in)
        new_B, new_A = lowrank_svd_factors(Bs, As, rank, svd_clamp)
    else:
        new_B, new_A = _dense_svd_combine(factors, weights, get_merge_method(method_name), kw, rank, svd_clamp)
    return _unflatten(new_A, new_B, factors[0], dtype)


def pad_rank(factors: LoraFactors, r: int) -> LoraFactors:
    """Zero-pad factors to rank ``r`` (``B @ A`` unchanged).

    peft allocates every module of the new adapter at the config's rank; with ``cat``, a module
    that lacks some adapters gets fewer rows, and peft leaves the rest zero. This does the same.
    """
    if r < factors.r:
        raise ValueError(f"cannot pad rank {factors.r} factors down to r={r}; r must be >= {factors.r}.")
    extra = r - factors.r
    A = torch.cat([factors.A, factors.A.new_zeros((extra,) + tuple(factors.A.shape[1:]))], dim=0)
    B = torch.cat([factors.B, factors.B.new_zeros((factors.B.shape[0], extra) + tuple(factors.B.shape[2:]))], dim=1)
    return LoraFactors(A, B, factors.scaling, factors.fan_in_fan_out, factors.use_dora)


def _combine_separately(factors, coeffs, method, kw, dtype) -> LoraFactors:
    """Linear family: merge the A's and the B's separately, c_i split as sqrt on each side."""
    root = [math.sqrt(abs(c)) for c in coeffs]
    w_A = [r if c >= 0 else -r for r, c in zip(root, coeffs)]  # sign on A only
    w_B = root
    cdt = torch.promote_types(dtype, torch.float32)
    A = method([f.A.to(cdt) for f in factors], w_A, **kw)  # (r, in): all A's drawn before any B
    B = method([f.B.to(cdt) for f in factors], w_B, **kw)  # (out, r)
    return LoraFactors(A.to(dtype), B.to(dtype), 1.0, factors[0].fan_in_fan_out)


def _dense_svd_combine(factors, weights, method, kw, rank, clamp) -> tuple[Tensor, Tensor]:
    """Prune-and-merge the dense deltas s_i B_i A_i, then truncated-SVD the result."""
    cdt = torch.promote_types(factors[0].A.dtype, torch.float32)
    fifo = factors[0].fan_in_fan_out
    # Prune in the base weight's layout, like peft's get_delta_weight, so random draws line up.
    deltas = [f.delta_weight(cdt).T if fifo else f.delta_weight(cdt) for f in factors]
    merged = method(deltas, [float(w) for w in weights], **kw)
    del deltas
    return dense_svd_factors(merged.T if fifo else merged, rank, clamp)


def _flat_A(f: LoraFactors) -> Tensor:
    return f.A.reshape(f.r, -1)  # (r, in)


def _flat_B(f: LoraFactors) -> Tensor:
    return f.B.reshape(f.B.shape[0], f.r)  # (out, r)


def _unflatten(A: Tensor, B: Tensor, like: LoraFactors, dtype: torch.dtype) -> LoraFactors:
    k = A.shape[0]
    A = A.reshape((k,) + tuple(like.A.shape[1:])).to(dtype)
    B = B.reshape((B.shape[0], k) + tuple(like.B.shape[2:])).to(dtype)
    return LoraFactors(A, B, 1.0, like.fan_in_fan_out)


def _check_type(combination_type: str) -> str:
    if combination_type not in _TYPES:
        raise ValueError(f"unknown combination_type {combination_type!r}; expected one of {list(COMBINATION_TYPES)}.")
    return _TYPES[combination_type][1]


def _mixed_rank_message(combination_type: str, ranks: list[int]) -> str:
    return (
        f"combination_type={combination_type!r} needs adapters of equal rank, got ranks {ranks}. "
        f"Use one of {list(MIXED_RANK_TYPES)}, which support mixed ranks, or retrain to a common rank."
    )


def _validate(factors, weights, combination_type, majority_sign_method) -> str:
    kind = _check_type(combination_type)
    if len(factors) == 0:
        raise ValueError("no adapters to combine; pass at least one LoraFactors.")
    if len(weights) != len(factors):
        raise ValueError(f"got {len(factors)} adapters but {len(weights)} weights; pass one weight per adapter.")
    if any(f.use_dora for f in factors):
        raise ValueError(
            "cannot combine DoRA adapters: their per-adapter magnitude vectors have no defined combination "
            "(peft 0.21 silently drops them). Merge each DoRA adapter into the base weights instead."
        )
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {majority_sign_method!r}.")
    io = {(tuple(f.B.shape[:1]) + tuple(f.B.shape[2:]), tuple(f.A.shape[1:])) for f in factors}
    if len(io) != 1:
        raise ValueError(f"adapters must target the same module shape; got (out, in) shapes {sorted(io)}.")
    if len({f.fan_in_fan_out for f in factors}) != 1:
        raise ValueError("adapters disagree on fan_in_fan_out for the same module; it is a property of the base layer.")
    if kind == "separate" and len({f.r for f in factors}) != 1:
        raise ValueError(_mixed_rank_message(combination_type, [f.r for f in factors]))
    return kind


def _warn_unused(combination_type, kind, prunes, density, svd_rank, svd_clamp) -> None:
    # peft ignores these silently; we say so once per call site.
    unused = [n for n, v, used in (("density", density, prunes), ("svd_rank", svd_rank, kind == "svd"),
                                   ("svd_clamp", svd_clamp, kind == "svd")) if v is not None and not used]
    if unused:
        warnings.warn(f"{unused} have no effect with combination_type={combination_type!r}; they are ignored.", stacklevel=3)
