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
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainerCallback
from transformers.training_args import OptimizerNames

from deltatune.train import outputs
from deltatune.train.config import TrainConfig
from deltatune.train.new_tokens import with_token_rows
# What a run loads before training, re-exported here: the public path of a run's API.
from deltatune.train.loading import (  # noqa: F401
    adapter_config, check_quantized_support, check_targets, load_model, load_tokenizer, prepare_data, total_steps,
    wants_accuracy,
)
from deltatune.train.config_check import ConfigError, did_you_mean
from deltatune.train.distributed import agree_on_plan, check_distributed
from deltatune.train.loftq import loftq_run
from deltatune.train.launch import export_launch_env
from deltatune.train.metrics import describe, score_accuracy
from deltatune.train.outputs import OutputPlan, check_output_dir, plan_output_dir, resume_plan
from deltatune.train.zero import check_resume
# The session's result types are re-exported here, the public path of a run's API.
from deltatune.train.session import RunResult, TrainingSession, TrainingStopped, is_main_process  # noqa: F401


def check_optimizer(name: str) -> None:
    """``train.optim`` must be one of transformers' optimizer names (the Trainer would refuse it after loading).

    Raises:
        ConfigError: an unknown name, with the closest valid one.
    """
    valid = [o.value for o in OptimizerNames]
    if name not in valid:
        raise ConfigError(f"Config key 'train.optim' is {name!r}, which transformers does not know."
                          f"{did_you_mean(name, valid)} Accepted names: {', '.join(valid)}.")


def check_before_loading(config: TrainConfig, peft_config: Any) -> None:
    """Everything about the method and optimizer that can fail, checked before any weights load."""
    check_quantized_support(config)
    check_distributed(config.train.distributed, config.method.name)
    if config.train.distributed == "fsdp" and (config.data.add_special_tokens or loftq_run(config)):
        # both change the base model after loading (rows added to the embedding; the 4-bit weights refitted),
        # which the shards FSDP2 made at load time cannot take
        raise ConfigError(
            "train.distributed=fsdp cannot be combined with data.add_special_tokens or method.init_lora_weights=loftq: "
            "both change the base model after it is loaded, when it is already sharded. Use train.distributed=ddp, "
            "or add the tokens to the model (resize its embeddings and save it) before training it with fsdp.")
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
    peft_config = adapter_config(config, steps)
    # data.add_special_tokens: the new tokens' embedding rows train with the adapter
    new_ids = tokenizer.convert_tokens_to_ids(list(config.data.add_special_tokens))
    peft_config = with_token_rows(peft_config, new_ids, config.method.name)
    check_before_loading(config, peft_config)
    accuracy = wants_accuracy(config, prepared)
    # Every rank of a torchrun job runs this; only rank 0 checks and writes the output folder
    # (otherwise rank 1 finds rank 0's config.yaml and refuses to overwrite "another run").
    main = is_main_process()

    def make_plan() -> OutputPlan:
        if main:
            return plan_output_dir(output_dir, resume, overwrite)
        return OutputPlan(checkpoint=resume_plan(output_dir).checkpoint if resume else None)

    # with several processes every rank must find the same checkpoint (a filesystem all nodes share)
    # (export_launch_env: mpirun/srun get the variable names torch.distributed reads, before it starts)
    plan = agree_on_plan(make_plan, export_launch_env().world_size,
                         lambda p: f"resumes {p.checkpoint.name}" if p.checkpoint else "starts afresh")
    if plan.checkpoint is not None:  # a DeepSpeed checkpoint resumes under DeepSpeed, on as many processes
        check_resume(plan.checkpoint, config.train.distributed, export_launch_env().world_size)
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
