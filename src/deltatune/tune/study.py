"""``deltatune tune``: an Optuna study over short training runs, stored in SQLite and resumable.

The tune file is a ``deltatune train`` config (model, method, data, train, eval) plus two
sections: ``search:`` (:mod:`deltatune.tune.space`) and ``tune:`` (:class:`TuneSettings`).
Every trial is stored as it runs; a study that was interrupted (Ctrl-C, a crash, SIGKILL) is
resumed by running the same command again: finished trials are counted and kept, only the
remaining ones run, and a trial that was cut off mid-run is marked failed and its parameters are
tried again first.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from deltatune.plan.meta import build_meta_model, load_model_config
from deltatune.plan.setup import TARGET_PRESETS, resolve_target_names
from deltatune.train.config import TrainConfig, default_tree, merge_layer, read_yaml
from deltatune.tune.report import plot_history, trials_table, write_best_config
from deltatune.tune.runner import Runner, load_runner
from deltatune.tune.space import Param, parse_space, to_layer

PRUNERS = ("median", "halving", "threshold", "none")
INTERRUPTED = "interrupted"
"""User attribute set on a trial that was still running when its process died."""


@dataclass(frozen=True)
class TuneSettings:
    """The ``tune:`` section of a tune file."""

    direction: str = "minimize"
    """``minimize`` the eval loss (the objective), or ``maximize`` for a custom runner's score."""
    pruner: str = "median"
    """``median`` (stop a trial whose eval loss is worse than the median of earlier trials at the same
    step), ``halving`` (successive halving), ``threshold`` (stop above ``prune_above``) or ``none``."""
    n_startup_trials: int = 2
    """Median pruner: trials that always run to the end before pruning starts."""
    n_warmup_steps: int = 0
    """Median/threshold pruner: reported steps before a trial may be pruned."""
    min_resource: int | str = "auto"
    """Halving pruner: steps before the first rung."""
    reduction_factor: int = 3
    """Halving pruner: 1/factor of the trials is promoted at each rung."""
    prune_above: float | None = None
    """Threshold pruner: prune as soon as a reported value exceeds this."""
    sampler: str = "tpe"
    """``tpe`` (Optuna's default Bayesian sampler) or ``random``."""
    seed: int | None = 0
    """Sampler seed, so a study is reproducible."""
    runner: str | None = None
    """``module:function`` of a custom trial runner; None runs ``deltatune train`` (see runner.py)."""
    keep_trial_dirs: bool = True
    """Keep each trial's output folder (adapter, metrics); False deletes it when the trial ends."""

    def __post_init__(self) -> None:
        def fail(key: str, expected: str) -> None:
            raise ValueError(f"tune.{key} is {getattr(self, key)!r}; expected {expected}.")

        if self.direction not in ("minimize", "maximize"):
            fail("direction", "minimize or maximize")
        if self.pruner not in PRUNERS:
            fail("pruner", f"one of {', '.join(PRUNERS)}")
        if self.pruner == "threshold" and self.prune_above is None:
            fail("prune_above", "a number: the threshold pruner stops trials whose value exceeds it")
        if self.sampler not in ("tpe", "random"):
            fail("sampler", "tpe or random")

    @classmethod
    def from_dict(cls, d: Any) -> "TuneSettings":
        """Build from the ``tune:`` mapping; unknown keys are an error naming the valid ones."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown tune settings {unknown}; valid keys: {', '.join(sorted(known))}.")
        return cls(**d)


@dataclass
class TuneJob:
    """A parsed tune file."""

    base: dict[str, Any]
    """The train-config part (every section but ``search`` and ``tune``)."""
    space: tuple[Param, ...]
    """The searched parameters."""
    settings: TuneSettings = field(default_factory=TuneSettings)
    """The ``tune:`` section."""


def load_tune_file(path: str | Path) -> TuneJob:
    """Read a tune file and check its base config and search space before anything runs.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a bad ``search``/``tune`` section, or a base config that does not validate.
    """
    tree = read_yaml(path)
    space = parse_space(tree.pop("search", None))
    settings = TuneSettings.from_dict(tree.pop("tune", None))
    base = merge_layer(default_tree(), tree)
    _validate(base)
    return TuneJob(base=base, space=space, settings=settings)


def _validate(tree: Mapping[str, Any]) -> None:
    try:
        TrainConfig.from_dict(tree)
    except Exception as err:  # ConfigError and config classes' ValueErrors
        raise ValueError(f"the tune file's train config is invalid: {err}") from err


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ImportError("deltatune tune needs Optuna, which is not installed; install the extra: "
                          "pip install 'deltatune[tune]'") from None
    return optuna


def _pruner(optuna: Any, s: TuneSettings) -> Any:
    p = optuna.pruners
    if s.pruner == "median":
        return p.MedianPruner(n_startup_trials=s.n_startup_trials, n_warmup_steps=s.n_warmup_steps)
    if s.pruner == "halving":
        return p.SuccessiveHalvingPruner(min_resource=s.min_resource, reduction_factor=s.reduction_factor)
    if s.pruner == "threshold":
        upper, lower = (s.prune_above, None) if s.direction == "minimize" else (None, s.prune_above)
        return p.ThresholdPruner(upper=upper, lower=lower, n_warmup_steps=s.n_warmup_steps)
    return p.NopPruner()


def open_study(job: TuneJob, storage: str, name: str) -> tuple[Any, Any]:
    """Create the study, or load it if it exists (``load_if_exists``); returns ``(study, storage)``."""
    optuna = _import_optuna()
    store = optuna.storages.RDBStorage(storage)
    s = job.settings
    sampler = (optuna.samplers.TPESampler(seed=s.seed) if s.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=s.seed))
    study = optuna.create_study(storage=store, study_name=name, direction=s.direction, sampler=sampler,
                                pruner=_pruner(optuna, s), load_if_exists=True)
    return study, store


def recover_interrupted(study: Any, store: Any) -> list[int]:
    """Mark trials left RUNNING by a dead process as failed and queue their parameters again.

    Assumes one process works on the study at a time (the CLI's use).

    Returns:
        The numbers of the trials that were recovered.
    """
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        store.set_trial_user_attr(t._trial_id, INTERRUPTED, True)
        store.set_trial_state_values(t._trial_id, TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params, skip_if_exists=True)
    return [t.number for t in stale]


def finished_trials(study: Any) -> list[Any]:
    """Trials that count towards ``--trials``: complete, pruned, or failed on their own (not interrupted)."""
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return [t for t in study.get_trials(deepcopy=False, states=done) if not t.user_attrs.get(INTERRUPTED)]


def make_objective(job: TuneJob, output_dir: Path, runner: Runner, log: Callable[[str], None]) -> Callable:
    """The Optuna objective: sample, build the trial's train config, run it, return its eval loss."""
    optuna = _import_optuna()
    resolve = _target_resolver(job.base)

    def objective(trial: Any) -> float:
        params = {p.name: p.suggest(trial) for p in job.space}
        tree = merge_layer(job.base, to_layer(params, job.base, resolve))
        trial_dir = output_dir / "trials" / f"trial-{trial.number:04d}"
        tree["output_dir"] = str(trial_dir)
        # One trial never resumes: a checkpoint at the end is enough (no mid-run saves).
        tree.setdefault("train", {}).setdefault("save_steps", 0)
        trial.set_user_attr("output_dir", str(trial_dir))
        started = time.perf_counter()

        def report(step: int, value: float) -> None:
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"eval loss {value:.4f} at step {step}")

        log(f"trial {trial.number}: {_fmt_params(params)}")
        try:
            value = runner(tree, report)
        except optuna.TrialPruned as why:
            log(f"trial {trial.number}: pruned ({why}) after {time.perf_counter() - started:.0f} s")
            raise
        except KeyboardInterrupt:
            # Not a result: flag it so a resumed study does not count it, and retry its parameters.
            trial.set_user_attr(INTERRUPTED, True)
            trial.study.enqueue_trial(params, skip_if_exists=True)
            raise
        finally:
            if not job.settings.keep_trial_dirs:
                import shutil

                shutil.rmtree(trial_dir, ignore_errors=True)
        log(f"trial {trial.number}: eval loss {value:.4f} in {time.perf_counter() - started:.0f} s")
        return value

    return objective


def _target_resolver(base: Mapping[str, Any]) -> Callable[[str], Any]:
    """``preset -> target_modules`` for the base model (``attention`` -> its q/k/v/o names)."""
    def resolve(value: str) -> Any:
        if value not in TARGET_PRESETS:
            return value
        if value == "all-linear":
            return value
        names = resolve_target_names(build_meta_model(load_model_config(base["model"])), value)
        return list(names)

    cache: dict[str, Any] = {}
    return lambda v: cache.setdefault(v, resolve(v)) if v not in cache else cache[v]


def _fmt_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


@dataclass
class TuneResult:
    """What :func:`run_study` did."""

    study: Any
    """The Optuna study (all trials, this run's and earlier ones)."""
    ran: int
    """Trials run by this call."""
    recovered: list[int]
    """Trials found interrupted and re-queued."""
    best_config: Path | None = None
    """The best trial's train config, if any trial completed."""
    history_png: Path | None = None
    """The optimisation-history plot."""
    interrupted: bool = False
    """Ctrl-C stopped the study before ``n_trials`` finished."""


def run_study(job: TuneJob, n_trials: int, output_dir: str | Path, storage: str | None = None,
              study_name: str = "deltatune", log: Callable[[str], None] = print) -> TuneResult:
    """Run (or resume) a study until ``n_trials`` trials have finished, then report.

    Args:
        job: the parsed tune file.
        n_trials: total finished trials wanted, counting those of earlier runs of this study.
        output_dir: where trials, ``best.yaml`` and ``history.png`` go.
        storage: an Optuna storage URL; default ``sqlite:///<output_dir>/study.db``.
        study_name: the study's name in the storage.
        log: where progress lines go.

    Returns:
        The :class:`TuneResult`.
    """
    if n_trials < 1:
        raise ValueError(f"--trials is {n_trials}; expected at least 1.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(output_dir / 'study.db').resolve()}"
    study, store = open_study(job, storage, study_name)
    recovered = recover_interrupted(study, store)
    if recovered:
        log(f"trials {recovered} were interrupted; they are marked failed and their parameters run again")
    done = len(finished_trials(study))
    remaining = max(0, n_trials - done)
    log(f"study {study_name!r} in {storage}: {done} trial(s) finished, running {remaining} more")
    runner = load_runner(job.settings.runner)
    interrupted = False
    if remaining:
        try:
            study.optimize(make_objective(job, output_dir, runner, log), n_trials=remaining, catch=(Exception,),
                           gc_after_trial=True)
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: finished trials are stored; run the same command again to resume the study")
    log("\n" + trials_table(study))
    ran = len(finished_trials(study)) - done
    result = TuneResult(study=study, ran=ran, recovered=recovered, interrupted=interrupted)
    result.best_config = write_best_config(study, best_tree(study, job), output_dir / "best.yaml")
    result.history_png = plot_history(study, output_dir / "history.png")
    if result.best_config is not None:
        best = study.best_trial
        log(f"\nbest: trial {best.number}, eval loss {best.value:.4f}; config written to {result.best_config}")
    else:
        log("\nno trial completed, so there is no best configuration yet")
    if result.history_png is not None:
        log(f"optimisation history: {result.history_png}")
    return result


def best_tree(study: Any, job: TuneJob) -> dict[str, Any] | None:
    """The base train config with the best trial's parameters applied (no output_dir)."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    tree = merge_layer(job.base, to_layer(study.best_trial.params, job.base, _target_resolver(job.base)))
    tree = copy.deepcopy(tree)
    tree.pop("output_dir", None)
    for section in tree.values():  # sampled floats to 6 significant digits: readable, same training
        if isinstance(section, dict):
            for k, v in section.items():
                if isinstance(v, float):
                    section[k] = float(f"{v:.6g}")
    return tree


