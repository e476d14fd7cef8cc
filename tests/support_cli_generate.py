"""Shared helpers for the CLI tests: a tiny LLaMA model folder with a tiny ChatML tokenizer.

The folder loads through ``deltatune.models.load_model_and_tokenizer`` like any local model, so
``--model <folder>`` exercises the real CLI paths in a second, offline. Imported by the other
``test_cli_*`` and ``test_distributed*`` modules; the test here checks the helper itself.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from support_data import tiny_tokenizer


def write_tiny_model(folder: Path, seed: int = 0, layers: int = 2, hidden: int = 32) -> Path:
    """Save a randomly initialised tiny LLaMA plus a ChatML tokenizer into ``folder``."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
