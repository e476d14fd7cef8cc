"""``deltatune generate``: text from a base model plus an optional adapter, streamed as it is produced.

    deltatune generate "What is LoRA?"                              # base SmolLM2-135M-Instruct
    deltatune generate --adapter runs/bbc/adapter "Article: ..."    # with a trained adapter
    echo "Hello" | deltatune generate --greedy --max-new-tokens 20 -
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltatune.model import PeftModel
from deltatune.models import DEFAULT_MODEL, load_model_and_tokenizer
from deltatune.models.vocab import fit_embeddings, tokenizer_beside
from deltatune.models.registry import get_spec
from deltatune.train.precision import choose_precision

_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick each next token."""

    max_new_tokens: int = 128
    """Stop after this many new tokens (or earlier, at the end-of-turn token)."""
    greedy: bool = False
    """Always take the most likely token (deterministic); the sampling knobs are then ignored."""
    temperature: float = 0.7
    """Divides the logits before sampling: lower is more conservative; 0 means greedy."""
    top_p: float = 0.9
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 50
    """Sample from the k most likely tokens (0 disables the cut)."""
    seed: int | None = None
    """Seed for the sampler, for a reproducible sample."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens}: expected a positive number of tokens")
        if self.temperature < 0:
            raise ValueError(f"--temperature {self.temperature}: expected >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p}: expected a probability in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"--top-k {self.top_k}: expected >= 0 (0 disables top-k)")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate``."""
        if self.greedy or self.temperature == 0:
            # Explicit Nones override sampling defaults a model's generation_config may carry.
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {
            "max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
            "top_p": self.top_p, "top_k": self.top_k or None,
        }


def build_prompt(tokenizer: Any, prompt: str, system: str | None = None, raw: bool = False) -> str:
    """The text fed to the model: the chat template around ``prompt`` with a generation prompt, or
    ``prompt`` itself when ``raw`` (or when the tokenizer has no chat template)."""
    if raw or not getattr(tokenizer, "chat_template", None):
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generate_text(
    model: Any, tokenizer: Any, text: str, options: SamplingOptions, streamer: Any = None, templated: bool = True
) -> tuple[str, int]:
    """Generate a continuation of ``text``.

    Args:
        templated: ``text`` came from the chat template, which already holds every special token the
            model needs (adding them again would double a BOS); False adds the tokenizer's own.

    Returns:
        ``(reply, new_token_count)``, the reply decoded without special tokens.
    """
    import torch

    if options.seed is not None:
        from transformers import set_seed

        set_seed(options.seed)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not templated)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    # LoRA's default low-rank path, not merged_inference: decode steps are one token each, where forming
    # each layer's merged weight per call costs more than it saves.
    with torch.no_grad():
        out = model.generate(**enc, **options.generate_kwargs(), streamer=streamer, pad_token_id=tokenizer.pad_token_id)
    new = out[0, enc["input_ids"].shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), int(new.numel())


def load_for_generation(model_name: str | None, adapter: str | None, dtype: str = "float32", device: str = "auto"):
    """Load the base model (and the adapter on top), in eval mode, on ``device``.

    ``model_name`` None means the adapter's base model when it exists locally, else the default model.
    ``dtype`` ``auto``: bf16 weights where the device multiplies bf16 natively (``train.bf16: auto``'s
    test), else fp32. Decoding reads every weight once per token, so halving the bytes is what pays:
    48 greedy tokens from SmolLM2-135M took 3.1 s in fp32, 2.1 s with bf16 weights and 2.25 s under
    bf16 autocast on fp32 weights (2 threads, this project's Zen 5 CPU). ``deltatune serve --dtype
    auto`` chooses the same way, so both give the same greedy text by default.
    """
    import torch

    if model_name is None and adapter is not None:
        model_name = _adapter_base(adapter)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if choose_precision("auto", cuda=device.startswith("cuda")).bf16 else "float32"
    model, tokenizer = load_model_and_tokenizer(model_name or DEFAULT_MODEL, dtype=getattr(torch, dtype), device=device)
    if adapter is not None:
        # An adapter trained with added tokens carries its tokenizer: use it, and grow the embeddings to it first.
        tokenizer = tokenizer_beside(adapter) or tokenizer
        fit_embeddings(model, tokenizer)
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tokenizer


def _adapter_base(adapter: str) -> str | None:
    """The base model an adapter names, if it can be found locally (a folder, or a registered name)."""
    config_file = Path(adapter) / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no adapter_config.json in {adapter}; pass the folder that save_pretrained wrote")
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if base and (get_spec(base) is not None or (Path(base) / "config.json").is_file()):
        return base
    return None


def register(subparsers: Any) -> None:
    """Add the ``generate`` subcommand."""
    p = subparsers.add_parser(
        "generate", help="Generate text with a base model and an optional adapter.",
        description="Wraps PROMPT in the model's chat template and streams the reply to stdout.",
    )
    p.add_argument("prompt", nargs="?", default="-", help="the user message; '-' or nothing reads it from stdin")
    p.add_argument("--adapter", default=None, metavar="DIR", help="adapter folder (written by deltatune train or save_pretrained)")
    p.add_argument("--model", default=None,
                   help="base model: registered name, folder or .gguf (default: the adapter's base model if it exists "
                   "locally, else smollm2-135m-instruct)")
    p.add_argument("--system", default=None, help="a system message before the prompt")
    p.add_argument("--raw", action="store_true", help="feed PROMPT as is, without the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=50, help="0 disables top-k")
    p.add_argument("--greedy", action="store_true", help="deterministic: always the most likely token")
    p.add_argument("--seed", type=int, default=None, help="seed the sampler for a reproducible sample")
    p.add_argument("--no-stream", action="store_true", help="print the reply once it is complete")
    p.add_argument("--dtype", choices=("auto", *_DTYPES), default="auto",
                   help="weights' dtype; auto: bfloat16 where the CPU/GPU has native bf16, else float32")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``deltatune generate``."""
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise ValueError("the prompt is empty; pass it as an argument, or pipe it in with '-'")
    options = SamplingOptions(args.max_new_tokens, args.greedy, args.temperature, args.top_p, args.top_k, args.seed)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bar would interleave with the streamed reply
    model, tokenizer = load_for_generation(args.model, args.adapter, args.dtype, args.device)
    text = build_prompt(tokenizer, prompt, args.system, args.raw)
    streamer = None
    if not args.no_stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    templated = not args.raw and bool(getattr(tokenizer, "chat_template", None))
    reply, count = generate_text(model, tokenizer, text, options, streamer, templated)
    if streamer is None:
        print(reply)
    seconds = time.perf_counter() - start
    print(f"[{count} tokens in {seconds:.1f} s, {count / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0
