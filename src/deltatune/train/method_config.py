"""The ``method:`` section of a training config: which PEFT method, and its options.

``method.name`` picks a method; every other key is a field of that method's config class
(``LoraConfig``, ``IA3Config``...), checked by name and type. Variants of LoRA are names too
(``dora``, ``rslora``, ``qlora``) that fix one flag or add 4-bit quantization; they share LoRA's
options. ``task_type`` defaults to ``CAUSAL_LM`` and AdaLoRA's ``total_step`` to the run's number
of optimizer steps.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from deltatune.config import PeftConfig
from deltatune.methods.adalora import AdaLoraConfig
from deltatune.methods.base import LLAMA_LINEAR, method_names  # noqa: F401  (LLAMA_LINEAR re-exported)
from deltatune.methods.lora import LORA_PRESET  # noqa: F401  (re-exported: the default method's options)
from deltatune.train.config_check import ConfigError, check_section, did_you_mean, field_hints


@dataclass(frozen=True)
class MethodSpec:
    """How a ``method.name`` maps onto a config class (built from the method registry)."""

    config_cls: type[PeftConfig]
    """The adapter config class whose fields are the method's options."""
    preset: Mapping[str, Any] = field(default_factory=dict)
    """Options used when the user sets none (resolved into the run's config file)."""
    fixed: Mapping[str, Any] = field(default_factory=dict)
    """Options the name implies (``dora`` -> ``use_dora: true``); setting them otherwise is an error."""
    quantized: bool = False
    """Quantize the base model's linear layers to 4 bits first (QLoRA)."""


class _MethodTable(Mapping[str, MethodSpec]):
    """``method.name`` -> :class:`MethodSpec`, read from :func:`deltatune.methods.base.method_names` on
    every access, so a method registered later (a plugin) is a ``method.name`` too."""

    def _specs(self) -> dict[str, MethodSpec]:
        return {
            name: MethodSpec(method.config_cls, method.train_preset, variant.fixed, variant.quantized)
            for name, (method, variant) in method_names().items()
        }

    def __getitem__(self, name: str) -> MethodSpec:
        return self._specs()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs())

    def __len__(self) -> int:
        return len(self._specs())

    def __repr__(self) -> str:
        return f"METHODS({', '.join(self)})"


METHODS: Mapping[str, MethodSpec] = _MethodTable()
"""Every method ``deltatune train`` can run, by ``method.name``."""

RELATIVE_LAYERS: Mapping[str, Callable[[int], list[int]]] = types.MappingProxyType({
    "upper_half": lambda n: list(range(n // 2, n)),
})
"""``method.layers_to_transform`` values of ``deltatune train`` that name layers by their place in the model
rather than by index, so that one config fits models of any depth. Resolved against the model's decoder
layer count (:meth:`MethodConfig.build`); the adapter's ``adapter_config.json`` gets the index list, as peft
writes it. ``upper_half``: the layers ``n // 2 .. n - 1``. Without adapters below them, backward stops there."""


def method_spec(name: Any) -> MethodSpec:
    """The spec for ``method.name``.

    Raises:
        ConfigError: the name is not a known method (with the closest one suggested).
    """
    if not isinstance(name, str) or name not in METHODS:
        hint = did_you_mean(name, list(METHODS)) if isinstance(name, str) else ""
        raise ConfigError(f"Unknown method.name {name!r}.{hint} Choose one of: {', '.join(METHODS)}.")
    return METHODS[name]


def same_options(a: str, b: str) -> bool:
    """Whether switching ``method.name`` from ``a`` to ``b`` keeps the options (same config class)."""
    return a in METHODS and b in METHODS and METHODS[a].config_cls is METHODS[b].config_cls


@dataclass(frozen=True)
class MethodConfig:
    """The ``method:`` section: a method name and the options of its config class."""

    name: str = "lora"
    """One of :data:`METHODS`: lora, dora, rslora, qlora, adalora, ia3, prompt, prefix, bottleneck,
    bitfit, partial."""

    options: Mapping[str, Any] = field(default_factory=lambda: dict(LORA_PRESET))
    """Fields of the method's config class (e.g. ``r``, ``lora_alpha``, ``target_modules``)."""

    def __post_init__(self) -> None:
        spec = method_spec(self.name)
        relative = {"layers_to_transform": Sequence[int] | int | str | None} \
            if "layers_to_transform" in field_hints(spec.config_cls) else None
        options = check_section("method", dict(self.options), spec.config_cls, extra=relative)
        layers = options.get("layers_to_transform")
        if isinstance(layers, str) and layers not in RELATIVE_LAYERS:
            raise ConfigError(f"Config key 'method.layers_to_transform' is {layers!r}; expected a layer index, a list "
                              f"of them, or one of {', '.join(RELATIVE_LAYERS)}.")
        for key, value in spec.fixed.items():
            if key in options and options[key] != value:
                raise ConfigError(
                    f"method.{key}={options[key]!r} contradicts method.name={self.name!r}, which implies "
                    f"{key}={value!r}. Remove method.{key}, or pick method.name=lora."
                )
        object.__setattr__(self, "options", types.MappingProxyType(options))
        if spec.config_cls is not AdaLoraConfig or "total_step" in options:
            # the config class's own validation, now rather than after loading (a 2-layer stand-in for the depth)
            self.build(total_steps=None, num_layers=2)

    @property
    def spec(self) -> MethodSpec:
        """The :class:`MethodSpec` of :attr:`name`."""
        return METHODS[self.name]

    @property
    def relative_layers(self) -> bool:
        """Whether ``layers_to_transform`` names layers by place (:data:`RELATIVE_LAYERS`): build needs the depth."""
        return isinstance(self.options.get("layers_to_transform"), str)

    def build(self, total_steps: int | None, num_layers: int | None = None) -> PeftConfig:
        """The adapter config for a run of ``total_steps`` optimizer steps on a model of ``num_layers`` decoder layers.

        Raises:
            ConfigError: the config class rejects the options (its message says which), or
                ``layers_to_transform`` is relative and ``num_layers`` is not given.
        """
        values = {"task_type": "CAUSAL_LM", **self.options, **self.spec.fixed}
        if self.relative_layers:
            if num_layers is None:
                raise ConfigError(f"method.layers_to_transform={values['layers_to_transform']!r} needs the model's "
                                  "number of decoder layers; build the config with num_layers.")
            values["layers_to_transform"] = RELATIVE_LAYERS[values["layers_to_transform"]](num_layers)
        if self.spec.config_cls is AdaLoraConfig and values.get("total_step") is None:
            values["total_step"] = total_steps
        try:
            return self.spec.config_cls(**values)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"Invalid method options for {self.name!r}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., **options}`` as plain YAML-ready values."""
        return {"name": self.name, **{k: _plain(v) for k, v in self.options.items()}}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "MethodConfig":
        """Build from a ``method:`` mapping (``name`` plus options; ``name`` defaults to lora)."""
        values = dict(values)
        return cls(name=values.pop("name", "lora"), options=values)


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return getattr(value, "value", value)  # enums as their values
