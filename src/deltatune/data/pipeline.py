"""From a :class:`DataConfig` to training and eval datasets, in two steps.

1. :func:`load_examples` reads and normalises the source with no tokenizer or model, so
   ``deltatune train`` can fail on bad data in a second, before loading a model.
2. :func:`prepare_datasets` renders, tokenizes (and optionally packs) with the model's tokenizer.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Any

import datasets

from deltatune.data.bbc import build_bbc_datasets
from deltatune.data.config import DataConfig
from deltatune.data.formats import normalize
from deltatune.data.packing import Collator, pack_examples
from deltatune.data.sources import load_source
from deltatune.data.templates import resolve_template
from deltatune.data.tokenize import TokenizeStats, tokenize_dataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Examples:
    """Normalised (untokenized) examples: ``messages``/``text`` columns, plus ``label`` if the source has one."""

    train: datasets.Dataset
    """Training examples."""

    eval: datasets.Dataset | None
    """Held-out examples, or None when no eval split was asked for."""

    format: str
    """The row format read (``chat`` for bbc-news)."""

    train_dropped: int = 0
    """Bad rows of ``data.source`` dropped by ``data.on_bad_rows=drop`` (counted before any split)."""

    eval_dropped: int = 0
    """Bad rows of ``data.eval_source`` dropped by ``data.on_bad_rows=drop``."""


@dataclass(frozen=True)
class PreparedData:
    """Tokenized datasets ready for a DataLoader with :attr:`collator`."""

    train: datasets.Dataset
    """``input_ids``, ``labels`` (and ``position_ids`` when packed) per row."""

    eval: datasets.Dataset | None
    """Never packed: ``input_ids``, ``labels``, and the normalised ``messages``/``label`` columns
    for generation-based scoring (see :func:`deltatune.data.templates.generation_prompt`)."""

    collator: Collator
    """Pads (and masks packed rows of) a list of rows into a batch."""

    template: str
    """Template used: ``tokenizer`` or a built-in name."""

    train_stats: TokenizeStats
    """Tokenization counts of the training set (before packing)."""

    eval_stats: TokenizeStats | None
    """Tokenization counts of the eval set."""


def _split(ds: datasets.Dataset, config: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    if config.eval_size == 0:
        return ds.shuffle(seed=config.seed), None
    if config.eval_size >= len(ds):
        raise ValueError(
            f"data.eval_size={config.eval_size} but {config.source!r} has only {len(ds)} examples; expected fewer "
            f"eval examples than rows. Set data.eval_size lower (e.g. {max(1, len(ds) // 10)}), 0 for no eval, "
            "or give a separate data.eval_source."
        )
    parts = ds.train_test_split(test_size=config.eval_size, seed=config.seed, shuffle=True)
    return parts["train"], parts["test"]


def _read(path: str | os.PathLike, config: DataConfig) -> tuple[datasets.Dataset, str, int]:
    """Rows of one file in the common form, their format, and how many bad rows were dropped."""
    raw = load_source(path)
    rows, fmt = normalize(raw, config.format, config.on_bad_rows, source=str(path))
    return rows, fmt, len(raw) - len(rows)


def load_examples(config: DataConfig, tokenizer: Any | None = None) -> Examples:
    """Read, validate and split the configured data, without tokenizing.

    Args:
        config: the data settings.
        tokenizer: only used by ``bbc-news`` to measure the article budget in tokens; None
            approximates it by words (good enough for validation).

    Raises:
        FileNotFoundError, ValueError: a missing or unreadable file, an unsupported type, an
            empty dataset, unknown or mismatched columns, a malformed row, a bad row (one without
            an answer, a prompt or a label) unless ``data.on_bad_rows=drop``, an impossible split.
    """
    if config.is_builtin:
        train, evaluation = build_bbc_datasets(
            tokenizer, config.article_tokens, config.eval_size, config.seed, config.max_train_examples
        )
        return Examples(train, evaluation, "chat")
    train, fmt, train_dropped = _read(config.source, config)
    eval_dropped = 0
    if config.eval_source is not None:
        evaluation, eval_fmt, eval_dropped = _read(config.eval_source, config)
        if eval_fmt != fmt:
            logger.warning("Train data is in %s format and eval data in %s format", fmt, eval_fmt)
        train = train.shuffle(seed=config.seed)
    else:
        train, evaluation = _split(train, config)
    if config.max_train_examples is not None:
        train = train.select(range(min(config.max_train_examples, len(train))))
    return Examples(train, evaluation, fmt, train_dropped, eval_dropped)


def validate_data(config: DataConfig) -> Examples:
    """Alias of :func:`load_examples` without a tokenizer: the pre-model data check."""
    return load_examples(config, tokenizer=None)


def prepare_datasets(config: DataConfig, tokenizer: Any, examples: Examples | None = None) -> PreparedData:
    """Tokenize (and pack) the configured data for training.

    Args:
        config: the data settings.
        tokenizer: the model's tokenizer (its chat template, eos and pad token are used).
        examples: the result of :func:`load_examples` if already computed (for bbc-news, pass
            one computed with this tokenizer so the article budget is in its tokens).

    Returns:
        Datasets, their stats and the collator.

    Raises:
        deltatune.data.templates.TemplateError: the template cannot render the data.
        ValueError: the tokenizer has neither a pad nor an eos token.
    """
    if examples is None:
        examples = load_examples(config, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither a pad nor an eos token; set tokenizer.pad_token first.")
    template = resolve_template(config.template, tokenizer)
    train, train_stats = tokenize_dataset(examples.train, tokenizer, template, config.max_length, config.train_on_prompt)
    train_stats = replace(train_stats, bad_rows=examples.train_dropped)  # the report's "dropped" counts them too
    logger.info("train: %s", train_stats.summary())
    evaluation, eval_stats = None, None
    if examples.eval is not None:
        evaluation, eval_stats = tokenize_dataset(
            examples.eval, tokenizer, template, config.max_length, config.train_on_prompt
        )
        eval_stats = replace(eval_stats, bad_rows=examples.eval_dropped)
        logger.info("eval: %s", eval_stats.summary())
    if config.packing:
        train = pack_examples(train, config.max_length)
        logger.info("packed %d examples into %d rows of <= %d tokens", train_stats.examples, len(train), config.max_length)
    collator = Collator(pad_token_id=pad_id, packed_mask=config.packed_mask)
    return PreparedData(train, evaluation, collator, template, train_stats, eval_stats)
