"""``deltatune merge``: combine LoRA adapters into one new adapter folder (peft format).

    deltatune merge runs/a runs/b --weights 0.7 0.3 --method ties --density 0.5 --out merged
    deltatune merge runs/a runs/b --method svd --svd-rank 16 --out merged --model ./base

Each combination type is :meth:`PeftModel.add_weighted_adapter`'s (peft's semantics; see
:mod:`deltatune.combine.adapters`). The base model is loaded only to give the adapters layers to
live on: ``--model``, or by default the ``base_model_name_or_path`` the adapters name. The new
adapter is written under a temporary name next to ``--out`` and renamed at the end, so a failure
leaves nothing half-written; an existing non-empty ``--out`` is refused unless ``--force``.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Sequence

from deltatune.atomic import atomic_folder, check_output_folder
from deltatune.cli.export import base_model_for, read_adapter_config
from deltatune.combine.weighted import COMBINATION_TYPES
from deltatune.model import PeftModel
from deltatune.models import load_model_and_tokenizer
from deltatune.surgery.inject import adapted_layers

NEW_ADAPTER = "default"  # saved at the root of --out, as peft does for 'default'


def adapter_names(folders: Sequence[str | Path]) -> list[str]:
    """A distinct, readable name per adapter folder (its folder name), never 'default'."""
    names: list[str] = []
    for folder in folders:
        base = re.sub(r"[^A-Za-z0-9_-]", "_", Path(folder).resolve().name) or "adapter"
        name, i = base if base != NEW_ADAPTER else f"{base}_in", 2
        while name in names:
            name, i = f"{base}_{i}", i + 1
        names.append(name)
    return names


def merge_adapters(
    folders: Sequence[str | Path],
    out: str | Path,
    *,
    weights: Sequence[float] | None = None,
    method: str = "svd",
    model: str | None = None,
    force: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Combine the adapters in ``folders`` and write the new adapter to ``out`` (atomically).

    Args:
        folders: Adapter folders (LoRA or rsLoRA), in the order of ``weights``.
        out: The folder to write (``adapter_config.json`` + ``adapter_model.safetensors``).
        weights: One weight per adapter; default ``1/n`` each (the average).
        method: The combination type.
        model: The base model (registered name, folder or .gguf); default the adapters' own.
        force: Replace an existing non-empty ``out``.
        **options: ``svd_rank``, ``svd_clamp``, ``density``, ``majority_sign_method``, ``seed``.

    Returns:
        A summary: ``{"base", "method", "r", "modules", "names"}``.

    Raises:
        ValueError, FileNotFoundError: bad arguments or adapters, with what to change.
    """
    import torch

    if not folders:
        raise ValueError("no adapters given; pass one or more adapter folders")
    weights = list(weights) if weights is not None else [1.0 / len(folders)] * len(folders)
    if len(weights) != len(folders):
        raise ValueError(f"got {len(folders)} adapters but {len(weights)} --weights; pass one weight per adapter")
    if method not in COMBINATION_TYPES:
        raise ValueError(f"--method {method!r}: expected one of {', '.join(COMBINATION_TYPES)}")
    check_output_folder(out, force)  # fail before the (slow) model load
    configs = [read_adapter_config(f) for f in folders]
    for folder, config in zip(folders, configs):
        if config.peft_type.value != "LORA" or getattr(config, "use_dora", False):
            kind = "DoRA" if config.peft_type.value == "LORA" else config.peft_type.value
            raise ValueError(f"{folder} is a {kind} adapter; only LoRA and rsLoRA adapters can be combined")
    base = base_model_for(configs, folders, model)
    base_model, _ = load_model_and_tokenizer(base, dtype=torch.float32)
    names = adapter_names(folders)
    peft_model = PeftModel.from_pretrained(base_model, folders[0], adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:]):
        peft_model.load_adapter(folder, name)
    peft_model.add_weighted_adapter(names, weights, NEW_ADAPTER, combination_type=method, **options)
    with atomic_folder(out, force) as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=[NEW_ADAPTER])
    config = peft_model.peft_config[NEW_ADAPTER]
    modules = sum(NEW_ADAPTER in h.adapters for _, h in adapted_layers(peft_model.base_model.model))
    return {"base": base, "method": method, "r": config.r, "modules": modules, "names": names}


def register(subparsers: Any) -> None:
    """Add the ``merge`` subcommand."""
    p = subparsers.add_parser(
        "merge", help="Combine adapters into a new adapter (linear, cat, svd, ties, dare, ...).",
        description="Combines LoRA adapters with peft's add_weighted_adapter semantics and writes a new "
        "adapter folder that deltatune and peft load.",
    )
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter folders to combine")
    p.add_argument("--weights", nargs="+", type=float, default=None,
                   help="one weight per adapter, negative to subtract (default: 1/n each)")
    p.add_argument("--method", choices=COMBINATION_TYPES, default="svd",
                   help="combination type (default svd; cat and svd are exact, linear/ties/... approximate)")
    p.add_argument("--density", type=float, default=None, help="fraction kept, for ties/dare/magnitude_prune")
    p.add_argument("--svd-rank", type=int, default=None, help="rank of the *_svd result (default: largest input rank)")
    p.add_argument("--svd-clamp", type=float, default=None, help="quantile at which *_svd factors are clamped")
    p.add_argument("--majority-sign", choices=("total", "frequency"), default="total", help="sign election of ties types")
    p.add_argument("--seed", type=int, default=None, help="seed of the dare types' random drops (reproducible)")
    p.add_argument("--out", required=True, metavar="DIR", help="adapter folder to write")
    p.add_argument("--model", default=None,
                   help="base model: registered name, folder or .gguf (default: the adapters' base_model_name_or_path)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``deltatune merge``."""
    options = {k: v for k, v in (("density", args.density), ("svd_rank", args.svd_rank),
                                  ("svd_clamp", args.svd_clamp), ("seed", args.seed)) if v is not None}
    summary = merge_adapters(
        args.adapters, args.out, weights=args.weights, method=args.method, model=args.model, force=args.force,
        majority_sign_method=args.majority_sign, **options,
    )
    weights = args.weights or [1 / len(args.adapters)] * len(args.adapters)
    parts = ", ".join(f"{w:g} x {n}" for w, n in zip(weights, summary["names"]))
    print(f"merged {parts} with {summary['method']} -> {args.out} (rank {summary['r']}, {summary['modules']} modules)")
    return 0
