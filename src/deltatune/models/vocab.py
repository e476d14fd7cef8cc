"""A tokenizer saved next to an adapter, and a base model grown to fit it.

Training with added tokens (``data.add_special_tokens``, or peft's resized-vocabulary recipe) saves the
tokenizer beside the adapter, and the adapter's embedding matrices have its size: whatever loads such an
adapter must use that tokenizer and resize the base model's embeddings before the adapter loads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def tokenizer_beside(folder: str | Path) -> Any | None:
    """The tokenizer saved in ``folder`` (an adapter folder), or None if it holds none."""
    folder = Path(folder)
    if not folder.is_dir() or not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def fit_embeddings(model: Any, tokenizer: Any) -> bool:
    """Grow ``model``'s embeddings to ``len(tokenizer)`` rows if it has fewer (as peft's ``AutoPeftModel`` does);
    returns whether it resized. The new rows' values do not matter: the adapter's weights overwrite them."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return False
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return True
