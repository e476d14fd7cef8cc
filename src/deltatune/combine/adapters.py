"""``PeftModel.add_weighted_adapter``: combine LoRA adapters of one model into a new adapter.

IA³ adapters are combined by :mod:`deltatune.combine.ia3` (a weighted sum of the vectors); the
dispatch happens here.

The per-module math lives in :mod:`deltatune.combine.weighted`; this module is the wiring: it checks
the request, creates the new adapter through ``PeftModel.add_adapter``, and fills it one wrapped
layer at a time, so the ``*_svd`` types that need a dense delta hold one module's delta at a time.

Semantics are peft 0.21's (parity-tested), with these deliberate differences:

* an existing ``adapter_name`` is an error (peft silently returns);
* rsLoRA: the new adapter gets ``lora_alpha = sqrt(r)``, so its scaling is 1 as intended (peft keeps
  ``lora_alpha = r``, which scales the combined delta by an extra ``sqrt(r)``);
* DoRA adapters are refused (peft drops their magnitude vectors without a word);
* the new adapter wraps exactly the modules that hold at least one of the combined adapters. peft
  uses the union of ``target_modules`` but keeps the first adapter's ``layers_to_transform`` and
  ``exclude_modules``, which can drop modules; we write peft's union when it selects the same
  modules, else the explicit list of module paths (which peft also loads);
* a module trained in full (``modules_to_save``) by exactly one of the adapters is copied, trained,
  into the new adapter (peft gives the new adapter an untrained copy of the original module);
* ``seed`` / ``generator`` make the DARE types reproducible, and the throwaway initialisation of the
  new adapter does not consume torch's global random state.

References:
    Hu et al., 2021. "LoRA: Low-Rank Adaptation of Large Language Models." arXiv:2106.09685.
    Yadav et al., 2023. "TIES-Merging." arXiv:2306.01708. Yu et al., 2024. "DARE." arXiv:2311.03099.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from deltatune.combine.ia3 import add_weighted_ia3_adapter, is_ia3_request
from deltatune.combine.request import check_names_and_weights
from deltatune.combine.algorithms import SIGN_METHODS, SignMethod, check_density
from deltatune.combine.weighted import (
    COMBINATION_TYPES,
    CombinationPlan,
    LoraFactors,
    combine_lora_factors,
    pad_rank,
    plan_combination,
)
from deltatune.config import LoraConfig, PeftType
from deltatune.surgery.inject import adapted_layers, save_wrappers
from deltatune.surgery.layer import AdaptedLayer, ModulesToSaveWrapper
from deltatune.surgery.targets import resolve_targets
from deltatune.methods.lora import LoraEmbedding, LoraLinear

_PRUNING_PREFIXES = ("ties", "dare_", "magnitude_prune")


def add_weighted_adapter(
    peft_model: Any,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    density: float | None = None,
    majority_sign_method: SignMethod = "total",
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
) -> None:
    """Add ``adapter_name``, a weighted combination of existing LoRA adapters (not made active).

    When the adapters are IA³, the result is peft's IA³ combination (a weighted sum of the vectors, see
    :func:`deltatune.combine.ia3.add_weighted_ia3_adapter`); the LoRA-only options do not apply to it.

    Args:
        peft_model: The :class:`~deltatune.model.PeftModel` holding the adapters.
        adapters: Names of the LoRA (or rsLoRA) adapters to combine.
        weights: One weight per adapter; negative weights subtract.
        adapter_name: Name of the new adapter; must not exist yet.
        combination_type: One of ``linear, cat, svd, ties, ties_svd, dare_linear, dare_ties,
            dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd``. ``cat`` and
            ``svd`` are exact (``svd`` up to truncation); the others without ``_svd`` combine the A
            and B factors separately, a rough approximation that needs equal ranks. With one
            adapter, every type is ``linear`` (a rescaling), as in peft.
        svd_rank: Rank of the ``*_svd`` result; default the largest input rank.
        svd_clamp: Optional quantile at which the ``*_svd`` factors are clamped (peft's option).
        density: Fraction of entries kept, in [0, 1]; required by the ties, dare and
            magnitude_prune types.
        majority_sign_method: ``"total"`` or ``"frequency"``: how the ties types elect signs.
        seed: Seed of the DARE types' random drops (a generator on the adapters' device). Seeded
            like torch's global RNG it reproduces peft's draws; ``None`` uses the global RNG.
        generator: Alternatively, the ``torch.Generator`` the DARE types draw from.
        svd_full_matrices: Accepted for peft compatibility; the factors do not depend on it.
        svd_driver: Accepted for peft compatibility (a CUDA solver choice); not used.

    Raises:
        ValueError: unknown or non-LoRA adapters, DoRA, an existing ``adapter_name``, mismatched
            weights, mixed ranks with a type that needs equal ranks, a missing ``density``, or two
            adapters training the same module in full. The model is left unchanged.
    """
    if is_ia3_request(peft_model, adapters):
        lora_only = {"combination_type": combination_type not in ("svd", "linear"), "svd_rank": svd_rank is not None,
                     "svd_clamp": svd_clamp is not None, "density": density is not None,
                     "majority_sign_method": majority_sign_method != "total", "seed": seed is not None,
                     "generator": generator is not None, "svd_driver": svd_driver is not None}
        if any(lora_only.values()):
            raise TypeError(
                f"{sorted(k for k, v in lora_only.items() if v)} apply to LoRA adapters only; IA³ adapters combine as a "
                "weighted sum of their vectors (peft's IA3Model.add_weighted_adapter takes adapters, weights, adapter_name)."
            )
        add_weighted_ia3_adapter(peft_model, adapters, weights, adapter_name)
        return
    del svd_full_matrices, svd_driver  # exact thin SVDs: neither changes the result
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both.")
    configs = _check_request(peft_model, adapters, weights, adapter_name, majority_sign_method)
    ranks = [max([c.r, *dict(c.rank_pattern).values()]) for c in configs]  # peft's rule with a rank_pattern
    plan = plan_combination(combination_type, ranks, svd_rank=svd_rank, use_rslora=configs[0].use_rslora)
    options = _module_options(plan, combination_type, svd_rank, svd_clamp, density, majority_sign_method)
    model = peft_model.base_model.model
    copies = _full_copies(model, adapters)
    hosts = [(n, h) for n, h in adapted_layers(model) if any(a in h.adapters for a in adapters)]
    if not hosts:
        raise ValueError(f"adapters {list(adapters)} are attached to no layer of this model; nothing to combine.")
    config = _new_config(model, configs, plan, [n for n, _ in hosts])
    # The new adapter's initial values are overwritten below; keep its init off the global RNG.
    with torch.random.fork_rng(devices=_cuda_devices(hosts)):
        peft_model.add_adapter(adapter_name, config)
    try:
        _check_placement(model, adapter_name, hosts)
        gen = _dare_generator(seed, generator, hosts, adapters)
        for name, host in hosts:  # named_modules order: one generator reproduces peft's draws
            _fill_module(name, host, adapters, weights, adapter_name, plan, options, gen)
        for wrapper, source in copies:
            wrapper.modules_to_save[adapter_name].load_state_dict(wrapper.modules_to_save[source].state_dict())
    except BaseException:
        peft_model.delete_adapter(adapter_name)  # never leave a half-filled adapter behind
        raise


# ---- checks ----------------------------------------------------------------------------------------
def _check_request(peft_model, adapters, weights, adapter_name, majority_sign_method) -> list[LoraConfig]:
    known = peft_model.peft_config
    check_names_and_weights(known, adapters, weights, adapter_name)
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {majority_sign_method!r}.")
    for a in adapters:
        config = known[a]
        if config.peft_type != PeftType.LORA or not isinstance(config, LoraConfig):
            raise ValueError(
                f"adapter {a!r} is {config.peft_type.value}; add_weighted_adapter combines LoRA-family adapters "
                "only (LoRA and rsLoRA, any ranks and targets), or IA³ adapters with IA³ adapters. Merge other methods "
                "into the base model instead."
            )
        if config.use_dora:
            raise ValueError(
                f"adapter {a!r} is DoRA: its per-feature magnitudes have no defined weighted combination (peft "
                "silently drops them). Combine plain LoRA/rsLoRA adapters, or merge the DoRA adapter into the base."
            )
    return [known[a] for a in adapters]


def _module_options(plan: CombinationPlan, requested: str, svd_rank, svd_clamp, density, sign_method) -> dict:
    """Keyword arguments of combine_lora_factors for every module; warns once about unused ones."""
    kind = plan.combination_type
    svd_kind = kind.endswith("svd")
    prunes = kind.startswith(_PRUNING_PREFIXES)
    options: dict[str, Any] = {"majority_sign_method": sign_method}
    if prunes:
        options["density"] = check_density(density, kind)
    if svd_kind:
        options.update(svd_rank=plan.r, svd_clamp=svd_clamp)
    unused = [n for n, v, used in (("density", density, prunes), ("svd_rank", svd_rank, svd_kind),
                                   ("svd_clamp", svd_clamp, svd_kind)) if v is not None and not used]
    if unused:
        why = " (a single adapter is always combined as 'linear')" if kind != requested else ""
        warnings.warn(f"{unused} have no effect with combination_type={kind!r}{why}; they are ignored.", stacklevel=4)
    return options


def _full_copies(model: nn.Module, adapters: Sequence[str]) -> list[tuple[ModulesToSaveWrapper, str]]:
    """(wrapper, adapter) for each module trained in full by one of the adapters; two is an error."""
    out = []
    for name, wrapper in save_wrappers(model):
        having = list(dict.fromkeys(a for a in adapters if a in wrapper.modules_to_save))
        if len(having) > 1:
            raise ValueError(
                f"adapters {having} each train their own full copy of {name!r} (modules_to_save); full copies "
                "cannot be weighted and combined (peft refuses this too). Combine adapters of which at most one "
                f"trains {name!r} in full."
            )
        if having:
            out.append((wrapper, having[0]))
    return out


def _check_placement(model: nn.Module, adapter_name: str, hosts: list[tuple[str, AdaptedLayer]]) -> None:
    placed = {n for n, h in adapted_layers(model) if adapter_name in h.adapters}
    wanted = {n for n, _ in hosts}
    if placed != wanted:  # a bug, not a user error: say exactly what differs
        raise RuntimeError(
            f"the combined adapter landed on the wrong modules: extra {sorted(placed - wanted)}, "
            f"missing {sorted(wanted - placed)}. Please report this."
        )


# ---- the new adapter's config ------------------------------------------------------------------------
def _new_config(model: nn.Module, configs: list[LoraConfig], plan: CombinationPlan, names: list[str]) -> LoraConfig:
    """The first adapter's config with peft's changes: rank and alpha from the plan, patterns cleared."""
    saved = [k for c in configs for k in (c.modules_to_save or ())]
    return configs[0].replace(
        r=plan.r, lora_alpha=plan.lora_alpha, rank_pattern={}, alpha_pattern={},
        target_modules=_target_spec(model, configs, names), exclude_modules=None,
        layers_to_transform=None, layers_pattern=None, use_dora=False,
        init_lora_weights=True,  # never PiSSA/OLoRA here: those would rewrite the base weights
        modules_to_save=tuple(dict.fromkeys(saved)) or None,
    )


def _target_spec(model: nn.Module, configs: list[LoraConfig], names: list[str]) -> Any:
    """peft's union of target_modules if it selects exactly ``names``, else the explicit module paths."""
    specs = [c.target_modules for c in configs]
    candidate: Any = None
    if all(isinstance(s, (list, tuple)) for s in specs):
        candidate = tuple(sorted({k for s in specs for k in s}))
    elif len(set(map(str, specs))) == 1:
        candidate = specs[0]  # identical specs (a regex, "all-linear" or None)
    elif all(isinstance(s, str) and s != "all-linear" for s in specs):
        candidate = "|".join(f"({s})" for s in specs)
    if candidate is not None:
        try:
            if set(resolve_targets(model, LoraConfig(target_modules=candidate))) == set(names):
                return candidate
        except ValueError:
            pass
    return tuple(names)


# ---- per-module work -----------------------------------------------------------------------------------
def _factors(name: str, adapter_name: str, adapter: nn.Module, base_layer: nn.Module) -> LoraFactors:
    if not isinstance(adapter, (LoraLinear, LoraEmbedding)):
        raise ValueError(
            f"{name}: adapter {adapter_name!r} is a {type(adapter).__name__}; add_weighted_adapter combines LoRA "
            "adapters on linear and embedding layers (and IA3 adapters), not yet LoRA on convolutions."
        )
    if getattr(adapter, "lora_B_bias", None) is not None:
        raise ValueError(
            f"{name}: adapter {adapter_name!r} has a lora_B bias (lora_bias=True); add_weighted_adapter combines the "
            "low-rank factors only and would drop it. Merge such adapters into the weights instead (merge_and_unload)."
        )
    # Embeddings and GPT-2's Conv1D store the base weight (in, out): peft prunes in that layout.
    fifo = isinstance(adapter, LoraEmbedding) or _is_conv1d(base_layer)
    return LoraFactors(adapter.lora_A.detach(), adapter.lora_B.detach(), float(adapter.scaling), fifo, adapter.use_dora)


@torch.no_grad()
def _fill_module(name, host, adapters, weights, new, plan, options, gen) -> None:
    present = [(a, w) for a, w in zip(adapters, weights) if a in host.adapters]
    factors = [_factors(name, a, host.adapters[a], host.base_layer) for a, _ in present]
    try:
        out = combine_lora_factors(
            factors, [w for _, w in present], plan.combination_type, generator=gen, **options
        )
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    if out.r < plan.r:  # e.g. cat where this module lacks some adapters: peft leaves the rest zero
        out = pad_rank(out, plan.r)
    target = host.adapters[new]
    if out.A.shape != target.lora_A.shape or out.B.shape != target.lora_B.shape:
        raise RuntimeError(
            f"{name}: combined factors A {tuple(out.A.shape)} / B {tuple(out.B.shape)} do not fit the new adapter's "
            f"A {tuple(target.lora_A.shape)} / B {tuple(target.lora_B.shape)}. Please report this."
        )
    target.lora_A.copy_(out.A)
    target.lora_B.copy_(out.B)


def _dare_generator(seed, generator, hosts, adapters) -> torch.Generator | None:
    if seed is None:
        return generator
    name, host = hosts[0]
    device = next(host.adapters[a].lora_A.device for a in adapters if a in host.adapters)
    return torch.Generator(device=device).manual_seed(int(seed))


def _cuda_devices(hosts) -> list[int]:
    return sorted({p.device.index or 0 for _, h in hosts for p in h.adapters.parameters() if p.is_cuda})


def _is_conv1d(layer: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(layer, Conv1D)


__all__ = ["COMBINATION_TYPES", "add_weighted_adapter"]
