"""``deltatune inspect``: a model's layers and target presets, or an adapter folder's health.

No weights are loaded: the model is built on the meta device from its config, and an adapter's
tensors are read as shapes only.

    deltatune inspect                                  # the default model: layers, presets at r=16
    deltatune inspect path/to/model --r 8 --targets q_proj,v_proj
    deltatune inspect --config run.yaml                # dry run of a training config's targets
    deltatune inspect --adapter runs/bbc/adapter [MODEL]
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from deltatune.inspect.adapter_check import (
    base_model_verdict,
    llama_cpp_verdict,
    load_problems,
    parse_config,
    read_adapter,
    tokenizer_verdict,
    whole_verdict,
)
from deltatune.inspect.architecture import describe, layer_groups, meta_model
from deltatune.inspect.parameters import parameter_groups
from deltatune.inspect.presets import expand_preset, preset_table, targets_config
from deltatune.inspect.report import (
    dry_run,
    format_adapter,
    format_architecture,
    format_dry_run,
    format_findings,
    format_layer_groups,
    format_parameter_groups,
    format_presets,
)
from deltatune.inspect.servers import server_findings
from deltatune.methods.base import get_method
from deltatune.models import DEFAULT_MODEL, model_config
from deltatune.surgery.presets import PRESET_NAMES  # the preset table `deltatune plan` reads too
from deltatune.train.config import load_train_config
from deltatune.train.loading import adapter_config  # the run's adapter config (a relative layers_to_transform resolved)


def register(subparsers: Any) -> None:
    """Add the ``inspect`` subcommand."""
    p = subparsers.add_parser(
        "inspect",
        help="Show a model's layers and target presets, or check an adapter folder.",
        description="Without --adapter: architecture, wrappable layers with shapes, LoRA target presets with exact "
        "parameter counts, and a dry run of --targets/--config. With --adapter: its config, ranks and targets, "
        "whether it loads on MODEL (exit code 1 if not), and whether vLLM/TGI can serve it. Loads no weights.",
    )
    p.add_argument("model", nargs="?", default=None,
                   help="registered name, transformers folder or .gguf file (default: smollm2-135m-instruct, or with "
                   "--adapter the base model the adapter names)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank for the preset parameter counts (default 16)")
    p.add_argument("--targets", default=None,
                   help=f"dry run: comma list of module names or a preset ({', '.join(PRESET_NAMES)})")
    p.add_argument("--target-regex", default=None, help="dry run: a regex matched against full module paths")
    p.add_argument("--exclude", default=None, help="dry run: comma list of module names never to wrap")
    p.add_argument("--layers", default=None, help="dry run: comma list of block indices to wrap (layers_to_transform)")
    p.add_argument("--config", default=None, metavar="CONFIG.yaml",
                   help="dry run of a `deltatune train` config file's method on its model (or on MODEL)")
    p.add_argument("--adapter", default=None, metavar="DIR", help="check an adapter folder instead")
    p.set_defaults(func=run)


def _train_config(args: argparse.Namespace):
    """The ``deltatune train`` config named by ``--config``, or None."""
    if args.config is None:
        return None
    return load_train_config(args.config, [])


def _dry_run_config(args: argparse.Namespace, model_type: str, train_config=None):
    if train_config is not None:
        # AdaLoRA's schedule needs a step count; any positive number gives the same layout.
        return adapter_config(train_config, train_config.train.max_steps or 1)
    fields: dict[str, Any] = {"r": args.r}
    if args.exclude:
        fields["exclude_modules"] = tuple(t.strip() for t in args.exclude.split(",") if t.strip())
    if args.layers:
        try:
            fields["layers_to_transform"] = tuple(int(i) for i in args.layers.split(","))
        except ValueError:
            raise ValueError(f"--layers {args.layers!r}: expected comma-separated block indices, e.g. 0,1,2") from None
    targets = expand_preset(args.targets, model_type) if args.targets else None
    return targets_config(targets, args.target_regex, **fields)


def inspect_model(args: argparse.Namespace, out=print) -> int:
    """Architecture, layer groups, presets, and the dry run when asked for."""
    if args.r < 1:
        raise ValueError(f"--r {args.r}: the LoRA rank must be a positive integer")
    train_config = _train_config(args)
    name = args.model or (train_config.model if train_config is not None else DEFAULT_MODEL)
    config = model_config(name)
    model = meta_model(config)
    arch = describe(config, model)
    lines = format_architecture(name, arch) + [""]
    lines += format_layer_groups(layer_groups(model, get_method("LORA").layer_types)) + [""]
    experts = parameter_groups(model)  # MoE expert stacks: not layers, so listed on their own
    lines += format_parameter_groups(experts, args.r) + [""] if experts else []
    lines += format_presets(preset_table(model, arch.model_type, args.r), args.r, arch.parameters)
    if args.targets or args.target_regex or args.config or args.exclude or args.layers:
        peft_config = _dry_run_config(args, arch.model_type, train_config)
        lines += [""] + format_dry_run(peft_config, dry_run(model, peft_config))
    out("\n".join(lines))
    return 0


def inspect_adapter(args: argparse.Namespace, out=print) -> int:
    """Config, saved-whole check, load check, base-model check and serving findings; 1 if a tensor was not
    saved whole or it does not load on MODEL."""
    files = read_adapter(args.adapter)
    lines = format_adapter(files) + [""] + format_findings(server_findings(files.raw_config, files.tensors)) + [""]
    whole, sentence = whole_verdict(files)  # needs no base model: a sharded save is broken on any model
    lines += [f"Saved whole: {sentence}"]
    base = files.raw_config.get("base_model_name_or_path")
    name = args.model or base
    if not name:
        out("\n".join(lines))
        if not whole:
            return 1
        raise ValueError("the adapter names no base model; pass MODEL to check whether it loads")
    try:
        config = parse_config(files)
    except ValueError as err:
        out("\n".join(lines + [f"Loads on {name}: cannot tell, deltatune cannot read this adapter: {err}"]))
        return 1
    try:
        model_cfg = model_config(name)
    except (FileNotFoundError, ValueError) as err:
        out("\n".join(lines))
        if not whole:
            return 1
        raise FileNotFoundError(f"cannot build {name!r} to check the adapter against: {err} Pass MODEL explicitly.") from None
    problems = load_problems(files, config, model_cfg)
    if problems:
        lines.append(f"Loads on {name}: NO")
        lines += ["  " + line for p in problems for line in p.splitlines()]
    else:
        lines.append(f"Loads on {name}: yes (every key and shape matches; checked on the meta device, no weights read)")
    _, sentence = base_model_verdict(base, name)
    lines.append(f"Base model: {sentence}")
    needs = tokenizer_verdict(files, model_cfg)
    if needs:
        lines.append(f"Tokenizer: {needs}")
    lines.append(f"llama.cpp: {llama_cpp_verdict(files, model_cfg)[1]}")
    out("\n".join(lines))
    return 1 if problems or not whole else 0


def run(args: argparse.Namespace) -> int:
    """Entry point of ``deltatune inspect``."""
    if args.adapter is not None:
        return inspect_adapter(args)
    return inspect_model(args)


if __name__ == "__main__":
    from deltatune.cli.main import main

    sys.exit(main(["inspect", *sys.argv[1:]]))
