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

import datasets

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


def _check_messages(messages: list[dict], index: int) -> list[dict]:
    for turn, msg in enumerate(messages):
        if msg["role"] not in ROLES:
            raise ValueError(f"Row {index}, message {turn}: role {msg['role']!r} is not one of {', '.join(ROLES)}.")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(
            f"Row {index} has no assistant message (roles: {[m['role'] for m in messages]}); expected at least one, "
            "since only assistant turns are trained on. Use format 'text' to train on whole documents."
        )
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
    instruction = _string(row["instruction"], "instruction", index)
    extra = _string(row.get("input"), "input", index)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _string(row["output"], "output", index)}]


def _prompt_completion(row: dict, index: int) -> list[dict]:
    return [
        {"role": "user", "content": _string(row["prompt"], "prompt", index)},
        {"role": "assistant", "content": _string(row["completion"], "completion", index)},
    ]


_CONVERTERS = {"chat": _chat, "sharegpt": _sharegpt, "alpaca": _alpaca, "prompt_completion": _prompt_completion}


def normalize_row(row: dict, fmt: str, index: int = 0) -> dict:
    """Convert one row of format ``fmt`` into ``{"messages": [...], "text": str}``.

    Raises:
        ValueError: the row's content does not fit the format (the message names the row).
    """
    if fmt == "text":
        text = _string(row["text"], "text", index)
        if not text.strip():
            raise ValueError(f"Row {index}: 'text' is empty; expected a document to train on.")
        return {"messages": [], "text": text}
    return {"messages": _CONVERTERS[fmt](row, index), "text": ""}


def normalize(ds: datasets.Dataset, fmt: str = "auto") -> tuple[datasets.Dataset, str]:
    """Convert every row of ``ds`` into the common form.

    Args:
        ds: rows in one of the supported layouts.
        fmt: a format name, or ``"auto"`` to detect it from the column names.

    Returns:
        ``(normalised dataset, format used)``.

    Raises:
        ValueError: the format is unknown or its columns are missing, or a row is malformed.
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
        **{c: ds.features[c] for c in KEPT_COLUMNS if c in ds.column_names},
    })
    out = ds.map(
        lambda row, i: normalize_row(row, fmt, i), with_indices=True, remove_columns=drop, features=features,
        desc=f"Reading {fmt} rows",
    )
    return out, fmt
