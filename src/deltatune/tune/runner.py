"""One tuning trial: a short ``deltatune train`` run that reports its eval loss as it goes.

The runner interface is ``run_trial(config_tree, report) -> final eval loss``: ``config_tree`` is
a complete train-config mapping (see :mod:`deltatune.train.config`), ``report(step, eval_loss)``
is called at every evaluation and may raise to stop the run (Optuna's pruning does). Any
callable with that signature can replace :func:`run_trial` (``tune.runner: module:function`` in
the tune config), e.g. to tune a training loop of your own.
"""
from __future__ import annotations

import importlib
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from deltatune.train import outputs
from deltatune.train.config import TrainConfig
from deltatune.train.run import adapter_config, check_output_dir, load_model, prepare_data, total_steps, wants_accuracy
from deltatune.train.session import TrainingSession

Report = Callable[[int, float], None]
Runner = Callable[[Mapping[str, Any], Report], float]


def _report_callback(report: Report) -> Any:
    from transformers import TrainerCallback

    class ReportEvalLoss(TrainerCallback):
        """Passes every evaluation's eval loss to ``report`` (which may raise to stop training)."""

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            value = (metrics or {}).get("eval_loss")
            if value is not None:
                report(int(state.global_step), float(value))

    return ReportEvalLoss()


def run_trial(config_tree: Mapping[str, Any], report: Report) -> float:
    """Train with ``config_tree`` and return the last eval loss, reporting each eval on the way.

    This is ``deltatune.train.run.run_training`` with one more Trainer callback; the steps are
    the same (data checked and tokenized before the model loads, output folder checked).

    Raises:
        ValueError: the config has no evaluation during training (``train.eval_steps: 0`` or
            ``data.eval_size: 0``), or the run ended without an eval loss.
        optuna.TrialPruned: passed on from ``report`` when the pruner stops the trial; training
            errors are passed on as they are.
    """
    _quiet()
    config = TrainConfig.from_dict(config_tree)
    if config.train.eval_steps == 0:
        raise ValueError("tuning needs evaluations during training: set train.eval_steps > 0 (or leave it unset "
                         "for 4 per run).")
    if config.output_dir is None:
        raise ValueError("run_trial needs output_dir in the config tree (deltatune tune sets one per trial).")
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    tokenizer, prepared = prepare_data(config, log=lambda _msg: None)
    if prepared.eval is None or len(prepared.eval) == 0:
        raise ValueError("tuning minimises the eval loss, but the data has no eval split: set data.eval_size > 0 "
                         "or data.eval_source.")
    steps = total_steps(config, len(prepared.train))
    peft_config = adapter_config(config, steps)
    accuracy = wants_accuracy(config, prepared)
    check_output_dir(output_dir, resume=False, overwrite=True)
    outputs.write_config(output_dir, config)
    callback = _report_callback(report)

    class TrialSession(TrainingSession):
        def build_trainer(self, peft_model):
            from transformers.trainer_callback import PrinterCallback

            trainer, *rest = super().build_trainer(peft_model)
            trainer.add_callback(callback)
            trainer.remove_callback(PrinterCallback)  # the study prints one line per trial instead
            return (trainer, *rest)

    session = TrialSession(config, output_dir, tokenizer, prepared, peft_config, steps, log=lambda _msg: None,
                           load_model=load_model)
    result = session.run(None, accuracy, started)
    if result.status != "completed":  # Ctrl-C: a partial run is no result
        raise KeyboardInterrupt
    final = (result.metrics.get("train") or {}).get("final_eval_loss")
    if final is None or not math.isfinite(final):
        raise ValueError(f"the trial ended without a finite eval loss (status {result.status!r}).")
    return float(final)


def _quiet() -> None:
    """No per-trial progress bars from datasets and transformers: the study logs one line per trial."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def load_runner(spec: str | None) -> Runner:
    """The runner named ``module:function`` (None: :func:`run_trial`).

    Raises:
        ValueError: the spec is malformed or names nothing importable.
    """
    if spec is None:
        return run_trial
    module, _, name = str(spec).partition(":")
    if not module or not name:
        raise ValueError(f"tune.runner is {spec!r}; expected 'package.module:function'.")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"tune.runner {spec!r} could not be loaded: {err}") from err
