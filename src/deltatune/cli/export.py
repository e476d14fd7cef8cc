"""``deltatune export``: merge an adapter into its base model and write a plain transformers folder.

    deltatune export --adapter runs/bbc/adapter --out exported/bbc-merged
    deltatune export --adapter merged-adapter --model ./base --dtype bfloat16 --out exported/m --force

The result (safetensors weights, config, generation config, tokenizer) loads with
``AutoModelForCausalLM.from_pretrained`` and gives the logits of base + adapter, with no deltatune
or peft needed at inference. LoRA, rsLoRA, DoRA, IA³, BitFit and other mergeable adapters work;
bottleneck adapters (a nonlinearity) and prompt/prefix tuning (extra inputs) cannot be merged.

Tied embeddings (e.g. SmolLM2's ``lm_head`` shares ``embed_tokens``' matrix): merging an adapter on
either one into the shared matrix would change the other too, which base + adapter does not do. The
export unties them first and writes ``tie_word_embeddings: false`` when they end up different (one
extra vocab x hidden matrix on disk); when they end up equal, they stay tied.

The folder is written next to ``--out`` under a temporary name and renamed at the end, so a failure
leaves nothing half-written; an existing non-empty ``--out`` is refused unless ``--force``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from deltatune.atomic import atomic_folder, check_output_folder
from deltatune.io.config_io import CONFIG_NAME, load_config
from deltatune.model import PeftModel
from deltatune.models import load_model_and_tokenizer

_DTYPES = ("float32", "bfloat16", "float16")
# Methods whose adapters can never be folded into the weights, and why.
_NOT_MERGEABLE = {
    "PROMPT_TUNING": "prompt tuning adds virtual tokens to the input",
    "PREFIX_TUNING": "prefix tuning adds key/value prefixes to every attention layer",
    "BOTTLENECK": "a bottleneck adapter has a nonlinearity between its two projections",
}


def read_adapter_config(folder: str | Path) -> Any:
    """The adapter's config, with an error that says what a valid adapter folder holds."""
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"no {CONFIG_NAME} in {folder}; pass the folder that save_pretrained (or deltatune train) wrote"
        )
    return load_config(folder)


def base_model_for(configs: Sequence[Any], folders: Sequence[str | Path], model: str | None) -> str:
    """``--model`` if given, else the base model the adapters name (which must agree)."""
    if model is not None:
        return model
    names = {str(c.base_model_name_or_path) for c in configs if c.base_model_name_or_path}
    if not names:
        raise ValueError(f"{folders[0]} does not name its base model (base_model_name_or_path); pass --model")
    if len(names) > 1:
        raise ValueError(f"the adapters name different base models {sorted(names)}; pass --model to choose one")
    return names.pop()


def _embeddings(model: Any) -> tuple[Any, Any]:
    inp = model.get_input_embeddings()
    try:
        out = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        out = None
    return inp, out


def untie_embeddings(model: Any) -> bool:
    """Give the output head its own copy of a tied embedding matrix; True if they were tied."""
    import torch

    inp, out = _embeddings(model)
    if out is None or getattr(out, "weight", None) is None or out.weight is not inp.weight:
        return False
    out.weight = torch.nn.Parameter(inp.weight.detach().clone(), requires_grad=False)
    return True


def retie_or_record(model: Any) -> bool:
    """After merging an untied model: tie again if both matrices are still equal, else record in the
    config that they are separate. Returns True if the exported model has separate matrices."""
    import torch

    inp, out = _embeddings(model)
    if torch.equal(inp.weight, out.weight):
        out.weight = inp.weight
        return False
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return True


def export_merged(adapter: str | Path, out: str | Path, model: str | None = None, dtype: str = "float32",
                  force: bool = False) -> dict[str, Any]:
    """Merge ``adapter`` into its base model and write the plain model to ``out`` (atomically).

    Args:
        adapter: The adapter folder.
        out: The model folder to write.
        model: The base model (registered name, folder or .gguf); default the adapter's own.
        dtype: The saved weights' dtype; the merge itself runs in float32.
        force: Replace an existing non-empty ``out``.

    Returns:
        A summary: ``{"base": ..., "method": ..., "untied": bool, "dtype": ...}``.

    Raises:
        ValueError: a non-mergeable adapter, an unknown dtype, or an existing ``out`` without ``force``.
        FileNotFoundError: no adapter config, or the base model cannot be found.
    """
    import torch

    if dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
    check_output_folder(out, force)  # fail before the (slow) model load
    config = read_adapter_config(adapter)
    kind = config.peft_type.value
    if kind in _NOT_MERGEABLE:
        raise ValueError(
            f"{adapter} is a {kind} adapter and cannot be merged into the weights: {_NOT_MERGEABLE[kind]}. "
            "Keep base model + adapter for inference (deltatune generate --adapter)."
        )
    base = base_model_for([config], [adapter], model)
    base_model, tokenizer = load_model_and_tokenizer(base, dtype=torch.float32)
    was_tied = untie_embeddings(base_model)  # so a merge into one cannot change the other
    peft_model = PeftModel.from_pretrained(base_model, adapter)
    merged = peft_model.merge_and_unload()
    untied = retie_or_record(merged) if was_tied else False
    merged.to(getattr(torch, dtype))
    with atomic_folder(out, force) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {"base": base, "method": kind, "untied": untied, "dtype": dtype}


def register(subparsers: Any) -> None:
    """Add the ``export`` subcommand."""
    p = subparsers.add_parser(
        "export", help="Merge an adapter into its base model and write a plain transformers folder.",
        description="Writes safetensors weights, config and tokenizer that AutoModelForCausalLM loads "
        "without deltatune; the logits equal base model + adapter.",
    )
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter folder (LoRA, DoRA, IA3, ...)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model folder to write")
    p.add_argument("--model", default=None,
                   help="base model: registered name, folder or .gguf (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", choices=_DTYPES, default="float32", help="dtype of the saved weights (merge runs in float32)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``deltatune export``."""
    summary = export_merged(args.adapter, args.out, args.model, args.dtype, args.force)
    note = " (embed_tokens and lm_head written untied: the adapter changed one of them)" if summary["untied"] else ""
    print(f"exported {summary['method']} adapter {args.adapter} merged into {summary['base']} -> {args.out} "
          f"[{summary['dtype']}]{note}")
    return 0
