"""``deltatune plan [MODEL] [--method ...] [--probe] [--recommend ...]``: counts, memory, recommendations."""
from __future__ import annotations

import argparse
import dataclasses
import json

from deltatune.plan.calibrate import calibrate
from deltatune.plan.memory import estimate_memory
from deltatune.plan.meta import load_model_config
from deltatune.plan.recommend import QUALITIES, TASKS, recommend
from deltatune.plan.report import fmt_bytes, parse_bytes, table
from deltatune.plan.setup import LOSSES, METHODS, OPTIMIZERS, TARGET_PRESETS, TrainSetup

EPILOG = """\
examples:
  deltatune plan                                        LoRA r=16 on SmolLM2-135M-Instruct, batch 4 x 1024 tokens
  deltatune plan path/to/model --method lora qlora full --device-memory 24GiB
  deltatune plan --method qlora --batch 8 --seq-len 2048 --grad-checkpointing
  deltatune plan --method lora --device cpu --batch 2 --seq-len 256 --probe     measure 2 real steps too
  deltatune plan path/to/llama-8b --recommend --device-memory 12GiB --dataset-size 5000 --task instruction
  deltatune plan --recommend --device-memory 8GiB --dataset-size 2000 --task qa --write-config train.yaml

Only the model's config.json is read (the model is built on PyTorch's meta device), so any size plans in
seconds. Memory is the peak of one training step; see docs/planning.md for what each line means.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``plan`` subcommand."""
    p = subparsers.add_parser(
        "plan", help="Parameter counts, a memory estimate and method/rank recommendations.",
        description="Count parameters and estimate the training memory of PEFT methods from a model's config "
                    "(no weights are loaded), or recommend a method and hyperparameters for a device.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="smollm2-135m-instruct",
                   help="registered name or transformers model folder (default: smollm2-135m-instruct)")
    p.add_argument("--method", nargs="+", default=["lora"], choices=METHODS, metavar="METHOD",
                   help=f"one or more of {', '.join(METHODS)} (default: lora)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank / bottleneck size (default 16)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x r)")
    p.add_argument("--targets", default="all-linear",
                   help=f"a preset ({', '.join(TARGET_PRESETS)}) or comma-separated layer names (default all-linear)")
    p.add_argument("--lora-dropout", type=float, default=0.05,
                   help="LoRA/DoRA dropout (default 0.05); DoRA with dropout takes a path that saves more for backward")
    p.add_argument("--target-parameters", default="", metavar="NAMES",
                   help="LoRA: comma-separated nn.Parameters to adapt too, e.g. mlp.experts.gate_up_proj,mlp.experts.down_proj "
                        "(MoE experts; needs --lora-dropout 0; --targets none adapts only these)")
    p.add_argument("--num-virtual-tokens", type=int, default=20, help="prompt/prefix length (default 20)")
    p.add_argument("--batch", type=int, default=4, help="micro-batch size (default 4)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024)")
    p.add_argument("--grad-checkpointing", action="store_true", help="estimate with gradient checkpointing")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where training runs (default cuda)")
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="default adamw (fp32 moments)")
    p.add_argument("--loss", default="auto", choices=LOSSES,
                   help="fused (deltatune's chunked loss), standard (full logits) or auto (what training uses)")
    p.add_argument("--device-memory", default=None, metavar="SIZE", help="e.g. 24GiB: say whether each plan fits")
    p.add_argument("--probe", action="store_true",
                   help="also run 2 real training steps (random weights, in a subprocess) and show the measured "
                        "peak next to the estimate, with the activation term calibrated from it")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    g = p.add_argument_group("recommendation (--recommend)")
    g.add_argument("--recommend", action="store_true", help="recommend method and hyperparameters, with reasons")
    g.add_argument("--dataset-size", type=int, default=None, help="training examples (required with --recommend)")
    g.add_argument("--task", default="instruction", choices=TASKS, help="task kind (default instruction)")
    g.add_argument("--quality", default="medium", choices=QUALITIES, help="quality need (default medium)")
    g.add_argument("--write-config", default=None, metavar="PATH",
                   help="write the recommendation as a ready `deltatune train` YAML config")
    p.set_defaults(func=main)


def _setup(args: argparse.Namespace, method: str):
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return TrainSetup(method=method, r=args.r, lora_alpha=args.alpha, lora_dropout=args.lora_dropout, targets=args.targets,
                      target_parameters=args.target_parameters,
                      num_virtual_tokens=args.num_virtual_tokens, batch_size=args.batch, seq_len=args.seq_len,
                      grad_checkpointing=args.grad_checkpointing, dtype=dtype, optimizer=args.optimizer,
                      loss=args.loss, device=args.device)


def main(args: argparse.Namespace) -> int:
    memory = parse_bytes(args.device_memory) if args.device_memory else None
    if args.recommend:
        return _recommend(args, memory)
    if args.write_config:
        raise ValueError("--write-config writes a recommendation; add --recommend (with --device-memory and "
                         "--dataset-size).")
    return _plan(args, memory)


def _recommend(args: argparse.Namespace, memory: int | None) -> int:
    if memory is None or args.dataset_size is None:
        raise ValueError("--recommend needs --device-memory (e.g. 24GiB) and --dataset-size (training examples).")
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    rec = recommend(args.model, memory, args.dataset_size, args.task, args.quality, seq_len=args.seq_len,
                    device=args.device, dtype=dtype)
    if args.json:
        print(json.dumps({"config": rec.train_config(), "reasons": rec.reasons, "notes": list(rec.notes),
                          "peak_bytes": rec.estimate.peak_bytes}, indent=2))
    else:
        print(f"recommendation for {args.model}: {args.dataset_size:,} examples, task {args.task}, "
              f"quality {args.quality}\n")
        print(rec.table())
        print("\nmemory of the recommended setup:\n" + rec.estimate.table())
    if args.write_config:
        path = rec.write_config(args.write_config)
        print(f"\nwrote {path}: run it with `deltatune train {path}`")
    return 0


def _plan(args: argparse.Namespace, memory: int | None) -> int:
    config = load_model_config(args.model)
    estimates = [estimate_memory(config, _setup(args, m)) for m in args.method]
    if args.json:
        print(json.dumps([_as_json(e, memory) for e in estimates], indent=2))
        return 0
    s = estimates[0].setup
    print(f"{args.model}: {getattr(config, 'model_type', '?')}, batch {s.batch_size} x {s.seq_len} tokens, "
          f"{s.dtype} on {s.device}, {s.optimizer}\n")
    rows = [(e.setup.method, f"{e.params.trainable:,d}", f"{e.params.total:,d}", f"{e.params.percent:.4f}%")
            for e in estimates]
    print(table(("method", "trainable", "total", "trainable %"), rows))
    for e in estimates:
        acts = e.activations
        print(f"\n{e.setup.method}: peak {fmt_bytes(e.peak_bytes)}"
              + (f" ({'fits in' if e.fits(memory) else 'does NOT fit in'} {fmt_bytes(memory)})" if memory else "")
              + f"; activations {fmt_bytes(acts['without checkpointing'])} without / "
                f"{fmt_bytes(acts['with checkpointing'])} with gradient checkpointing")
        print(e.table())
    if args.probe:
        _probe(args.model, estimates)
    return 0


def _probe(model: str, estimates: list) -> None:
    """Measure each plan (on CPU unless CUDA is present) and show estimate vs measurement."""
    import torch

    rows, notes = [], []
    for est in estimates:
        setup = est.setup
        if setup.device == "cuda" and not torch.cuda.is_available():
            setup = setup.replace(device="cpu", dtype="float32")
            notes.append(f"{setup.method}: no CUDA device here, so measured on CPU in float32")
        if setup.optimizer == "adamw8bit":
            setup = setup.replace(optimizer="adamw")
            notes.append(f"{setup.method}: the probe runs torch AdamW (fp32 moments) instead of 8-bit AdamW")
        cal = calibrate(model, setup)
        rows.append((setup.method, setup.device, fmt_bytes(cal.estimate.peak_bytes),
                     fmt_bytes(cal.measured.peak_bytes), f"{cal.error:+.1%}", f"{cal.activation_scale:.2f}",
                     f"{cal.measured.seconds:.1f} s"))
        if setup != est.setup:
            calibrated = estimate_memory(model, est.setup, activation_scale=cal.activation_scale)
            notes.append(f"{est.setup.method} on {est.setup.device} with activations calibrated: "
                         f"{fmt_bytes(calibrated.peak_bytes)} (was {fmt_bytes(est.peak_bytes)})")
    print("\nprobe: 2 real training steps per plan, each in its own process")
    print(table(("method", "device", "estimate", "measured", "error", "activation scale", "steps"), rows))
    for n in notes:
        print("note: " + n)


def _as_json(e, memory: int | None) -> dict:
    return {"setup": dataclasses.asdict(e.setup), "trainable": e.params.trainable, "total": e.params.total,
            "percent": e.params.percent, "peak_bytes": e.peak_bytes, "peak_phase": e.peak_phase,
            "fits": e.fits(memory) if memory else None, "activations": e.activations,
            "components": [dataclasses.asdict(c) for c in e.components]}
