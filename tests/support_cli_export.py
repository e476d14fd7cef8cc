"""Shared helpers for the merge/export CLI tests: a tiny model folder (tied or not) and adapters on it.

Adapters are made by deltatune on the model loaded from the folder, so their
``base_model_name_or_path`` is that folder and the CLI finds the base model on its own.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.models import load_model_and_tokenizer
from support_data import tiny_tokenizer


def write_model(folder: Path, tied: bool = False, seed: int = 0) -> Path:
    """A randomly initialised 2-layer LLaMA (hidden 32) plus the tiny ChatML tokenizer."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_adapter(model_folder: Path, out: Path, config, seed: int = 0) -> Path:
    """Save an adapter with non-trivial weights (every trainable tensor perturbed)."""
    model, _ = load_model_and_tokenizer(model_folder)
    torch.manual_seed(seed)
    peft_model = dt.get_peft_model(model, config)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    peft_model.save_pretrained(out)
    return out


def ids(vocab: int = 300, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (2, 8), generator=g)


def adapter_logits(model_folder: Path, adapter: Path) -> torch.Tensor:
    """Logits of base model + adapter, unmerged (the reference an export must reproduce)."""
    model, _ = load_model_and_tokenizer(model_folder)
    peft_model = dt.PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return peft_model(ids()).logits
