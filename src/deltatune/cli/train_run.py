"""``deltatune train``'s run: resolve the config, then train (the parser is in :mod:`deltatune.cli.train`,
so that ``deltatune train --help`` does not load transformers' Trainer)."""
from __future__ import annotations

import argparse
import sys

from deltatune.cli.train import resolve_config, split_args
from deltatune.train.distributed import agree_on_plan, end_process_group
from deltatune.train.launch import export_launch_env
from deltatune.train.run import TrainingStopped, run_training


def main(args: argparse.Namespace) -> int:
    """Entry point of ``deltatune train``: 0 when done, 130 when interrupted (resumable), 1 when stopped."""
    code = 1
    try:
        code = _main(args)
        return code
    finally:
        # under torchrun: the ranks leave together, and the group goes before the interpreter's exit tears it down
        end_process_group(wait=code in (0, 130))


def _main(args: argparse.Namespace) -> int:
    config_file, overrides = split_args(args.args)
    # Several processes (several nodes, maybe): each reads the run's config.yaml itself on --resume, and one
    # node without it must stop every node, not leave the others waiting (deltatune.train.distributed).
    processes = 1 if args.print_config else export_launch_env().world_size
    config = agree_on_plan(lambda: resolve_config(config_file, overrides, args.resume), processes,
                           lambda _: "read the run's config")
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    print(f"deltatune train: {config.method.name} on {config.model}, data {config.data.source}, "
          f"output {config.output_dir}", flush=True)
    try:
        result = run_training(config, resume=args.resume, overwrite=args.overwrite,
                              log=lambda line: print(line, flush=True))
    except TrainingStopped as err:
        print(f"deltatune train: {err}", file=sys.stderr)
        return 1
    if result.status != "completed":
        return 130
    _summary(result)
    return 0


def _summary(result) -> None:
    m = result.metrics
    lines = [f"done in {m['timings'].get('total_s', 0):.0f} s; outputs in {result.output_dir}/"]
    zs, final = m.get("zero_shot"), m.get("final")
    if zs and final:
        lines.append(f"accuracy: {100 * zs['accuracy']:.1f}% before -> {100 * final['accuracy']:.1f}% after "
                     f"({final['scoring'].replace('_', '-')} scoring, {final['total']} held-out examples)")
    train = m.get("train") or {}
    if train.get("tokens"):
        lines.append(f"training: {train['steps']} steps, {train['seconds']:.0f} s, {train['tokens_per_s']:.0f} tokens/s")
    print("\n".join(lines), flush=True)
