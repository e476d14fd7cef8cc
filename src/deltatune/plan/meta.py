"""Models on the meta device: exact parameter counts and weight sizes, without any weights.

A model built under ``torch.device("meta")`` has every parameter's shape and dtype but no storage,
so a 70B model costs nothing to build. ``get_peft_model`` works on it too (the adapters are made on
the meta device as well), which gives parameter counts identical to a real model's. The activation
trace on such a model is in :mod:`deltatune.plan.trace`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.model import get_peft_model
from deltatune.models import model_config
from deltatune.plan.setup import TrainSetup, peft_config_for
from deltatune.quant.config import QuantConfig
from deltatune.quant.linear import quantized_parameter_count
from deltatune.quant.model import tied_parameter_names
from deltatune.surgery.layer import AdaptedLayer


def load_model_config(model: Any) -> Any:
    """A transformers config from a registered name, a local folder, a config dict or a config.

    Args:
        model: ``"smollm2-135m-instruct"`` (or another registered name), a path to a transformers
            model folder (only its config.json is read), a ``dict`` with a ``model_type`` key, or a
            ``PretrainedConfig``.

    Raises:
        FileNotFoundError, ValueError: as :func:`deltatune.models.model_config`.
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    if isinstance(model, dict):
        d = dict(model)
        if "model_type" not in d:
            raise ValueError(f"a config dict needs a 'model_type' key (e.g. 'llama'); got keys {sorted(d)}")
        return AutoConfig.for_model(d.pop("model_type"), **d)
    return model_config(model)


def build_meta_model(config: Any, setup: TrainSetup | None = None) -> nn.Module:
    """The causal LM of ``config`` on the meta device, with ``setup``'s adapter attached.

    QLoRA is built as LoRA on a dense base: the counts are the same (the quantized weights are
    frozen) and :func:`weight_bytes` accounts for the 4-bit storage.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        if setup is None:
            return model
        peft_config = peft_config_for(setup, model)
        if peft_config is None:  # full fine-tuning: everything trains
            model.requires_grad_(True)
            return model
        return get_peft_model(model, peft_config)


@dataclass(frozen=True)
class ParamCount:
    """Exact parameter counts of a model with a method applied."""

    trainable: int
    """Parameters that receive gradients."""

    total: int
    """All parameters, the adapter's included (tied weights counted once, as peft does)."""

    @property
    def percent(self) -> float:
        """``100 * trainable / total``."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


def count_model(model: nn.Module) -> ParamCount:
    """Count a built model's parameters (meta or real), as ``get_nb_trainable_parameters`` does."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    total += quantized_parameter_count(model)
    return ParamCount(trainable, total)


def count_parameters(model: Any, setup: TrainSetup | str | None = None, **changes: Any) -> ParamCount:
    """Exact trainable/total parameter counts of ``model`` with a method applied, from its config alone.

    Args:
        model: a registered name, a model folder, a config dict or a ``PretrainedConfig``.
        setup: a :class:`TrainSetup`, or just a method name (``"lora"``, ``"ia3"``, ``"full"``...).
            None counts the bare model (everything trainable).
        **changes: :class:`TrainSetup` fields to set (``r=32``, ``targets="attention"``).

    Returns:
        The :class:`ParamCount`, identical to ``get_nb_trainable_parameters()`` of the real model.
    """
    if isinstance(setup, str):
        setup = TrainSetup(method=setup, **changes)
    elif setup is not None and changes:
        setup = setup.replace(**changes)
    elif setup is None:
        setup = TrainSetup(method="full", **changes)
    return count_model(build_meta_model(load_model_config(model), setup))


def _quant_bytes(numel: int, blocksize: int, double_quant: bool) -> int:
    """Bytes of one NF4 weight as :class:`deltatune.quant.Linear4bit` stores it."""
    n_blocks = -(-numel // blocksize)
    packed = (numel + 1) // 2
    if not double_quant:
        return packed + 4 * n_blocks
    return packed + n_blocks + 4 * -(-n_blocks // 256) + 4


def weight_bytes(model: nn.Module, setup: TrainSetup) -> tuple[int, int]:
    """``(frozen_bytes, trainable_bytes)`` of a meta model built for ``setup``.

    Frozen weights are stored in ``setup.dtype``; under QLoRA the Linear layers that
    :func:`deltatune.quant.plan_quantization` would pick are NF4 (with double quantization ~4.13
    bits per weight) and the rest is fp32, as ``prepare_model_for_kbit_training`` leaves it.
    Trainable parameters are fp32 (adapters are kept in fp32; full fine-tuning keeps fp32 master
    weights under mixed precision).
    """
    quantized = _quantized_weights(model, setup) if setup.method == "qlora" else set()
    frozen = trainable = 0
    frozen_dtype = 4 if setup.method == "qlora" else setup.dtype_bytes
    for p in model.parameters():
        if p.requires_grad:
            trainable += 4 * p.numel()
        elif id(p) in quantized:
            frozen += _quant_bytes(p.numel(), setup.quant_blocksize, setup.double_quant)
        else:
            frozen += frozen_dtype * p.numel()
    return frozen, trainable


def _quantized_weights(model: nn.Module, setup: TrainSetup) -> set[int]:
    """ids of the weights QLoRA stores in 4 bits: every ``nn.Linear`` (wrapped by an adapter or not)
    that :class:`deltatune.quant.QuantConfig`'s ``skip_modules`` keeps in (e.g. not ``lm_head``),
    unless tied to another parameter, as :func:`deltatune.quant.plan_quantization` decides."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    qc = QuantConfig(blocksize=setup.quant_blocksize, double_quant=setup.double_quant)
    tied = {id(base.get_parameter(n)) for n in tied_parameter_names(base) if _has_parameter(base, n)}
    out: set[int] = set()
    for name, module in base.named_modules():
        layer = module.base_layer if isinstance(module, AdaptedLayer) else module
        if type(layer) is nn.Linear and not qc.skips(name) and id(layer.weight) not in tied:
            out.add(id(layer.weight))
    return out


def _has_parameter(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
        return True
    except AttributeError:
        return False
