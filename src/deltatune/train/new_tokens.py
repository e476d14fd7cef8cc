"""``data.add_special_tokens``: new tokens in the tokenizer, room for them in the model, and their rows trained.

The tokens are added before the data is tokenized (so they are single tokens in it); the model's
embeddings are resized to the tokenizer right after it loads; the adapter config gets the new ids as
trainable rows (LoRA's ``trainable_token_indices``, or ``trainable_tokens``' ``token_indices``), so only
those rows of the embedding train. The tokenizer is saved next to the adapter: whatever loads the adapter
resizes the base model to it first (peft's ``AutoPeftModel``, ``deltatune generate``/``export``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from deltatune.config import LoraConfig, PeftConfig
from deltatune.methods.trainable_tokens import TrainableTokensConfig
from deltatune.train.config_check import ConfigError


def add_tokens(tokenizer: Any, tokens: Sequence[str]) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` as special tokens (kept whole, never split) and return their ids
    (a token the tokenizer already has keeps its id)."""
    if tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)}, replace_extra_special_tokens=False)
    return [int(i) for i in tokenizer.convert_tokens_to_ids(list(tokens))]


def with_token_rows(config: PeftConfig, ids: Sequence[int], method: str) -> PeftConfig:
    """``config`` with the rows of ``ids`` made trainable.

    Raises:
        ConfigError: the method has no trainable rows (only LoRA variants and trainable_tokens do).
    """
    if not ids:
        return config
    if isinstance(config, TrainableTokensConfig):
        return config.replace(token_indices=tuple(dict.fromkeys([*config.token_indices, *ids])))
    if isinstance(config, LoraConfig):
        have = config.trainable_token_indices
        if isinstance(have, dict):
            raise ConfigError("data.add_special_tokens cannot be combined with method.trainable_token_indices given per "
                              "layer; list the token ids instead, or drop data.add_special_tokens")
        return config.replace(trainable_token_indices=tuple(dict.fromkeys([*(have or ()), *ids])))
    raise ConfigError(f"data.add_special_tokens needs the new tokens' embedding rows to train, which method.name="
                      f"{method!r} cannot do; use lora, dora, rslora, qlora or trainable_tokens")


def resize_for(model: Any, tokenizer: Any, log: Callable[[str], None] = print) -> None:
    """Grow ``model``'s embeddings to ``len(tokenizer)`` rows when the tokenizer has more tokens than the model
    has rows (transformers initialises the new rows at the mean of the old ones, plus noise)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer))
        log(f"resized the embeddings from {rows} to {len(tokenizer)} rows for the added tokens")
