"""``deltatune train [CONFIG.yaml] [key=value ...] [--resume] [--overwrite] [--print-config]``."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from deltatune.methods.base import method_names  # the registry: every method.name, variants included
from deltatune.train import outputs
from deltatune.train.config import load_train_config, read_yaml

EPILOG = """\
examples:
  deltatune train                                   the default job: LoRA on SmolLM2-135M-Instruct, BBC news topics
  deltatune train examples/dora.yaml                a config file (examples/ has one per method)
  deltatune train method.name=ia3 train.lr=3e-3     dotted overrides, applied after the file
  deltatune train method.r=16 data.max_length=512 output_dir=runs/r16
  deltatune train --resume                          continue the newest run under runs/ from its last checkpoint
  deltatune train --resume output_dir=runs/r16      continue that run
  deltatune train --print-config method.name=dora   show the resolved config and exit

Ctrl-C saves a resumable checkpoint after the current step (press twice to stop at once).
Outputs in output_dir: adapter/ (peft format), config.yaml, metrics.json, loss.png, tensorboard/, checkpoint-N/.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand."""
    parser = subparsers.add_parser(
        "train", help="Fine-tune a model with an adapter (default: SmolLM2-135M-Instruct on BBC news topics).",
        description="Fine-tune a causal LM with a PEFT adapter. With no arguments, runs the default job: LoRA on "
                    "SmolLM2-135M-Instruct classifying BBC news articles into five topics, scoring accuracy "
                    f"before and after. Methods (method.name): {', '.join(method_names())}.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value",
                        help="an optional YAML config file, then dotted overrides such as train.lr=2e-4")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in output_dir (default: the newest under runs/) from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in output_dir (kept aside until the new run saves its first checkpoint)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit (nothing is loaded)")
    parser.set_defaults(func="deltatune.cli.train_run:main")  # loads the Trainer only when it runs


def split_args(items: list[str]) -> tuple[str | None, list[str]]:
    """``(config file or None, overrides)``: the one item without ``=`` is the config file.

    Raises:
        ValueError: more than one item without ``=``.
    """
    files = [a for a in items if "=" not in a]
    if len(files) > 1:
        raise ValueError(f"Expected at most one config file and key=value overrides; got {files}. "
                         "Overrides need an '=' (e.g. train.lr=2e-4).")
    return (files[0] if files else None), [a for a in items if "=" in a]


def resolve_config(config_file: str | None, overrides: list[str], resume: bool):
    """The run's :class:`~deltatune.train.config.TrainConfig`, with ``output_dir`` filled in.

    On ``resume`` the run's saved ``config.yaml`` is the base and the file and overrides apply on top.
    """
    config = load_train_config(config_file, overrides)
    if not resume:
        if config.output_dir is None:
            config = dataclasses.replace(config, output_dir=outputs.default_output_dir())
        return config
    output_dir = Path(config.output_dir) if config.output_dir else outputs.latest_run()
    if output_dir is None:
        raise ValueError("--resume: no run found under runs/; name the run with output_dir=PATH.")
    saved = output_dir / outputs.CONFIG_FILE
    if not saved.is_file():
        raise FileNotFoundError(f"--resume: {saved} does not exist, so {output_dir} is not a deltatune train run.")
    base = read_yaml(saved)
    base["output_dir"] = str(output_dir)
    return load_train_config(config_file, overrides, base=base)
