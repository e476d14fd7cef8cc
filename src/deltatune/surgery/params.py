"""Adapting ``nn.Parameter``s directly (peft's ``target_parameters``): resolution and the host layer.

Mixture-of-experts layers in transformers 5 (Mixtral, Qwen3-MoE, gpt-oss, ...) keep their experts as one
3-D parameter, ``(experts, out, in)`` (or ``(experts, in, out)`` where the module says ``is_transposed``),
not as ``nn.Linear`` modules, so ``target_modules`` cannot reach them. A :class:`ParameterAdapter` changes
such a parameter instead, and a :class:`ParamAdaptedLayer` hosts it: it runs its module with each adapted
parameter replaced, for that call only, by the parameter plus the active adapters' deltas
(``torch.func.functional_call``; the stored parameter is never written outside merging).

``resolve_param_targets(model, config)`` is the dry run, as ``resolve_targets`` is for modules; unlike
peft (which warns when nothing matched at all), an entry that matches no parameter is an error with the
closest name. Injection itself is :func:`deltatune.surgery.inject.inject_parameters`.
"""
from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from deltatune.surgery.adapter import Adapter
from deltatune.surgery.layer import AdaptedLayer
from deltatune.surgery.targets import iter_layers, name_matches


class ParameterAdapter(Adapter):
    """An adapter that changes parameters of its module rather than its output.

    Subclasses set :attr:`param_names` and implement :meth:`adapt`; their ``forward`` is never called.
    """

    param_names: tuple[str, ...]

    def adapt(self, base_layer: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Add this adapter's deltas to ``weights`` (parameter name -> the value the module will see),
        starting from the module's own parameter for a name not there yet."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, base_layer: nn.Module, base_out: torch.Tensor | None) -> torch.Tensor:
        raise RuntimeError(f"{type(self).__name__} changes parameters; its ParamAdaptedLayer applies it")


class ParamAdaptedLayer(AdaptedLayer):
    """A module whose parameters (not its output) carry adapters: ``adapters`` holds only
    :class:`ParameterAdapter`\\ s, which the module sees through its parameters for the duration of a call."""

    def add(self, name: str, adapter: Adapter) -> None:
        if not isinstance(adapter, ParameterAdapter):
            raise ValueError(
                f"this {type(self.base_layer).__name__} is adapted through target_parameters (adapter(s) "
                f"{sorted(self.adapters)}); a layer cannot also be a target_modules target. Leave it out of "
                "target_modules (or out of target_parameters)."
            )
        super().add(name, adapter)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        live = [] if self.disabled else self._live()
        if not live:
            return self.base_layer(*args, **kwargs)
        weights: dict[str, torch.Tensor] = {}
        for adapter in live:
            adapter.adapt(self.base_layer, weights)
        # Swaps the tensors in for this call only and restores the Parameters after it, even on error.
        return torch.func.functional_call(self.base_layer, weights, args, kwargs, tie_weights=False, strict=False)


def _candidates(model: nn.Module) -> list[str]:
    """``<module>.<parameter>`` suffixes of every 2-D/3-D parameter outside the linear layers, in model order:
    what a ``target_parameters`` error suggests."""
    seen: dict[str, None] = {}
    for path, module in iter_layers(model):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() in (2, 3):
                seen.setdefault(f"{path.rsplit('.', 1)[-1]}.{pname}", None)
    return list(seen)


def _no_param_error(model: nn.Module, entry: str) -> ValueError:
    # Suggest like for like: the parameters' last dotted parts, as many as the entry has.
    depth = entry.count(".") + 1
    keys = {
        ".".join(f"{path}.{pname}".split(".")[-depth:]): None
        for path, module in iter_layers(model) for pname, _ in module.named_parameters(recurse=False)
    }
    close = difflib.get_close_matches(entry, list(keys), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(
        f"target_parameters entry {entry!r} matches no parameter of {type(model).__name__}.{hint} "
        f"Parameters that only target_parameters can adapt: {', '.join(_candidates(model)) or '(none)'}"
    )


def resolve_param_targets(model: nn.Module, config: Any) -> dict[str, tuple[str, ...]]:
    """Module path -> the names of its parameters that ``config.target_parameters`` selects, for every module
    that has one, in model order; the names in the module's registration order (peft's nesting order, which
    its on-disk keys follow: the first one is the innermost wrapper, ``base_layer.`` × (n - 1 - i)).

    peft's rule: ``<module path>.<parameter name>`` equals an entry or ends with ``.`` + entry; only the
    module that holds the parameter itself counts (not its parents).

    Raises:
        ValueError: an entry matches no parameter (with the closest name), a matched parameter is not 2-D
            or 3-D, or belongs to the model itself rather than to a submodule.
    """
    entries = tuple(getattr(config, "target_parameters", None) or ())
    found: dict[str, tuple[str, ...]] = {}
    used: set[str] = set()
    for name, p in model.named_parameters(recurse=False):
        if any(name_matches(name, e) for e in entries):
            raise ValueError(
                f"target_parameters entry matches {name!r}, a parameter of the model itself; only parameters of "
                "submodules can be adapted (as in peft)"
            )
    for path, module in iter_layers(model):
        chosen = []
        for pname, p in module.named_parameters(recurse=False):
            hits = [e for e in entries if name_matches(f"{path}.{pname}", e)]
            if not hits:
                continue
            used.update(hits)
            if p.dim() not in (2, 3):
                raise ValueError(
                    f"target_parameters matched {path}.{pname} of shape {tuple(p.shape)}; only 2-D weights and 3-D "
                    "expert stacks (experts, out, in) can carry a LoRA"
                )
            chosen.append(pname)
        if chosen:
            found[path] = tuple(chosen)
    for entry in entries:
        if entry not in used:
            raise _no_param_error(model, entry)
    return found


def check_same_parameters(model: nn.Module, chosen: dict[str, tuple[str, ...]], adapter_name: str) -> None:
    """peft's rule: every adapter with ``target_parameters`` adapts the same parameters, because its keys
    encode a parameter by its depth in the nesting of wrappers, which the set of parameters decides.

    Raises:
        ValueError: another adapter of ``model`` adapts a different set (both named).
    """
    new = {f"{path}.{p}" for path, params in chosen.items() for p in params}
    others: dict[str, set[str]] = {}
    for path, host in model.named_modules():
        if isinstance(host, ParamAdaptedLayer):
            for name, adapter in host.adapters.items():
                others.setdefault(name, set()).update(f"{path}.{p}" for p in adapter.param_names)
    for name, theirs in others.items():
        if name != adapter_name and theirs != new:
            raise ValueError(
                f"adapter {adapter_name!r} adapts the parameters {sorted(new - theirs)[:3] or sorted(new)[:3]}... but "
                f"adapter {name!r} adapts {sorted(theirs - new)[:3] or sorted(theirs)[:3]}...: all adapters with "
                "target_parameters must adapt the same parameters (as in peft, whose keys depend on that set). "
                "Use the same target_parameters for every adapter."
            )


def targeted_parameter_names(model: nn.Module) -> list[str]:
    """peft's ``targeted_parameter_names``: ``<module path>.<parameter>`` of every adapted parameter, in model order."""
    return [f"{path}.{p}" for path, host in model.named_modules() if isinstance(host, ParamAdaptedLayer)
            for p in dict.fromkeys(p for a in host.adapters.values() for p in a.param_names)]
