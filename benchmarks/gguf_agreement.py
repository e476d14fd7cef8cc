"""Does llama.cpp answer like deltatune after ``deltatune export --format gguf``? (Not a timing benchmark.)

Takes a trained adapter (default: the newest ``runs/*/adapter``), exports it three ways and runs each in
a real llama.cpp (llama-cpp-python) on the run's own held-out examples (the default job: 200 BBC
articles), scoring the topic exactly as deltatune's training does (``first_token``: the label whose first
answer token gets the highest logit at the end of the prompt, see ``deltatune.train.metrics``):

- the base model's own GGUF (SmolLM2 Q4_1) + the GGUF LoRA (``--lora``);
- the merged model, q8_0 (the export's default) and f16.

Token ids come from deltatune's tokenizer and are fed to llama.cpp as ids, so the model is compared and
not the tokenizer; the "same tokens" column says how often llama.cpp's own tokenizer agrees anyway.

    python benchmarks/gguf_agreement.py [--adapter runs/<run>/adapter] [--limit 200] [--threads 2]
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def newest_adapter() -> str:
    runs = sorted(p for p in glob.glob("runs/*/adapter") if os.path.isfile(os.path.join(p, "adapter_config.json")))
    if not runs:
        sys.exit("no runs/*/adapter here; train one (deltatune train) or pass --adapter")
    return runs[-1]


def eval_prompts(adapter: str, limit: int):
    """``(tokenizer, prompts, label first-token ids per prompt, gold labels, labels)`` of the run's eval split."""
    from deltatune.data.templates import generation_prompt
    from deltatune.train.config import load_train_config
    from deltatune.train.loading import prepare_data

    run_config = Path(adapter).parent / "config.yaml"
    if not run_config.is_file():
        sys.exit(f"{run_config} not found: pass the adapter of a deltatune train run (it holds the data settings)")
    config = load_train_config(run_config)
    tokenizer, prepared = prepare_data(config, log=lambda _: None)
    ds = prepared.eval.select(range(min(limit, len(prepared.eval))))
    labels = sorted(set(ds["label"]))
    prompts, firsts = [], []
    for row in ds:
        messages = [m for m in row["messages"] if m["role"] != "assistant"]
        prompt = generation_prompt(messages, tokenizer, prepared.template)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        # The label's first token as it is tokenized after the prompt (a BPE merge may cross the seam),
        # as deltatune.train.metrics scores it.
        row_firsts = []
        for label in labels:
            full = tokenizer(prompt + label, add_special_tokens=False)["input_ids"]
            ok = full[: len(ids)] == ids and len(full) > len(ids)
            row_firsts.append(full[len(ids)] if ok else tokenizer(label, add_special_tokens=False)["input_ids"][0])
        prompts.append((prompt, ids))
        firsts.append(row_firsts)
    return tokenizer, prompts, firsts, list(ds["label"]), labels


def deltatune_logits(adapter: str, prompts, firsts, threads: int):
    import torch

    from deltatune.export.merging import base_model_for, load_adapted, read_adapter_config

    torch.set_num_threads(threads)
    model, _ = load_adapted(adapter, base_model_for([read_adapter_config(adapter)], [adapter], None))
    out = []
    with torch.no_grad():
        for (_, ids), f in zip(prompts, firsts):
            out.append(model(torch.tensor([ids])).logits[0, -1, f].float().numpy())  # (labels,)
    return out


def llama_cpp_logits(model_path: Path, lora_path: Path | None, prompts, firsts, threads: int):
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None, n_ctx=1024,
                          n_batch=512, n_threads=threads, verbose=False)
    out, same_tokens = [], 0
    try:
        for (prompt, ids), f in zip(prompts, firsts):
            same_tokens += llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
            llm.reset()
            llm.eval(ids)  # without logits_all, scores stay empty: read the last position's logits directly
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            out.append(row[f].copy())
    finally:
        llm.close()
    return out, same_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", default=None, help="adapter folder of a deltatune train run (default: newest)")
    ap.add_argument("--limit", type=int, default=200, help="held-out examples to score")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import numpy as np

    from deltatune.export.gguf_lora import export_gguf_lora
    from deltatune.export.gguf_merged import export_gguf_merged

    adapter = args.adapter or newest_adapter()
    _, prompts, firsts, gold, labels = eval_prompts(adapter, args.limit)
    t = time.perf_counter()
    ref = deltatune_logits(adapter, prompts, firsts, args.threads)
    ref_pred = [labels[int(np.argmax(r))] for r in ref]
    print(f"\nadapter {adapter}, {len(prompts)} held-out examples, first-token topic scoring\n")
    print("| loaded in | accuracy | same answer as deltatune | max abs logit diff (label tokens) | llama.cpp tokenizer "
          "gives the same ids | seconds |")
    print("|---|---|---|---|---|---|")

    def row(name, acc, agree, diff, tok, secs):  # printed as soon as measured: a long run shows its progress
        tok_s = "-" if tok is None else f"{100 * tok:.1f}%"
        print(f"| {name} | {100 * acc:.1f}% | {100 * agree:.1f}% | {diff:.3f} | {tok_s} | {secs:.0f} |", flush=True)

    row("deltatune (PyTorch, base + adapter)", np.mean([p == g for p, g in zip(ref_pred, gold)]), 1.0, 0.0, None,
        time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lora = export_gguf_lora(adapter, tmp / "lora.gguf")
        variants = [(f"{lora['base_gguf'].name} + LoRA GGUF (f32)", lora["base_gguf"], tmp / "lora.gguf")]
        for quant in ("q8_0", "f16"):
            export_gguf_merged(adapter, tmp / f"merged-{quant}.gguf", quant=quant)
            variants.append((f"merged GGUF, {quant}", tmp / f"merged-{quant}.gguf", None))
        for name, model_path, lora_path in variants:
            t = time.perf_counter()
            got, same_tokens = llama_cpp_logits(model_path, lora_path, prompts, firsts, args.threads)
            pred = [labels[int(np.argmax(r))] for r in got]
            diff = max(float(np.abs(a - b).max()) for a, b in zip(got, ref))
            row(name, np.mean([p == g for p, g in zip(pred, gold)]), np.mean([p == r for p, r in zip(pred, ref_pred)]),
                diff, same_tokens / len(prompts), time.perf_counter() - t)


if __name__ == "__main__":
    main()
