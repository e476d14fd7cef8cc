"""Accuracy of ``deltatune plan``'s memory model: estimate vs measured peak, per configuration.

Every configuration is measured in its own fresh Python process by :func:`deltatune.plan.probe.probe`:
the resident-set high-water mark over two training steps (forward, backward, AdamW step,
zero_grad) minus the resident set after the imports, with glibc returning freed blocks to the OS
so that RSS follows live memory (see deltatune/plan/probe.py for the exact definition). Models are
randomly initialised from their config (the same bytes as loaded weights). CPU, fp32, 1 thread.

Models: SmolLM2-135M-Instruct (the default model; 30 layers, vocab 49,152, tied embeddings) and
the tiny LLaMA of tests/test_plan_memory.py. With a CUDA GPU, ``--cuda`` measures
``max_memory_allocated`` in bf16 instead (the estimate's CUDA-context term is left out of the
comparison, since the allocator does not see it).

    python benchmarks/bench_plan_memory.py                 # SmolLM2 (slow on CPU: ~1-2 min per row) + tiny
    python benchmarks/bench_plan_memory.py --quick         # tiny LLaMA only
    python benchmarks/bench_plan_memory.py --only full,lora --batch 2 --seq-len 256
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

warnings.filterwarnings("ignore")

TINY = dict(model_type="llama", vocab_size=2048, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
# name -> TrainSetup changes
CONFIGS = {
    "full": dict(method="full"),
    "lora": dict(method="lora"),
    "qlora": dict(method="qlora"),
    "prompt": dict(method="prompt"),
    "lora+ckpt": dict(method="lora", grad_checkpointing=True),
    "full+ckpt": dict(method="full", grad_checkpointing=True),
    "lora std loss": dict(method="lora", loss="standard"),
    "ia3": dict(method="ia3"),
    "prefix": dict(method="prefix"),
}
DEFAULT = ("full", "lora", "qlora", "prompt", "lora+ckpt", "lora std loss")


def rows_for(model, label: str, names, batch: int, seq_len: int, device: str):
    from deltatune.plan import TrainSetup, estimate_memory
    from deltatune.plan.probe import probe

    dtype = "bfloat16" if device == "cuda" else "float32"
    for name in names:
        setup = TrainSetup(r=16, batch_size=batch, seq_len=seq_len, device=device, dtype=dtype, lora_dropout=0.0,
                           **CONFIGS[name])
        start = time.perf_counter()
        measured = probe(model, setup)
        est = estimate_memory(model, setup)
        estimate = est.peak_bytes - (est.component("overhead").at_peak if device == "cuda" else 0)
        error = estimate / measured.peak_bytes - 1
        yield (label, name, f"{batch}x{seq_len}", f"{estimate / 2**20:,.1f}", f"{measured.peak_bytes / 2**20:,.1f}",
               f"{error:+.1%}", est.peak_phase, f"{time.perf_counter() - start:.0f} s")


def main() -> int:
    from deltatune.plan.report import table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny LLaMA only")
    p.add_argument("--only", default=",".join(DEFAULT), help=f"configs, comma-separated: {', '.join(CONFIGS)}")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--cuda", action="store_true", help="measure on the GPU (bf16, max_memory_allocated)")
    args = p.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    device = "cuda" if args.cuda else "cpu"
    headers = ("model", "config", "batch", "estimate MiB", "measured MiB", "error", "peak phase", "time")
    rows = []
    if not args.quick:
        for row in rows_for(args.model, args.model, names, args.batch, args.seq_len, device):
            rows.append(row)
            print("  ".join(row), flush=True)
    for row in rows_for(TINY, "tiny-llama", [n for n in names if n in CONFIGS], 16, 512, device):
        rows.append(row)
        print("  ".join(row), flush=True)
    print()
    print(table(headers, rows, "llrrrrlr"))
    worst = max(abs(float(r[5].rstrip("%"))) for r in rows)
    print(f"\nworst |error|: {worst:.1f}% (target: within 15%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
