"""``deltatune serve MODEL [--adapter NAME=DIR ...]``: an OpenAI-compatible server over many adapters at once."""
from __future__ import annotations

import argparse
import importlib
import importlib.util

EPILOG = """\
examples:
  deltatune serve smollm2-135m-instruct --adapter bbc=runs/bbc/adapter
  deltatune serve ./my-model --adapter-root adapters/ --max-adapters 16 --api-key secret
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "bbc", "prompt": "Article: ...", "max_tokens": 20, "temperature": 0}'

Requests name an adapter (or MODEL for the base model) in "model"; requests for different adapters are
decoded together in one batch. Needs the extra: pip install 'deltatune[serve]'. See docs/serving.md.
"""


def _adapter(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=DIR, e.g. bbc=runs/bbc/adapter")
    return name, folder


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` subcommand."""
    p = subparsers.add_parser(
        "serve", help="Serve a model and many adapters over an OpenAI-compatible HTTP API.",
        description="OpenAI-compatible server (/v1/completions, /v1/chat/completions, streaming, vLLM's "
                    "/v1/load_lora_adapter) with continuous batching over many LoRA adapters.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="registered name, transformers folder or .gguf file")
    p.add_argument("--adapter", action="append", type=_adapter, default=[], metavar="NAME=DIR",
                   help="serve the adapter in DIR as NAME (repeatable)")
    p.add_argument("--adapter-root", default=None, metavar="DIR",
                   help="allow /v1/load_lora_adapter to load folders under DIR (off without it)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-adapters", type=int, default=8, metavar="N",
                   help="adapters resident at once; others are evicted LRU and reloaded on demand (default: 8)")
    p.add_argument("--max-batch-size", type=int, default=32, metavar="B", help="sequences per forward (default: 32)")
    p.add_argument("--max-queue", type=int, default=256, metavar="Q",
                   help="requests waiting before new ones get 429 (default: 256)")
    p.add_argument("--max-model-len", type=int, default=None, metavar="L",
                   help="longest prompt + completion in tokens (default: the model's context length)")
    p.add_argument("--api-key", default=None, metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="auto: bf16 autocast where this machine runs bf16 fast, else float32")
    p.set_defaults(func=run)


def missing_extra() -> str | None:
    """Why the server cannot run here (its optional dependencies are absent), or None."""
    absent = [m for m in ("fastapi", "uvicorn", "pydantic") if importlib.util.find_spec(m) is None]
    if absent:
        return f"{', '.join(absent)} not installed; install the server extra: pip install 'deltatune[serve]'"
    return None


def run(args: argparse.Namespace) -> int:
    """Check the extra, then hand over to the server's entry point.

    The entry point is loaded by name, as ``cli/main.py`` loads ``"module:function"`` entries, and only
    once the extra is known to be there: importing it imports torch, transformers and pydantic, and
    without the extra that import would fail with a bare ModuleNotFoundError instead of this message.
    """
    problem = missing_extra()
    if problem:
        raise ValueError(problem)
    return importlib.import_module("deltatune.serve.runner").main(args)
