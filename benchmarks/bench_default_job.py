"""The default job's training phase: deltatune against real peft + plain Trainer + the standard loss.

Both sides train SmolLM2-135M-Instruct with the same LoRA config (the default job's: r=8 on every
linear layer of the blocks), the same tokenized BBC data, collator, TrainingArguments (batch,
schedule, seed) and number of steps, in transformers' Trainer:

- deltatune: ``deltatune.get_peft_model`` + :class:`deltatune.train.adapter_trainer.AdapterTrainer`
  (fused chunked loss: only the supervised positions are projected onto the 49,152-token vocabulary);
- reference: ``peft.get_peft_model`` + ``transformers.Trainer`` (the model's own loss, which
  materialises (batch, seq, vocab) logits, their log-softmax and its gradient).

Each side runs in its own subprocess. Memory: the peak resident set during ``trainer.train()``
(Linux: VmHWM is reset through /proc/self/clear_refs after loading, so model-loading spikes do not
count), and the whole process's peak for reference. Speed: input tokens per second over the steps
after ``--warmup``, by the wall clock and per CPU-second of the process (on a shared, loaded machine
the wall clock mostly measures the neighbours; with one thread, CPU time is the work done). Sides
alternate (A B A B ...) so machine load drifts hit both; medians reported.

    python benchmarks/bench_default_job.py [--steps 8] [--warmup 2] [--reps 2] [--threads 2] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def worker(impl: str, steps: int, warmup: int, threads: int, overrides: list[str]) -> dict:
    import resource

    import torch
    from transformers import Trainer, TrainerCallback

    torch.set_num_threads(threads)
    from deltatune.train.config import load_train_config
    from deltatune.train.run import adapter_config, load_model, prepare_data
    from deltatune.train.precision import choose_precision, training_attention
    from deltatune.train.session import training_arguments

    out = tempfile.mkdtemp(prefix=f"bench-{impl}-")
    config = load_train_config(None, [f"train.max_steps={steps}", "train.eval_steps=0", "train.save_steps=0",
                                      "train.tensorboard=false", "train.progress_bar=false", f"output_dir={out}",
                                      *overrides])
    _, prepared = prepare_data(config, log=lambda line: None)
    model = load_model(config)
    built = adapter_config(config, steps)  # the job's adapter: a relative layer choice resolved for this model
    options = dict(config.method.options)
    if "layers_to_transform" in options:  # peft gets the same index list
        layers = built.layers_to_transform
        options["layers_to_transform"] = None if layers is None else list(layers)
    torch.manual_seed(config.train.seed)
    if impl == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **options))
        trainer_cls = Trainer
    else:
        import deltatune
        from deltatune.train.adapter_trainer import AdapterTrainer

        model = deltatune.get_peft_model(model, built)
        trainer_cls = AdapterTrainer
    marks: list[tuple[float, float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), time.process_time(), int(state.num_input_tokens_seen)))

    args = training_arguments(config, out, steps, has_eval=False)
    trainer = trainer_cls(model=model, args=args, train_dataset=prepared.train, data_collator=prepared.collator,
                          callbacks=[Clock()])
    before_kb = _status_kb("VmRSS")
    reset = _reset_peak()
    # deltatune's job trains with the attention kernel its precision is fastest with (eager under CPU
    # bf16, train/precision.py); peft + Trainer keeps the model's own, as a peft user's script does.
    attention = (training_attention(model.get_base_model(), choose_precision(config.train.bf16))
                 if impl == "deltatune" else contextlib.nullcontext())
    with attention:
        trainer.train()
    train_peak_kb = _status_kb("VmHWM") if reset else 0
    (t0, c0, n0), (t1, c1, n1) = marks[warmup - 1], marks[-1]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "impl": impl, "tokens_per_s": (n1 - n0) / (t1 - t0), "tokens_per_cpu_s": (n1 - n0) / (c1 - c0),
        "rss_before_train_mb": before_kb / 1024,
        "train_peak_mb": train_peak_kb / 1024, "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "tokens_per_step": (n1 - n0) / (len(marks) - warmup), "bf16": bool(args.bf16),
    }


def run_side(impl: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), *[f"--set={o}" for o in args.set]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run (default job config otherwise)")
    ap.add_argument("--warmup", type=int, default=2, help="steps excluded from the tokens/s timing")
    ap.add_argument("--reps", type=int, default=2, help="runs per side, alternating")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads in each worker")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a train-config override applied to both sides, e.g. train.gradient_checkpointing=true")
    ap.add_argument("--worker", choices=("deltatune", "peft"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup, args.threads, args.set)))
        return
    results: dict[str, list[dict]] = {"peft": [], "deltatune": []}
    for rep in range(args.reps):
        for impl in ("peft", "deltatune") if rep % 2 == 0 else ("deltatune", "peft"):
            results[impl].append(run_side(impl, args))
            print(f"  rep {rep + 1} {impl}: {json.dumps(results[impl][-1])}", file=sys.stderr, flush=True)

    def med(impl: str, key: str) -> float:
        return statistics.median(r[key] for r in results[impl])

    load = os.getloadavg()
    from deltatune.train.config import load_train_config

    cfg = load_train_config(None, args.set)
    print(f"\nDefault job training phase ({cfg.model}, {cfg.method.name} r={cfg.method.options.get('r')} on "
          f"{len(cfg.method.options.get('target_modules', []))} linears per block, batch {cfg.train.batch_size}, BBC "
          f"articles cut to {cfg.data.article_tokens} tokens), {args.steps} steps ({args.warmup} warm-up), "
          f"{args.threads} threads, median of {args.reps} alternating runs per side; load average {load[0]:.1f}"
          + (f"; overrides {' '.join(args.set)}" if args.set else "")
          + f"; both sides' Trainer bf16={results['peft'][0]['bf16']}/{results['deltatune'][0]['bf16']}\n")
    print("| metric | peft + Trainer (standard loss) | deltatune (AdapterTrainer, fused loss) | deltatune / peft | target |")
    print("|---|---|---|---|---|")
    # issue 17's targets for the default (bf16 autocast where native) against peft + Trainer(bf16=True)
    rows = [("tokens/s (wall clock)", "tokens_per_s", "{:.0f}", ">= 1.3x"),
            ("tokens per CPU-second (robust to other load)", "tokens_per_cpu_s", "{:.0f}", "-"),
            ("peak RSS during training", "train_peak_mb", "{:.0f} MB", "<= 0.7x"),
            ("peak RSS of the process", "process_peak_mb", "{:.0f} MB", "-"),
            ("RSS before training (model + data)", "rss_before_train_mb", "{:.0f} MB", "-")]
    for label, key, fmt, target in rows:
        p, d = med("peft", key), med("deltatune", key)
        ratio = f"{d / p:.2f}x" if p else "-"
        print(f"| {label} | {fmt.format(p)} | {fmt.format(d)} | {ratio} | {target} |")
    p_inc = med("peft", "train_peak_mb") - med("peft", "rss_before_train_mb")
    d_inc = med("deltatune", "train_peak_mb") - med("deltatune", "rss_before_train_mb")
    if p_inc > 0:
        print(f"| training-phase increase over the loaded model | {p_inc:.0f} MB | {d_inc:.0f} MB | "
              f"{d_inc / p_inc:.2f}x | - |")
    print(f"\nfirst/last logged loss: peft {med('peft', 'first_loss'):.3f}/{med('peft', 'last_loss'):.3f}, "
          f"deltatune {med('deltatune', 'first_loss'):.3f}/{med('deltatune', 'last_loss'):.3f}")


if __name__ == "__main__":
    main()
