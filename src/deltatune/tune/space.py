"""The search space of ``deltatune tune``, declared in YAML, and how a sample becomes a train config.

A ``search:`` section maps a parameter to its distribution::

    search:
      r: {type: categorical, choices: [4, 8, 16, 32]}
      alpha_over_r: {type: categorical, choices: [1, 2, 4]}   # lora_alpha = alpha_over_r * r
      lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
      dropout: {type: float, low: 0.0, high: 0.2}
      targets: {type: categorical, choices: [qv, attention, all-linear]}
      method: {type: categorical, choices: [lora, dora]}
      train.warmup_ratio: {type: float, low: 0.0, high: 0.2}   # any dotted train-config key

Short names (:data:`SHORT_NAMES`) map onto train-config keys; any other name must be a dotted key
of the train config (``train.weight_decay``, ``method.init_lora_weights``...). A bare value
(``lr: 2e-4``) fixes the parameter instead of searching it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

SHORT_NAMES = {"r": "method.r", "alpha": "method.lora_alpha", "lr": "train.lr", "dropout": "method.lora_dropout",
               "targets": "method.target_modules", "method": "method.name", "batch_size": "train.batch_size",
               "warmup_ratio": "train.warmup_ratio", "weight_decay": "train.weight_decay"}
"""Short parameter names and the train-config keys they set."""

RATIO_NAMES = ("alpha_over_r", "alpha_ratio")
"""Names that set ``method.lora_alpha`` as a multiple of the sampled (or configured) rank."""

TYPES = ("float", "int", "categorical")


@dataclass(frozen=True)
class Param:
    """One searched (or fixed) parameter."""

    name: str
    """The name in the YAML (``r``, ``lr``, ``train.weight_decay``...)."""
    type: str
    """``float``, ``int``, ``categorical`` or ``fixed``."""
    low: float | None = None
    """Lower bound (float/int)."""
    high: float | None = None
    """Upper bound (float/int)."""
    log: bool = False
    """Sample on a log scale (learning rates)."""
    step: float | None = None
    """Grid step (float/int); None for continuous."""
    choices: tuple[Any, ...] = ()
    """Values of a categorical parameter (or the one value of a fixed one)."""

    def suggest(self, trial: Any) -> Any:
        """Draw this parameter from an Optuna trial."""
        if self.type == "fixed":
            return self.choices[0]
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)


def _fail(name: str, problem: str) -> None:
    raise ValueError(f"search.{name}: {problem}")


def parse_param(name: str, spec: Any) -> Param:
    """One entry of the ``search:`` section.

    Raises:
        ValueError: an unknown name or type, missing bounds, an empty choice list, bad bounds.
    """
    if not isinstance(name, str) or not (name in SHORT_NAMES or name in RATIO_NAMES or "." in name):
        _fail(str(name), f"unknown parameter; use one of {', '.join([*SHORT_NAMES, *RATIO_NAMES])} or a dotted "
                         "train-config key such as train.weight_decay")
    if not isinstance(spec, Mapping):
        return Param(name, "fixed", choices=(spec,))
    kind = spec.get("type", "categorical" if "choices" in spec else None)
    if kind not in TYPES:
        _fail(name, f"type is {kind!r}; expected one of {', '.join(TYPES)} (or give choices: [...])")
    unknown = set(spec) - {"type", "low", "high", "log", "step", "choices"}
    if unknown:
        _fail(name, f"unknown keys {sorted(unknown)}; allowed: type, low, high, log, step, choices")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, (list, tuple)) or not choices:
            _fail(name, "a categorical parameter needs a non-empty list: choices: [a, b]")
        return Param(name, kind, choices=tuple(choices))
    low, high = spec.get("low"), spec.get("high")
    if not isinstance(low, (int, float)) or not isinstance(high, (int, float)) or not low <= high:
        _fail(name, f"needs numeric low <= high; got low={low!r}, high={high!r}")
    if spec.get("log") and low <= 0:
        _fail(name, f"a log-scale range must be positive; got low={low!r}")
    return Param(name, kind, low=low, high=high, log=bool(spec.get("log", False)), step=spec.get("step"))


def parse_space(section: Any) -> tuple[Param, ...]:
    """The whole ``search:`` section (a mapping of names to specs).

    Raises:
        ValueError: it is missing or empty, or an entry is invalid.
    """
    if not isinstance(section, Mapping) or not section:
        raise ValueError("the tune config needs a non-empty 'search:' section, e.g. search: {lr: {type: float, "
                         "low: 1.0e-5, high: 1.0e-3, log: true}}")
    return tuple(parse_param(k, v) for k, v in section.items())


def to_layer(params: Mapping[str, Any], base_tree: Mapping[str, Any], resolve_targets: Any = None) -> dict[str, Any]:
    """A train-config layer (nested mapping) that applies sampled ``params`` on top of ``base_tree``.

    Args:
        params: ``{name: value}`` as sampled.
        base_tree: the trial's base config tree (for the rank when only ``alpha_over_r`` is searched).
        resolve_targets: ``preset -> target_modules`` (e.g. ``"attention" -> [q_proj, ...]``); values
            that are not presets pass through.
    """
    layer: dict[str, Any] = {}
    for name, value in params.items():
        if name in RATIO_NAMES:
            continue
        key = SHORT_NAMES.get(name, name)
        if key == "method.target_modules" and resolve_targets is not None and isinstance(value, str):
            value = resolve_targets(value)
        section, _, sub = key.partition(".")
        if sub:
            layer.setdefault(section, {})[sub] = value
        else:
            layer[section] = value
    for name in RATIO_NAMES:
        if name in params:
            rank = layer.get("method", {}).get("r", (base_tree.get("method") or {}).get("r", 8))
            layer.setdefault("method", {})["lora_alpha"] = float(params[name]) * rank
    return layer
