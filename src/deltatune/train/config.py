"""The configuration of a ``deltatune train`` run: one frozen, validated object built from layers.

Layers, later ones winning: the built-in defaults (the default job: SmolLM2-135M-Instruct, LoRA,
BBC news topics), an optional YAML file, then ``key=value`` overrides with dotted keys
(``method.r=16 train.lr=2e-4 data.max_length=512``). Every key is checked against the section's
dataclass before anything runs: an unknown key is an error with the closest valid key suggested,
a value of the wrong type is an error naming the key and the expected type.

Sections: top-level ``model`` and ``output_dir``; ``method`` (:class:`MethodConfig`), ``data``
(:class:`deltatune.data.DataConfig`), ``train`` (:class:`TrainSection`), ``eval``
(:class:`EvalSection`) and ``quant`` (:class:`deltatune.quant.QuantConfig`, QLoRA only).
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import yaml

from deltatune.data.config import DataConfig
from deltatune.models.registry import DEFAULT_MODEL
from deltatune.quant import QuantConfig
from deltatune.train.config_check import (
    ConfigError, build_section, check_section, check_value, parse_override, set_dotted, unknown_key_error,
)
from deltatune.train.distributed import DISTRIBUTED, FsdpSection
from deltatune.train.zero import check_setting
from deltatune.train.method_config import MethodConfig, method_spec, same_options
from deltatune.train.metrics import SCORINGS

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
"""Learning-rate schedules (transformers' ``lr_scheduler_type`` values)."""

DEFAULT_DATA: Mapping[str, Any] = {"source": "bbc-news", "article_tokens": 64, "max_length": 160, "eval_size": 200}
"""The default job's data: BBC news with each article cut to its first 64 tokens (the title and
first sentence or two carry the topic), and 200 held-out articles (40 per topic)."""


def _fail(section: str, key: str, got: Any, expected: str) -> None:
    raise ConfigError(f"Config key '{section}.{key}' is {got!r}; expected {expected}.")


@dataclass(frozen=True)
class TrainSection:
    """The ``train:`` section: the optimisation and the Trainer's schedule of logs, evals and saves."""

    max_steps: int | None = 80
    """Optimizer steps to run. None: run :attr:`epochs` epochs instead. The default job's 80 steps of 8
    articles (640 of the 2,025 training articles) took SmolLM2 from 36% to 93.5% on the held-out set."""
    epochs: float = 1.0
    """Passes over the training set when :attr:`max_steps` is None."""
    batch_size: int = 8
    """Rows per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size x grad_accum)."""
    lr: float = 2e-3
    """Peak learning rate."""
    scheduler: str = "cosine"
    """Learning-rate schedule after warm-up: cosine, linear, constant, ... (transformers' names)."""
    warmup_ratio: float = 0.05
    """Fraction of the steps spent warming the learning rate up linearly from 0."""
    warmup_steps: int | None = None
    """Warm-up steps; when set, replaces :attr:`warmup_ratio`."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping threshold (0 disables clipping)."""
    optim: str = "adamw_torch"
    """Optimizer (transformers' ``optim`` names)."""
    loraplus_lr_ratio: float | None = None
    """LoRA+ (Hayou et al., 2024): train each LoRA ``B`` at ``lr`` times this (peft's
    ``create_loraplus_optimizer``; the paper suggests 16). None: one learning rate for every adapter weight."""
    bf16: bool | str = "auto"
    """bfloat16 autocast: true, false, or ``auto`` (on where the device multiplies bf16 natively: CUDA with
    bf16, CPUs with AVX512-BF16 or AMX; off elsewhere). Adapters and optimizer state stay fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (slower)."""
    distributed: str = "auto"
    """With several processes (torchrun, accelerate launch, mpirun, srun): ``auto`` or ``ddp`` replicate the
    model (DDP); ``fsdp`` shards it (FSDP2, set up by ``train.fsdp``); ``deepspeed`` runs DeepSpeed ZeRO (set
    up by ``train.deepspeed``). One process ignores ``ddp`` and ``fsdp``."""
    deepspeed: str = "zero2"
    """With ``train.distributed: deepspeed``: ``zero2`` or ``zero3`` (the shipped configs, also in
    ``configs/deepspeed/``), or the path of a DeepSpeed JSON config (``"auto"`` values come from ``train.*``)."""
    fsdp: FsdpSection = field(default_factory=FsdpSection)
    """FSDP2's settings (:class:`deltatune.train.distributed.FsdpSection`)."""
    eval_steps: int | None = None
    """Evaluate the eval loss every N steps. None: 4 times over the run; 0: never during training."""
    save_steps: int | None = None
    """Write a resumable checkpoint every N steps. None: at every eval; 0: only at the end and on Ctrl-C."""
    save_total_limit: int | None = 2
    """Keep only the newest N checkpoints (None keeps all)."""
    logging_steps: int = 5
    """Log the training loss every N steps."""
    seed: int = 0
    """Seed of the adapter's initialisation, the data order and dropout."""
    num_threads: int | None = None
    """torch CPU threads. None: torch's default (the number of physical cores)."""
    progress_bar: bool = True
    """Show the Trainer's progress bar."""
    tensorboard: bool = True
    """Write TensorBoard logs to ``<output_dir>/tensorboard``."""
    plot: bool = True
    """Draw ``loss.png`` (train and eval loss) with matplotlib at the end."""

    def __post_init__(self) -> None:
        positive = ("batch_size", "grad_accum", "logging_steps")
        for key in positive:
            if getattr(self, key) < 1:
                _fail("train", key, getattr(self, key), "an integer >= 1")
        for key in ("max_steps", "num_threads"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                _fail("train", key, getattr(self, key), "None or an integer >= 1")
        for key in ("eval_steps", "save_steps", "warmup_steps"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                _fail("train", key, getattr(self, key), "None or an integer >= 0")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            _fail("train", "save_total_limit", self.save_total_limit, "None (keep all) or an integer >= 1")
        if self.max_steps is None and not self.epochs > 0:
            _fail("train", "epochs", self.epochs, "a number > 0 (or set train.max_steps)")
        if not self.lr > 0:
            _fail("train", "lr", self.lr, "a learning rate > 0, e.g. 2e-4")
        if not 0 <= self.warmup_ratio < 1:
            _fail("train", "warmup_ratio", self.warmup_ratio, "a fraction in [0, 1)")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            _fail("train", "weight_decay/max_grad_norm", (self.weight_decay, self.max_grad_norm), "values >= 0")
        if self.scheduler not in SCHEDULERS:
            _fail("train", "scheduler", self.scheduler, f"one of {', '.join(SCHEDULERS)}")
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio > 0:
            _fail("train", "loraplus_lr_ratio", self.loraplus_lr_ratio, "None or a ratio > 0, e.g. 16")
        if isinstance(self.bf16, str) and self.bf16 != "auto":
            _fail("train", "bf16", self.bf16, "true, false or 'auto'")
        if self.distributed not in DISTRIBUTED:
            _fail("train", "distributed", self.distributed, f"one of {', '.join(DISTRIBUTED)}")
        if self.distributed == "deepspeed":
            check_setting(self.deepspeed)


@dataclass(frozen=True)
class EvalSection:
    """The ``eval:`` section: accuracy before and after training, and the eval loss during it."""

    accuracy: bool | str = "auto"
    """Score label accuracy: true, false, or ``auto`` (when the eval data has a ``label`` column)."""
    scoring: str = "auto"
    """How an answer is read: ``first_token`` (log-prob of each label's first token after the
    prompt; one forward pass), ``greedy`` (decode and compare text), or ``auto`` (first_token when
    the labels' first tokens differ)."""
    zero_shot: bool = True
    """Also score the model before training (the baseline the run is compared with)."""
    max_examples: int | None = None
    """Score accuracy on at most this many eval examples (None: all)."""
    loss_examples: int | None = 32
    """Eval-loss examples used during training (None: the whole eval split). A subset keeps the
    periodic evaluation cheap on CPU."""
    max_new_tokens: int = 8
    """Decoding budget of ``greedy`` scoring."""

    def __post_init__(self) -> None:
        if isinstance(self.accuracy, str) and self.accuracy != "auto":
            _fail("eval", "accuracy", self.accuracy, "true, false or 'auto'")
        if self.scoring not in SCORINGS:
            _fail("eval", "scoring", self.scoring, f"one of {', '.join(SCORINGS)}")
        for key in ("max_examples", "loss_examples"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                _fail("eval", key, getattr(self, key), "None or an integer >= 1")
        if self.max_new_tokens < 1:
            _fail("eval", "max_new_tokens", self.max_new_tokens, "an integer >= 1")


TOP_LEVEL = {"model": str, "model_dtype": str, "output_dir": str | None}
MODEL_DTYPES = ("float32", "bfloat16")
SECTIONS = ("method", "data", "train", "eval", "quant")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a ``deltatune train`` run needs, validated. Build with :func:`load_train_config`."""

    model: str = DEFAULT_MODEL
    """A registered model name (``smollm2-135m-instruct``), a transformers model folder or a .gguf file."""
    model_dtype: str = "float32"
    """The base model's weights: ``float32`` or ``bfloat16`` (half the weight memory; the residual stream
    and norms then run in bf16 too). Adapters and optimizer state stay fp32 either way. fp32 weights with
    bf16 autocast (``train.bf16``) are the default: on this CPU bf16 weights trained no faster
    (docs/training.md#bf16-weights)."""
    output_dir: str | None = None
    """Where the run writes its adapter, config, metrics, plot, logs and checkpoints.
    None: ``runs/<date>-<time>``."""
    method: MethodConfig = field(default_factory=MethodConfig)
    """The PEFT method and its options."""
    data: DataConfig = field(default_factory=lambda: DataConfig(**DEFAULT_DATA))
    """The data pipeline settings."""
    train: TrainSection = field(default_factory=TrainSection)
    """Optimisation and checkpointing."""
    eval: EvalSection = field(default_factory=EvalSection)
    """Accuracy and eval-loss settings."""
    quant: Any = None
    """QLoRA's quantization (a :class:`deltatune.quant.QuantConfig`); None for other methods."""

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML-ready values (what ``config.yaml`` in a run holds)."""
        out = {"model": self.model, "model_dtype": self.model_dtype, "output_dir": self.output_dir, "method": self.method.to_dict(),
               "data": self.data.to_dict(), "train": asdict(self.train), "eval": asdict(self.eval)}
        if self.quant is not None:
            out["quant"] = self.quant.to_dict()
        return out

    def to_yaml(self) -> str:
        """:meth:`to_dict` as YAML text."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, tree: Mapping[str, Any]) -> "TrainConfig":
        """Check and build a config from a nested mapping (all sections optional).

        Raises:
            ConfigError: an unknown key, a wrong type or an invalid value, naming the dotted key.
        """
        for key in tree:
            if key not in TOP_LEVEL and key not in SECTIONS:
                raise unknown_key_error("", str(key), [*TOP_LEVEL, *SECTIONS])
        top = {k: check_value(k, tree[k], TOP_LEVEL[k]) for k in TOP_LEVEL if k in tree}
        if top.get("model_dtype", "float32") not in MODEL_DTYPES:
            raise ConfigError(f"Config key 'model_dtype' is {top['model_dtype']!r}; expected one of {', '.join(MODEL_DTYPES)}.")
        method = _section(tree, "method")
        method.setdefault("name", "lora")
        spec = method_spec(method["name"])
        try:
            method_cfg = MethodConfig.from_dict(method)
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:
            raise ConfigError(f"Invalid 'method' config: {err}") from err
        data = build_section("data", DataConfig, check_section("data", _section(tree, "data"), DataConfig))
        train_values = _section(tree, "train")
        fsdp = _section(train_values, "fsdp")  # a section inside train: checked as one
        train_values.pop("fsdp", None)
        train_values = check_section("train", train_values, TrainSection)
        train_values["fsdp"] = build_section("train.fsdp", FsdpSection, check_section("train.fsdp", fsdp, FsdpSection))
        train = build_section("train", TrainSection, train_values)
        evaluation = build_section("eval", EvalSection, check_section("eval", _section(tree, "eval"), EvalSection))
        quant = _quant_section(tree.get("quant"), spec.quantized, method["name"])
        return cls(method=method_cfg, data=data, train=train, eval=evaluation, quant=quant, **top)


def _section(tree: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = tree.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"Config section {name!r} must be a mapping of keys to values; got {value!r}.")
    return dict(value)


def _quant_section(values: Any, quantized: bool, method: str) -> Any:
    if not quantized:
        if values:
            raise ConfigError(f"The 'quant' section applies to method.name=qlora only; method.name is {method!r}. "
                              "Remove the quant settings or set method.name=qlora.")
        return None
    checked = check_section("quant", _section({"quant": values}, "quant"), QuantConfig)
    return build_section("quant", QuantConfig, checked)


# ---- layering: defaults, file, overrides -------------------------------------------------------------------
def default_tree() -> dict[str, Any]:
    """The built-in default job as a nested mapping (the first layer)."""
    return {"model": DEFAULT_MODEL, "output_dir": None, "method": {"name": "lora", **method_spec("lora").preset},
            "data": dict(DEFAULT_DATA), "train": {}, "eval": {}}


def merge_layer(tree: dict[str, Any], layer: Mapping[str, Any], user_data_keys: Collection[str] = ()) -> dict[str, Any]:
    """``tree`` updated by ``layer``, section by section (a new tree; inputs are not changed).

    A layer that switches ``method.name`` to a method with another config class starts that
    section afresh from the new method's preset, so LoRA's ``r`` never leaks into, say, IA3.
    Switching within one class (lora -> dora) keeps the options. Likewise a layer that changes
    ``data.source`` starts the data section from :class:`DataConfig`'s defaults, except for the
    keys in ``user_data_keys``: what the user set in earlier layers (the YAML file, earlier
    ``data.*`` overrides) is kept; only the default job's BBC settings are dropped.
    """
    out = copy.deepcopy(tree)
    for key, value in layer.items():
        if key == "method" and isinstance(value, Mapping):
            current = out.get("method") or {}
            new_name = value.get("name", current.get("name", "lora"))
            if not same_options(current.get("name", "lora"), new_name):
                current = {"name": new_name, **copy.deepcopy(dict(method_spec(new_name).preset))}
            out["method"] = {**current, **copy.deepcopy(dict(value))}
        elif key == "data" and isinstance(value, Mapping) and value.get("source", out["data"].get("source")) != \
                out["data"].get("source"):
            # Another dataset: the default job's BBC settings (64-token articles, max_length 160) do
            # not carry over; DataConfig's own defaults apply to every key the user has not set.
            kept = {k: v for k, v in out["data"].items() if k in user_data_keys}
            out["data"] = {**kept, **copy.deepcopy(dict(value))}
        elif key in SECTIONS and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = {**out[key], **copy.deepcopy(dict(value))}
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML config file as a mapping.

    Raises:
        FileNotFoundError: no such file.
        ConfigError: not valid YAML, or not a mapping at the top.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {str(path)!r} does not exist; pass a YAML file such as "
                                "examples/lora.yaml, or no file for the default job.")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{path} must hold a mapping of sections (model, method, data, train, eval); "
                          f"got {type(tree).__name__}.")
    return dict(tree)


def overrides_tree(overrides: Sequence[str]) -> list[dict[str, Any]]:
    """One layer per ``key=value`` override (order kept, so ``method.name`` switches apply in place)."""
    layers = []
    for text in overrides:
        parts, value = parse_override(text)
        valid = SECTIONS if len(parts) > 1 else TOP_LEVEL
        if parts[0] not in valid:
            raise unknown_key_error("", parts[0], [*TOP_LEVEL, *SECTIONS])
        layer: dict[str, Any] = {}
        set_dotted(layer, parts, value)
        layers.append(layer)
    return layers


def load_train_config(
    path_or_none: str | os.PathLike | None = None, overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Build the run's config: defaults (or ``base``), then the YAML file, then the overrides.

    Args:
        path_or_none: a YAML config file, or None for the built-in default job.
        overrides: ``key=value`` strings with dotted keys (values are read as YAML:
            ``method.target_modules=[q_proj,v_proj]``, ``output_dir=null``).
        base: a resolved config mapping to start from instead of the defaults (resuming a run).

    Returns:
        The validated :class:`TrainConfig`.

    Raises:
        FileNotFoundError: the config file does not exist.
        ConfigError: an unknown key (with a did-you-mean suggestion), a wrong type or an invalid value.
    """
    tree = copy.deepcopy(dict(base)) if base is not None else default_tree()
    layers = ([read_yaml(path_or_none)] if path_or_none is not None else []) + overrides_tree(overrides)
    user_data_keys = set(tree.get("data") or {}) if base is not None else set()  # a resolved run: all chosen
    for layer in layers:
        tree = merge_layer(tree, layer, user_data_keys)
        if isinstance(layer.get("data"), Mapping):
            user_data_keys |= set(layer["data"])
    return TrainConfig.from_dict(tree)
