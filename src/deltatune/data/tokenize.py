"""Tokenize rendered examples with label masking and truncation.

Labels follow transformers' causal-LM convention: ``labels[t]`` is the token at ``t`` and the
model shifts them, so a label of ``-100`` at ``t`` means "do not train on predicting token t".
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Any

import datasets

from deltatune.data.templates import Segment, render_segments

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value that the loss skips (``torch.nn.CrossEntropyLoss``'s default ignore_index)."""


@dataclass(frozen=True)
class TokenizeStats:
    """Counts from tokenizing one dataset, reported before training starts."""

    examples: int
    """Examples kept."""

    truncated: int
    """Examples longer than ``max_length`` that were cut (and kept, if labels remained)."""

    dropped: int
    """Examples left with no trainable token (all labels -100, usually after truncation) and removed."""

    tokens: int
    """Tokens in the kept examples."""

    label_tokens: int
    """Tokens that carry a label."""

    longest: int
    """Length of the longest kept example, after truncation."""

    bad_rows: int = 0
    """Rows dropped before tokenizing for lacking an answer, a prompt or a label
    (``data.on_bad_rows=drop``); not included in :attr:`dropped`."""

    def summary(self) -> str:
        """One line for logs, e.g. ``2025 examples, 12 truncated, 3 dropped (2 bad rows, 1 with no trainable
        token), 310k tokens (4% labelled)``."""
        share = 100 * self.label_tokens / max(self.tokens, 1)
        dropped = f"{self.dropped + self.bad_rows} dropped"
        if self.bad_rows:
            why = [f"{self.bad_rows} bad row{'s' if self.bad_rows != 1 else ''}"]
            why += [f"{self.dropped} with no trainable token"] if self.dropped else []
            dropped += f" ({', '.join(why)})"
        return (
            f"{self.examples} examples, {self.truncated} truncated, {dropped}, {self.tokens} tokens "
            f"({share:.1f}% labelled), longest {self.longest}"
        )


def _attribute(segments: list[Segment], offsets: list[tuple[int, int]]) -> list[bool]:
    # Each token belongs to the segment its first character falls in.
    starts, flags, pos = [], [], 0
    for seg, trainable in segments:
        starts.append(pos)
        flags.append(trainable)
        pos += len(seg)
    return [flags[bisect.bisect_right(starts, start) - 1] for start, _ in offsets]


def _encode_many(examples: list[list[Segment]], tokenizer: Any) -> list[tuple[list[int], list[bool]]]:
    if getattr(tokenizer, "is_fast", False):
        # One pass over each example's full text keeps the tokenization identical to inference
        # (BPE merges can cross segment boundaries); offsets then attribute tokens to segments.
        texts = ["".join(s for s, _ in segs) for segs in examples]
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [
            (list(ids), _attribute(segs, offsets))
            for segs, ids, offsets in zip(examples, enc["input_ids"], enc["offset_mapping"])
        ]
    # Slow tokenizers have no offsets; tokenizing segment by segment is exact at the segment level.
    out = []
    for segs in examples:
        ids: list[int] = []
        trainable: list[bool] = []
        for seg, flag in segs:
            piece = tokenizer(seg, add_special_tokens=False)["input_ids"]
            ids += piece
            trainable += [flag] * len(piece)
        out.append((ids, trainable))
    return out


def _finish(ids: list[int], trainable: list[bool], max_length: int, train_on_prompt: bool) -> dict:
    truncated = len(ids) > max_length
    ids, trainable = ids[:max_length], trainable[:max_length]
    labels = [tok if (flag or train_on_prompt) else IGNORE_INDEX for tok, flag in zip(ids, trainable)]
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


def tokenize_segments(
    segments: list[Segment], tokenizer: Any, max_length: int, train_on_prompt: bool = False
) -> dict:
    """Token ids and labels for one rendered example.

    Args:
        segments: from :func:`deltatune.data.templates.render_segments`.
        tokenizer: a transformers tokenizer (fast ones are tokenized in one pass).
        max_length: keep at most this many tokens (the end is cut).
        train_on_prompt: give every token a label, not only the trainable segments'.

    Returns:
        ``{"input_ids": [...], "labels": [...], "truncated": bool}``.
    """
    (ids, trainable), = _encode_many([segments], tokenizer)
    return _finish(ids, trainable, max_length, train_on_prompt)


def tokenize_dataset(
    ds: datasets.Dataset, tokenizer: Any, template: str, max_length: int, train_on_prompt: bool = False
) -> tuple[datasets.Dataset, TokenizeStats]:
    """Render and tokenize every row of a normalised dataset.

    Columns other than ``messages``/``text`` (e.g. ``label``) are kept, so evaluation can score
    generations against them. Rows left without any label are removed and counted.

    Returns:
        ``(dataset with input_ids and labels added, stats)``.
    """
    def encode(batch: dict[str, list]) -> dict[str, list]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        rendered = [render_segments(row, tokenizer, template) for row in rows]
        done = [_finish(ids, flags, max_length, train_on_prompt) for ids, flags in _encode_many(rendered, tokenizer)]
        return {key: [d[key] for d in done] for key in ("input_ids", "labels", "truncated")}

    out = ds.map(encode, batched=True, batch_size=256, desc="Tokenizing")
    # Position 0's label is never used (labels are shifted), so it does not count as trainable.
    n_labels = [sum(lab != IGNORE_INDEX for lab in labels[1:]) for labels in out["labels"][:]]
    keep = [i for i, n in enumerate(n_labels) if n > 0]
    kept = (out if len(keep) == len(out) else out.select(keep)).remove_columns("truncated")
    lengths = [len(ids) for ids in kept["input_ids"][:]]
    stats = TokenizeStats(
        examples=len(kept),
        truncated=sum(out["truncated"][:]),
        dropped=len(out) - len(kept),
        tokens=sum(lengths),
        label_tokens=sum(n_labels[i] for i in keep),
        longest=max(lengths, default=0),
    )
    if stats.truncated or stats.dropped:
        logger.warning(
            "%d of %d examples exceeded max_length=%d and were truncated; %d were dropped with no trainable token left. "
            "Raise data.max_length to keep them whole.", stats.truncated, len(out), max_length, stats.dropped,
        )
    return kept, stats
