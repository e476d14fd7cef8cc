"""LoRA on ``nn.Parameter``s (peft's ``target_parameters``): one low-rank update per expert of an MoE layer.

Mixture-of-experts layers in transformers 5 keep their experts as one 3-D parameter W of shape
(E, out, in), or (E, in, out) where the module sets ``is_transposed`` (gpt-oss); a 2-D (out, in) weight
is the case E = 1. Each expert e gets its own LoRA (Hu et al., 2021, arXiv:2106.09685):

    W'_e = W_e + s · B_e A_e,   s = alpha / r (alpha / sqrt(r) for rsLoRA)

Storage is peft's (``ParamWrapper``), so checkpoints are interchangeable: the factors of one parameter are
one pair A (r·E, in), B (out, r·E). Expert e's A_e is the block of rows e·r … e·r + r − 1 of A, but its
B_e is the columns j·E + e (j < r) of B: the two factors interleave the experts differently.

The adapter changes the parameter, not the module's output, so it needs no knowledge of how the experts
are routed: its :class:`~deltatune.surgery.params.ParamAdaptedLayer` runs the module with W' in place of
W for the call. Like peft, it has no dropout (x cannot be factored out of W' x), no DoRA and no mixed
adapter batches; merging adds s · B_e A_e to W_e in place.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Any

import torch
from torch import nn

from deltatune.config import LoraConfig
from deltatune.methods.default_targets import LORA_DEFAULT_TARGETS
from deltatune.methods.lora_init import init_factors
from deltatune.surgery.adapter import linear_layer_types
from deltatune.surgery.params import ParameterAdapter
from deltatune.surgery.targets import iter_layers, output_head, pattern_value


# ---- functional core -------------------------------------------------------------------------------
def expert_factors(A: torch.Tensor, B: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's stacked factors split per expert: (B_e stacked (E, out, r), A_e stacked (E, r, in)).

    Args:
        A: (r·E, in), expert e in rows e·r … e·r + r − 1.
        B: (out, r·E), expert e in columns j·E + e.
        num_experts: E.
    """
    A_e = A.reshape(num_experts, -1, A.shape[-1])  # (E, r, in)
    B_e = B.reshape(B.shape[0], -1, num_experts).permute(2, 0, 1)  # (E, out, r)
    return B_e, A_e


def adapted_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, transposed: bool = False) -> torch.Tensor:
    """W + s · B_e A_e for every expert, in W's dtype, as one batched matmul (no loop over experts).

    Args:
        W: (E, out, in), (E, in, out) when ``transposed``, or a 2-D (out, in) weight.
        A, B: peft's stacked factors (see :func:`expert_factors`); for a 2-D W, A (r, in) and B (out, r).
        scaling: s.
        transposed: W is stored (E, in, out).
    """
    A, B = A.to(W.dtype), B.to(W.dtype)
    # Under autocast the product would come out in autocast's dtype; the module must see W's own dtype.
    # (Only devices with an autocast: a meta-device model, as the planner builds, has none.)
    no_autocast = torch.autocast(W.device.type, enabled=False) if W.device.type in ("cpu", "cuda", "xpu") else contextlib.nullcontext()
    with no_autocast:
        if W.dim() == 2:
            return torch.addmm(W, B, A, alpha=scaling)  # (out, in)
        B_e, A_e = expert_factors(A, B, W.shape[0])
        if transposed:
            return torch.baddbmm(W, A_e.transpose(1, 2), B_e.transpose(1, 2), alpha=scaling)  # (E, in, out)
        return torch.baddbmm(W, B_e, A_e, alpha=scaling)  # (E, out, in)


def expert_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, num_experts: int, transposed: bool = False) -> torch.Tensor:
    """s · B_e A_e for every expert: (E, out, in), or (E, in, out) when ``transposed``."""
    B_e, A_e = expert_factors(A, B, num_experts)
    delta = torch.bmm(B_e, A_e) * scaling  # (E, out, in)
    return delta.transpose(1, 2) if transposed else delta


# ---- modules ---------------------------------------------------------------------------------------
class ParamFactors(nn.Module):
    """The LoRA factors of one parameter, in peft's shapes (A (r·E, in), B (out, r·E))."""

    def __init__(self, shape: torch.Size, transposed: bool, r: int, alpha: float, use_rslora: bool, dtype: torch.dtype) -> None:
        super().__init__()
        if len(shape) == 3:
            experts, d1, d2 = shape
            in_f, out_f = (d1, d2) if transposed else (d2, d1)
        else:
            (out_f, in_f), experts, transposed = shape, 1, False
        self.r, self.lora_alpha, self.num_experts, self.transposed = r, alpha, int(experts), transposed
        self.in_features, self.out_features = int(in_f), int(out_f)
        # lora.lora_scaling's rule (lora.py imports this module, so it cannot be imported here)
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_A = nn.Parameter(torch.zeros(r * self.num_experts, in_f, dtype=dtype))  # (r·E, in)
        self.lora_B = nn.Parameter(torch.zeros(out_f, r * self.num_experts, dtype=dtype))  # (out, r·E)

    def adapted(self, W: torch.Tensor) -> torch.Tensor:
        """W with this update added (a new tensor that carries the factors' gradients)."""
        return adapted_weight(W, self.lora_A, self.lora_B, self.scaling, self.transposed)

    def delta(self, W: torch.Tensor) -> torch.Tensor:
        """The update alone, shaped and typed like W."""
        if W.dim() == 2:
            return (self.scaling * (self.lora_B @ self.lora_A)).to(W.dtype)
        return expert_delta(self.lora_A, self.lora_B, self.scaling, self.num_experts, self.transposed).to(W.dtype)


class LoraParameters(ParameterAdapter):
    """One adapter's LoRA on the targeted parameters of one module (``factors[name]`` per parameter)."""

    mergeable = True
    peft_keys: dict[str, str] = {}  # its keys depend on the parameters: see peft_state_dict
    targeted = False  # peft lists its module in targeted_parameter_names, not in targeted_module_names

    def __init__(self, factors: dict[str, ParamFactors]) -> None:
        super().__init__()
        self.factors = nn.ModuleDict(factors)
        self.param_names = tuple(factors)
        self.use_dora = False

    def adapt(self, base_layer: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        for name, f in self.factors.items():
            W = weights[name] if name in weights else getattr(base_layer, name)
            weights[name] = f.adapted(W)

    @torch.no_grad()
    def merge(self, base_layer: nn.Module) -> None:
        for name, f in self.factors.items():
            p = getattr(base_layer, name)
            p.add_(f.delta(p))

    @torch.no_grad()
    def unmerge(self, base_layer: nn.Module) -> None:
        for name, f in self.factors.items():
            p = getattr(base_layer, name)
            p.sub_(f.delta(p))

    def _disk_prefix(self, name: str) -> str:
        # peft nests one ParamWrapper per parameter, the first in registration order innermost: its keys carry
        # one "base_layer." per wrapper around it (Mixtral: gate_up_proj -> base_layer.lora_A.weight).
        return "base_layer." * (len(self.param_names) - 1 - self.param_names.index(name))

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, f in self.factors.items():
            out[f"{self._disk_prefix(name)}lora_A.weight"] = f.lora_A
            out[f"{self._disk_prefix(name)}lora_B.weight"] = f.lora_B
        return out

    def declared_peft_shapes(self) -> dict[str, tuple[int, ...]]:
        """peft suffix -> the shape each factor must have, from the declared sizes (the save guard's check)."""
        out = {}
        for name, f in self.factors.items():
            out[f"{self._disk_prefix(name)}lora_A.weight"] = (f.r * f.num_experts, f.in_features)
            out[f"{self._disk_prefix(name)}lora_B.weight"] = (f.out_features, f.r * f.num_experts)
        return out


# ---- construction ----------------------------------------------------------------------------------
def make_lora_param_adapter(config: LoraConfig, module: nn.Module, module_name: str, params: tuple[str, ...]) -> LoraParameters:
    """Build and initialise the LoRA on ``module``'s parameters ``params`` (registration order).

    Raises:
        ValueError: an option peft's ``ParamWrapper`` refuses too (dropout, DoRA, fan_in_fan_out), or an
            initialisation that reads the base weight as a matrix (PiSSA, OLoRA).
    """
    refused = {
        "lora_dropout": config.lora_dropout != 0, "use_dora": config.use_dora, "fan_in_fan_out": config.fan_in_fan_out,
        "init_lora_weights": config.init_lora_weights not in (True, False, "gaussian"),
        "lora_bias": bool(getattr(config, "lora_bias", False)),
    }
    bad = [k for k, v in refused.items() if v]
    if bad:
        raise ValueError(
            f"{module_name}: target_parameters does not work with {', '.join(f'{k}={getattr(config, k)!r}' for k in bad)} "
            "(as in peft: dropout cannot be factored out of (W + ΔW) x, and DoRA, fan_in_fan_out, lora_bias and "
            "the initialisations that read W assume a 2-D Linear weight). Use lora_dropout=0, use_dora=False, "
            "lora_bias=False and init_lora_weights True/False/'gaussian', or a separate adapter for the linear layers."
        )
    transposed = bool(getattr(module, "is_transposed", False))
    factors = {}
    for name in params:
        p = getattr(module, name)
        key = f"{module_name}.{name}"
        r = pattern_value(config.rank_pattern, key, config.r)
        alpha = pattern_value(config.alpha_pattern, key, config.lora_alpha)
        dtype = p.dtype if p.is_floating_point() else torch.float32
        f = ParamFactors(p.shape, transposed, r, alpha, config.use_rslora, dtype)
        init_factors(f, module, config.init_lora_weights)
        factors[name] = f
    return LoraParameters(factors)


# peft 0.21's tables for transformers 5's fused MoE families (peft/utils/transformers_weight_conversion.py): a
# transformers-4 module name -> the parameter it became, and the names fused into one parameter.
_MOE_RENAMES = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"},
}
_MOE_FUSED = {"mixtral": {"gate_up_proj": ("w1", "w3")}, "qwen2_moe": {"gate_up_proj": ("gate_proj", "up_proj")}}


def _moe_family(model_type: Any) -> str | None:
    """The table peft rewrites this model type's targets with ("mixtral", "qwen2_moe"), or None."""
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN, get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4: no fused experts, nothing to rewrite
        return None
    if not isinstance(model_type, str) or get_checkpoint_conversion_mapping(model_type) is None:
        return None
    family = "mixtral" if model_type == "mixtral" else _MODEL_TO_CONVERSION_PATTERN.get(model_type)
    return family if family in _MOE_RENAMES else None


def _linear_leaf_names(model: nn.Module) -> list[str]:
    """Last path components of the layers peft's ``all-linear`` selects (Linear/Conv1D except the output head)."""
    head = output_head(model)
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in iter_layers(model) if isinstance(m, linear_layer_types()) and m is not head))


def peft_moe_config(config: LoraConfig, model: nn.Module) -> LoraConfig | None:
    """``config`` with its targets as peft 0.21 sets them on transformers 5, or None where LoRA's per-family
    default ``target_modules`` apply (``target_modules`` None and no ``target_parameters``).

    For the fused-MoE families (Mixtral; Qwen2/3-MoE, OLMoE, DeepSeek-V2/3 and the other models transformers
    converts like Qwen2-MoE), peft moves module names of transformers 4 into ``target_parameters``: ``gate``
    (the router, no longer an nn.Linear) -> ``gate.weight``; the experts' ``w1``/``w3`` or ``gate_proj``/
    ``up_proj`` -> ``gate_up_proj`` at twice the rank and alpha (the two were fused into one matrix);
    ``w2``/``down_proj`` -> ``down_proj``; ``all-linear`` includes all of these. ``target_parameters`` alone
    adapts no module there; elsewhere peft's own per-family table still applies. A regex ``target_modules``
    is used as written.

    Raises:
        ValueError: only some of the names fused into one parameter are targeted (peft's error).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = _moe_family(model_type)
    if config.target_modules is None and not config.target_parameters:
        return None
    if family is None:
        if config.target_modules is not None:
            return config
        return config.replace(target_modules=[]) if model_type not in LORA_DEFAULT_TARGETS else None
    modules = config.target_modules or ()
    if isinstance(modules, str):
        if modules.lower() != "all-linear":
            return config
        modules = (*_linear_leaf_names(model), *_MOE_RENAMES[family])
    renames, kept, params, seen = _MOE_RENAMES[family], [], list(config.target_parameters or ()), {}
    for target in modules:
        old = next((o for o in renames if target == o or target.endswith("." + o)), None)
        if old is None:
            kept.append(target)
            continue
        params.append(renames[old])
        seen.setdefault(renames[old], set()).add(old)
    if config.lora_dropout and len(params) > len(config.target_parameters or ()):
        moved = sorted(set(params) - set(config.target_parameters or ()))
        raise ValueError(
            f"on {model_type} (transformers 5) the router and the experts are no longer nn.Linear layers, so peft turns "
            f"target_modules={config.target_modules!r} into target_parameters {moved}, and LoRA on a parameter has no "
            f"dropout: set lora_dropout=0 (peft refuses lora_dropout={config.lora_dropout} here too), or name only "
            "linear layers such as target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj']"
        )
    ranks, alphas = dict(config.rank_pattern), dict(config.alpha_pattern)
    for new, parts in _MOE_FUSED[family].items():
        got = seen.get(new, set())
        if got and len(got) < len(parts):
            raise ValueError(
                f"cannot target {', '.join(sorted(got))} without {', '.join(sorted(set(parts) - got))}: transformers 5 "
                f"fused them into one parameter, {new} (peft refuses this too); target all of {list(parts)} or none"
            )
        if len(got) == len(parts) > 1:
            key = rf".*\.{re.escape(new)}"
            ranks[key], alphas[key] = config.r * len(parts), config.lora_alpha * len(parts)
    return config.replace(target_modules=kept, target_parameters=list(dict.fromkeys(params)) or None,
                          rank_pattern=ranks, alpha_pattern=alphas)
