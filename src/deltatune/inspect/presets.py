"""Target presets per model family, and the exact number of LoRA parameters each one trains.

The presets themselves (``qv``, ``attention``, ``attention+mlp``, ``all-linear``) are the one table in
:mod:`deltatune.surgery.presets`, which ``deltatune plan`` reads too; this module sizes them for a model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from deltatune.config import LoraConfig
from deltatune.inspect.parameters import parameter_lora_count
from deltatune.methods.base import layer_dims
from deltatune.methods.lora_param import peft_moe_config
# The preset table lives with target resolution; re-exported here, where the inspection API names it.
from deltatune.surgery.presets import FAMILY_PRESETS, PRESET_NAMES, presets_for  # noqa: F401
from deltatune.surgery.targets import pattern_value, resolve_targets


def lora_parameter_count(model: nn.Module, config: LoraConfig, targets: Sequence[str] | None = None) -> int:
    """Exact number of LoRA parameters ``config`` adds to ``model``: sum over targets of r·(in + out),
    with per-module ranks from ``rank_pattern``, plus the DoRA magnitude (out) per target.

    An embedding's LoRA is (r × vocab) and (dim × r), the same r·(in + out) with in = vocab.
    ``model`` may live on the meta device. ``modules_to_save`` copies are not counted here.
    """
    names = resolve_targets(model, config) if targets is None else targets
    total = 0
    for name in names:
        layer = model.get_submodule(name)
        fan_out, fan_in = layer_dims(getattr(layer, "base_layer", layer))
        r = pattern_value(config.rank_pattern, name, config.r)
        total += r * (fan_in + fan_out) + (fan_out if config.use_dora and not isinstance(layer, nn.Embedding) else 0)
    return total


@dataclass(frozen=True)
class PresetRow:
    """One preset applied to one model."""

    name: str
    """Preset name (see :data:`PRESET_NAMES`)."""
    target_modules: tuple[str, ...] | str
    """What goes into ``LoraConfig(target_modules=...)``."""
    modules: int
    """How many modules it wraps; 0 when it does not apply (see :attr:`error`)."""
    trainable: int
    """LoRA parameters at the requested rank."""
    error: str | None
    """Why the preset does not apply to this model, or None."""


def preset_table(model: nn.Module, model_type: str, r: int) -> list[PresetRow]:
    """Every known preset for ``model_type`` with its module count and exact LoRA size at rank ``r``."""
    rows = []
    for name, targets in presets_for(model_type).items():
        config = LoraConfig(r=r, target_modules=targets)
        try:
            config = peft_moe_config(config, model) or config  # fused-MoE families: router/experts become parameters
            chosen = resolve_targets(model, config)
        except ValueError as err:
            rows.append(PresetRow(name, targets, 0, 0, str(err)))
            continue
        trainable = lora_parameter_count(model, config, chosen) + parameter_lora_count(model, config)
        rows.append(PresetRow(name, targets, len(chosen), trainable, None))
    return rows


def targets_config(targets: str | None = None, regex: str | None = None, **fields: Any) -> LoraConfig:
    """A LoraConfig from command-line style targets.

    Args:
        targets: a comma list of module names (``"q_proj,v_proj"``), ``"all-linear"``, or None for the
            family default. Expand preset names first with :func:`expand_preset`.
        regex: a regular expression matched against full module paths, instead of ``targets``.
        **fields: other LoraConfig fields (``r``, ``exclude_modules``, ``layers_to_transform``...).
    """
    if regex is not None:
        return LoraConfig(target_modules=regex, **fields)
    if targets is None or targets == "all-linear":
        return LoraConfig(target_modules=targets, **fields)
    return LoraConfig(target_modules=tuple(t.strip() for t in targets.split(",") if t.strip()), **fields)


def expand_preset(targets: str, model_type: str) -> str:
    """Turn a preset name into the comma list for ``model_type``; other values pass through.

    Raises:
        ValueError: ``targets`` names a preset that has no entry for this model family.
    """
    if targets not in PRESET_NAMES or targets == "all-linear":
        return targets
    known = presets_for(model_type)
    if targets not in known:
        raise ValueError(
            f"preset {targets!r} is not defined for model type {model_type!r} (presets are known for "
            f"{', '.join(sorted(FAMILY_PRESETS))}); pass module names instead, e.g. --targets q_proj,v_proj, "
            "or --targets all-linear"
        )
    return ",".join(known[targets])
