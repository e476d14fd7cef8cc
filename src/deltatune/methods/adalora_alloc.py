"""AdaLoRA's training side (Zhang et al., 2023, arXiv:2303.10512): the orthogonality regulariser (eq. 4),
the budget allocation (sections 3.2-3.3) and peft's ``rank_pattern`` masks. The Trainer callback is in
:mod:`deltatune.methods.adalora_callback`.

Per step, for every entry w of P, Λ and Q (peft's lora_B, lora_E, lora_A):

    I(w)  = |w · ∂L/∂w|                                  sensitivity               (eq. 8)
    Ī(w) ← β1 Ī(w) + (1 − β1) I(w)                       smoothed sensitivity      (eq. 9)
    Ū(w) ← β2 Ū(w) + (1 − β2) |I(w) − Ī(w)|              uncertainty               (eq. 10)
    s(w)  = Ī(w) · Ū(w)                                                            (eq. 11)

A triplet's score is S_i = s(λ_i) + mean_k s(P_ki) + mean_j s(Q_ij) (eq. 7). The budget b(t) of kept
triplets, summed over all layers, follows the cubic schedule of eq. 12:

    b(t) = b0                                       t ≤ tinit
    b(t) = bT + (b0 − bT)(1 − (t − tinit)/(T − tinit − tfinal))³    tinit < t ≤ T − tfinal
    b(t) = bT                                       otherwise

with b0 = init_r · layers and bT = target_r · layers; every deltaT steps the lowest-scoring triplets
beyond b(t) are masked (λ_i = 0). All of this follows peft's ``RankAllocator`` exactly, so a run gives
the same masks in both libraries.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from deltatune.methods.adalora_config import AdaLoraConfig

if TYPE_CHECKING:
    from deltatune.methods.adalora import SVDAdapter

E_KEY = ".lora_E"  # rank_pattern keys are "<module path>.lora_E", as peft writes them

PARAMS = ("lora_A", "lora_E", "lora_B")


# ---- functional core -------------------------------------------------------------------------------
def orth_penalty(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """‖Q Qᵀ − I‖_F + ‖Pᵀ P − I‖_F for one layer (A = Q (r, in), B = P (out, r)).

    The paper's eq. 4 squares both norms; peft (whose checkpoints and losses we match) does not, and
    neither do we. An empty (rank 0) layer contributes 0.
    """
    total = A.new_zeros(())
    for cov in (A @ A.T, B.T @ B):  # (r, r) each
        total = total + torch.norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device), p="fro")
    return total


def orth_regularizer(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | float:
    """peft's R: the sum of ‖·‖_F terms over every A and B, divided by the number of matrices (2 per layer)."""
    if not factors:
        return 0.0
    return sum(orth_penalty(A, B) for A, B in factors) / (2 * len(factors))


def budget_schedule(step: int, init_bgt: int, target_bgt: int, config: AdaLoraConfig) -> tuple[int, bool]:
    """(budget b(t), whether to mask at this step) for the cubic schedule of eq. 12."""
    tinit, tfinal, total = config.tinit, config.tfinal, config.total_step
    if step <= tinit:
        return init_bgt, False
    if step > total - tfinal:
        return target_bgt, True
    left = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_bgt - target_bgt) * left**3 + target_bgt), step % config.deltaT == 0


def smoothed_importance(
    p: torch.Tensor, grad: torch.Tensor, avg: torch.Tensor, unc: torch.Tensor, beta1: float, beta2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One EMA step of eqs. 8-10: returns (Ī, Ū). Ū uses the Ī just updated, as peft does."""
    ipt = (p * grad).abs()
    avg = beta1 * avg + (1 - beta1) * ipt
    unc = beta2 * unc + (1 - beta2) * (ipt - avg).abs()
    return avg, unc


def triplet_scores(s_A: torch.Tensor, s_E: torch.Tensor, s_B: torch.Tensor) -> torch.Tensor:
    """S_i = s(λ_i) + mean_j s(Q_ij) + mean_k s(P_ki) for s_A (r, in), s_E (r, 1), s_B (out, r) -> (r,)."""
    return s_E.view(-1) + (s_A.mean(dim=1) + s_B.mean(dim=0))


def keep_mask(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """True for the triplets that survive pruning the ``n_prune`` lowest scores.

    As in peft, everything at or below the n_prune-th smallest score goes, so exact ties at the threshold
    can prune a few more than n_prune (never fewer).
    """
    if n_prune <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(scores, min(n_prune, scores.numel())).values.item()
    return scores > threshold


def masks_by_module(rank_pattern: Mapping[str, Sequence[bool]] | None, adapter_name: str) -> dict[str, Sequence[bool]]:
    """{module path: init_r-long mask} from peft's keys "<path>.lora_E" (or "<path>.lora_E.<adapter>")."""
    out: dict[str, Sequence[bool]] = {}
    for key, mask in dict(rank_pattern or {}).items():
        key = key[: -len(adapter_name) - 1] if key.endswith(f"{E_KEY}.{adapter_name}") else key
        if not key.endswith(E_KEY):
            raise ValueError(f"rank_pattern key {key!r} does not end in '{E_KEY}'; keys are '<module path>{E_KEY}' as peft writes them")
        out[key[: -len(E_KEY)]] = mask
    return out


# ---- allocator ---------------------------------------------------------------------------------------
class RankAllocator:
    """EMA importance state for one trainable AdaLoRA adapter (peft's ``RankAllocator``)."""

    def __init__(self, adapter_name: str, config: AdaLoraConfig, n_layers: int) -> None:
        self.adapter_name = adapter_name
        self.beta1, self.beta2 = config.beta1, config.beta2
        self.init_bgt = config.init_r * n_layers
        self.target_bgt = config.target_r * n_layers
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    @torch.no_grad()
    def update_ipt(self, adapters: list[tuple[str, "SVDAdapter"]]) -> None:
        """Fold this step's |w · grad| into the smoothed sensitivity and uncertainty of every entry."""
        if all(getattr(a, p).grad is None for _, a in adapters for p in PARAMS):
            raise ValueError(
                f"update_and_allocate found no gradients on AdaLoRA adapter {self.adapter_name!r}: call it after "
                "loss.backward() and before optimizer.zero_grad(), with the adapter active and trainable"
            )
        for path, adapter in adapters:
            for pname in PARAMS:
                p = getattr(adapter, pname)
                key = (path, pname)
                if key not in self.exp_avg_ipt or self.exp_avg_ipt[key].shape != p.shape:
                    self.exp_avg_ipt[key], self.exp_avg_unc[key] = torch.zeros_like(p), torch.zeros_like(p)
                grad = p.grad if p.grad is not None else torch.zeros_like(p)  # a layer unused in forward
                self.exp_avg_ipt[key], self.exp_avg_unc[key] = smoothed_importance(
                    p, grad, self.exp_avg_ipt[key], self.exp_avg_unc[key], self.beta1, self.beta2
                )

    def scores(self, path: str) -> torch.Tensor:
        s = {p: self.exp_avg_ipt[(path, p)] * self.exp_avg_unc[(path, p)] for p in PARAMS}  # eq. 11
        return triplet_scores(s["lora_A"], s["lora_E"], s["lora_B"])

    @torch.no_grad()
    def mask_to_budget(self, adapters: list[tuple[str, "SVDAdapter"]], budget: int) -> dict[str, list[bool]]:
        """Zero λ of every triplet below the global threshold; return peft's rank_pattern for the result."""
        scores = [self.scores(path) for path, _ in adapters]
        flat = torch.cat(scores)  # (total triplets,)
        keep = keep_mask(flat, flat.numel() - budget).split([s.numel() for s in scores])
        pattern: dict[str, list[bool]] = {}
        for (path, adapter), kept in zip(adapters, keep):
            adapter.lora_E.masked_fill_(~kept.view(-1, 1), 0.0)
            pattern[path + ".lora_E"] = _full_mask(adapter, kept)
        return pattern


def _full_mask(adapter: "SVDAdapter", kept: torch.Tensor) -> list[bool]:
    # rank_pattern always spans the init_r original triplets, even for a layer already shrunk on load.
    full = [False] * adapter.init_r
    for position, k in zip(adapter.positions, kept.tolist()):
        full[position] = k
    return full


@torch.no_grad()
def mask_using_rank_pattern(adapters: list[tuple[str, "SVDAdapter"]], rank_pattern, adapter_name: str) -> None:
    """Re-zero the λ of pruned triplets (the final phase: the optimizer would otherwise revive them)."""
    masks = masks_by_module(rank_pattern, adapter_name)
    for path, adapter in adapters:
        if path in masks:
            adapter.lora_E.masked_fill_(~adapter.rows_kept_by(masks[path]).view(-1, 1), 0.0)
