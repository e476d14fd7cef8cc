"""`deltatune` command line: one module per subcommand under deltatune.cli.

Each subcommand module defines ``register(subparsers)`` (adds its parser, with ``func`` set to
its entry point) and is imported lazily, so ``deltatune --help`` stays fast and one command's
optional dependencies (Optuna, matplotlib) load only when that command runs. A command whose code is
slow to import (``train``, ``tune``: transformers' Trainer) names its entry point as a
``"module:function"`` string instead, loaded here when the command runs, so its ``--help`` and
config errors stay fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": "Fine-tune a model with an adapter (default: SmolLM2-135M-Instruct on BBC news topics).",
    "eval": "Loss / perplexity on a dataset, accuracy for label tasks.",
    "generate": "Generate text with a base model and an optional adapter.",
    "inspect": "Show a model's layers and target presets, or check an adapter folder.",
    "merge": "Combine adapters into a new adapter (linear, cat, svd, ties, dare, ...).",
    "export": "Merge an adapter into its base model (transformers folder), or write GGUF for llama.cpp / Ollama.",
    "plan": "Parameter counts, a memory estimate and method/rank recommendations.",
    "tune": "Hyperparameter search with Optuna (resumable).",
    "serve": "Serve a model and many adapters over an OpenAI-compatible HTTP API.",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatune", description="Parameter-efficient fine-tuning.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the chosen subcommand's module is imported; the others get a stub parser for --help.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        if name == chosen:
            module = importlib.import_module(f"deltatune.cli.{name}")
            module.register(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    func = args.func
    if isinstance(func, str):  # "module:function": a command whose code loads only when it runs (as entry points do)
        module, _, name = func.partition(":")
        func = getattr(importlib.import_module(module), name)
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:
        # User-facing errors: say what was wrong, without a traceback.
        print(f"deltatune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
