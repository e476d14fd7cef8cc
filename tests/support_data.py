"""Shared helpers for the data and model tests: a tiny offline ChatML tokenizer and data files.

Imported by the other ``test_data_*`` / ``test_models_*`` modules (``tests/`` is on sys.path);
the few tests here check the helpers themselves.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from deltatune.models.tokenizer import CHATML_TEMPLATE

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "system user assistant: what is the topic of this article? business sports tech politics",
    "Hello, how are you today? I am fine, thank you very much.",
    "Summarise the following text in one sentence. Answer with one word.",
] * 4


@functools.lru_cache(maxsize=None)
def _trained() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def tiny_tokenizer(chat_template: str | None = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (~320 tokens) with ChatML specials, eos = pad = <|im_end|>, no BOS."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained()),
        eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>", bos_token="<|im_start|>",
    )
    tok.chat_template = chat_template
    return tok


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_rows(n: int = 6) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"It is {2 * i}."},
            ],
            "label": str(2 * i),
        }
        for i in range(n)
    ]
