"""Serving cost: mixed-adapter batches, unmerged single-adapter forward, and merged adapter swaps.

Model: LLaMA-shaped, hidden 512, 8 layers, intermediate 1408, vocab 32000, fp32, 2 threads.
Adapters: LoRA r=16 on all seven projections (q, k, v, o, gate, up, down).

1. Forward (no grad), as a ratio to the base model's forward on the same batch:
   - mixed: rows spread round-robin over N distinct adapters; deltatune's
     ``model(ids, adapter_names=...)`` (stacked banks, gathered bmm) against peft's
     ``adapter_names`` (a loop over sub-batches inside every layer);
   - single: one unmerged adapter for the whole batch (the training layers' forward), both libraries;
     for deltatune both its paths: the default low-rank one, and ``merged_inference`` (W + s·B·A formed
     per call, the opt-in that ``deltatune eval`` and accuracy scoring use).
2. Swap: time to replace the merged adapter by another one, and the largest weight error left
   after --swaps swaps against a fresh merge of the final adapter.

Every configuration lives in this one process and is timed interleaved (one call of each, round
robin); the table shows the median over rounds of each round's ratio to the base model, in wall
time and in process CPU time (all threads; steadier than wall time on a busy machine).

    python benchmarks/bench_serving.py [--rounds 5] [--seq 128] [--swaps 20] [--threads 2]
        [--skip-swap] [--skip-forward] [--device cuda] [--dtype bfloat16] [--compare-cpu-kernel]
        [--cases 32x32] [--shuffle]

On CUDA (``--device cuda``) each call is followed by a synchronize, and ``--compare-triton`` adds
deltatune's opt-in Triton path (``DELTATUNE_TRITON=1``) as a second timing of the same models. On the
CPU, ``--compare-cpu-kernel`` adds the mixed path with the compiled kernel switched off (the torch path).
"""
from __future__ import annotations

import argparse
import copy
import random
import statistics
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = [(8, 8), (32, 8), (32, 32)]  # (rows, distinct adapters)


def build_base(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


def build_adapted(lib_name: str, base, n_adapters: int, share_weights: bool = False):
    """``base`` (deep-copied) with n LoRA adapters a0..a{n-1}, random B so nothing is a no-op.

    ``share_weights``: the copy's parameters and buffers are the base model's own tensors (the
    forward benchmark). Separate copies land on different pages, and whether a weight sits on
    transparent huge pages moved one process's base-vs-adapted ratio by several points either way
    (an adapted single-adapter forward measured 0.94x "of the base"); sharing makes it common to both.
    """
    lib = __import__(lib_name)
    cfg = lib.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    memo = {id(t): t for t in [*base.parameters(), *base.buffers()]} if share_weights else None
    model = lib.get_peft_model(copy.deepcopy(base, memo), cfg, adapter_name="a0")
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", cfg)
    return model.eval()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> tuple[float, float]:
    _sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_rounds(calls: dict, rounds: int, shuffle: bool = False) -> dict[str, tuple[float, float, float]]:
    """{name: (median wall ratio to 'base', median cpu ratio, median base-relative wall seconds)}."""
    for fn in calls.values():  # warm-up
        fn()
    ratios: dict[str, list[tuple[float, float, float]]] = {k: [] for k in calls}
    order, rng = list(calls), random.Random(0)
    for _ in range(rounds):
        if shuffle:  # a new order each round: no configuration always runs right after another
            rng.shuffle(order)
        times = {k: timed(calls[k]) for k in order}
        for k, (w, c) in times.items():
            ratios[k].append((w / times["base"][0], c / times["base"][1], w))
    return {k: tuple(statistics.median(v[i] for v in vals) for i in range(3)) for k, vals in ratios.items()}


def forward_tables(rounds: int, seq: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
                   compare_triton: bool = False, compare_cpu_kernel: bool = False,
                   cases: list[tuple[int, int]] = CASES, shuffle: bool = False) -> None:
    from deltatune.serving import cpu_kernel, triton_lora

    base = build_base()
    base = base.to(device, dtype)
    # adapters in the base dtype too, as before (the shared base tensors are already there: no copy)
    ours = build_adapted("deltatune", base, 32, share_weights=True).to(device, dtype)
    theirs = build_adapted("peft", base, 32, share_weights=True).to(device, dtype)
    print(f"device {device}, {dtype}; Triton installed: {triton_lora.AVAILABLE}; "
          f"compiled CPU kernel: {cpu_kernel.unavailable_reason() or 'in use'}")
    print("| batch | distinct adapters | deltatune mixed / base | peft mixed / base | base (s) |")
    print("|---|---|---|---|---|")
    singles = {}
    for rows, distinct in cases:
        ids = torch.randint(0, 32000, (rows, seq), generator=torch.Generator().manual_seed(rows)).to(device)
        names = [f"a{i % distinct}" for i in range(rows)]
        ours.set_adapter("a0")
        theirs.set_adapter("a0")
        calls = {
            "base": lambda: base(input_ids=ids),
            "ours": lambda: ours(input_ids=ids, adapter_names=names),
            "peft": lambda: theirs(input_ids=ids, adapter_names=names),
        }
        if compare_triton:
            calls["ours triton"] = lambda: _with_triton(lambda: ours(input_ids=ids, adapter_names=names))
        if compare_cpu_kernel:
            calls["ours torch"] = lambda: _without_cpu_kernel(lambda: ours(input_ids=ids, adapter_names=names))
        if distinct == cases[0][1]:  # single unmerged adapter, same batch
            calls["ours single"] = lambda: ours(input_ids=ids)
            calls["ours single merged"] = lambda: _merged(ours, ids)
            calls["peft single"] = lambda: theirs(input_ids=ids)
        with torch.no_grad():
            res = run_rounds(calls, rounds, shuffle)
        torch_row = f"; Triton path {res['ours triton'][0]:.3f}" if compare_triton else ""
        if compare_cpu_kernel:
            torch_row += f"; torch path {res['ours torch'][0]:.3f} (cpu {res['ours torch'][1]:.3f})"
        print(f"| {rows}x{seq} | {distinct} | {res['ours'][0]:.3f} (cpu {res['ours'][1]:.3f}{torch_row}) "
              f"| {res['peft'][0]:.3f} (cpu {res['peft'][1]:.3f}) | {res['base'][2]:.4f} |", flush=True)
        if "ours single" in res:
            singles[f"{rows}x{seq}"] = res
    print("\n| batch | deltatune single unmerged / base | deltatune, merged_inference / base "
          "| peft single unmerged / base |")
    print("|---|---|---|---|")
    for batch, res in singles.items():
        print(f"| {batch} | {res['ours single'][0]:.3f} (cpu {res['ours single'][1]:.3f}) "
              f"| {res['ours single merged'][0]:.3f} (cpu {res['ours single merged'][1]:.3f}) "
              f"| {res['peft single'][0]:.3f} (cpu {res['peft single'][1]:.3f}) |")


def _merged(model, ids):
    from deltatune.methods.lora import merged_inference

    with merged_inference(model):
        return model(input_ids=ids)


def _with_triton(fn):
    from deltatune.serving import triton_lora

    with triton_lora.switched(True):
        return fn()


def _without_cpu_kernel(fn):
    from deltatune.serving import cpu_kernel

    with cpu_kernel.switched(False):
        return fn()


def _drift(model, reference) -> float:
    """Largest difference of the targeted weights (inside any wrapper) from the reference model's."""
    worst = 0.0
    for path, ref in reference.named_modules():
        if path.rsplit(".", 1)[-1] in TARGETS:
            layer = model.get_submodule(path)
            layer = getattr(layer, "base_layer", layer)
            worst = max(worst, (layer.weight - ref.weight).abs().max().item())
    return worst


def swap_table(swaps: int) -> None:
    import peft

    from deltatune.serving import MergedAdapterSwitcher
    from deltatune.surgery.inject import adapted_layers

    base = build_base()
    ours = build_adapted("deltatune", base, 2)
    with tempfile.TemporaryDirectory() as tmp:  # peft gets the very same adapters
        ours.save_pretrained(tmp)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/a0", adapter_name="a0")
        theirs.load_adapter(f"{tmp}/a1", adapter_name="a1")
    theirs.eval()
    switchers = {}
    for exact in (True, False):
        model = copy.deepcopy(base)
        sw = MergedAdapterSwitcher(model, exact=exact)
        for name in ("a0", "a1"):
            sw.add(name, {p: copy.deepcopy(h.adapters[name]) for p, h in adapted_layers(ours.base_model.model)})
        sw.switch("a0")  # every variant starts with a0 merged
        switchers[exact] = (model, sw)
    ours.merge_adapter(["a0"])
    theirs.set_adapter("a0")
    theirs.merge_adapter()

    def peft_like(m, is_peft):
        state = {"cur": "a0"}

        def swap():
            nxt = "a1" if state["cur"] == "a0" else "a0"
            m.unmerge_adapter()
            m.set_adapter(nxt)
            if is_peft:
                m.merge_adapter()
            else:
                m.merge_adapter([nxt])
            state["cur"] = nxt
        return swap

    def switcher_swap(sw):
        return lambda: sw.switch("a1" if sw.current == "a0" else "a0")

    calls = {
        "deltatune MergedAdapterSwitcher (pristine copy)": switcher_swap(switchers[True][1]),
        "deltatune MergedAdapterSwitcher(exact=False) (subtract, add)": switcher_swap(switchers[False][1]),
        "deltatune PeftModel unmerge_adapter + merge_adapter": peft_like(ours, False),
        "peft unmerge_adapter + set_adapter + merge_adapter": peft_like(theirs, True),
    }
    with torch.no_grad():
        times = {k: [] for k in calls}
        for fn in calls.values():
            fn()
        for _ in range(swaps // 2 * 2):  # an even count: every variant ends on the same adapter
            for k, fn in calls.items():
                times[k].append(timed(fn)[0])
        reference = copy.deepcopy(base)
        sw = MergedAdapterSwitcher(reference)
        sw.add("x", switchers[True][1].adapters[switchers[True][1].current])
        sw.switch("x")  # a fresh merge of the current adapter into the pristine base
        drift = {
            list(calls)[0]: _drift(switchers[True][0], reference),
            list(calls)[1]: _drift(switchers[False][0], reference),
            list(calls)[2]: _drift(ours.base_model.model, reference),
            list(calls)[3]: _drift(theirs.base_model.model, reference),
        }
    n = len(times[list(calls)[0]]) + 1
    print(f"\n| swap (56 layers) | median ms | max weight error vs a fresh merge, after {n} swaps |")
    print("|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {1e3 * statistics.median(v):.1f} | {drift[k]:.2e} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--swaps", type=int, default=20)
    ap.add_argument("--skip-swap", action="store_true")
    ap.add_argument("--skip-forward", action="store_true")
    ap.add_argument("--threads", type=int, default=2, help="1 gives steadier numbers on a shared machine")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--compare-triton", action="store_true", help="also time the opt-in Triton mixed path (CUDA)")
    ap.add_argument("--compare-cpu-kernel", action="store_true",
                    help="also time the mixed path with the compiled CPU kernel switched off (the torch path)")
    ap.add_argument("--cases", nargs="+", default=[f"{r}x{d}" for r, d in CASES],
                    help="ROWSxDISTINCT forward cases to run (default: all three)")
    ap.add_argument("--shuffle", action="store_true", help="time the configurations in a new random order each round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = [tuple(int(v) for v in c.split("x")) for c in args.cases]
    if not args.skip_forward:
        forward_tables(args.rounds, args.seq, args.device, getattr(torch, args.dtype), args.compare_triton,
                       args.compare_cpu_kernel, cases, args.shuffle)
    if not args.skip_swap:
        swap_table(args.swaps)


if __name__ == "__main__":
    main()
