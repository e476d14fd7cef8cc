"""Adapter configurations: frozen dataclasses, validated when constructed, with peft's field names.

Reading ``adapter_config.json`` is here too, because what a file may hold is part of what a valid config
is. Newer peft versions write keys deltatune does not model. A key at its inert value (e.g.
``"eva_config": null``) is accepted silently; any other unknown key is reported in a warning that
names it; a known peft feature switched on that we do not implement is an error, because loading it
would silently give different outputs.

Values are checked against the config class's type hints before the config is built: JSON has real
types, so ``"use_rslora": "false"`` (a string) or ``"lora_alpha": true`` is refused with the file, the key
and the expected type, instead of loading as a truthy string or as 1.0. Unlike the training CLI's YAML,
no string is read as a number here.

Writing the file is :mod:`deltatune.io.config_io`'s.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

from deltatune.atomic import finish_interrupted_save
from deltatune.config_types import check_types
from deltatune.lora_options import REFUSED_LORA_OPTIONS, check_lora_extras, refusal_message, refuse_unimplemented_options


class PeftType(str, enum.Enum):
    """The adapter family, written as ``peft_type`` in ``adapter_config.json`` (peft's values)."""

    LORA = "LORA"
    ADALORA = "ADALORA"
    IA3 = "IA3"
    PROMPT_TUNING = "PROMPT_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"
    # Not in peft: our own values, documented in the README.
    BOTTLENECK = "BOTTLENECK"
    BITFIT = "BITFIT"
    PARTIAL = "PARTIAL"


class TaskType(str, enum.Enum):
    """What the wrapped model does; decides the PeftModel subclass and default ``modules_to_save``."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


def _as_tuple(value: Any) -> Any:
    """Lists become tuples so a frozen config cannot be mutated through a shared list."""
    if isinstance(value, (list, set)):
        return tuple(sorted(value)) if isinstance(value, set) else tuple(value)
    return value


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# Fields read as regexes (a string value) and mappings keyed by regexes, in any config that has them.
_REGEX_FIELDS = ("target_modules", "exclude_modules", "feedforward_modules", "modules")
_REGEX_KEYED = ("rank_pattern", "alpha_pattern")


def _check_regexes(config: Any) -> None:
    """Compile every regex a config holds now, so a typo is a config error and not ``re.error`` at injection."""
    def compile_or_fail(what: str, pattern: str) -> None:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{what} regex {pattern!r} does not compile: {e}") from None

    for name in _REGEX_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, str) and value != "all-linear":
            compile_or_fail(name, value)
    for name in _REGEX_KEYED:
        for key in dict(getattr(config, name, None) or {}):
            compile_or_fail(f"{name} key", key)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def check_token_indices(value: Any, per_layer: bool) -> Any:
    """Token ids as a tuple (or ``{layer name: tuple}`` when ``per_layer`` allows a mapping); ValueError if bad."""
    if per_layer and isinstance(value, Mapping):
        _check(bool(value), "trainable_token_indices={} names no layer; give token ids or {'embed_tokens': [ids]}")
        return {str(k): check_token_indices(v, False) for k, v in value.items()}
    ok = isinstance(value, (list, tuple)) and bool(value) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)
    _check(ok, f"token indices must be a non-empty list of token ids (ints >= 0), got {value!r}; "
               "find them with tokenizer.convert_tokens_to_ids([...])")
    _check(len(set(value)) == len(value), f"token indices {list(value)} repeat an id; list each token once")
    return tuple(value)


_CONFIG_CLASSES: dict[Any, type["PeftConfig"]] = {}
"""peft_type -> its config class; each concrete config class adds itself when defined."""


def config_class(peft_type: Any) -> type["PeftConfig"]:
    """The config class for ``peft_type`` (the built-in methods are imported first if they were not).

    Raises:
        KeyError: no config class has that ``peft_type``.
    """
    if peft_type not in _CONFIG_CLASSES:
        importlib.import_module("deltatune.methods")
    return _CONFIG_CLASSES[peft_type]


@dataclass(frozen=True)
class PeftConfig:
    """Fields every adapter config shares. Subclasses set ``peft_type``."""

    peft_type: ClassVar[PeftType]

    task_type: TaskType | str | None = None
    """What the model does (``TaskType``); ``SEQ_CLS`` adds the classifier head to ``modules_to_save``."""
    base_model_name_or_path: str | None = None
    """Where the base model came from; written to disk so a loader can check it matches."""
    revision: str | None = None
    """Revision of the base model, as in peft."""
    inference_mode: bool = False
    """True when loaded for inference: adapter parameters are frozen."""

    def __post_init__(self) -> None:
        if self.task_type is not None:
            try:
                object.__setattr__(self, "task_type", TaskType(self.task_type))
            except ValueError:
                raise ValueError(
                    f"task_type={self.task_type!r} is not known; use one of {[t.value for t in TaskType]}"
                ) from None
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _as_tuple(getattr(self, f.name)))
        _check_regexes(self)
        self.validate()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "peft_type" in cls.__dict__:  # a concrete config: the class a file with this peft_type is read as
            _CONFIG_CLASSES[cls.peft_type] = cls

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field; subclasses extend this."""

    @property
    def is_prompt_learning(self) -> bool:
        """True for methods that add virtual tokens or prefixes to the inputs (prompt and prefix tuning) rather than change layers (peft's attribute)."""
        return False

    def replace(self, **changes: Any) -> "PeftConfig":
        """A copy with some fields changed (configs are frozen)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The dict peft writes: enum values as strings, tuples as lists."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            out[f.name] = _as_list(value)
        out["peft_type"] = self.peft_type.value
        return out

    @classmethod
    def field_names(cls) -> set[str]:
        """The names of this config class's fields (what ``adapter_config.json`` may hold for it)."""
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_pretrained(cls, path: str, subfolder: str | None = None) -> "PeftConfig":
        """Read ``adapter_config.json`` from a folder (peft's ``PeftConfig.from_pretrained``)."""
        return load_config(path, subfolder=subfolder)


@refuse_unimplemented_options  # peft's options deltatune lacks: a ValueError with the reason
@dataclass(frozen=True)
class LoraConfig(PeftConfig):
    """LoRA (Hu et al., 2021), rsLoRA (Kalajdzievski, 2023) and DoRA (Liu et al., 2024) in one config.

    The variants are independent choices: scaling (``use_rslora``), magnitude (``use_dora``) and
    initialisation (``init_lora_weights``); the base weight may be dense or 4-bit.
    """

    peft_type: ClassVar[PeftType] = PeftType.LORA

    r: int = 8
    """Rank of the update ΔW = B·A."""
    target_modules: Sequence[str] | str | None = None
    """Module names (suffix match on the dotted path), a regex matched against the full path, or
    ``"all-linear"`` (every Linear/Conv1D except the output head)."""
    exclude_modules: Sequence[str] | str | None = None
    """Names (suffix match) or a regex of modules never to wrap, even if ``target_modules`` matches."""
    lora_alpha: float = 8
    """Scale numerator: the update is multiplied by alpha/r (or alpha/sqrt(r) with rsLoRA)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    fan_in_fan_out: bool = False
    """True for layers storing weights as (in, out), e.g. GPT-2's Conv1D; set automatically for Conv1D."""
    bias: str = "none"
    """Which biases train: "none", "all" (every bias in the model) or "lora_only" (wrapped layers')."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r) instead of alpha/r."""
    modules_to_save: Sequence[str] | None = None
    """Modules (suffix match) trained in full and saved with the adapter, e.g. a classifier head."""
    init_lora_weights: bool | str = True
    """True: A Kaiming-uniform, B zero. "gaussian": A ~ N(0, 1/r). False: both random (tests only).
    "pissa" / "pissa_niter_K": principal singular vectors. "olora": QR. PiSSA and OLoRA move the base
    weight so that the initial model is unchanged."""
    layers_to_transform: Sequence[int] | int | None = None
    """Only wrap modules inside these layer indices."""
    layers_pattern: Sequence[str] | str | None = None
    """Name of the layer list (e.g. "layers", "h") used to read a module's layer index."""
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    """Per-module rank overrides: {regex or name suffix: r}."""
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    """Per-module alpha overrides: {regex or name suffix: alpha}."""
    use_dora: bool = False
    """Weight-decomposed LoRA: a learned magnitude per output feature."""
    trainable_token_indices: Sequence[int] | Mapping[str, Sequence[int]] | None = None
    """Embedding rows that train besides the LoRA (peft's option, for added special tokens): a list of
    token ids for the input embedding, or ``{layer name: ids}``. Tied output embeddings follow."""
    loftq_config: Mapping[str, int] = field(default_factory=dict)
    """With ``init_lora_weights="loftq"``: ``LoftQConfig(loftq_bits, loftq_iter)`` (kept as peft's dict)."""
    lora_bias: bool = False
    """A trainable bias on lora_B (peft's option); merging folds s·bias into the base layer's bias."""
    target_parameters: Sequence[str] | None = None
    """nn.Parameters to adapt directly (peft's option), e.g. ``["mlp.experts.gate_up_proj"]`` for MoE experts
    stored as one 3-D tensor: one low-rank update per expert (:mod:`deltatune.methods.lora_param`). Suffix
    match on ``<module path>.<parameter name>``; ``target_modules=[]`` adapts only these."""

    def validate(self) -> None:
        _check(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}")
        _check(self.lora_alpha > 0, f"lora_alpha must be positive, got {self.lora_alpha!r}")
        _check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        _check(
            self.bias in ("none", "all", "lora_only"),
            f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}",
        )
        init = self.init_lora_weights
        ok_init = isinstance(init, bool) or init in ("gaussian", "pissa", "olora", "loftq") or (
            isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init) is not None
        )
        _check(
            ok_init,
            f"init_lora_weights={init!r} is not supported; use True, False, 'gaussian', 'pissa', "
            "'pissa_niter_K', 'olora' or 'loftq'",
        )
        check_lora_extras(self)  # loftq_config and lora_bias (deltatune/lora_options.py)
        _check(
            self.target_parameters is None or all(isinstance(t, str) and t for t in self.target_parameters),
            f"target_parameters must be a list of parameter names such as ['mlp.experts.down_proj'], got {self.target_parameters!r}",
        )
        for key, value in dict(self.rank_pattern).items():
            _check(isinstance(value, int) and value > 0, f"rank_pattern[{key!r}] must be a positive int, got {value!r}")
        if self.trainable_token_indices is not None:
            object.__setattr__(self, "trainable_token_indices", check_token_indices(self.trainable_token_indices, True))
        if self.layers_pattern is not None:
            _check(
                self.layers_to_transform is not None,
                "layers_pattern only makes sense together with layers_to_transform; set both or neither",
            )

    def _register_custom_module(self, mapping: Mapping[type, type]) -> None:
        """peft's experimental hook mapping a layer type to a custom LoRA layer class: refused, with what to do instead.

        peft's custom classes subclass its LoRA layers (``peft.tuners.lora.layer.Linear``: one module holding
        every adapter's factors in per-adapter dicts, with peft's ``update_layer``/``forward`` contract).
        deltatune has no such classes: an adapter is one :class:`deltatune.surgery.adapter.Adapter` per
        adapter on a plain layer, so a peft layer class cannot be plugged in, and ignoring the mapping
        would silently train something else (docs/api.md, "Custom layer types").

        Raises:
            NotImplementedError: always, naming the mapping and the alternatives.
        """
        names = {getattr(k, "__name__", repr(k)): getattr(v, "__name__", repr(v)) for k, v in dict(mapping).items()}
        raise NotImplementedError(
            f"LoraConfig._register_custom_module({names}) is not supported: deltatune's adapters are not peft "
            "layer classes, so a custom peft LoRA layer cannot be used. Instead: for layer types deltatune already "
            "wraps (nn.Linear, transformers' Conv1D, nn.Embedding, nn.Conv1d/2d/3d, deltatune's 4-bit/8-bit linears) "
            "drop the mapping and name the layers in target_modules; for another layer type, target the nn.Linear "
            "layers inside it, or write an adapter method (an Adapter subclass registered with register_method, "
            "docs/methods/overview.md); or use peft for this model."
        )


# ---- reading adapter_config.json ------------------------------------------------------------------------
CONFIG_NAME = "adapter_config.json"
_ANY = object()
# Keys peft writes that carry no meaning for the methods we implement, with their inert values.
PEFT_INERT_KEYS: dict[str, Any] = {
    "auto_mapping": _ANY, "peft_version": _ANY, "megatron_core": _ANY, "qalora_group_size": _ANY,
    "alora_invocation_tokens": None, "arrow_config": None, "corda_config": None, "eva_config": None,
    "kasa_config": None, "lora_ga_config": None, "megatron_config": None, "monteclora_config": None,
    "velora_config": None, "layer_replication": None,
    "use_bdlora": None, "ensure_weight_tying": False,
    "use_qalora": False, "runtime_config": _ANY, "num_transformer_submodules": _ANY,
    "num_attention_heads": _ANY, "num_layers": _ANY, "token_dim": _ANY, "modules_to_save": None,
}


def _inert(key: str, value: Any) -> bool:
    expected = PEFT_INERT_KEYS.get(key, object())
    return expected is _ANY or value == expected or (expected == {} and value in (None, {}))


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> PeftConfig:
    """Build the right config class from a peft-style dict; see the module docstring for unknown keys."""
    if "peft_type" not in data:
        raise ValueError(f"{source}: no 'peft_type' key; this is not an adapter_config.json written by peft or deltatune")
    try:
        peft_type = PeftType(data["peft_type"])
    except ValueError:
        raise ValueError(
            f"{source}: peft_type {data['peft_type']!r} is not supported by deltatune "
            f"(supported: {[t.value for t in PeftType]})"
        ) from None
    cls = config_class(peft_type)
    known = cls.field_names()
    kwargs = {k: v for k, v in data.items() if k in known}
    rest = {k: v for k, v in data.items() if k not in known and k != "peft_type"}
    active = {k: v for k, v in rest.items() if k in PEFT_INERT_KEYS and not _inert(k, v)}
    if active:
        raise ValueError(
            f"{source}: this adapter uses peft features deltatune does not implement: "
            + ", ".join(f"{k}={v!r}" for k, v in active.items())
            + ". Loading it would give different outputs; re-train or convert it without them."
            + "".join(f"\n  {refusal_message(k, v)}" for k, v in active.items() if k in REFUSED_LORA_OPTIONS)
        )
    unknown = sorted(k for k in rest if k not in PEFT_INERT_KEYS)
    if unknown:
        warnings.warn(
            f"{source}: ignoring config keys deltatune does not know (written by a newer peft?): {', '.join(unknown)}",
            stacklevel=3,
        )
    check_types(cls, kwargs, source)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None


def read_config_json(path: str | os.PathLike, subfolder: str | None = None) -> tuple[Path, dict]:
    """``(file, parsed JSON)`` of an adapter folder's config (or of a config file given directly).

    Raises:
        FileNotFoundError: there is no config file there.
        ValueError: the file is not valid JSON.
    """
    folder = Path(path) / subfolder if subfolder else Path(path)
    file = folder / CONFIG_NAME if folder.is_dir() else folder
    finish_interrupted_save(file.parent)  # weights and config of one save, never of two
    if not file.is_file():
        raise FileNotFoundError(
            f"no {CONFIG_NAME} at {folder}; pass the folder that save_pretrained wrote "
            "(a non-default adapter lives in a subfolder named after it)"
        )
    try:
        return file, json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None


def load_config(path: str | os.PathLike, subfolder: str | None = None) -> PeftConfig:
    """The config saved in an adapter folder (``adapter_config.json``), as its method's config class.

    Raises:
        FileNotFoundError: there is no config file there.
        ValueError: the file is not valid JSON, or holds a value or key that deltatune refuses (named).
    """
    file, data = read_config_json(path, subfolder)
    return config_from_dict(data, source=str(file))
