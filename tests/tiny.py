"""Tiny, randomly initialised transformers models built from configs (no downloads).

Every test that needs a model builds it here so the shapes stay small and the suite fast.
"""
from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 96


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, layers: int = 2, hidden: int = 32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert_cls(seed: int = 0, layers: int = 2, hidden: int = 32, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=2 * hidden, max_position_embeddings=128, num_labels=num_labels, pad_token_id=0,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_t5(seed: int = 0, layers: int = 2, hidden: int = 32, **overrides) -> T5ForConditionalGeneration:
    """An encoder-decoder model (``overrides`` change config fields, e.g. ``num_decoder_layers``)."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=VOCAB, d_model=hidden, d_kv=hidden // 4, d_ff=2 * hidden, num_layers=layers, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2,
    )
    return T5ForConditionalGeneration(T5Config(**{**fields, **overrides})).eval()


def input_ids(batch: int = 2, seq: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Move every trainable tensor off its initial value (zero LoRA B, unit IA³ vectors, zero bottleneck
    up-projections, modules_to_save copies...), seeded, so that a test sees every adapter term."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p) * std)
    return model
