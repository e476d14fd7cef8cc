"""Shared helpers for the ``deltatune serve`` tests: a tiny model folder, tiny adapters, a running server.

The model is the CLI tests' tiny LLaMA with a ChatML tokenizer (it loads through
``load_model_and_tokenizer`` like any local model); adapters are random LoRA/DoRA/IA³ adapters saved
to folders. Each server runs in a background thread on 127.0.0.1 and a free port.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import deltatune as dt  # noqa: E402
from deltatune.cli.generate import SamplingOptions, generate_text  # noqa: E402
from deltatune.models import load_model_and_tokenizer  # noqa: E402
from support_cli_generate import write_tiny_model  # noqa: E402
from tiny import perturb  # noqa: E402

ADAPTERS = {
    "sql": lambda: dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    "chat": lambda: dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
                                  init_lora_weights=False),
    "tone": lambda: dt.LoraConfig(r=2, use_dora=True, target_modules=["o_proj", "down_proj"], init_lora_weights=False),
    "news": lambda: dt.IA3Config(init_ia3_weights=False),
}


def make_model_and_adapters(root: Path, names=tuple(ADAPTERS)) -> tuple[Path, dict[str, Path]]:
    """A tiny model folder and one adapter folder per name, under ``root``."""
    model_dir = write_tiny_model(root / "model")
    folders = {}
    for i, name in enumerate(names):
        model, _ = load_model_and_tokenizer(str(model_dir))
        peft = perturb(dt.get_peft_model(model, ADAPTERS[name]()), seed=10 + i, std=0.3)
        folders[name] = root / "adapters" / name
        peft.save_pretrained(folders[name])
    return model_dir, folders


def reference(model_dir: Path, adapter: Path | None, prompt: str, max_tokens: int, chat: bool = False) -> str:
    """What ``deltatune generate --greedy`` (the adapter alone, PeftModel) answers for ``prompt``."""
    from deltatune.cli.generate import build_prompt

    model, tok = load_model_and_tokenizer(str(model_dir))
    if adapter is not None:
        model = dt.PeftModel.from_pretrained(model, adapter)
    text = build_prompt(tok, prompt, raw=not chat)
    with torch.no_grad():
        reply, _ = generate_text(model.eval(), tok, text, SamplingOptions(max_new_tokens=max_tokens, greedy=True),
                                 templated=chat)
    return reply


@contextlib.contextmanager
def running_server(model_dir: Path, adapters: dict[str, Path] | None = None, **options):
    """Start ``deltatune serve`` on the tiny model in a thread; yields (base url, engine)."""
    from deltatune.serve.runner import ServeOptions, ServerThread, build

    options = {"dtype": "float32", **options}
    opts = ServeOptions(model=str(model_dir), adapters=tuple((n, str(p)) for n, p in (adapters or {}).items()),
                        port=0, **options)
    app, engine = build(opts)
    thread = ServerThread(app)
    url = thread.start()
    try:
        yield url, engine
    finally:
        thread.stop()
        assert not thread.thread.is_alive(), "the server did not shut down"


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample's value from a /metrics scrape."""
    for line in text.splitlines():
        if line.startswith(f"{name}{labels} "):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{labels} not in /metrics:\n{text}")
