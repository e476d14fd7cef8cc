"""peft's LoRA options beyond the core fields: :class:`LoftQConfig`, and the table of the ones deltatune refuses.

peft's ``LoraConfig`` keeps growing (0.21.2 has 42 fields). Every field is one of three things here:
a field of deltatune's :class:`deltatune.config.LoraConfig` (supported), an entry of
:data:`REFUSED_LORA_OPTIONS` (refused when set to anything but its inert default, with the reason), or
metadata peft writes that changes nothing (accepted). ``tests/test_lora_options.py`` walks peft's
dataclass fields, so a field a new peft adds fails a test until it is placed in one of the three.

The table is the one source of the refusals: :func:`refuse_unimplemented_options` turns it into a
clear ``ValueError`` when a config is constructed, and :func:`deltatune.config.config_from_dict`
quotes the same reasons when an ``adapter_config.json`` holds such a key.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class LoftQConfig:
    """LoftQ's settings (Li et al., 2023, arXiv:2310.08659), peft's ``LoftQConfig``.

    Used with ``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(...))``; the config
    stores it as the dict ``{"loftq_bits": ..., "loftq_iter": ...}``, as peft does.
    """

    loftq_bits: int = 4
    """Bits of the quantization LoftQ fits against: 4 (NF4, blocks of 64) or 8 (row-wise int8)."""
    loftq_iter: int = 1
    """Alternating steps: quantize the weight minus the low-rank part, then refit the low-rank part."""

    def __post_init__(self) -> None:
        if self.loftq_bits not in (4, 8) or isinstance(self.loftq_bits, bool):
            raise ValueError(f"loftq_bits must be 4 (NF4) or 8 (int8), got {self.loftq_bits!r}")
        if not isinstance(self.loftq_iter, int) or isinstance(self.loftq_iter, bool) or self.loftq_iter < 1:
            raise ValueError(f"loftq_iter must be an integer >= 1, got {self.loftq_iter!r}")

    def to_dict(self) -> dict[str, int]:
        """The dict peft writes as ``loftq_config``."""
        return dataclasses.asdict(self)


def as_loftq_dict(value: Any) -> dict[str, int]:
    """A ``loftq_config`` value (``LoftQConfig``, dict, or peft's ``LoftQConfig``) as a validated dict.

    Raises:
        ValueError: an unknown key or a bad value (named).
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if not isinstance(value, Mapping):
        raise ValueError(f"loftq_config must be a LoftQConfig or a dict, got {type(value).__name__}")
    unknown = set(value) - {"loftq_bits", "loftq_iter"}
    if unknown:
        raise ValueError(f"loftq_config has unknown keys {sorted(unknown)}; it takes loftq_bits and loftq_iter")
    return LoftQConfig(**value).to_dict()


def check_lora_extras(config: Any) -> None:
    """Validate (and normalise, on the frozen ``config``) ``loftq_config`` and ``lora_bias`` as peft does.

    Raises:
        ValueError: ``"loftq"`` without a ``loftq_config``, a bad ``loftq_config``, or ``lora_bias`` with
            DoRA or with an initialisation other than True/False (peft's rules).
    """
    if config.init_lora_weights == "loftq":
        if not config.loftq_config:
            raise ValueError(
                "init_lora_weights='loftq' needs loftq_config, e.g. loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1)"
            )
        object.__setattr__(config, "loftq_config", as_loftq_dict(config.loftq_config))
    elif config.loftq_config:
        # peft warns and drops it; a frozen config must not keep a setting that does nothing
        warnings.warn("loftq_config is ignored because init_lora_weights is not 'loftq'", stacklevel=4)
        object.__setattr__(config, "loftq_config", {})
    if config.lora_bias:
        if config.init_lora_weights not in (True, False):
            raise ValueError(
                f"lora_bias=True works with init_lora_weights=True or False (as in peft), got {config.init_lora_weights!r}"
            )
        if config.use_dora:
            raise ValueError("lora_bias=True is not supported with DoRA (as in peft); pass use_dora=False")


ANY = object()
"""An inert value meaning: any value is accepted (metadata)."""


@dataclass(frozen=True)
class Refused:
    """One peft option deltatune does not implement."""

    inert: Any
    """The value that means "off" (``ANY``: any value is accepted, the key is metadata)."""
    reason: str
    """Why it is refused and what to do instead, for the error message and docs/methods/lora.md."""

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` leaves the option off (so a config holding it can be built)."""
        if self.inert is ANY or value == self.inert:
            return True
        # an empty container or None stands for "off" wherever the default is empty or None
        return self.inert in (None, {}, []) and value in (None, {}, [])


_NOT_IMPLEMENTED = "not implemented in deltatune; use peft for this adapter"
REFUSED_LORA_OPTIONS: Mapping[str, Refused] = {
    "layer_replication": Refused(None, (
        "duplicating decoder layers that share weights is not implemented: the replicated layers would "
        "share one wrapped module, which deltatune's injection and saving do not model. Build the "
        "stacked model yourself (e.g. mergekit's passthrough merge) and train LoRA on it, or use peft")),
    "megatron_config": Refused(None, "Megatron-LM tensor-parallel layers are not wrapped: deltatune wraps plain torch layers"),
    "eva_config": Refused(None, "EVA initialisation (data-driven SVD of activations) is " + _NOT_IMPLEMENTED),
    "corda_config": Refused(None, "CorDA initialisation is " + _NOT_IMPLEMENTED),
    "lora_ga_config": Refused(None, "LoRA-GA initialisation is " + _NOT_IMPLEMENTED),
    "velora_config": Refused(None, "VeLoRA (compressed activations) is " + _NOT_IMPLEMENTED),
    "monteclora_config": Refused(None, "MonteCLoRA is " + _NOT_IMPLEMENTED),
    "arrow_config": Refused(None, "Arrow routing over LoRA experts is " + _NOT_IMPLEMENTED),
    "kasa_config": Refused(None, "KaSA is " + _NOT_IMPLEMENTED),
    "use_bdlora": Refused(None, "BD-LoRA (block-diagonal factors) is " + _NOT_IMPLEMENTED),
    "alora_invocation_tokens": Refused(None, "activated LoRA (aLoRA, applied after invocation tokens) is " + _NOT_IMPLEMENTED),
    "use_qalora": Refused(False, "QA-LoRA (group-pooled inputs for GPTQ bases) is " + _NOT_IMPLEMENTED),
    "ensure_weight_tying": Refused(False, (
        "ensure_weight_tying (keeping modules_to_save of tied embeddings tied) is not implemented; "
        "leave the tied embedding out of modules_to_save")),
}
"""peft 0.21.2 LoraConfig fields deltatune refuses when set (a key that is also a field of deltatune's
LoraConfig is supported and never looked up here)."""

# Fields that only describe the run or the file (no effect on outputs), accepted with any value.
LORA_METADATA = ("auto_mapping", "peft_version", "megatron_core", "qalora_group_size", "runtime_config")


def refusal_message(key: str, value: Any) -> str:
    """``"key=value: reason"`` for a refused option set to ``value``."""
    return f"{key}={value!r}: {REFUSED_LORA_OPTIONS[key].reason}"


def refuse_unimplemented_options(cls: type) -> type:
    """Class decorator (outside ``@dataclass``): peft's keyword arguments that ``cls`` has no field for
    are accepted at their inert value (dropped) and refused otherwise with the reason, instead of a
    bare ``TypeError: unexpected keyword argument``."""
    init: Callable[..., None] = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in [k for k in kwargs if k not in fields and (k in REFUSED_LORA_OPTIONS or k in LORA_METADATA)]:
            value = kwargs.pop(key)
            if key in REFUSED_LORA_OPTIONS and not REFUSED_LORA_OPTIONS[key].accepts(value):
                raise ValueError(f"{cls.__name__}: {refusal_message(key, value)}")
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls
