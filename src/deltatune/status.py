"""peft's status helpers: :func:`get_layer_status` (one row per adapter layer) and :func:`get_model_status`
(the model as a whole), with peft's dataclasses and field names, read from the wrapper layers that
:mod:`deltatune.surgery` put in a model.

A row's ``active_adapters`` are the adapters that run in that layer: the model's active adapters that the
layer holds (peft lists the model's active set on every layer, held there or not). The model's
``active_adapters`` is ``"irregular"`` only when some layer disagrees with that.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Literal

from torch import nn

from deltatune.quant.linear import Linear4bit, Linear8bit, quantized_parameter_count
from deltatune.surgery.layer import AdaptedLayer, ModulesToSaveWrapper

if TYPE_CHECKING:
    from deltatune.model import PeftModel

__all__ = ["TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status", "targeted_module_names"]

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    """One adapter layer (or ``modules_to_save`` wrapper), as peft's ``TunerLayerStatus``.

    ``name``: its path under the tuner (``model.encoder.block.0.layer.0.SelfAttention.q``); ``module_type``:
    the wrapper and the wrapped class (``AdaptedLayer(Linear)``, where peft writes ``lora.Linear``);
    ``enabled``: False between ``disable_adapter_layers()`` and ``enable_adapter_layers()``;
    ``active_adapters``, ``merged_adapters``, ``available_adapters``: adapter names; ``requires_grad``:
    per adapter, True, False or ``"irregular"`` (some of its parameters train, some do not); ``devices``:
    per adapter, the device types its tensors are on; ``quantization_backend``: ``"deltatune 4bit"`` or
    ``"deltatune 8bit"`` for a quantized base layer (peft: ``"bnb 4bit"``), else None.
    """

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    """The whole model, as peft's ``TunerModelStatus``: the layers' values agreed on, or ``"irregular"``
    where layers disagree (an inconsistent state that may not work as expected).

    ``base_model_type``: the user's model's class (``"other"`` for a module that is not a transformers
    model); ``adapter_model_type``: the tuner's class (``AdapterModel``; ``"None"`` for a model with
    adapters injected but no :class:`~deltatune.PeftModel`); ``peft_types``: adapter name -> ``peft_type``;
    ``trainable_params``, ``total_params``: as :meth:`~deltatune.PeftModel.get_nb_trainable_parameters`;
    ``num_adapter_layers``: the rows of :func:`get_layer_status`; the other fields as there, merged.
    """

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular


def _is_peft_model(model: nn.Module) -> bool:
    # A PeftModel, known without importing model.py (which imports this module: its methods delegate here).
    # A transformers model's ``base_model`` is a property, never a submodule.
    return "base_model" in model._modules and hasattr(model, "peft_config") and hasattr(model, "get_nb_trainable_parameters")


def targeted_module_names(model: nn.Module) -> list[str]:
    """peft's ``targeted_module_names``: the paths (in ``model``) of the modules that got an adapter layer,
    in module order; ``modules_to_save`` copies are not targets, nor layers whose every adapter declares
    ``targeted = False`` (LoRA's trainable-token rows, a tied output layer's follower: peft lists neither)."""
    return [name for name, module in model.named_modules() if isinstance(module, AdaptedLayer)
            and any(getattr(a, "targeted", True) for a in module.adapters.values())]


def _agree(values: Iterable[bool | str]) -> bool | Irregular:
    values = list(values)
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _per_adapter(modules: dict[str, nn.Module]) -> tuple[dict[str, bool | Irregular], dict[str, list[str]]]:
    requires_grad, devices = {}, {}
    for key, module in modules.items():
        params = list(module.parameters())
        if params:
            requires_grad[key] = _agree(p.requires_grad for p in params)
        tensors = params + list(module.buffers())
        if tensors:
            devices[key] = sorted({t.device.type for t in tensors})
    return requires_grad, devices


def _quantization_backend(base: nn.Module) -> str | None:
    if isinstance(base, Linear4bit):
        return "deltatune 4bit"
    if isinstance(base, Linear8bit):
        return "deltatune 8bit"
    return None


def _layer_status(name: str, module: nn.Module) -> TunerLayerStatus:
    if isinstance(module, AdaptedLayer):
        adapters = dict(module.adapters.items())
        requires_grad, devices = _per_adapter(adapters)
        return TunerLayerStatus(
            name=name, module_type=f"{type(module).__name__}({type(module.base_layer).__name__})",
            enabled=not module.disabled, active_adapters=list(module.active), merged_adapters=list(module.merged),
            requires_grad=requires_grad, available_adapters=sorted(adapters), devices=devices,
            quantization_backend=_quantization_backend(module.base_layer),
        )
    copies = dict(module.modules_to_save.items())
    requires_grad, devices = _per_adapter(copies)
    return TunerLayerStatus(
        name=name, module_type=f"{type(module).__name__}({type(module.original_module).__name__})",
        enabled=not module.disabled, active_adapters=[module.active] if module.active is not None else [],
        merged_adapters=[], requires_grad=requires_grad, available_adapters=sorted(copies), devices=devices,
        quantization_backend=None,
    )


def _tuner(model: nn.Module, caller: str) -> nn.Module:
    if not _is_peft_model(model):
        return model
    if model.peft_config and all(c.is_prompt_learning for c in model.peft_config.values()):
        raise TypeError(
            f"{caller}() got a PeftModel with only prompt-learning adapters ({', '.join(sorted(model.peft_config))}); "
            "prompt and prefix tuning add virtual tokens to the inputs and have no adapter layers to report (as in peft)"
        )
    return model.base_model


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """peft's ``get_layer_status``: the status of each adapter layer (and ``modules_to_save`` wrapper).

    Args:
        model: a :class:`~deltatune.PeftModel`, or a model with adapters injected
            (:func:`~deltatune.inject_adapter_in_model`).

    Returns:
        One :class:`TunerLayerStatus` per layer, in module order; names are paths under the tuner
        (``model.…``) for a PeftModel, under ``model`` itself otherwise.

    Raises:
        TypeError: a PeftModel whose adapters are all prompt or prefix tuning.
        ValueError: no adapter layers in the model.
    """
    return [row for _, row in _rows(model, "get_layer_status")]


def _rows(model: nn.Module, caller: str) -> list[tuple[nn.Module, TunerLayerStatus]]:
    tuner = _tuner(model, caller)
    rows = [(m, _layer_status(name, m)) for name, m in tuner.named_modules() if isinstance(m, (AdaptedLayer, ModulesToSaveWrapper))]
    if not rows:
        raise ValueError(
            "No adapter layers found in the model, please ensure that it's a PEFT model or that you have PEFT adapters "
            "injected in the model."
        )
    return rows


def _active(modules: list[nn.Module], rows: list[TunerLayerStatus], model_active: list[str] | None) -> list[str] | Irregular:
    """The model's active adapters, or ``"irregular"`` when a layer runs other adapters than those it holds."""
    if model_active is None:  # no PeftModel: the order in which the layers list them
        model_active = list(dict.fromkeys(a for row in rows for a in row.active_adapters))
    for module, row in zip(modules, rows):
        expected = [a for a in model_active if a in row.available_adapters]
        if isinstance(module, ModulesToSaveWrapper):
            expected = expected[:1]  # a wrapper runs one copy: the first active adapter it holds
        if row.active_adapters != expected:
            return "irregular"
    return model_active


def _merged(rows: list[TunerLayerStatus]) -> list[str] | Irregular:
    merged_anywhere = set().union(*(row.merged_adapters for row in rows))
    for row in rows:
        if (set(row.available_adapters) - set(row.merged_adapters)) & merged_anywhere:
            return "irregular"
    return sorted(merged_anywhere)


def _counts(model: nn.Module) -> tuple[int, int]:
    if _is_peft_model(model):
        return model.get_nb_trainable_parameters()
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total + quantized_parameter_count(model)


def _is_transformers_model(model: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in type(model).__mro__)


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """peft's ``get_model_status``: the status of the model's adapters as a whole (see :class:`TunerModelStatus`).

    Args:
        model: a :class:`~deltatune.PeftModel`, or a model with adapters injected.

    Raises:
        TypeError: a PeftModel whose adapters are all prompt or prefix tuning.
        ValueError: no adapter layers in the model.
    """
    pairs = _rows(model, "get_model_status")
    modules, rows = [m for m, _ in pairs], [row for _, row in pairs]
    if _is_peft_model(model):
        peft: "PeftModel" = model  # type: ignore[assignment]
        base_model_type = type(peft.get_base_model()).__name__
        adapter_model_type = type(peft.base_model).__name__
        peft_types = {name: config.peft_type.value for name, config in peft.peft_config.items()}
        model_active = list(peft.active_adapters)
    else:
        base_model_type = type(model).__name__ if _is_transformers_model(model) else "other"
        adapter_model_type, peft_types, model_active = "None", {}, None
    trainable, total = _counts(model)
    enabled = {row.enabled for row in rows}
    requires_grad = collections.defaultdict(list)
    devices = collections.defaultdict(set)
    for row in rows:
        for key, value in row.requires_grad.items():
            requires_grad[key].append(value)
        for key, value in row.devices.items():
            devices[key].update(value)
    backends = {row.quantization_backend for row in rows}
    return TunerModelStatus(
        base_model_type=base_model_type,
        adapter_model_type=adapter_model_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(rows),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=_active(modules, rows, model_active),
        merged_adapters=_merged(rows),
        requires_grad={key: _agree(values) for key, values in requires_grad.items()},
        available_adapters=sorted(set().union(*(row.available_adapters for row in rows))),
        devices={key: sorted(value) for key, value in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )


class ModelReport:
    """What a :class:`~deltatune.model.PeftModel` reports about itself (a mixin): peft's counts and status
    helpers, read from ``self.base_model.model``'s wrapper layers."""

    @property
    def targeted_module_names(self) -> list[str]:
        """peft's attribute: the paths (in the user's model, e.g. ``model.layers.0.self_attn.q_proj``) of the
        modules that got an adapter layer, in module order; empty for prompt and prefix tuning."""
        return targeted_module_names(self.base_model.model)

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """peft's method: one :class:`~deltatune.status.TunerLayerStatus` per adapter layer (see
        :func:`deltatune.status.get_layer_status`)."""
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """peft's method: the adapters' :class:`~deltatune.status.TunerModelStatus` (see
        :func:`deltatune.status.get_model_status`)."""
        return get_model_status(self)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """Count the parameters, as peft does.

        Returns:
            ``(trainable, total)``: the elements of the parameters that require grad, and of all parameters
            plus the weights of 4-bit/8-bit quantized layers (buffers, counted once per logical weight).
        """
        trainable = total = 0
        for p in self.parameters():
            n = p.numel()
            total += n
            trainable += n if p.requires_grad else 0
        total += quantized_parameter_count(self)
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print peft's line: ``trainable params: N || all params: M || trainable%: P`` (see :meth:`get_nb_trainable_parameters`)."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
