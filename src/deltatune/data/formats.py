"""Convert rows of the common dataset layouts into one form: chat messages, or plain text.

After :func:`normalize` every row has two columns (plus ``label`` when the source has one):

- ``messages``: a list of ``{"role": "system"|"user"|"assistant", "content": str}``; the
  assistant turns are what the model is trained to produce.
- ``text``: a plain document trained on in full; ``""`` for chat rows, and ``messages`` is ``[]``
  for text rows.

Prompt/completion and alpaca rows become a user turn and an assistant turn, so one renderer
(:mod:`deltatune.data.templates`) serves every layout.
"""
from __future__ import annotations

import logging

import datasets

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
"""Roles a normalised message may have."""

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
"""ShareGPT ``from`` values -> roles."""

REQUIRED_COLUMNS = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
"""Columns each format needs; detection tries them in this order."""

KEPT_COLUMNS = ("label",)
"""Source columns carried through unchanged (``label`` is used for accuracy scoring)."""

MISSING = "(missing or null)"
"""How a bad row's reason says that a field has no value."""

CSV_MISSING = "(an empty field, or a row with fewer fields than the header)"
"""What :data:`MISSING` means in a CSV file, whose reader turns both into nulls."""


class BadRow(ValueError):
    """A row lacks content every row needs: an answer, a prompt, or a label in a labelled file.

    Unlike a row of the wrong shape (a plain ValueError), a bad row can be skipped:
    ``data.on_bad_rows`` decides whether it stops the run or is dropped and counted.
    """

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"Row {index} {reason}.")
        self.reason = reason
        """What is missing, as a clause after "Row N", e.g. ``has no 'completion' (missing or null)``."""


def detect_format(columns: list[str]) -> str:
    """Name the format whose required columns are all present (first match in :data:`REQUIRED_COLUMNS`).

    Raises:
        ValueError: no format matches; the message lists the columns found and those expected.
    """
    for fmt, required in REQUIRED_COLUMNS.items():
        if all(col in columns for col in required):
            return fmt
    raise ValueError(f"Cannot tell the data format from columns {sorted(columns)}; expected {_expected()}.")


def _expected() -> str:
    return "; ".join(f"{fmt}: {', '.join(cols)}" for fmt, cols in REQUIRED_COLUMNS.items()) + (
        " (or set `format:` explicitly)"
    )


def check_columns(columns: list[str], fmt: str) -> None:
    """Raise ValueError naming the missing and found columns if ``fmt`` cannot read them."""
    missing = [c for c in REQUIRED_COLUMNS[fmt] if c not in columns]
    if missing:
        raise ValueError(
            f"Format {fmt!r} needs column(s) {', '.join(REQUIRED_COLUMNS[fmt])}, but {', '.join(missing)} "
            f"missing; the data has columns {sorted(columns)}. Rename the columns, or pick the matching format: "
            f"{_expected()}."
        )


def _string(value: object, what: str, index: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"Row {index}: {what} is a {type(value).__name__} ({value!r:.60}); expected a string.")
    return value


def _required(value: object, what: str, index: int) -> str:
    """A field every row needs: a null (or a key absent from this row) makes the row bad."""
    if value is None:
        raise BadRow(index, f"has no {what!r} {MISSING}")
    return _string(value, what, index)


def _answer(value: object, what: str, index: int) -> str:
    """A trained-on answer: besides missing, a blank one would teach the model to say nothing."""
    text = _required(value, what, index)
    if not text.strip():
        raise BadRow(index, f"has an empty {what!r}")
    return text


def _check_messages(messages: list[dict], index: int) -> list[dict]:
    for turn, msg in enumerate(messages):
        if msg["role"] not in ROLES:
            raise ValueError(f"Row {index}, message {turn}: role {msg['role']!r} is not one of {', '.join(ROLES)}.")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow(
            index, f"has no assistant message (roles: {[m['role'] for m in messages]}); only assistant turns are "
            "trained on, so every row needs one (use format 'text' to train on whole documents)"
        )
    for turn, msg in enumerate(messages):
        if msg["role"] == "assistant" and not msg["content"].strip():
            raise BadRow(index, f"message {turn} (assistant) has no content (missing, null or blank)")
    return messages


def _chat(row: dict, index: int) -> list[dict]:
    raw = row["messages"]
    if not isinstance(raw, list):
        raise ValueError(f"Row {index}: 'messages' is a {type(raw).__name__}; expected a list of {{role, content}}.")
    msgs = []
    for turn, m in enumerate(raw):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"Row {index}, message {turn}: {m!r:.80} lacks 'role'/'content'; expected both keys.")
        msgs.append({"role": str(m["role"]), "content": _string(m["content"], f"message {turn} content", index)})
    return _check_messages(msgs, index)


def _sharegpt(row: dict, index: int) -> list[dict]:
    raw = row["conversations"]
    if not isinstance(raw, list):
        raise ValueError(f"Row {index}: 'conversations' is a {type(raw).__name__}; expected a list of {{from, value}}.")
    msgs = []
    for turn, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ValueError(
                f"Row {index}, turn {turn}: {m!r:.80} is not a mapping; expected {{'from': ..., 'value': ...}}."
            )
        # Arrow fills keys that only other rows use with None, so fall back on None, not on absence.
        speaker = m.get("from") or m.get("role")
        content = m["value"] if m.get("value") is not None else m.get("content")
        if speaker not in SHAREGPT_ROLES:
            raise ValueError(
                f"Row {index}, turn {turn}: speaker {speaker!r} is not one of {', '.join(SHAREGPT_ROLES)}; "
                "expected ShareGPT turns like {'from': 'human', 'value': ...}."
            )
        msgs.append({"role": SHAREGPT_ROLES[speaker], "content": _string(content, f"turn {turn} value", index)})
    return _check_messages(msgs, index)


def _alpaca(row: dict, index: int) -> list[dict]:
    instruction = _required(row["instruction"], "instruction", index)
    extra = _string(row.get("input"), "input", index)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _answer(row["output"], "output", index)}]


def _prompt_completion(row: dict, index: int) -> list[dict]:
    return [
        {"role": "user", "content": _required(row["prompt"], "prompt", index)},
        {"role": "assistant", "content": _answer(row["completion"], "completion", index)},
    ]


_CONVERTERS = {"chat": _chat, "sharegpt": _sharegpt, "alpaca": _alpaca, "prompt_completion": _prompt_completion}


def normalize_row(row: dict, fmt: str, index: int = 0) -> dict:
    """Convert one row of format ``fmt`` into ``{"messages": [...], "text": str}``.

    Args:
        row: the source row (a ``label`` key, if present, must hold a label).
        fmt: its format.
        index: the row's number in error messages.

    Raises:
        BadRow: the row lacks an answer, a prompt or a label (see :class:`BadRow`).
        ValueError: the row's content does not fit the format (the message names the row).
    """
    if fmt == "text":
        out = {"messages": [], "text": _answer(row["text"], "text", index)}
    else:
        out = {"messages": _CONVERTERS[fmt](row, index), "text": ""}
    label = row.get("label")
    if "label" in row and (label is None or (isinstance(label, str) and not label.strip())):
        raise BadRow(index, f"has no 'label' {MISSING}; the data has a label column, which scores accuracy, so "
                            "every row needs one")
    return out


def normalize(
    ds: datasets.Dataset, fmt: str = "auto", on_bad_rows: str = "error", source: str | None = None
) -> tuple[datasets.Dataset, str]:
    """Convert every row of ``ds`` into the common form.

    Args:
        ds: rows in one of the supported layouts.
        fmt: a format name, or ``"auto"`` to detect it from the column names.
        on_bad_rows: ``error`` or ``drop``: what to do with rows that lack an answer, a prompt or a
            label (:class:`BadRow`). Dropped rows are logged; ``len(ds) - len(result)`` counts them.
        source: the file the rows come from, named in errors; rows are numbered from 1.

    Returns:
        ``(normalised dataset, format used)``.

    Raises:
        ValueError: the format is unknown or its columns are missing, a row is malformed, or there
            is a bad row and ``on_bad_rows`` is ``error`` (or every row is bad).
    """
    if fmt == "auto":
        fmt = detect_format(ds.column_names)
    elif fmt not in REQUIRED_COLUMNS:
        raise ValueError(f"Unknown data format {fmt!r}; expected 'auto' or one of {', '.join(REQUIRED_COLUMNS)}.")
    check_columns(ds.column_names, fmt)
    drop = [c for c in ds.column_names if c not in KEPT_COLUMNS]
    features = datasets.Features({
        "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "text": datasets.Value("string"),
        "bad": datasets.Value("string"),
        **{c: ds.features[c] for c in KEPT_COLUMNS if c in ds.column_names},
    })

    def convert(row: dict, i: int) -> dict:
        try:
            return {**normalize_row(row, fmt, i + 1), "bad": ""}
        except BadRow as err:  # collected, so the error can count them all or drop can remove them
            return {"messages": [], "text": "", "bad": err.reason}
        except ValueError as err:
            if source is None:
                raise
            raise ValueError(f"Data file {source!r}: {err}") from err

    out = ds.map(convert, with_indices=True, remove_columns=drop, features=features, desc=f"Reading {fmt} rows")
    reasons = out["bad"][:]
    out = out.remove_columns("bad")
    bad = [i for i, reason in enumerate(reasons) if reason]
    if not bad:
        return out, fmt
    first = reasons[bad[0]]
    if source is not None and source.lower().endswith(".csv"):
        first = first.replace(MISSING, CSV_MISSING)
    where, name = (f"Data file {source!r}, row", repr(source)) if source is not None else ("Row", "the data")
    if on_bad_rows != "drop":
        raise ValueError(
            f"{where} {bad[0] + 1} {first}. {len(bad)} of {len(out)} rows lack an answer, a prompt or a label; fix or "
            "remove them, or set data.on_bad_rows=drop to skip such rows."
        )
    if len(bad) == len(out):
        raise ValueError(
            f"data.on_bad_rows=drop would drop all {len(out)} rows of {name}, leaving nothing; "
            f"row 1 {first}. Check the format and the column names of the file."
        )
    logger.warning("Dropped %d of %d rows of %s that lack an answer, a prompt or a label (data.on_bad_rows=drop); "
                   "the first is row %d, which %s", len(bad), len(out), name, bad[0] + 1, first)
    bad_set = set(bad)
    return out.select([i for i in range(len(out)) if i not in bad_set]), fmt
