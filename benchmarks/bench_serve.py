"""`deltatune serve` under load: throughput and latency of continuous batching over many adapters.

An open-loop load generator on localhost: each scenario releases its requests at fixed times (all at
once for "N concurrent", back to back for "one at a time"), whatever the server has answered, and
streams every reply (/v1/completions, greedy, ``stream: true``) to time each token as it arrives. The
load generator runs in a process of its own, so its threads never take the server's GIL.

| measurement | target |
|---|---|
| throughput (generated tokens/s), 32 concurrent over 8 adapters / same load on 1 adapter | >= 0.9x |
| throughput, 32 concurrent / the same requests one at a time | >= 4x |
| throughput, 32 concurrent / peft, one request at a time with ``set_adapter`` per request | >= 5x |
| p50 / p95 time to first token and inter-token latency, at 1, 8 and 32 concurrent | report |

Model: by default a LLaMA-shaped random model (hidden 512, 8 layers, intermediate 1408) with a small
byte-level tokenizer, so no download is needed; ``--model`` serves a real one (a registered name such as
``smollm2-135m-instruct``, a folder, a .gguf). Adapters: 8 random LoRA r=16 on all linear layers.
The random model's end-of-text token lies outside its vocabulary, so every reply has exactly
``--max-tokens`` tokens; with ``--model`` replies may end early, and the token counts come from ``usage``.

    python benchmarks/bench_serve.py [--threads 2] [--max-tokens 64] [--prompt-len 64] [--rounds 2]
        [--model NAME] [--hidden 512] [--layers 8] [--dtype float32]
    python benchmarks/bench_serve.py --hidden 64 --layers 2 --max-tokens 8 --prompt-len 8 --rounds 1   # smoke
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
ADAPTERS = [f"a{i}" for i in range(8)]


def random_model(folder: Path, hidden: int, layers: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    text = ["Serving many adapters at once, one batch, one forward per step, every row its own adapter."] * 50
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    fast.add_special_tokens({"eos_token": "<eos>"})  # the last id: the model's vocabulary stops before it
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=fast.eos_token_id, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=2048, eos_token_id=None, pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def save_adapters(model_name: str, root: Path) -> dict[str, str]:
    import deltatune as dt
    from deltatune.models import load_model_and_tokenizer

    folders = {}
    for i, name in enumerate(ADAPTERS):
        model, _ = load_model_and_tokenizer(model_name)
        peft = dt.get_peft_model(model, dt.LoraConfig(r=16, target_modules="all-linear", init_lora_weights=False))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in peft.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        folders[name] = str(root / name)
        peft.save_pretrained(folders[name])
    return folders


def stream_one(port: int, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed request: arrival, first-token and last-token times, tokens generated."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    first = last = None
    tokens = 0
    for line in iter(reply.readline, b""):
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise RuntimeError(chunk["error"]["message"])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif chunk["choices"]:
            # Any choice chunk marks text arriving. A random model's bytes can leave a chunk's text empty
            # (an incomplete UTF-8 sequence is held back), so the final chunk may be the first with text.
            now = time.perf_counter()
            first = first or now
            last = now
    conn.close()
    return {"ttft": first - start, "itl": (last - first) / max(tokens - 1, 1), "tokens": tokens}


def scenario(port: int, names: list[str], prompts: list[list[int]], max_tokens: int, concurrent: bool) -> dict:
    """All requests released at once (open loop) or one after another; tokens/s over the whole scenario."""
    results: list[dict] = [None] * len(prompts)  # type: ignore[list-item]

    def run(i: int) -> None:
        results[i] = stream_one(port, names[i % len(names)], prompts[i], max_tokens)

    start = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(len(prompts)):
            run(i)
    wall = time.perf_counter() - start
    return {"tps": sum(r["tokens"] for r in results) / wall, "ttft": [r["ttft"] for r in results],
            "itl": [r["itl"] for r in results]}


def peft_one_at_a_time(model_name: str, folders: dict[str, str], prompts, max_tokens: int) -> float:
    """Tokens/s of peft serving the same requests one at a time, ``set_adapter`` before each."""
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_name if Path(model_name).exists() else _folder(model_name))
    model = peft.PeftModel.from_pretrained(base, folders[ADAPTERS[0]], adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    model.eval()
    tokens, start = 0, time.perf_counter()
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            model.set_adapter(ADAPTERS[i % len(ADAPTERS)])
            out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False)
            tokens += out.shape[1] - len(prompt)
    return tokens / (time.perf_counter() - start)


def _folder(name: str) -> str:
    from deltatune.models import resolve_model_path

    return str(resolve_model_path(name))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="serve this model instead of the random one")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "auto"), default="float32",
                    help="the server's --dtype (float32: the compiled CPU kernel's dtype)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="repeat each throughput scenario; the best round counts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from deltatune.serve.runner import ServeOptions, ServerThread, build

    with tempfile.TemporaryDirectory() as tmp:
        model_name = args.model or str(random_model(Path(tmp) / "model", args.hidden, args.layers))
        folders = save_adapters(model_name, Path(tmp) / "adapters")
        options = ServeOptions(model_name, adapters=tuple(folders.items()), port=0, max_adapters=8,
                               max_batch_size=32, max_queue=1024, dtype=args.dtype)
        app, engine = build(options)
        vocab = len(engine.codec.tokenizer) - 1
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(32)]
        with ServerThread(app) as url, multiprocessing.get_context("spawn").Pool(1) as clients:
            port = int(url.rsplit(":", 1)[1])
            clients.apply(scenario, (port, ADAPTERS, prompts[:8], args.max_tokens, True))  # warm-up

            def best(names, n, concurrent):
                runs = [clients.apply(scenario, (port, names, prompts[:n], args.max_tokens, concurrent))
                        for _ in range(args.rounds)]
                return max(runs, key=lambda r: r["tps"])

            mixed32 = best(ADAPTERS, 32, True)
            single32 = best(ADAPTERS[:1], 32, True)
            serial = best(ADAPTERS, 32, False)
            latency = {1: serial, 8: best(ADAPTERS, 8, True), 32: mixed32}
            steps = engine.metrics.get("deltatune_decode_steps_total")
            rows = engine.metrics.get("deltatune_decode_rows_total")
        peft_tps = peft_one_at_a_time(model_name, folders, prompts[:8], args.max_tokens)

    print(f"\nmodel: {args.model or f'random LLaMA hidden {args.hidden}, {args.layers} layers'}; 8 LoRA r=16 "
          f"all-linear; prompt {args.prompt_len} tokens, {args.max_tokens} generated; {args.threads} threads; "
          f"mean decode batch {rows / max(steps, 1):.1f}\n")
    print("| measurement | tokens/s | ratio | target |\n|---|---|---|---|")
    print(f"| 32 concurrent over 8 adapters / 32 on 1 adapter | {mixed32['tps']:.0f} / {single32['tps']:.0f} "
          f"| {mixed32['tps'] / single32['tps']:.2f}x | >= 0.9x |")
    print(f"| 32 concurrent / one at a time | {mixed32['tps']:.0f} / {serial['tps']:.0f} "
          f"| {mixed32['tps'] / serial['tps']:.2f}x | >= 4x |")
    print(f"| 32 concurrent / peft one at a time, set_adapter per request | {mixed32['tps']:.0f} / {peft_tps:.0f} "
          f"| {mixed32['tps'] / peft_tps:.2f}x | >= 5x |")
    print("\n| concurrent | TTFT p50 (ms) | TTFT p95 (ms) | ITL p50 (ms) | ITL p95 (ms) |\n|---|---|---|---|---|")
    for c, r in latency.items():
        print(f"| {c} | {pct(r['ttft'], .5):.0f} | {pct(r['ttft'], .95):.0f} | {pct(r['itl'], .5):.1f} "
              f"| {pct(r['itl'], .95):.1f} |")


if __name__ == "__main__":
    main()
