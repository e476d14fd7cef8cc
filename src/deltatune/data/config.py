"""The data section of a training config: where examples come from and how they become token rows."""
from __future__ import annotations

from dataclasses import asdict, dataclass

BUILTIN_SOURCES = ("bbc-news",)
"""Dataset names that need no file: ``bbc-news`` is the default topic-classification set."""

FORMATS = ("auto", "alpaca", "chat", "sharegpt", "prompt_completion", "text")
"""Accepted values of :attr:`DataConfig.format`."""

TEMPLATES = ("auto", "tokenizer", "chatml", "llama2", "alpaca", "plain")
"""Accepted values of :attr:`DataConfig.template`."""

PACKED_MASKS = ("4d", "position_ids")
"""Accepted values of :attr:`DataConfig.packed_mask`."""

ON_BAD_ROWS = ("error", "drop")
"""Accepted values of :attr:`DataConfig.on_bad_rows`."""

BBC_PROMPT_TOKENS = 64
"""Room ``bbc-news`` examples need besides the article: system and user instructions plus the
answer take ~60 SmolLM2 tokens in ChatML."""


@dataclass(frozen=True)
class DataConfig:
    """How ``deltatune train`` reads, renders, tokenizes and batches its data."""

    source: str = "bbc-news"
    """A built-in dataset name (``bbc-news``) or a path to a .jsonl/.json/.csv/.parquet file."""

    eval_source: str | None = None
    """Optional separate eval file. When None, :attr:`eval_size` examples are split off the source."""

    format: str = "auto"
    """Row format: ``alpaca``, ``chat`` (a ``messages`` column), ``sharegpt`` (``conversations``),
    ``prompt_completion``, ``text``, or ``auto`` to detect it from the column names."""

    template: str = "auto"
    """How messages become text: ``tokenizer`` (its chat template), a built-in (``chatml``,
    ``llama2``, ``alpaca``, ``plain``), or ``auto``: the tokenizer's template if it has one, else chatml."""

    max_length: int = 256
    """Tokens per example (and per packed row). Longer examples are truncated and counted."""

    packing: bool = False
    """Pack several short examples into each row, with attention kept inside each example."""

    packed_mask: str = "4d"
    """How packed rows keep examples apart: ``4d`` passes a block-diagonal causal float mask as
    ``attention_mask`` (works with eager and sdpa, cache or not); ``position_ids`` passes no mask
    and relies on transformers detecting restarts in ``position_ids``, which it only does when the
    forward runs with ``use_cache=False``."""

    train_on_prompt: bool = False
    """Also train on prompt/system/user tokens. By default only assistant tokens carry labels."""

    eval_size: int = 200
    """Examples held out for evaluation when :attr:`eval_source` is None (0 for none). For
    ``bbc-news`` the split is stratified by topic."""

    max_train_examples: int | None = None
    """Keep at most this many training examples (after the split), to shorten CPU runs."""

    on_bad_rows: str = "error"
    """What to do with a row that lacks content every row needs: an answer (a null, missing or blank
    ``completion``/``output``/``text``/assistant message, or a CSV row with too few fields), a
    ``prompt``/``instruction``, or a ``label`` when the file has a label column. ``error`` stops
    before training, naming the file and the first such row; ``drop`` removes them and counts them
    in the report's "dropped" figure. Rows of the wrong shape (wrong types, unknown roles) are
    always an error."""

    seed: int = 0
    """Seed of the train/eval split and of the subsampling; the same seed gives the same split."""

    article_tokens: int = 112
    """``bbc-news`` only: token budget for the article's opening shown in the prompt."""

    add_special_tokens: tuple[str, ...] = ()
    """Special tokens to add to the tokenizer (e.g. ``["<tool_call>", "</tool_call>"]``): the embeddings are
    resized, the new rows train (LoRA's ``trainable_token_indices``, or ``trainable_tokens``' ``token_indices``),
    and the tokenizer is saved next to the adapter."""

    def __post_init__(self) -> None:
        def fail(field: str, got: object, expected: str) -> None:
            raise ValueError(f"DataConfig.{field} is {got!r}; expected {expected}.")

        if not isinstance(self.source, str) or not self.source.strip():
            fail("source", self.source, f"a built-in name ({', '.join(BUILTIN_SOURCES)}) or a file path")
        if self.format not in FORMATS:
            fail("format", self.format, f"one of {', '.join(FORMATS)}")
        if self.template not in TEMPLATES:
            fail("template", self.template, f"one of {', '.join(TEMPLATES)}")
        if self.packed_mask not in PACKED_MASKS:
            fail("packed_mask", self.packed_mask, f"one of {', '.join(PACKED_MASKS)}")
        if self.on_bad_rows not in ON_BAD_ROWS:
            fail("on_bad_rows", self.on_bad_rows, f"one of {', '.join(ON_BAD_ROWS)}")
        if not isinstance(self.max_length, int) or self.max_length < 8:
            fail("max_length", self.max_length, "an integer >= 8 (tokens per example)")
        if not isinstance(self.eval_size, int) or self.eval_size < 0:
            fail("eval_size", self.eval_size, "an integer >= 0 (0 disables the eval split)")
        limit = self.max_train_examples
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            fail("max_train_examples", self.max_train_examples, "None or an integer >= 1")
        if not isinstance(self.article_tokens, int) or self.article_tokens < 8:
            fail("article_tokens", self.article_tokens, "an integer >= 8")
        if self.is_builtin and self.article_tokens + BBC_PROMPT_TOKENS > self.max_length:
            # Truncation cuts the end of an example, i.e. the answer: leave room for prompt and answer.
            fail("article_tokens", self.article_tokens,
                 f"at most max_length - {BBC_PROMPT_TOKENS} = {self.max_length - BBC_PROMPT_TOKENS} (the instructions "
                 "and the answer need the rest); lower it or raise max_length")
        if self.is_builtin and self.eval_source is not None:
            fail("eval_source", self.eval_source, f"None for the built-in {self.source!r} dataset (use eval_size)")
        tokens = self.add_special_tokens
        if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, str) and t.strip() for t in tokens) \
                or len(set(tokens)) != len(tokens):
            fail("add_special_tokens", tokens, 'a list of distinct non-empty strings, e.g. ["<tool_call>"]')
        object.__setattr__(self, "add_special_tokens", tuple(tokens))
        if self.is_builtin and self.format not in ("auto", "chat"):
            fail("format", self.format, f"'auto' for the built-in {self.source!r} dataset (it is already chat-formatted)")

    @property
    def is_builtin(self) -> bool:
        """True when :attr:`source` names a built-in dataset rather than a file."""
        return self.source in BUILTIN_SOURCES

    def to_dict(self) -> dict:
        """Plain dict of the fields, for writing into a run's config file."""
        return {**asdict(self), "add_special_tokens": list(self.add_special_tokens)}

    @classmethod
    def from_dict(cls, values: dict) -> "DataConfig":
        """Build from a dict (e.g. the ``data:`` section of a YAML config).

        Raises:
            ValueError: a key is not a DataConfig field (the message lists the valid ones).
        """
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown data config key(s) {unknown}; valid keys are {sorted(known)}.")
        return cls(**values)
