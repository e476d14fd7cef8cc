"""One training session of a run: load, score, wrap, train (or resume), save, score, report."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from deltatune.data.pipeline import PreparedData
from deltatune.surgery.partitioned import gathered, trainable_partitioned
from deltatune.optimizers import create_loraplus_optimizer
from deltatune.registry import get_method
from deltatune.train import launch, loftq, outputs
from deltatune.train.adapter_trainer import AdapterTrainer, NonFiniteLossError
from deltatune.train.callbacks import GracefulInterrupt, RunRecorder, StepBoundary
from deltatune.train.config import TrainConfig
from deltatune.train.distributed import engine
from deltatune.train.new_tokens import resize_for
from deltatune.train.metrics import describe, score_accuracy, training_warnings
from deltatune.train.precision import choose_precision, inference_autocast, training_attention
from deltatune.train.zero import deepspeed_config


class TrainingStopped(RuntimeError):
    """The run stopped early for a reason the user must act on (e.g. a NaN loss); the message says which."""


@dataclass
class RunResult:
    """What :func:`deltatune.train.run.run_training` returns."""

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


def is_main_process() -> bool:
    """True on rank 0 of a ``torchrun`` / ``accelerate launch`` / ``mpirun`` / ``srun`` job, and in a plain single
    process (:mod:`deltatune.train.launch`; raises its ``LaunchError`` for a launch that started too few processes)."""
    return launch.is_main_process()


def training_arguments(config: TrainConfig, output_dir: Path, steps: int, has_eval: bool) -> Any:
    """transformers ``TrainingArguments`` for the run (the Trainer owns the schedule and checkpoints)."""
    from transformers import TrainingArguments
    from transformers.integrations import is_tensorboard_available

    launch.export_launch_env()  # mpirun/srun: the RANK/WORLD_SIZE names transformers and torch.distributed read
    t = config.train
    eval_steps = (max(1, steps // 4) if t.eval_steps is None else t.eval_steps) if has_eval else 0
    save_steps = (eval_steps or max(1, steps // 4)) if t.save_steps is None else t.save_steps
    cuda = torch.cuda.is_available()
    bf16 = choose_precision(t.bf16, cuda).bf16
    tensorboard = t.tensorboard and is_tensorboard_available()
    if t.tensorboard and not tensorboard:
        print("note: tensorboard is not installed, so no TensorBoard logs are written; "
              "install it with pip install 'deltatune[plot]'")
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr,
        lr_scheduler_type=t.scheduler, warmup_steps=t.warmup_steps if t.warmup_steps is not None else t.warmup_ratio,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, optim=t.optim, bf16=bf16,
        logging_steps=t.logging_steps, eval_strategy="steps" if eval_steps else "no", eval_steps=eval_steps or None,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or None,
        save_total_limit=t.save_total_limit, report_to=["tensorboard"] if tensorboard else [], seed=t.seed,
        disable_tqdm=not t.progress_bar, use_cpu=not cuda, remove_unused_columns=False, label_names=["labels"],
        include_num_input_tokens_seen="all" if config.data.packing else "non_padding",
        logging_nan_inf_filter=False, dataloader_num_workers=0,
        # Every trainable adapter parameter takes part in each forward, so DDP need not search the
        # autograd graph for unused ones each step (and that search breaks with checkpointing).
        ddp_find_unused_parameters=False,
        # transformers refuses checkpoints of a model sharded at load time unless they are model-only;
        # AdapterTrainer saves the replicated adapter's optimizer state after all (resumable_when_sharded).
        save_only_model=sharded(config),
        deepspeed=deepspeed_config(t.deepspeed) if t.distributed == "deepspeed" else None,
    )


def sharded(config: TrainConfig) -> bool:
    """Whether this run's model is sharded with FSDP2 (``train.distributed=fsdp`` with several processes)."""
    return engine(config.train.distributed, launch.world_info().world_size) == "fsdp"


def drop_autocast_wrapper(trainer: AdapterTrainer) -> None:
    """Give the trained model back its own forward.

    For bf16 (or fp16) accelerate replaces ``model.forward`` with an autocast wrapper and leaves it there
    after training, so the returned model, its accuracy scoring and any later use would silently run in
    bf16. Inference precision is chosen where inference runs, not inherited from training.
    """
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    if "forward" in vars(model) and "_original_forward" not in vars(model):
        del model.forward  # unwrap_model rebinds PeftModel's own forward as an attribute; the class's is the same


class TrainingSession:
    """Holds what one call of :func:`deltatune.train.run.run_training` builds, phase by phase."""

    def __init__(self, config: TrainConfig, output_dir: Path, tokenizer: Any, prepared: PreparedData,
                 peft_config: Any, steps: int, log: Callable[[str], None], *,
                 load_model: Callable[[TrainConfig, Callable[[str], None]], Any]) -> None:
        self.config, self.output_dir, self.tokenizer = config, output_dir, tokenizer
        self.prepared, self.peft_config, self.steps, self.log = prepared, peft_config, steps, log
        self.load_model = load_model  # (config, log) -> the base model: run.load_model, passed in by the run
        self.metrics: dict[str, Any] = {"status": "running", "model": config.model, "method": config.method.name,
                                        "output_dir": str(output_dir), "timings": {},
                                        "world_size": launch.world_info().world_size}
        self.callbacks: list[Any] = []  # extra Trainer callbacks (run_training's RunFolder)
        self.precision = choose_precision(config.train.bf16)  # training's, and the scoring's around it

    # ---- phases --------------------------------------------------------------------------------------------
    def run(self, checkpoint: Path | None, accuracy: bool, started: float):
        from transformers import set_seed

        timings = self.metrics["timings"]
        timings["data_s"] = time.perf_counter() - started
        t0 = time.perf_counter()
        model = self.load_model(self.config, self.log)
        resize_for(model, self.tokenizer, self.log)  # data.add_special_tokens: rows for the new tokens
        timings["load_model_s"] = time.perf_counter() - t0
        if checkpoint is not None:
            previous = outputs.read_metrics(self.output_dir)
            self.metrics["zero_shot"] = previous.get("zero_shot")
            self.log(f"resuming from {checkpoint}")
        if checkpoint is None and accuracy and self.config.eval.zero_shot:
            self.metrics["zero_shot"] = self.score(model, "zero-shot accuracy (before training)")
            timings["zero_shot_s"] = self.metrics["zero_shot"]["seconds"]
            if is_main_process():
                outputs.write_metrics(self.output_dir, self.metrics)
        set_seed(self.config.train.seed)  # the adapter's initialisation
        peft_model = loftq.wrap(model, self.peft_config, self.log)  # get_peft_model, plus LoftQ for QLoRA
        trainable, total = peft_model.get_nb_trainable_parameters()
        self.metrics.update(trainable_params=trainable, total_params=total)
        self.log(f"method {self.config.method.name}: {trainable:,d} trainable parameters of {total:,d} "
                 f"({100 * trainable / total:.3f}%); {self.steps} steps of {self.config.train.batch_size} x "
                 f"{self.config.train.grad_accum} rows on {torch.get_num_threads()} CPU threads"
                 if not torch.cuda.is_available() else f"method {self.config.method.name}: {trainable:,d} trainable")
        self.log(str(self.precision))
        self.metrics.update(bf16=self.precision.bf16)
        status = self.train(peft_model, checkpoint)
        # DeepSpeed ZeRO-3 partitions the adapter: every rank takes part in gathering it, rank 0 writes it
        partitioned = trainable_partitioned(peft_model)
        with gathered(p for p in peft_model.parameters() if p.requires_grad):
            if status == "completed" and is_main_process():
                peft_model.save_pretrained(self.output_dir / outputs.ADAPTER_DIR)
                if self.config.data.add_special_tokens:  # loaders resize the base model to this tokenizer first
                    self.tokenizer.save_pretrained(self.output_dir / outputs.ADAPTER_DIR)
        # FSDP2's and ZeRO-3's forwards gather weights from every rank, so every rank scores (rank 0 reports)
        if status == "completed" and (is_main_process() or sharded(self.config) or partitioned):
            if accuracy:
                self.metrics["final"] = self.score(peft_model, "accuracy after training")
                timings["final_eval_s"] = self.metrics["final"]["seconds"]
        timings["total_s"] = time.perf_counter() - started
        self.finish(status)
        return RunResult(self.output_dir, status, self.metrics, outputs.last_checkpoint(self.output_dir), peft_model)

    def score(self, model: Any, what: str) -> dict[str, Any]:
        ev = self.config.eval
        with inference_autocast(self.precision, "cuda" if torch.cuda.is_available() else "cpu"):
            result = score_accuracy(model, self.tokenizer, self.prepared.eval, template=self.prepared.template,
                                    scoring=ev.scoring, max_examples=ev.max_examples, max_new_tokens=ev.max_new_tokens,
                                    progress=self.config.train.progress_bar)
        self.log(f"{what}: {describe(result)} [{result['seconds']:.0f} s]")
        return result

    def build_trainer(self, peft_model: Any) -> tuple[AdapterTrainer, RunRecorder, GracefulInterrupt, StepBoundary]:
        evaluation = self.prepared.eval
        if evaluation is not None and self.config.eval.loss_examples is not None:
            evaluation = evaluation.select(range(min(self.config.eval.loss_examples, len(evaluation))))
        args = training_arguments(self.config, self.output_dir, self.steps, evaluation is not None)
        recorder, interrupt, boundary = RunRecorder(), GracefulInterrupt(), StepBoundary()
        callbacks = [recorder, interrupt, boundary]
        for config in peft_model.peft_config.values():  # what the method needs in training (AdaLoRA's allocator)
            callbacks += [make() for make in get_method(config.peft_type).callbacks]
        trainer = AdapterTrainer(model=peft_model, args=args, train_dataset=self.prepared.train,
                                 eval_dataset=evaluation, data_collator=self.prepared.collator, callbacks=callbacks,
                                 optimizers=(self.optimizer(peft_model, args), None))
        trainer.note = self.log
        for cb in trainer.callback_handler.callbacks:  # TensorBoard: a fixed folder, not runs/<date>_<host>
            if type(cb).__name__ == "TensorBoardCallback":
                cb.logging_dir = str(self.output_dir / outputs.TENSORBOARD_DIR)
        return trainer, recorder, interrupt, boundary

    def optimizer(self, peft_model: Any, args: Any) -> Any:
        """LoRA+'s optimizer (``train.loraplus_lr_ratio``) over ``train.optim``'s class, or None: the Trainer's own."""
        ratio = self.config.train.loraplus_lr_ratio
        if ratio is None:
            return None
        optimizer_cls, kwargs = AdapterTrainer.get_optimizer_cls_and_kwargs(args, peft_model)
        kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
        return create_loraplus_optimizer(peft_model, optimizer_cls, lr=args.learning_rate, loraplus_lr_ratio=ratio,
                                         loraplus_weight_decay=args.weight_decay, **kwargs)

    def train(self, peft_model: Any, checkpoint: Path | None) -> str:
        """Run the Trainer; returns ``completed`` or ``interrupted`` (a resumable checkpoint is on disk)."""
        trainer, recorder, interrupt, boundary = self.build_trainer(peft_model)
        for callback in self.callbacks:
            trainer.add_callback(callback)
        status = "completed"
        with interrupt, training_attention(peft_model.get_base_model(), self.precision) as attention:
            if attention is not None:
                self.log(f"attention: {attention} while training (eager's arithmetic, faster than SDPA's backward under "
                         "CPU bf16; its probabilities are recomputed in backward, not kept)")
            try:
                trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            except NonFiniteLossError as err:
                self.record_training(trainer, recorder)
                self.finish("stopped: non-finite loss")
                raise self.non_finite(err) from None
            except KeyboardInterrupt:
                status = "interrupted"
                self.save_on_interrupt(trainer, boundary)
        if interrupt.stopped_at is not None and trainer.state.global_step < self.steps:
            status = "interrupted"
        drop_autocast_wrapper(trainer)
        self.record_training(trainer, recorder)
        if status == "interrupted":
            where = outputs.last_checkpoint(self.output_dir)
            self.log(f"interrupted at step {trainer.state.global_step} of {self.steps}; "
                     + (f"resumable checkpoint: {where}. Continue with: deltatune train --resume "
                        f"output_dir={self.output_dir}" if where else "no checkpoint was written"))
        return status

    def save_on_interrupt(self, trainer: AdapterTrainer, boundary: StepBoundary) -> None:
        """After a hard interrupt: checkpoint the last completed step, if the state is consistent."""
        step = trainer.state.global_step
        if step == 0 or not boundary.consistent or (self.output_dir / f"checkpoint-{step}").is_dir():
            return
        try:
            trainer._save_checkpoint(trainer.model, trial=None)
        except NonFiniteLossError as err:
            self.log(f"no checkpoint written at the interruption: {err}")

    def non_finite(self, err: NonFiniteLossError):
        # The newest checkpoint can hold finite but exploded weights (the step before the NaN): set such
        # ones aside, so the one named here is also the one --resume takes.
        good, bad = outputs.usable_checkpoint(self.output_dir)
        aside = [f"{folder.name} ({why}) was renamed {outputs.mark_corrupt(folder).name}" for folder, why in bad]
        keep = (f"The last good checkpoint is {good} (resume with --resume after lowering train.lr or raising "
                "train.warmup_ratio)." if good else "No good checkpoint had been written.")
        return TrainingStopped(f"Training stopped: {err}. Nothing from step {err.step} on was saved. {keep}"
                               + (" " + "; ".join(aside) + "." if aside else ""))

    def record_training(self, trainer: AdapterTrainer, recorder: RunRecorder) -> None:
        recorder.finish(trainer.state)
        seconds = recorder.train_seconds or 1e-9
        self.metrics["train"] = {
            "steps": trainer.state.global_step, "max_steps": self.steps,
            "train_loss": recorder.train_loss, "eval_loss": recorder.eval_loss,
            "final_train_loss": recorder.train_loss[-1][1] if recorder.train_loss else None,
            "final_eval_loss": recorder.eval_loss[-1][1] if recorder.eval_loss else None,
            "tokens": recorder.tokens, "seconds": recorder.train_seconds, "tokens_per_s": recorder.tokens / seconds,
            "threads": torch.get_num_threads(),
        }
        self.metrics["timings"]["train_s"] = recorder.train_seconds
        trained = [p.detach() for p in trainer.model.parameters() if p.requires_grad and p.numel()]
        peak = max((float(p.abs().max()) for p in trained), default=0.0)
        warnings = training_warnings(recorder.train_loss, self.config.train.lr, peak, outputs.DIVERGED_WEIGHT)
        self.metrics["train"]["warnings"] = warnings
        for text in warnings:
            self.log(f"warning: {text}")

    def finish(self, status: str) -> None:
        """Write ``metrics.json`` and ``loss.png`` with the given status."""
        self.metrics["status"] = status
        if not is_main_process():  # under torchrun only rank 0 writes metrics.json and loss.png
            return
        self.metrics["peak_rss_mb"] = outputs.peak_rss_bytes() / 2**20
        outputs.write_metrics(self.output_dir, self.metrics)
        train = self.metrics.get("train") or {}
        if self.config.train.plot:
            outputs.plot_losses(self.output_dir, train.get("train_loss", []), train.get("eval_loss", []),
                                title=f"{self.config.method.name} on {self.config.data.source}")
