"""Training-step cost of each PEFT method, deltatune against peft, as a ratio to the frozen-base floor.

Model: LLaMA-shaped, hidden 512, 8 layers, intermediate 1408, vocab 32000; batch 4 x 256, fp32.
A step is forward + backward + AdamW. The floor is the same model with every weight frozen and
gradients flowing through the activations only (the input embeddings require grad): no PEFT method
can be cheaper than that.

Time: all models live in one process and are timed interleaved (one step of each, round robin), so
machine noise hits every config alike; we report the median. Memory: each config runs in its own
process (peak RSS), and the bytes autograd saves for backward are counted with saved_tensors_hooks.

    python benchmarks/bench_train_step.py [--reps 7] [--only lora,dora] [--seq 256] [--threads 2] [--cpu-time] [--bf16]

--bf16 runs every step (the floor's too) under bf16 autocast on the CPU, as ``deltatune train`` does
where the CPU has native bf16; weights, adapters and optimizer state stay fp32. The order of the
configurations is shuffled every round (seeded), so no config always runs right after another.

--compare-native also times each deltatune config with deltatune's compiled CPU code switched off
(deltatune/native: dropout's masks and masked copies, 4-bit tiles), same process, in the same shuffled
rounds: what the compiled paths save, next to everything else.

--cpu-time times each step by the process's CPU time instead of the wall clock. With --threads 1
all work runs on the calling thread, so other processes competing for the cores barely move the
number: use it on a shared, loaded machine, and say so when reporting.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "lora": dict(r=16, lora_alpha=32, target_modules=TARGETS),
    "lora+dropout": dict(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.05),
    "dora": dict(r=16, lora_alpha=32, target_modules=TARGETS, use_dora=True),
    "dora+dropout": dict(r=16, lora_alpha=32, target_modules=TARGETS, use_dora=True, lora_dropout=0.05),
    "ia3": dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "prefix": dict(num_virtual_tokens=20, task_type="CAUSAL_LM"),
    "prompt": dict(num_virtual_tokens=20, task_type="CAUSAL_LM"),
}
CLASS = {"lora": "LoraConfig", "lora+dropout": "LoraConfig", "dora": "LoraConfig", "dora+dropout": "LoraConfig",
         "ia3": "IA3Config",
         "prefix": "PrefixTuningConfig", "prompt": "PromptTuningConfig"}


def build_base(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg)


def build(impl: str, config: str):
    """A ready-to-step (model, optimizer, make_inputs) for one implementation and config."""
    model = build_base()
    if config == "floor":
        model.requires_grad_(False)
    else:
        lib = __import__("peft" if impl == "peft" else "deltatune")
        cfg = getattr(lib, CLASS[config])(**CONFIGS[config])
        model = lib.get_peft_model(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    return model.train(), opt


def native_off() -> contextlib.ExitStack:
    """deltatune's compiled CPU paths (deltatune/native) switched off: torch's ops do their work."""
    from deltatune.native import dequant, dropout

    stack = contextlib.ExitStack()
    for module in (dequant, dropout):
        stack.enter_context(module.switched(False))
    return stack


def step(model, opt, ids, floor: bool, bf16: bool = False) -> None:
    with torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext():
        loss = _loss(model, ids, floor)
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def _loss(model, ids, floor: bool):
    if floor:
        # Gradients through every activation, none into weights: the physical lower bound.
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        return model(inputs_embeds=emb, labels=ids).loss
    return model(input_ids=ids, labels=ids).loss


def saved_bytes(model, ids, floor: bool, bf16: bool = False) -> int:
    """Bytes of distinct storages autograd keeps for backward during one forward."""
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    autocast = torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        loss = _loss(model, ids, floor)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(v for k, v in seen.items() if k not in params)  # weights are not activations


def worker(impl: str, config: str, seq: int, bf16: bool) -> None:
    torch.set_num_threads(2)
    model, opt = build(impl, config)
    ids = torch.randint(0, 32000, (4, seq), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        step(model, opt, ids, config == "floor", bf16)
    saved = saved_bytes(model, ids, config == "floor", bf16)
    print(json.dumps({"peak": _peak_rss(), "saved": saved}))


def _peak_rss() -> int:
    """This process's peak resident bytes. Linux's VmHWM, not ``ru_maxrss``: a child's ``ru_maxrss`` starts at its
    parent's RSS when it forked (kept across exec), and the parent holds every model of the timing runs."""
    try:
        with open("/proc/self/status") as status:
            return int(status.read().split("VmHWM:")[1].split()[0]) * 1024
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--only", default="lora,lora+dropout,dora")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--worker", nargs=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-time", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="every step under bf16 autocast")
    ap.add_argument("--compare-native", action="store_true", help="deltatune with its compiled CPU code off, too")
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker, args.seq, args.bf16)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    configs = args.only.split(",")
    impls = ("peft", "deltatune", "deltatune-torch") if args.compare_native else ("peft", "deltatune")
    runs = [("floor", "floor")] + [(impl, c) for c in configs for impl in impls]
    models = {r: build(*r) for r in runs}
    ids = torch.randint(0, 32000, (4, args.seq), generator=torch.Generator().manual_seed(0))
    times: dict = {r: [] for r in runs}
    order, shuffle = list(runs), random.Random(0).shuffle
    for rep in range(args.reps + 2):  # two warm-up rounds
        shuffle(order)
        for r in order:
            t0 = clock()
            with native_off() if r[0] == "deltatune-torch" else contextlib.nullcontext():
                step(*models[r], ids, r[1] == "floor", args.bf16)
            if rep >= 2:
                times[r].append(clock() - t0)
    med = {r: statistics.median(v) for r, v in times.items()}
    mem = {}
    if not args.no_memory:
        for r in (r for r in runs if r[0] != "deltatune-torch"):
            out = subprocess.run([sys.executable, __file__, "--worker", r[0], r[1], "--seq", str(args.seq),
                                  *(["--bf16"] if args.bf16 else [])],
                                 capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            mem[r] = json.loads(out.stdout.strip().splitlines()[-1])
    floor = med[("floor", "floor")]
    print(f"\nbatch 4x{args.seq}, {'bf16 autocast' if args.bf16 else 'fp32'}, {torch.get_num_threads()} threads, {'CPU' if args.cpu_time else 'wall'} time, median of {args.reps} interleaved, shuffled steps; "
          f"floor step = {floor * 1000:.0f} ms\n")
    extra = (" deltatune, compiled code off / floor |", "---|") if args.compare_native else ("", "")
    print("| config | peft / floor | deltatune / floor | deltatune / peft | peak RSS peft | peak RSS deltatune | saved act. peft | saved act. deltatune |" + extra[0])
    print("|---|---|---|---|---|---|---|---|" + extra[1])
    if mem:
        f = mem[("floor", "floor")]
        print(f"| floor | 1.00x | 1.00x | - | {f['peak'] / 2**20:.0f} MB | {f['peak'] / 2**20:.0f} MB | {f['saved'] / 2**20:.0f} MB | {f['saved'] / 2**20:.0f} MB |"
              + (" 1.00x |" if args.compare_native else ""))
    for c in configs:
        p, d = med[("peft", c)], med[("deltatune", c)]
        row = f"| {c} | {p / floor:.3f}x | {d / floor:.3f}x | {d / p:.3f}x |"
        if mem:
            mp, md = mem[("peft", c)], mem[("deltatune", c)]
            row += f" {mp['peak'] / 2**20:.0f} MB | {md['peak'] / 2**20:.0f} MB | {mp['saved'] / 2**20:.0f} MB | {md['saved'] / 2**20:.0f} MB |"
        else:
            row += " - | - | - | - |"
        if args.compare_native:
            row += f" {med[('deltatune-torch', c)] / floor:.3f}x |"
        print(row)


if __name__ == "__main__":
    main()
