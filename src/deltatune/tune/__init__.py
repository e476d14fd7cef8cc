"""Hyperparameter search over short training runs (``deltatune tune``), with Optuna (lazy import).

Optuna is an optional dependency: ``pip install 'deltatune[tune]'``. Importing this package does
not import it; running a study does, with a clear message when it is missing.
"""
from deltatune.tune.runner import load_runner, run_trial
from deltatune.tune.space import Param, parse_space, to_layer
from deltatune.tune.study import TuneJob, TuneResult, TuneSettings, load_tune_file, run_study

__all__ = ["Param", "TuneJob", "TuneResult", "TuneSettings", "load_runner", "load_tune_file", "parse_space",
           "run_study", "run_trial", "to_layer"]
