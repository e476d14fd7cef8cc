"""``deltatune eval``: loss and perplexity on a dataset, and label accuracy, for a base model or an adapter.

    deltatune eval                                     # base SmolLM2 on the default job's held-out BBC articles
    deltatune eval --adapter runs/bbc/adapter          # an adapter, on its own run's eval split and settings
    deltatune eval --adapter DIR --data test.jsonl     # every row of a file (any format deltatune train reads)
    deltatune eval run.yaml data.max_length=512 --json metrics.json

The data and model come from a ``deltatune train`` config (the defaults, a file and ``key=value``
overrides, as for ``train``); with ``--adapter runs/X/adapter`` and no config file, the run's own
``runs/X/config.yaml`` is the base, so the adapter is scored on the split it was held out from.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from deltatune.atomic import atomic_write_text
from deltatune.cli.train import split_args
from deltatune.data import Collator, load_examples, resolve_template, tokenize_dataset
from deltatune.methods.lora import merged_inference
from deltatune.model import PeftModel
from deltatune.train.config import load_train_config, read_yaml
from deltatune.train.loss import causal_lm_loss
from deltatune.train.metrics import describe, score_accuracy
from deltatune.train.precision import choose_precision, inference_autocast
from deltatune.train.loading import load_model, load_tokenizer


def eval_loss(model: Any, dataset: Any, collator: Callable, batch_size: int = 8, max_examples: int | None = None) -> dict:
    """Mean next-token loss over the supervised (label) tokens of ``dataset``, and its perplexity.

    Every supervised token weighs the same, however the rows are batched: the per-batch mean is
    multiplied back by its token count before averaging.

    Args:
        model: a causal LM or a deltatune ``PeftModel``.
        dataset: tokenized rows with ``input_ids`` and ``labels`` (-100 where unsupervised).
        collator: pads a list of rows into a batch (:class:`deltatune.data.Collator`).
        batch_size: rows per forward pass.
        max_examples: evaluate only the first this many rows.

    Returns:
        ``{"loss", "perplexity", "tokens", "examples", "seconds"}``.

    Raises:
        ValueError: the dataset is empty or has no supervised token.
    """
    n = len(dataset) if max_examples is None else min(max_examples, len(dataset))
    if n == 0:
        raise ValueError("the eval dataset is empty; nothing to compute a loss on")
    device = next(model.parameters()).device
    start, total, tokens = time.perf_counter(), 0.0, 0
    was_training = model.training
    model.eval()
    try:
        # Whole rows per forward: each LoRA layer's merged weight costs less than its low-rank path here.
        with merged_inference(model):
            for i in range(0, n, batch_size):
                batch = collator([dataset[j] for j in range(i, min(i + batch_size, n))])
                batch = {k: v.to(device) for k, v in batch.items()}
                loss, count = causal_lm_loss(model, **batch, regularize=False)  # the plain LM loss, for perplexity
                total += float(loss) * int(count)
                tokens += int(count)
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no eval row has a supervised token (every label is -100); check data.train_on_prompt and the data")
    mean = total / tokens
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": tokens, "examples": n,
            "seconds": time.perf_counter() - start}


def resolve_config(items: list[str], adapter: str | None, data_file: str | None) -> tuple[Any, str | None]:
    """The train config to evaluate with, and which run config it started from (or None)."""
    config_file, overrides = split_args(items)
    if data_file is not None:
        # A file evaluated whole: its own data section, no split held out of it.
        overrides = [*overrides, f"data.source={data_file}", "data.eval_size=0", "data.packing=false"]
    run_config = Path(adapter).parent / "config.yaml" if adapter else None
    if config_file is None and run_config is not None and run_config.is_file():
        return load_train_config(None, overrides, base=read_yaml(run_config)), str(run_config)
    return load_train_config(config_file, overrides), None


def eval_dataset(config: Any, tokenizer: Any, whole_source: bool) -> tuple[Any, str, Any]:
    """Tokenized rows to score (keeping ``messages``/``label``), the template used, and the tokenize stats.

    ``whole_source``: every row of ``config.data.source``; otherwise the config's eval split.

    Raises:
        ValueError: the config holds out no eval split.
    """
    data = dataclasses.replace(config.data, eval_size=0, max_train_examples=None) if whole_source else config.data
    examples = load_examples(data, tokenizer)
    rows = examples.train if whole_source else examples.eval
    if rows is None:
        raise ValueError(
            f"data {config.data.source!r} has no eval split (data.eval_size=0 and no data.eval_source); set "
            "data.eval_size=N or data.eval_source=FILE, or score a whole file with --data FILE"
        )
    template = resolve_template(config.data.template, tokenizer)
    dataset, stats = tokenize_dataset(rows, tokenizer, template, config.data.max_length, config.data.train_on_prompt)
    return dataset, template, stats


def evaluate(model: Any, tokenizer: Any, dataset: Any, template: str, config: Any, args: argparse.Namespace) -> dict:
    """Loss/perplexity and, when the rows have a ``label`` and ``eval.accuracy`` allows, accuracy; in bf16
    autocast where ``train.bf16`` chooses it (as the run's own scoring is)."""
    with inference_autocast(choose_precision(config.train.bf16), "cuda" if torch.cuda.is_available() else "cpu"):
        return _evaluate(model, tokenizer, dataset, template, config, args)


def _evaluate(model: Any, tokenizer: Any, dataset: Any, template: str, config: Any, args: argparse.Namespace) -> dict:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = {"loss": eval_loss(model, dataset, Collator(pad_token_id=pad), args.batch_size or config.train.batch_size,
                             args.max_examples)}
    wanted = config.eval.accuracy
    has_labels = "label" in dataset.column_names
    if wanted is True and not has_labels:
        raise ValueError("eval.accuracy is true but the data has no 'label' column; add one or set eval.accuracy=auto")
    if has_labels and wanted in (True, "auto"):
        out["accuracy"] = score_accuracy(
            model, tokenizer, dataset, template=template, scoring=config.eval.scoring,
            max_examples=args.max_examples or config.eval.max_examples, max_new_tokens=config.eval.max_new_tokens,
        )
    return out


def report_lines(name: str, result: dict) -> list[str]:
    """Printable summary of one :func:`evaluate` result."""
    loss = result["loss"]
    lines = [f"{name}: loss {loss['loss']:.4f}, perplexity {loss['perplexity']:.2f} over {loss['examples']} examples "
             f"({loss['tokens']:,} supervised tokens) [{loss['seconds']:.0f} s]"]
    acc = result.get("accuracy")
    if acc:
        lines.append(f"{name}: accuracy {describe(acc)} [{acc['seconds']:.0f} s]")
        lines.append("  per label: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(acc["per_label"].items())))
    return lines


def register(subparsers: Any) -> None:
    """Add the ``eval`` subcommand."""
    p = subparsers.add_parser(
        "eval", help="Loss / perplexity on a dataset, accuracy for label tasks.",
        description="Score a base model, or a base model plus --adapter, on the eval split of a deltatune train "
        "config (or on every row of --data FILE): next-token loss and perplexity on the supervised tokens, and "
        "label accuracy when the rows have a 'label' column (the default BBC news job has).",
        epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value",
                   help="a deltatune train config file, then dotted overrides such as data.max_length=512")
    p.add_argument("--adapter", default=None, metavar="DIR", help="adapter folder; without it the base model is scored")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="score every row of this .jsonl/.json/.csv/.parquet file instead of the config's eval split")
    p.add_argument("--max-examples", type=int, default=None, help="score at most this many rows")
    p.add_argument("--batch-size", type=int, default=None, help="rows per forward pass for the loss (default train.batch_size)")
    p.add_argument("--compare-base", action="store_true", help="with --adapter, also score the base model (adapter disabled)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``deltatune eval``."""
    if args.max_examples is not None and args.max_examples < 1:
        raise ValueError(f"--max-examples {args.max_examples}: expected a positive number of rows")
    if args.adapter is not None and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no adapter_config.json in {args.adapter}; pass the folder save_pretrained wrote")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config, from_run = resolve_config(args.args, args.adapter, args.data)
    tokenizer = load_tokenizer(config.model)
    dataset, template, stats = eval_dataset(config, tokenizer, whole_source=args.data is not None)
    source = args.data or config.data.source
    print(f"deltatune eval: {config.model}{' + ' + args.adapter if args.adapter else ''} on {source} "
          f"({stats.summary()})" + (f"; settings from {from_run}" if from_run else ""), flush=True)
    model = load_model(config, log=lambda line: print(line, flush=True))
    results: dict[str, Any] = {"model": config.model, "adapter_dir": args.adapter, "data": source}
    if args.adapter is None:
        results["base"] = evaluate(model, tokenizer, dataset, template, config, args)
        lines = report_lines("base", results["base"])
    else:
        peft_model = PeftModel.from_pretrained(model, args.adapter)
        results["with_adapter"] = evaluate(peft_model, tokenizer, dataset, template, config, args)
        lines = report_lines("adapter", results["with_adapter"])
        if args.compare_base:
            with peft_model.disable_adapter():
                results["base"] = evaluate(peft_model, tokenizer, dataset, template, config, args)
            lines = report_lines("base", results["base"]) + lines
    print("\n".join(lines))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    from deltatune.cli.main import main

    sys.exit(main(["eval", *sys.argv[1:]]))
