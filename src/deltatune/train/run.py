"""``deltatune train``: check the data, load the model, score it, fine-tune with an adapter, score it again.

The order matters for failures: the data is read, rendered and tokenized (with the tokenizer
alone) before any model weights are loaded, so a missing file or column, an empty dataset or a
template error costs a second, not a model load. Training runs in transformers' ``Trainer``
(:class:`~deltatune.train.adapter_trainer.AdapterTrainer`); a Ctrl-C writes a resumable
checkpoint, a NaN/inf loss stops with the step named and the last good checkpoint kept.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from deltatune.data import prepare_datasets, validate_data
from deltatune.data.pipeline import PreparedData, load_examples
from deltatune.models import load_model_and_tokenizer
from deltatune.models.checkpointing import enable_activation_checkpointing
from deltatune.train import outputs
from deltatune.train.config import TrainConfig
from deltatune.train.metrics import describe, score_accuracy


class TrainingStopped(RuntimeError):
    """The run stopped early for a reason the user must act on (e.g. a NaN loss); the message says which."""


@dataclass
class RunResult:
    """What :func:`run_training` returns."""

    output_dir: Path
    """The run's folder."""
    status: str
    """``completed`` or ``interrupted`` (a resumable checkpoint was written)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Everything written to ``metrics.json``."""
    checkpoint: Path | None = None
    """The newest resumable checkpoint (after an interruption: the one to resume from)."""
    model: Any = field(default=None, repr=False)
    """The trained ``PeftModel`` (in memory; ``output_dir/adapter`` holds its saved adapter)."""


def load_tokenizer(name_or_path: str) -> Any:
    """The model's tokenizer with deltatune's fixes, without loading any weights.

    A registered GGUF model is converted into its cache folder first if needed (~20 s, once).
    """
    from transformers import AutoTokenizer

    from deltatune.models.cache import read_marker
    from deltatune.models.loader import resolve_model_path
    from deltatune.models.registry import get_spec
    from deltatune.models.tokenizer import normalize_tokenizer

    folder = resolve_model_path(name_or_path)
    marker = read_marker(folder) or {}
    spec = get_spec(name_or_path) or (get_spec(marker["model_name"]) if marker.get("model_name") else None)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    normalize_tokenizer(tokenizer, spec)
    return tokenizer


def prepare_data(config: TrainConfig, log: Callable[[str], None] = print) -> tuple[Any, PreparedData]:
    """Validate, render and tokenize the data with the tokenizer only: every data error surfaces here.

    Returns:
        ``(tokenizer, prepared data)``.

    Raises:
        FileNotFoundError, ValueError: a missing file or column, an empty dataset, a template error.
    """
    examples = validate_data(config.data)  # no tokenizer: fails fast on files, columns, emptiness
    tokenizer = load_tokenizer(config.model)
    if config.data.is_builtin:
        examples = load_examples(config.data, tokenizer)  # article budget measured in this tokenizer's tokens
    prepared = prepare_datasets(config.data, tokenizer, examples)
    if len(prepared.train) == 0:
        raise ValueError(f"No training example is left after tokenizing {config.data.source!r} "
                         f"({prepared.train_stats.summary()}); raise data.max_length or check the data.")
    log(f"data: {config.data.source} with template {prepared.template!r}; train {prepared.train_stats.summary()}"
        + (f"; eval {prepared.eval_stats.summary()}" if prepared.eval_stats else ""))
    return tokenizer, prepared


def total_steps(config: TrainConfig, n_rows: int) -> int:
    """Optimizer steps of the run: ``train.max_steps``, or ``epochs`` passes over ``n_rows`` rows."""
    t = config.train
    if t.max_steps is not None:
        return t.max_steps
    per_epoch = max(1, math.ceil(math.ceil(n_rows / t.batch_size) / t.grad_accum))  # as Trainer counts them
    return max(1, math.ceil(per_epoch * t.epochs))


def wants_accuracy(config: TrainConfig, prepared: PreparedData) -> bool:
    """Whether to score label accuracy (``eval.accuracy``; ``auto``: the eval data has labels).

    Raises:
        ValueError: ``eval.accuracy: true`` but there is no eval split or no ``label`` column.
    """
    has = prepared.eval is not None and "label" in prepared.eval.column_names and len(prepared.eval) > 0
    if config.eval.accuracy is True and not has:
        raise ValueError("eval.accuracy is true but the eval data has no 'label' column (or no eval split); "
                         "add a label column, set data.eval_size > 0, or set eval.accuracy=auto.")
    return has if config.eval.accuracy == "auto" else bool(config.eval.accuracy)


def check_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run), after checking the folder suits the request.

    Raises:
        ValueError: a fresh run into a folder holding another run, or ``resume`` with no checkpoint.
    """
    if resume:
        checkpoint = outputs.last_checkpoint(output_dir)
        if checkpoint is None:
            raise ValueError(f"--resume: {output_dir} holds no complete checkpoint-N folder to resume from. "
                             "Run without --resume to start afresh (add --overwrite if the folder has old files).")
        return checkpoint
    existing = outputs.run_contents(output_dir)
    if existing and not overwrite:
        raise ValueError(f"{output_dir} already holds a run ({', '.join(existing[:4])}). Pass --resume to continue "
                         "it, --overwrite to replace it, or choose another output_dir=...")
    if existing:
        import shutil

        for name in existing:
            target = output_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    return None


def check_quantized_support(config: TrainConfig) -> None:
    """QLoRA needs deltatune.quant and a LoRA that wraps its 4-bit layers; check before loading anything.

    Raises:
        ValueError: either is missing, with what to do instead.
    """
    if not config.method.spec.quantized:
        return
    from deltatune.config import PeftType
    from deltatune.methods.base import get_method

    try:
        from deltatune.quant import Linear4bit, Linear8bit
    except ImportError as err:
        raise ValueError(f"method.name=qlora needs deltatune.quant, which could not be imported ({err}); "
                         "use method.name=lora.") from err
    wanted = Linear4bit if config.quant.bits == 4 else Linear8bit
    if not issubclass(wanted, get_method(PeftType.LORA).layer_types):
        raise ValueError(
            f"method.name=qlora: LoRA in this deltatune build cannot wrap {wanted.__name__} layers. Use "
            "method.name=lora, or update deltatune."
        )


def is_main_process() -> bool:
    """True on rank 0 of a ``torchrun`` / ``accelerate launch`` job, and in a plain single process."""
    return int(os.environ.get("RANK", "0")) == 0


def load_model(config: TrainConfig, log: Callable[[str], None] = print) -> Any:
    """The base model, quantized to 4 bits for QLoRA and with gradient checkpointing if asked."""
    # Under torchrun each rank loads onto its own GPU (LOCAL_RANK), not all onto cuda:0.
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else None
    model, _ = load_model_and_tokenizer(config.model, device=device)
    if config.method.spec.quantized:
        from deltatune.quant import prepare_model_for_kbit_training, quantize_model

        quantize_model(model, config.quant)
        log(f"quantized the linear layers to {config.quant.bits}-bit {config.quant.quant_type} (QLoRA)")
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.train.gradient_checkpointing)
    elif config.train.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need an input grad
        enable_activation_checkpointing(model)
    return model


def run_training(config: TrainConfig, *, resume: bool = False, overwrite: bool = False,
                 log: Callable[[str], None] = print) -> RunResult:
    """Run the whole job described by ``config`` (see the module docstring).

    Args:
        config: the validated run config; ``config.output_dir`` must be set.
        resume: continue from the newest complete checkpoint in ``config.output_dir``.
        overwrite: replace a previous run's files in ``config.output_dir``.
        log: where progress lines go.

    Returns:
        The run's folder, status and metrics.

    Raises:
        FileNotFoundError, ValueError: bad data, model or output folder (before any model is loaded).
        TrainingStopped: the loss became NaN/inf; the message names the step and the last good checkpoint.
    """
    from deltatune.train.session import TrainingSession

    started = time.perf_counter()
    if config.output_dir is None:
        raise ValueError("run_training needs config.output_dir; load_train_config leaves it None, so set it first.")
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    output_dir = Path(config.output_dir)
    tokenizer, prepared = prepare_data(config, log)
    steps = total_steps(config, len(prepared.train))
    peft_config = config.method.build(total_steps=steps)
    check_quantized_support(config)
    accuracy = wants_accuracy(config, prepared)
    # Every rank of a torchrun job runs this; only rank 0 checks, clears and writes the output folder
    # (otherwise rank 1 finds rank 0's config.yaml and refuses to overwrite "another run").
    if is_main_process():
        checkpoint = check_output_dir(output_dir, resume, overwrite)
    else:
        checkpoint = outputs.last_checkpoint(output_dir) if resume else None
    if checkpoint is not None and config.method.name == "adalora":
        raise ValueError("--resume is not supported for AdaLoRA: its rank allocator's importance scores are not "
                         "checkpointed and saved adapters hold only the kept ranks. Start the run again.")
    if is_main_process():
        outputs.write_config(output_dir, config)
    session = TrainingSession(config, output_dir, tokenizer, prepared, peft_config, steps, log)
    return session.run(checkpoint, accuracy, started)


__all__ = ["RunResult", "TrainingStopped", "describe", "load_model", "load_tokenizer",
           "prepare_data", "run_training", "score_accuracy", "total_steps"]
