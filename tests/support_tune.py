"""Helpers for the ``deltatune tune`` tests: a fast stand-in trial runner and tune files.

``quick_runner`` has the runner signature (``run_trial(config_tree, report) -> eval loss``) but
trains nothing: its "eval loss" is a smooth function of the sampled rank and learning rate, and
it sleeps ``TUNE_TEST_SLEEP`` seconds per report so a test can kill a study mid-trial.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import yaml


def quick_runner(config_tree, report) -> float:
    lr, r = config_tree["train"]["lr"], config_tree["method"]["r"]
    final = abs(math.log10(lr) + 3.0) + 1.0 / r  # best near lr = 1e-3 and a high rank
    for step in (1, 2, 3):
        time.sleep(float(os.environ.get("TUNE_TEST_SLEEP", "0")))
        report(step, final + 1.0 / step)
    return final


def write_tune_file(path: Path, base: dict, search: dict, tune: dict) -> Path:
    path.write_text(yaml.safe_dump({**base, "search": search, "tune": tune}, sort_keys=False))
    return path
