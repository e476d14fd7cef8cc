"""Pack short examples into rows of ``max_length`` tokens, and collate padded or packed batches.

Packed examples must not see each other. Two things make a packed row compute exactly what each
example computes alone (checked by ``tests/test_data_packing.py`` on a tiny LLaMA):

- ``position_ids`` restart at 0 for every example, so rotary/learned positions match;
- attention is block-diagonal causal. In transformers 5.23 the dependable way on CPU is a 4D
  additive float mask ``(batch, 1, T, T)`` (0 where allowed, the dtype's minimum elsewhere)
  passed as ``attention_mask``: ``create_causal_mask`` hands a 4D mask to the kernel unchanged, and
  both the ``sdpa`` and ``eager`` kernels add it to the scores. A 4D *boolean* mask is right for
  sdpa but wrong for eager (which adds it, turning True into +1). Passing no mask and letting
  transformers detect the restarts in ``position_ids`` also works, but only when the forward runs
  with ``use_cache=False``: with a cache (LLaMA's default, even in train mode) the detection is
  skipped and examples silently attend across boundaries.

Each example's first label is set to -100 in a packed row: alone, nothing predicts an example's
first token, and packed, the previous example's last token must not learn to predict it.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from deltatune.data.tokenize import IGNORE_INDEX


def pack_examples(ds: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Pack tokenized examples into rows of at most ``max_length`` tokens (best-fit decreasing).

    Args:
        ds: rows with ``input_ids`` and ``labels`` (lists, each at most ``max_length`` long).
        max_length: tokens per packed row.

    Returns:
        A dataset with ``input_ids``, ``labels`` and ``position_ids`` per packed row. Other
        columns are not carried over (a row holds several examples).

    Raises:
        ValueError: an example is longer than ``max_length`` (tokenize with the same limit).
    """
    # Column[:] materialises a Python list in one Arrow call; indexing a Column row by row is slow.
    ids_col, labels_col = ds["input_ids"][:], ds["labels"][:]
    lengths = [len(ids) for ids in ids_col]
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise ValueError(
            f"{len(too_long)} example(s) (first: row {too_long[0]}, {lengths[too_long[0]]} tokens) exceed "
            f"max_length={max_length}; tokenize with the same max_length before packing."
        )
    # Best-fit decreasing: longest first, each into the fullest row that still has room for it.
    # `open_rows` is kept sorted by (free room, row index), so the choice is one bisect and ties
    # resolve the same way every run.
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []
    for i in order:
        k = bisect.bisect_left(open_rows, (lengths[i], -1))
        if k < len(open_rows):
            free, b = open_rows.pop(k)
        else:
            free, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if free - lengths[i] > 0:
            bisect.insort(open_rows, (free - lengths[i], b))
    rows: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    for members in bins:
        ids, labels, pos = [], [], []
        for i in sorted(members):
            ids += ids_col[i]
            labels += [IGNORE_INDEX] + list(labels_col[i][1:])
            pos += list(range(lengths[i]))
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        rows["position_ids"].append(pos)
    return datasets.Dataset.from_dict(rows)


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive attention mask keeping each packed example to itself, from restarting positions.

    Args:
        position_ids: ``(B, T)``, restarting at 0 at the start of every example.
        dtype: mask dtype; 0 marks allowed pairs, ``finfo(dtype).min`` blocked ones.

    Returns:
        ``(B, 1, T, T)`` mask: query t attends to key s iff s <= t and both are in the same example.
    """
    seq = (position_ids == 0).cumsum(-1)  # (B, T) example index of each token
    T = position_ids.shape[-1]
    same = seq[:, :, None] == seq[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()  # (T, T)
    allowed = (same & causal)[:, None]  # (B, 1, T, T)
    return torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


@dataclass(frozen=True)
class Collator:
    """Turn a list of tokenized (or packed) rows into a batch of tensors, padding on the right.

    Unpacked rows get ``input_ids``, ``labels`` and a 2D ``attention_mask``. Packed rows (those
    with ``position_ids``) get ``position_ids`` and, with ``packed_mask="4d"``, the 4D mask of
    :func:`block_causal_mask`; padding then forms its own block of positions and labels -100.
    Columns other than these (``messages``, ``label``...) are ignored.
    """

    pad_token_id: int
    """Id written into padded positions of ``input_ids`` (they never carry a label)."""

    packed_mask: str = "4d"
    """For packed rows: ``"4d"`` (block-diagonal float mask) or ``"position_ids"`` (no mask;
    the model must be run with ``use_cache=False``)."""

    mask_dtype: torch.dtype = torch.float32
    """dtype of the 4D mask; float32 works for float32 and bfloat16 models under sdpa and eager."""

    pad_to_multiple_of: int | None = None
    """Round the batch length up to a multiple of this (None: the longest row)."""

    def __post_init__(self) -> None:
        if self.packed_mask not in ("4d", "position_ids"):
            raise ValueError(f"Collator.packed_mask is {self.packed_mask!r}; expected '4d' or 'position_ids'.")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"Collator.pad_to_multiple_of is {self.pad_to_multiple_of}; expected None or >= 1.")

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("Collator got an empty batch; expected at least one row.")
        T = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = "position_ids" in rows[0]
        batch = {
            "input_ids": torch.full((len(rows), T), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long),
        }
        if packed:
            # Padding restarts at position 0: it becomes one more "example" that attends only to itself.
            batch["position_ids"] = torch.arange(T).repeat(len(rows), 1)
        else:
            batch["attention_mask"] = torch.zeros((len(rows), T), dtype=torch.long)
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            batch["input_ids"][b, :n] = torch.as_tensor(row["input_ids"])
            batch["labels"][b, :n] = torch.as_tensor(row["labels"])
            if packed:
                batch["position_ids"][b, :n] = torch.as_tensor(row["position_ids"])
                batch["position_ids"][b, n:] = torch.arange(T - n)
            else:
                batch["attention_mask"][b, :n] = 1
        if packed and self.packed_mask == "4d":
            batch["attention_mask"] = block_causal_mask(batch["position_ids"], self.mask_dtype)
        return batch
