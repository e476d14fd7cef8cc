"""Read a local data file into a ``datasets.Dataset``, failing early and clearly.

Everything here runs before any model is loaded, so a typo in a path or an empty file costs a
second, not a model load.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import datasets

LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
"""File extension -> ``datasets`` builder name."""


def check_source_path(path: str | os.PathLike) -> Path:
    """Return ``path`` as a Path after checking that it is a readable file of a supported type.

    Raises:
        FileNotFoundError: nothing exists at ``path``, or it is a folder.
        ValueError: the extension is not one of .jsonl, .json, .csv, .parquet.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"Data file {str(p)!r} does not exist; expected a .jsonl/.json/.csv/.parquet file or a built-in "
            "dataset name such as 'bbc-news'. Check the path (relative paths start at the current folder)."
        )
    if p.is_dir():
        raise FileNotFoundError(f"Data source {str(p)!r} is a folder; expected one data file inside it.")
    if p.suffix.lower() not in LOADERS:
        raise ValueError(
            f"Data file {str(p)!r} has unsupported extension {p.suffix or '(none)'!r}; expected one of "
            f"{', '.join(LOADERS)}. Convert it, or rename it if the content already is one of these."
        )
    return p


def load_source(path: str | os.PathLike) -> datasets.Dataset:
    """Load a local data file as one ``datasets.Dataset`` (all rows, no split).

    ``.json`` files may hold a list of records or JSON lines; ``.jsonl`` holds one JSON object per
    line; ``.csv`` needs a header row.

    Args:
        path: the file.

    Returns:
        The rows, with the file's columns.

    Raises:
        FileNotFoundError, ValueError: see :func:`check_source_path`; also ValueError when the
            file cannot be parsed as its extension says, or holds no rows.
    """
    p = check_source_path(path)
    builder = LOADERS[p.suffix.lower()]
    if p.stat().st_size == 0:
        raise ValueError(f"Data file {str(p)!r} is empty; expected at least one example.")
    try:
        # keep_in_memory: small local files gain nothing from an Arrow cache under ~/.cache.
        ds = datasets.load_dataset(builder, data_files=str(p), split="train", keep_in_memory=True)
    except Exception as err:  # datasets wraps parser errors in several types; report them all the same way
        cause = err.__cause__ or err
        if builder == "json" and isinstance(cause, KeyError):
            # datasets before 5.0 cannot read JSON rows that lack a key other rows have; such rows are
            # the bad rows data.on_bad_rows reports, so read the records here, a missing key as None.
            records = _json_records(p)
            if records is not None:
                return _from_records(records)
        raise ValueError(
            f"Could not read {str(p)!r} as {builder} ({type(cause).__name__}: {cause}). "
            f"Expected valid {p.suffix} content" + (" with a header row." if builder == "csv" else ".")
        ) from err
    if len(ds) == 0 or not ds.column_names:
        raise ValueError(f"Data file {str(p)!r} holds no rows; expected at least one example.")
    return ds


def _json_records(p: Path) -> list[dict] | None:
    """The objects of a JSON-lines file or a JSON list, or None if it is neither."""
    text = p.read_text()
    try:
        data = json.loads(text)
        rows = data if isinstance(data, list) else None
    except json.JSONDecodeError:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            return None
    return rows if rows and all(isinstance(r, dict) for r in rows) else None


def _from_records(records: list[dict]) -> datasets.Dataset:
    keys = list(dict.fromkeys(k for r in records for k in r))  # every key any row has, in first-seen order
    return datasets.Dataset.from_dict({k: [r.get(k) for r in records] for k in keys})
