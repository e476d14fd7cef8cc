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
from typing import Any, Mapping

from deltatune.config import LoraConfig, PeftConfig
from deltatune.methods.adalora import AdaLoraConfig
from deltatune.methods.bitfit import BitFitConfig
from deltatune.methods.bottleneck import BottleneckConfig
from deltatune.methods.ia3 import IA3Config
from deltatune.methods.partial import PartialConfig
from deltatune.methods.prefix import PrefixTuningConfig
from deltatune.methods.prompt import PromptTuningConfig
from deltatune.train.config_check import ConfigError, check_section, did_you_mean

LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

LORA_PRESET: Mapping[str, Any] = types.MappingProxyType(
    {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": list(LLAMA_LINEAR)}
)
"""Default LoRA options of ``deltatune train``: rank 8 on every linear layer of the blocks (the
default model is LLaMA-shaped; for other families set ``method.target_modules``, or ``all-linear``)."""


@dataclass(frozen=True)
class MethodSpec:
    """How a ``method.name`` maps onto a config class."""

    config_cls: type[PeftConfig]
    """The adapter config class whose fields are the method's options."""
    preset: Mapping[str, Any] = field(default_factory=dict)
    """Options used when the user sets none (resolved into the run's config file)."""
    fixed: Mapping[str, Any] = field(default_factory=dict)
    """Options the name implies (``dora`` -> ``use_dora: true``); setting them otherwise is an error."""
    quantized: bool = False
    """Quantize the base model's linear layers to 4 bits first (QLoRA)."""


METHODS: dict[str, MethodSpec] = {
    "lora": MethodSpec(LoraConfig, LORA_PRESET),
    "dora": MethodSpec(LoraConfig, LORA_PRESET, {"use_dora": True}),
    "rslora": MethodSpec(LoraConfig, LORA_PRESET, {"use_rslora": True}),
    "qlora": MethodSpec(LoraConfig, LORA_PRESET, quantized=True),
    "adalora": MethodSpec(AdaLoraConfig, {"init_r": 12, "target_r": 8, "lora_alpha": 16,
                                          "target_modules": list(LLAMA_LINEAR)}),
    "ia3": MethodSpec(IA3Config),
    "prompt": MethodSpec(PromptTuningConfig, {"num_virtual_tokens": 20}),
    "prefix": MethodSpec(PrefixTuningConfig, {"num_virtual_tokens": 20}),
    "bottleneck": MethodSpec(BottleneckConfig),
    "bitfit": MethodSpec(BitFitConfig),
    "partial": MethodSpec(PartialConfig, {"layers_to_train": "last:2"}),
}
"""Every method ``deltatune train`` can run, by ``method.name``."""


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
        options = check_section("method", dict(self.options), spec.config_cls)
        for key, value in spec.fixed.items():
            if key in options and options[key] != value:
                raise ConfigError(
                    f"method.{key}={options[key]!r} contradicts method.name={self.name!r}, which implies "
                    f"{key}={value!r}. Remove method.{key}, or pick method.name=lora."
                )
        object.__setattr__(self, "options", types.MappingProxyType(options))
        if spec.config_cls is not AdaLoraConfig or "total_step" in options:
            self.build(total_steps=None)  # the config class's own validation, now rather than after loading

    @property
    def spec(self) -> MethodSpec:
        """The :class:`MethodSpec` of :attr:`name`."""
        return METHODS[self.name]

    def build(self, total_steps: int | None) -> PeftConfig:
        """The adapter config for a run of ``total_steps`` optimizer steps.

        Raises:
            ConfigError: the config class rejects the options (its message says which).
        """
        values = {"task_type": "CAUSAL_LM", **self.options, **self.spec.fixed}
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
