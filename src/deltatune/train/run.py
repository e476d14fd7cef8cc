"""``deltatune train``: check the data, load the model, score it, fine-tune with an adapter, score it again.

The order matters for failures: the data is read, rendered and tokenized (with the tokenizer
alone), the method's targets are resolved on the model built on the meta device, the optimizer name
and the output folder are checked, all before any model weights are loaded or anything is written,
so a missing file, a template error or a ``target_modules`` typo costs a second, not a model load,
and leaves nothing behind. An old run that ``--overwrite`` replaces is kept aside until the new run
has a checkpoint (:class:`RunFolder`). Training runs in transformers' ``Trainer``
(:class:`~deltatune.train.adapter_trainer.AdapterTrainer`); a Ctrl-C writes a resumable
checkpoint, a NaN/inf loss stops with the step named and the last good checkpoint kept.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainerCallback

from deltatune.config import PeftType, TaskType
from deltatune.data import prepare_datasets, validate_data
from deltatune.data.pipeline import PreparedData, load_examples
from deltatune.inspect.architecture import meta_model
from deltatune.methods.base import get_method
from deltatune.models import load_model_and_tokenizer, model_config
from deltatune.models.cache import read_marker
from deltatune.models.checkpointing import enable_activation_checkpointing
from deltatune.models.loader import resolve_model_path
from deltatune.models.registry import get_spec
from deltatune.models.tokenizer import normalize_tokenizer
from deltatune.quant import Linear4bit, Linear8bit, prepare_model_for_kbit_training, quantize_model
from deltatune.surgery.targets import resolve_targets
from deltatune.train import outputs
from deltatune.train.config import TrainConfig
from deltatune.train.config_check import ConfigError, did_you_mean
from deltatune.train.metrics import describe, score_accuracy
from deltatune.train.outputs import OutputPlan, check_output_dir, plan_output_dir, resume_plan
# The session's result types are re-exported here, the public path of a run's API.
from deltatune.train.session import RunResult, TrainingSession, TrainingStopped, is_main_process  # noqa: F401


def load_tokenizer(name_or_path: str) -> Any:
    """The model's tokenizer with deltatune's fixes, without loading any weights.

    A registered GGUF model is converted into its cache folder first if needed (~20 s, once).
    """
    from transformers import AutoTokenizer

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


def check_quantized_support(config: TrainConfig) -> None:
    """QLoRA needs deltatune.quant and a LoRA that wraps its 4-bit layers; check before loading anything.

    Raises:
        ValueError: either is missing, with what to do instead.
    """
    if not config.method.spec.quantized:
        return
    wanted = Linear4bit if config.quant.bits == 4 else Linear8bit
    if not issubclass(wanted, get_method(PeftType.LORA).layer_types):
        raise ValueError(
            f"method.name=qlora: LoRA in this deltatune build cannot wrap {wanted.__name__} layers. Use "
            "method.name=lora, or update deltatune."
        )


def check_optimizer(name: str) -> None:
    """``train.optim`` must be one of transformers' optimizer names (the Trainer would refuse it after loading).

    Raises:
        ConfigError: an unknown name, with the closest valid one.
    """
    from transformers.training_args import OptimizerNames

    valid = [o.value for o in OptimizerNames]
    if name not in valid:
        raise ConfigError(f"Config key 'train.optim' is {name!r}, which transformers does not know."
                          f"{did_you_mean(name, valid)} Accepted names: {', '.join(valid)}.")


def check_targets(config: TrainConfig, peft_config: Any) -> None:
    """Resolve the method's targets on the model built from its config on the meta device (no weights).

    A ``target_modules`` typo then costs a second, not a model load. Methods that wrap no layers by
    name (prompt and prefix tuning, BitFit, partial fine-tuning) have nothing to check here.

    Raises:
        ConfigError: a target matches nothing or a layer the method cannot wrap; the message lists the
            layers that exist, with the closest match.
    """
    method = get_method(peft_config.peft_type)
    if method.make_adapter is None:
        return
    model = meta_model(model_config(config.model), TaskType.CAUSAL_LM)
    try:
        prepared = method.prepare(peft_config, model)
        resolve_targets(model, prepared)
    except ValueError as err:
        raise ConfigError(f"Config key 'method.target_modules' does not fit {config.model}: {err}") from None


def check_before_loading(config: TrainConfig, peft_config: Any) -> None:
    """Everything about the method and optimizer that can fail, checked before any weights load."""
    check_quantized_support(config)
    check_optimizer(config.train.optim)
    check_targets(config, peft_config)


class RunFolder(TrainerCallback):
    """The output folder's changes in one run: kept once the run has a checkpoint or completes, else undone.

    Nothing is written before :meth:`start`, which runs once every check has passed. A fresh run that
    fails or stops before its first checkpoint leaves the folder as it found it: its own files are
    deleted, and the previous run that ``--overwrite`` set aside at the start is moved back. Once the new
    run saves its first checkpoint (``on_save``) or completes, the previous run is deleted.
    """

    def __init__(self, output_dir: Path, plan: OutputPlan, log: Callable[[str], None]) -> None:
        super().__init__()
        self.output_dir, self.plan, self.log = output_dir, plan, log
        self.kept = plan.checkpoint is not None  # a resumed run is never undone
        self.found: set[str] = set()  # run files that were there before (e.g. a stray tensorboard/)
        self.created = False

    def start(self, config: TrainConfig) -> None:
        """Rename damaged checkpoints, set the old run aside and write ``config.yaml``.

        Raises:
            ValueError: the folder cannot be written after all (e.g. a disk that became read-only).
        """
        try:
            self.created = not self.output_dir.exists()
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for folder, why in self.plan.corrupt:
                kept_as = outputs.mark_corrupt(folder)
                self.log(f"resume: {folder.name} is damaged: {why}. Resuming from {self.plan.checkpoint.name} "
                         f"instead; the damaged folder is kept as {kept_as.name}.")
            if self.plan.replaces:
                aside = outputs.set_aside(self.output_dir, self.plan.replaces)
                self.log(f"--overwrite: the previous run is set aside in {aside} until this run saves a checkpoint")
            self.found = set(outputs.run_outputs(self.output_dir))
            outputs.write_config(self.output_dir, config)
        except OSError as err:
            with contextlib.suppress(OSError):  # put back what was set aside, if the folder still allows it
                self.undo("could not start")
            raise ValueError(f"output_dir {self.output_dir} cannot be written: {err.strerror or err} "
                             f"({err.filename}). Choose another output_dir=PATH or fix its permissions.") from err

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.keep()

    def keep(self) -> None:
        """The new run is worth keeping: delete the previous one."""
        if not self.kept:
            self.kept = True
            outputs.discard_aside(self.output_dir)

    def end(self, status: str) -> None:
        """After the session returned: keep a completed or resumable run, undo one with nothing to resume."""
        if status == "completed" or outputs.last_checkpoint(self.output_dir) is not None:
            self.keep()
        else:
            self.undo(f"was {status} before its first checkpoint")

    def fail(self, err: BaseException) -> None:
        """After the session raised: undo a run with nothing to resume, else record the failure."""
        if not self.kept and outputs.last_checkpoint(self.output_dir) is None:
            self.undo(f"failed before its first checkpoint ({type(err).__name__})")
            return
        self.keep()
        metrics = outputs.read_metrics(self.output_dir)
        if metrics.get("status", "running") == "running":  # a NaN stop has already said what happened
            outputs.write_metrics(self.output_dir, {**metrics, "status": f"failed: {type(err).__name__}: {err}"})

    def undo(self, why: str) -> None:
        new = sorted(set(outputs.run_outputs(self.output_dir)) - self.found)
        restored = outputs.restore_aside(self.output_dir, new)
        if self.created and not any(self.output_dir.iterdir()):
            self.output_dir.rmdir()
        self.log(f"the new run {why}; " + (f"the previous run in {self.output_dir} is restored" if restored
                                            else f"its files in {self.output_dir} are removed"))


def load_model(config: TrainConfig, log: Callable[[str], None] = print) -> Any:
    """The base model, quantized to 4 bits for QLoRA and with gradient checkpointing if asked."""
    # Under torchrun each rank loads onto its own GPU (LOCAL_RANK), not all onto cuda:0.
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else None
    model, _ = load_model_and_tokenizer(config.model, device=device)
    if config.method.spec.quantized:
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
    started = time.perf_counter()
    if config.output_dir is None:
        raise ValueError("run_training needs config.output_dir; load_train_config leaves it None, so set it first.")
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    output_dir = Path(config.output_dir)
    tokenizer, prepared = prepare_data(config, log)
    steps = total_steps(config, len(prepared.train))
    peft_config = config.method.build(total_steps=steps)
    check_before_loading(config, peft_config)
    accuracy = wants_accuracy(config, prepared)
    # Every rank of a torchrun job runs this; only rank 0 checks and writes the output folder
    # (otherwise rank 1 finds rank 0's config.yaml and refuses to overwrite "another run").
    main = is_main_process()
    if main:
        plan = plan_output_dir(output_dir, resume, overwrite)
    else:
        plan = OutputPlan(checkpoint=resume_plan(output_dir).checkpoint if resume else None)
    if plan.checkpoint is not None and config.method.name == "adalora":
        raise ValueError("--resume is not supported for AdaLoRA: its rank allocator's importance scores are not "
                         "checkpointed and saved adapters hold only the kept ranks. Start the run again.")
    session = TrainingSession(config, output_dir, tokenizer, prepared, peft_config, steps, log, load_model=load_model)
    if not main:
        return session.run(plan.checkpoint, accuracy, started)
    folder = RunFolder(output_dir, plan, log)
    folder.start(config)
    session.callbacks.append(folder)
    try:
        result = session.run(plan.checkpoint, accuracy, started)
    except BaseException as err:
        folder.fail(err)
        raise
    folder.end(result.status)
    return result


__all__ = ["OutputPlan", "RunFolder", "RunResult", "TrainingStopped", "check_before_loading", "check_output_dir",
           "describe", "load_model", "load_tokenizer", "plan_output_dir", "prepare_data", "run_training",
           "score_accuracy", "total_steps"]
