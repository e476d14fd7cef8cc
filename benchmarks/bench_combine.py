"""Benchmark: re-factorising a sum of two LoRA adapters by SVD, peft vs deltatune.

On a LLaMA-shaped model (hidden 512, 8 layers, intermediate 1408, vocab 32000) with two r=16
adapters on q, k, v, o, gate, up and down, times in the same run:

* peft's ``add_weighted_adapter(combination_type="svd", svd_rank=16)`` (whole call);
* with ``--dense``, the dense route per module (form dW, thin ``torch.linalg.svd``), i.e. the route
  deltatune's pruning ``*_svd`` types take;
* deltatune's ``combine_lora_factors(..., "svd")`` on every module (QR of the stacked factors,
  SVD of an R x R core; never forms dW).

and checks that our delta B @ A equals peft's in every module. Prints a markdown table.

Usage: ``python benchmarks/bench_combine.py [--repeats 3]``
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM

from deltatune.combine import LoraFactors, combine_lora_factors
from deltatune.combine.svd import dense_svd_factors

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16
WEIGHTS = [0.6, 0.4]


def build():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    lora = LoraConfig(r=RANK, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    pm = get_peft_model(model, lora, adapter_name="a")
    pm.add_adapter("b", LoraConfig(r=RANK, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))
    return pm


def layers(pm) -> list[LoraLayer]:
    return [m for m in pm.base_model.model.modules() if isinstance(m, LoraLayer)]


def factors(layer: LoraLayer, name: str) -> LoraFactors:
    return LoraFactors(layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach(), float(layer.scaling[name]))


def time_interleaved(fns: dict, repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Median wall time of each function, running them in turn each repeat so that load from
    other processes on a shared machine hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    outs: dict[str, object] = {}
    for i in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outs[name] = fn(i)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dense", action="store_true", help="also time the dense dW + thin SVD route (slow)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    pm = build()
    mods = layers(pm)

    def run_peft(i):
        pm.add_weighted_adapter(["a", "b"], WEIGHTS, f"peft_{i}", combination_type="svd", svd_rank=RANK)
        return f"peft_{i}"

    def run_ours(_):
        return [combine_lora_factors([factors(m, "a"), factors(m, "b")], WEIGHTS, "svd", svd_rank=RANK) for m in mods]

    def run_dense(_):
        out = []
        for m in mods:
            dW = sum(w * factors(m, n).delta_weight() for n, w in zip("ab", WEIGHTS))
            out.append(dense_svd_factors(dW, RANK))
        return out

    with torch.no_grad():
        run_ours(0)  # warm-up (LAPACK initialisation)
        fns = {"peft": run_peft, "ours": run_ours} | ({"dense": run_dense} if args.dense else {})
        t, outs = time_interleaved(fns, args.repeats)
        t_peft, t_ours = t["peft"], t["ours"]
        peft_name, ours = outs["peft"], outs["ours"]
        err = max(
            ((o.delta_weight() - factors(m, peft_name).delta_weight()).abs().max()
             / factors(m, peft_name).delta_weight().abs().max()).item()
            for m, o in zip(mods, ours)
        )

    print(f"{len(mods)} LoRA modules, r={RANK} x 2 adapters -> svd_rank={RANK}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats}, interleaved")
    print()
    print("| method | time (s) | speed-up vs peft |")
    print("|---|---:|---:|")
    rows = [("peft add_weighted_adapter(svd)", t_peft)]
    rows += [("dense dW + thin SVD per module", t["dense"])] if args.dense else []
    rows += [("deltatune combine_lora_factors(svd)", t_ours)]
    for name, secs in rows:
        print(f"| {name} | {secs:.4f} | {t_peft / secs:.1f}x |")
    print()
    print(f"max over modules of max|dW_ours - dW_peft| / max|dW_peft| = {err:.2e}")


if __name__ == "__main__":
    main()
