"""``deltatune tune``'s run (the parser is in :mod:`deltatune.cli.tune`, so ``--help`` stays fast)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from deltatune.tune.study import _import_optuna, load_tune_file, run_study


def main(args: argparse.Namespace) -> int:
    try:
        _import_optuna()  # fail fast, before reading data or models
    except ImportError as err:
        print(f"deltatune tune: error: {err}", file=sys.stderr)
        return 2
    job = load_tune_file(args.config)
    if args.pruner:
        job.settings = dataclasses.replace(job.settings, pruner=args.pruner)
    name = args.study or Path(args.config).stem
    output_dir = Path(args.output_dir or Path("tune-runs") / name)
    result = run_study(job, args.trials, output_dir, storage=args.storage, study_name=name)
    return 130 if result.interrupted else 0
