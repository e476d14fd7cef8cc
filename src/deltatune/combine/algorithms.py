"""Merge algorithms as pure, registered tensor functions.

Every method combines a list of same-shaped tensors -- LoRA factors, dense adapter deltas or whole
task vectors (fine-tuned minus base weights) -- into one tensor. A method is a composition of two
independent choices:

* a **sparsifier** applied to each input on its own: none, magnitude trimming (keep the top
  ``density`` fraction by absolute value) or DARE (drop at random, rescale the survivors);
* a **combiner**: a weighted sum (task arithmetic), or TIES's sign election followed by a disjoint
  mean over the entries that agree with the elected sign.

So ``dare_ties`` is ``(dare, ties)`` and ``magnitude_prune`` is ``(magnitude, sum)``; none is a
subclass of another. All registered methods share one keyword-only signature::

    fn(tensors, weights, *, density=None, majority_sign_method="total", generator=None) -> Tensor

The semantics are peft's (``peft.utils.merge_utils``), which the parity tests check:

* weights multiply the *sparsified* tensors; TIES elects the sign from the sparsified but
  *unweighted* tensors and divides by the number of agreeing inputs (a mean, not a sum);
* magnitude trimming keeps ``int(density * numel)`` entries; DARE keeps each entry with probability
  ``density`` and divides survivors by ``density``; ``density == 1`` leaves a tensor unchanged.

Where peft is undefined we choose, and say so: magnitude ties are broken towards the lower flat
index (peft leaves it to ``torch.topk``), and DARE with ``density == 0`` returns zeros (peft divides
0 by 0 and returns NaN).

References:
    Ilharco et al., 2023. "Editing Models with Task Arithmetic." ICLR. arXiv:2212.04089.
    Yadav et al., 2023. "TIES-Merging: Resolving Interference When Merging Models." NeurIPS.
    arXiv:2306.01708.
    Yu et al., 2024. "Language Models are Super Mario: Absorbing Abilities from Homologous Models
    as a Free Lunch" (DARE). ICML. arXiv:2311.03099.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import torch
from torch import Tensor

SignMethod = Literal["total", "frequency"]
SIGN_METHODS: tuple[str, ...] = ("total", "frequency")


class MergeMethod(Protocol):
    """The shared signature of every registered merge method."""

    def __call__(
        self,
        tensors: Sequence[Tensor],
        weights: Sequence[float] | Tensor,
        *,
        density: float | None = None,
        majority_sign_method: SignMethod = "total",
        generator: torch.Generator | None = None,
    ) -> Tensor: ...


_REGISTRY: dict[str, MergeMethod] = {}


def register(name: str) -> Callable[[MergeMethod], MergeMethod]:
    """Decorator that registers a merge method under ``name``.

    Raises:
        ValueError: if ``name`` is already taken.
    """

    def deco(fn: MergeMethod) -> MergeMethod:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is already registered; pick another name.")
        _REGISTRY[name] = fn
        return fn

    return deco


def get_merge_method(name: str) -> MergeMethod:
    """Return the merge method registered as ``name``.

    Raises:
        KeyError: if no method has that name; the message lists the registered ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; registered methods: {list_merge_methods()}.") from None


def list_merge_methods() -> list[str]:
    """Names of all registered merge methods, sorted."""
    return sorted(_REGISTRY)


# ---------------------------------------------------------------------------------------------
# Sparsifiers: one tensor in, one tensor of the same shape out.
# ---------------------------------------------------------------------------------------------


def check_density(density: float | None, method: str) -> float:
    """Validate a keep-fraction and return it as a float.

    Raises:
        ValueError: if ``density`` is missing or outside [0, 1].
    """
    if density is None:
        raise ValueError(f"{method!r} needs `density`, the fraction of entries to keep, in [0, 1] (e.g. density=0.5).")
    if not 0.0 <= float(density) <= 1.0:
        raise ValueError(f"density must be in [0, 1] (the fraction of entries kept), got {density} for {method!r}.")
    return float(density)


def magnitude_mask(tensor: Tensor, density: float) -> Tensor:
    """Boolean mask of the ``int(density * numel)`` entries of largest absolute value.

    Exactly that many entries are selected. Among entries whose magnitude equals the k-th largest,
    the ones with the lowest flat (row-major) index win, so the result is deterministic. Runs in
    O(numel) (``kthvalue``, no full sort), so it suits whole-model task vectors.

    Args:
        tensor: Any shape.
        density: Fraction of entries to keep, in [0, 1].

    Returns:
        A bool tensor shaped like ``tensor``.
    """
    flat = tensor.detach().reshape(-1).abs()  # (N,)
    n = flat.numel()
    k = int(density * n)  # peft's count: floor, not round
    if k >= n:
        return torch.ones_like(tensor, dtype=torch.bool)
    if k == 0:
        return torch.zeros_like(tensor, dtype=torch.bool)
    threshold = torch.kthvalue(flat, n - k + 1).values  # the k-th largest magnitude
    above = flat > threshold
    at = flat == threshold
    # Ties at the threshold: keep the earliest ones until exactly k are kept.
    room = k - int(above.sum())
    keep_at = at & (torch.cumsum(at, dim=0) <= room)
    return (above | keep_at).reshape(tensor.shape)


def magnitude_trim(tensor: Tensor, density: float) -> Tensor:
    """TIES step 1, "trim": zero all but the top ``density`` fraction of entries by magnitude.

    ``density == 1`` returns ``tensor`` itself (peft: no pruning).
    """
    if density >= 1.0:
        return tensor
    return tensor * magnitude_mask(tensor, density)


def dare_drop(tensor: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE: drop each entry with probability ``p = 1 - density``, rescale the rest by ``1/(1-p)``.

    The rescale keeps the expectation: E[dare(x)] = x. The mask is drawn with
    ``torch.bernoulli`` on a tensor of ``density`` shaped and typed like ``tensor`` -- the same
    draws peft makes -- so a generator seeded like the global RNG reproduces peft's result.

    Args:
        tensor: Any shape.
        density: Keep probability, in [0, 1]. ``1`` returns ``tensor`` unchanged without drawing.
        generator: Source of randomness; ``None`` uses torch's global RNG (as peft does).

    Returns:
        The sparsified, rescaled tensor. ``density == 0`` gives zeros.
    """
    if density >= 1.0:
        return tensor
    if density <= 0.0:
        return torch.zeros_like(tensor)
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)  # 1 = kept
    return tensor * keep / density


_Sparsifier = Callable[[Tensor, float, "torch.Generator | None"], Tensor]
_SPARSIFIERS: dict[str, _Sparsifier] = {
    "magnitude": lambda t, d, g: magnitude_trim(t, d),
    "dare": dare_drop,
}


# ---------------------------------------------------------------------------------------------
# Combiners: a stack of (sparsified) tensors and weights in, one tensor out.
# ---------------------------------------------------------------------------------------------


def _weights_like(stacked: Tensor, weights: Sequence[float] | Tensor) -> Tensor:
    """Weights as a (n, 1, ..., 1) tensor that broadcasts against ``stacked`` (n, *shape)."""
    w = torch.as_tensor(weights, dtype=stacked.dtype, device=stacked.device).reshape(-1)
    if w.numel() != stacked.shape[0]:
        raise ValueError(f"got {stacked.shape[0]} tensors but {w.numel()} weights; pass one weight per tensor.")
    return w.reshape((-1,) + (1,) * (stacked.dim() - 1))


def weighted_sum(stacked: Tensor, weights: Sequence[float] | Tensor) -> Tensor:
    """Task arithmetic: sum_i w_i * t_i over the leading axis of ``stacked`` (n, *shape)."""
    return (stacked * _weights_like(stacked, weights)).sum(dim=0)


def elect_sign(stacked: Tensor, method: SignMethod = "total") -> Tensor:
    """TIES step 2, "elect": per entry, the sign the inputs agree on, as a mask of agreeing inputs.

    ``"total"`` elects the sign of the sum of the values (mass); ``"frequency"`` the sign held by
    more inputs (a vote). A zero total counts as positive. Zeros never agree with either sign.

    Args:
        stacked: (n, *shape) trimmed, unweighted inputs.
        method: ``"total"`` or ``"frequency"``.

    Returns:
        A bool (n, *shape) mask, True where input i has the elected sign.
    """
    sign = stacked.sign()  # (n, *shape) in {-1, 0, 1}
    if method == "total":
        score = stacked.sum(dim=0)
    elif method == "frequency":
        score = sign.sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {method!r}.")
    elected = torch.where(score >= 0, 1.0, -1.0).to(sign.dtype)  # (*shape)
    return sign == elected


def disjoint_mean(weighted: Tensor, agree: Tensor) -> Tensor:
    """TIES step 3, "disjoint merge": mean over the inputs that agree with the elected sign.

    Entries where no input agrees are 0 (the count is clamped to at least 1).
    """
    total = (weighted * agree).sum(dim=0)
    count = agree.sum(dim=0).clamp(min=1).to(weighted.dtype)
    return total / count


def _stack(tensors: Sequence[Tensor]) -> Tensor:
    if len(tensors) == 0:
        raise ValueError("no tensors to merge; pass at least one.")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"all tensors must have the same shape to be merged, got shapes {sorted(shapes)}.")
    return torch.stack(list(tensors), dim=0)  # (n, *shape)


def _compose(sparsifier: str | None, combiner: Literal["sum", "ties"], name: str) -> MergeMethod:
    """Build a merge method from a sparsifier choice and a combiner choice."""

    def method(
        tensors: Sequence[Tensor],
        weights: Sequence[float] | Tensor,
        *,
        density: float | None = None,
        majority_sign_method: SignMethod = "total",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        if sparsifier is None:
            if density is not None:
                raise ValueError(f"{name!r} does not prune, so `density` must be None; use ties/dare_*/magnitude_prune to prune.")
        else:
            d = check_density(density, name)
            # Sparsify each input on its own, in list order (the order the RNG is consumed in).
            tensors = [_SPARSIFIERS[sparsifier](t, d, generator) for t in tensors]
        stacked = _stack(tensors)
        if combiner == "sum":
            return weighted_sum(stacked, weights)
        # Elect on the unweighted inputs, then average the weighted agreeing ones (peft's order).
        agree = elect_sign(stacked, majority_sign_method)
        weighted = stacked * _weights_like(stacked, weights)
        return disjoint_mean(weighted, agree)

    method.__name__ = name
    method.__qualname__ = name
    method.__doc__ = (
        f"Merge method {name!r}: sparsifier={sparsifier or 'none'}, combiner={combiner}. "
        "See the module docstring for the shared signature and semantics."
    )
    return method


linear = register("linear")(_compose(None, "sum", "linear"))
"""Task arithmetic (Ilharco et al., 2023): sum_i w_i t_i."""
register("task_arithmetic")(linear)
magnitude_prune = register("magnitude_prune")(_compose("magnitude", "sum", "magnitude_prune"))
"""Trim each input to its top-``density`` magnitudes, then take the weighted sum."""
ties = register("ties")(_compose("magnitude", "ties", "ties"))
"""TIES (Yadav et al., 2023): trim, elect sign, disjoint merge."""
dare_linear = register("dare_linear")(_compose("dare", "sum", "dare_linear"))
"""DARE (Yu et al., 2024) drop-and-rescale, then the weighted sum."""
dare_ties = register("dare_ties")(_compose("dare", "ties", "dare_ties"))
"""DARE drop-and-rescale, then TIES's sign election and disjoint merge."""
