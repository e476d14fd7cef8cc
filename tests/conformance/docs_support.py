"""Helpers for the ported peft documentation snippets (``test_docs_*.py``).

A snippet is written once as a function of ``lib`` (the ``peft`` or ``deltatune`` module): the doc's
``from peft import X`` becomes ``X = lib.X`` (or :func:`imp` for a submodule), and nothing else
changes except hub ids, which become tiny random models saved in local folders (:func:`local_llama`
and friends), because this machine has no model hub.

:func:`oracle` runs a snippet with peft. A failure there means the port is wrong (or peft's own doc is),
never that deltatune has a known gap, so it is turned into ``pytest.fail`` (a ``BaseException``) that
the ``xfail(raises=...)`` marks from :func:`issue18` and :func:`bug` never swallow.
"""
from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import deltatune
from support_data import tiny_tokenizer

LIBS = [peft, deltatune]
LIB_IDS = ["peft", "deltatune"]


def imp(lib, module: str, *names: str):
    """``from <lib>.<module> import <names>`` (``module`` "" for the package itself)."""
    mod = importlib.import_module(lib.__name__ + (f".{module}" if module else ""))
    found = []
    for name in names:
        if not hasattr(mod, name):
            raise ImportError(f"cannot import name {name!r} from {mod.__name__!r}")
        found.append(getattr(mod, name))
    return found[0] if len(found) == 1 else tuple(found)


def oracle(snippet, *args, **kwargs):
    """Run ``snippet(peft, ...)``: what the same code gives with the real peft. Its warnings are silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return snippet(peft, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any peft failure means the test itself is wrong
            pytest.fail(f"peft itself fails this snippet ({type(err).__name__}: {err}); fix the port", pytrace=False)


def ours(snippet, *args, **kwargs):
    """Run ``snippet(deltatune, ...)``."""
    return snippet(deltatune, *args, **kwargs)


def issue18(reason: str, raises=Exception):
    """A known gap listed in issue 18: expected to fail on deltatune, with this exception type only."""
    return pytest.mark.xfail(strict=True, raises=raises, reason=f"issue 18: {reason}")


def bug(reason: str, raises=Exception):
    """A failure not covered by issue 18: reported as a bug (see tests/conformance/README.md)."""
    return pytest.mark.xfail(strict=True, raises=raises, reason=f"BUG: {reason}")


# ---- tiny stand-ins for hub models --------------------------------------------------------------------
def llama_config(tok=None, layers: int = 2, hidden: int = 32, vocab: int | None = None) -> LlamaConfig:
    tok = tok or tiny_tokenizer()
    return LlamaConfig(
        vocab_size=vocab or len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


def local_llama(folder: Path, seed: int = 0, **kw) -> str:
    """Save a tiny random Llama and the tiny tokenizer to ``folder``; returns it as a model id."""
    if not (Path(folder) / "config.json").exists():
        tok = tiny_tokenizer()
        torch.manual_seed(seed)
        LlamaForCausalLM(llama_config(tok, **kw)).save_pretrained(folder)
        tok.save_pretrained(folder)
    return str(folder)


def load_causal_lm(model_id: str, **kw):
    """``AutoModelForCausalLM.from_pretrained`` without its progress bars, in eval mode as from the hub."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(model_id, **kw).eval()
    finally:
        if was:
            logging.enable_progress_bar()


def lora_weights(model, lib) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's on-disk keys."""
    return {k: v.detach().clone() for k, v in lib.get_peft_model_state_dict(model).items()}


def same_start(src, dst, lib=deltatune, adapter_name: str = "default"):
    """Copy the adapter weights of peft model ``src`` into ``dst`` (built by ``lib``) through peft's keys.

    The two libraries draw random initial weights in different orders, so a seed alone does not give the
    same start; snippets that train or compare outputs copy peft's start into ours first.
    """
    sd = peft.get_peft_model_state_dict(src, adapter_name=adapter_name)
    lib.set_peft_model_state_dict(dst, sd, adapter_name=adapter_name)
    return dst


def perturb(model, seed: int = 0, scale: float = 0.1):
    """Move every trainable tensor off its initial value (a zero LoRA B hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)
    return model
