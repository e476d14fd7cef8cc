"""``deltatune export``: merge an adapter into its base model and write a plain transformers folder,
or (``--format gguf``) write it for llama.cpp and Ollama.

    deltatune export --adapter runs/bbc/adapter --out exported/bbc-merged
    deltatune export --adapter merged-adapter --model ./base --dtype bfloat16 --out exported/m --force
    deltatune export --adapter runs/bbc/adapter --format gguf --out exported/bbc-lora.gguf --ollama
    deltatune export --adapter runs/bbc/adapter --format gguf --merged --quant q8_0 --out exported/bbc-q8_0.gguf

The GGUF forms live in :mod:`deltatune.export` (see docs/export.md); this module parses arguments.

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
from typing import Any

from deltatune.atomic import atomic_folder, check_output_folder
from deltatune.export.gguf_lora import export_gguf_lora
from deltatune.export.gguf_merged import export_gguf_merged
from deltatune.export.merging import NOT_MERGEABLE, base_model_for, merged_model, read_adapter_config

__all__ = ["base_model_for", "export_merged", "read_adapter_config", "register", "run"]

_DTYPES = ("float32", "bfloat16", "float16")


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
    if kind in NOT_MERGEABLE:
        raise ValueError(
            f"{adapter} is a {kind} adapter and cannot be merged into the weights: {NOT_MERGEABLE[kind]}. "
            "Keep base model + adapter for inference (deltatune generate --adapter)."
        )
    base = base_model_for([config], [adapter], model)
    merged, tokenizer, untied = merged_model(adapter, base)
    merged.to(getattr(torch, dtype))
    with atomic_folder(out, force) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {"base": base, "method": kind, "untied": untied, "dtype": dtype}


def register(subparsers: Any) -> None:
    """Add the ``export`` subcommand."""
    p = subparsers.add_parser(
        "export", help="Merge an adapter into its base model (transformers folder), or write GGUF for llama.cpp / Ollama.",
        description="Writes safetensors weights, config and tokenizer that AutoModelForCausalLM loads "
        "without deltatune; the logits equal base model + adapter. With --format gguf: a GGUF LoRA adapter "
        "for llama.cpp (--lora) and Ollama (ADAPTER), or with --merged one merged GGUF model.",
    )
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter folder (LoRA, DoRA, IA3, ...)")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="model folder to write (transformers), or the .gguf file (--format gguf)")
    p.add_argument("--model", default=None,
                   help="base model: registered name, folder or .gguf (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", choices=_DTYPES, default="float32", help="dtype of the saved weights (merge runs in float32)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    g = p.add_argument_group("GGUF (llama.cpp, Ollama, LM Studio)")
    g.add_argument("--format", choices=("transformers", "gguf"), default="transformers",
                   help="transformers folder (default) or GGUF file")
    g.add_argument("--merged", action="store_true",
                   help="gguf: merge the adapter into the base and write a whole model (default: a GGUF LoRA adapter)")
    g.add_argument("--quant", default=None, metavar="TYPE",
                   help="gguf: f32, f16, bf16, q8_0 (merged default), q5_1/q5_0/q4_1/q4_0 (merged, with --allow-lossy); "
                   "adapter: f32 (default) or f16. K-quants: run llama-quantize on an f16 export")
    g.add_argument("--allow-lossy", action="store_true",
                   help="gguf --merged: allow 4/5-bit re-quantization, which erased most of the default job's fine-tune")
    g.add_argument("--ollama", action="store_true", help="gguf: also write <out>.Modelfile for `ollama create`")
    p.set_defaults(func=run)


def run_gguf(args: argparse.Namespace) -> int:
    """``deltatune export --format gguf``."""
    if args.dtype != "float32":
        raise ValueError("--dtype applies to transformers folders; for GGUF use --quant (f32, f16, bf16, q8_0, ...)")
    if args.merged:
        summary = export_gguf_merged(args.adapter, args.out, args.model, args.quant or "q8_0", args.force,
                                     args.allow_lossy, args.ollama)
        print(f"exported {summary['method']} adapter {args.adapter} merged into {summary['base']} -> {args.out} "
              f"[GGUF {summary['quant']}]")
    else:
        if args.allow_lossy:
            raise ValueError("--allow-lossy applies to --merged exports; a GGUF LoRA is written as f32 or f16")
        summary = export_gguf_lora(args.adapter, args.out, args.model, args.quant or "f32", args.force, args.ollama)
        base = summary["base_gguf"] or summary["base"]
        print(f"exported LoRA adapter {args.adapter} ({summary['tensors']} weights) -> {args.out} [GGUF LoRA "
              f"{summary['quant']}]\nrun it on its base: llama-cli -m {base} --lora {args.out}")
    if summary["modelfile"]:
        print(f"Ollama: ollama create NAME -f {summary['modelfile']}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point of ``deltatune export``."""
    if args.format == "gguf":
        return run_gguf(args)
    for flag in ("merged", "quant", "allow_lossy", "ollama"):
        if getattr(args, flag):
            raise ValueError(f"--{flag.replace('_', '-')} applies to --format gguf")
    summary = export_merged(args.adapter, args.out, args.model, args.dtype, args.force)
    note = " (embed_tokens and lm_head written untied: the adapter changed one of them)" if summary["untied"] else ""
    print(f"exported {summary['method']} adapter {args.adapter} merged into {summary['base']} -> {args.out} "
          f"[{summary['dtype']}]{note}")
    return 0
