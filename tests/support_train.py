"""Shared helpers for the ``deltatune train`` tests: a tiny LLaMA saved with a tiny ChatML tokenizer, and data.

The model folder is what ``model: <path>`` in a training config points at; the data files are
chat rows with a ``label`` column, like the BBC task but with three short topics.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from support_data import tiny_tokenizer, write_jsonl

TOPICS = ("business", "sports", "tech")


def save_tiny_model(folder: Path, chat_template: bool = True, seed: int = 0, family: str = "llama") -> Path:
    """A 2-layer LLaMA (hidden 32; or GPT-2, which has biases) plus the tiny tokenizer, saved as a model folder."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from deltatune.models.tokenizer import CHATML_TEMPLATE

    tok = tiny_tokenizer(CHATML_TEMPLATE if chat_template else None)
    torch.manual_seed(seed)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256, **ids))
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **ids,
        ))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def topic_rows(n: int = 24) -> list[dict]:
    """Chat rows "Article i about <topic> news" -> "<topic>", with a ``label`` column."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"Article {i} about {TOPICS[i % 3]} news. Topic?"},
                {"role": "assistant", "content": TOPICS[i % 3]},
            ],
            "label": TOPICS[i % 3],
        }
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def tiny_run_files(tmp_path_factory):
    """``{"model": folder, "data": train.jsonl}`` shared by the tests of one session."""
    root = tmp_path_factory.mktemp("tiny_train")
    return {"model": save_tiny_model(root / "model"), "data": write_jsonl(root / "train.jsonl", topic_rows()),
            "gpt2": save_tiny_model(root / "gpt2", family="gpt2")}


def base_args(files: dict, out: Path, *extra: str) -> list[str]:
    """CLI arguments for a fast run on the tiny model: no accuracy, plot, TensorBoard or progress bar."""
    return [
        "train", f"model={files['model']}", f"data.source={files['data']}", "data.eval_size=6",
        "train.batch_size=4", "train.max_steps=6", "train.logging_steps=1", "train.progress_bar=false",
        "train.tensorboard=false", "train.plot=false", "eval.accuracy=false", "train.eval_steps=0",
        f"output_dir={out}", *extra,
    ]


def logged_losses(output_dir: Path) -> dict[int, float]:
    """{step: training loss} from the run's metrics.json."""
    metrics = json.loads((Path(output_dir) / "metrics.json").read_text())
    return {int(step): loss for step, loss in metrics["train"]["train_loss"]}
