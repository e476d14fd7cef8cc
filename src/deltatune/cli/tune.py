"""``deltatune tune CONFIG.yaml --trials N [--storage URL] [--study NAME] [--output-dir DIR]``."""
from __future__ import annotations

import argparse

EPILOG = """\
examples:
  deltatune tune examples/tune.yaml --trials 20
  deltatune tune examples/tune.yaml --trials 20 --storage sqlite:///study.db --study lora-bbc
  deltatune tune examples/tune.yaml --trials 30        after an interruption: resumes, runs the missing 10

The tune file is a `deltatune train` config plus a `search:` section (the parameters to search) and an
optional `tune:` section (pruner, sampler, seed). Each trial is a short training run that reports its eval
loss at every evaluation, so poor trials are pruned early. Trials are stored in SQLite as they finish: run
the same command again to resume. Outputs: trials/, best.yaml (a ready train config), history.png.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``tune`` subcommand."""
    p = subparsers.add_parser(
        "tune", help="Hyperparameter search with Optuna (resumable).",
        description="Search hyperparameters (rank, alpha, learning rate, dropout, targets, method) with Optuna over "
                    "short training runs, pruning poor trials early. Needs the extra: pip install 'deltatune[tune]'.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="tune file: a train config with a search: section (see examples/tune.yaml)")
    p.add_argument("--trials", type=int, required=True,
                   help="finished trials wanted in total (earlier runs of the same study count)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL (default: sqlite:///<output-dir>/study.db)")
    p.add_argument("--study", default=None, help="study name (default: the config file's name)")
    p.add_argument("--output-dir", default=None, help="where trials and results go (default: tune-runs/<study>)")
    p.add_argument("--pruner", default=None, choices=("median", "halving", "threshold", "none"),
                   help="override tune.pruner")
    p.set_defaults(func="deltatune.cli.tune_run:main")  # loads Optuna and the Trainer only when it runs
