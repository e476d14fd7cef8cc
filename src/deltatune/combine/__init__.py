"""Combining adapters: merge algorithms, exact low-rank SVD, and peft's add_weighted_adapter math.

* :mod:`.algorithms` -- registered pure tensor merge methods (linear, ties, dare_*, magnitude_prune).
* :mod:`.svd` -- truncated SVD of sums of LoRA products without forming them.
* :mod:`.weighted` -- per-module LoRA combination with peft's semantics.
"""
from .algorithms import get_merge_method, list_merge_methods, register
from .svd import lowrank_svd, lowrank_svd_factors
from .weighted import (
    COMBINATION_TYPES,
    CombinationPlan,
    LoraFactors,
    combine_lora_factors,
    pad_rank,
    plan_combination,
)

__all__ = [
    "COMBINATION_TYPES",
    "CombinationPlan",
    "LoraFactors",
    "combine_lora_factors",
    "get_merge_method",
    "list_merge_methods",
    "lowrank_svd",
    "lowrank_svd_factors",
    "pad_rank",
    "plan_combination",
    "register",
]
