"""The running batch's KV cache: one transformers ``DynamicCache``, rows left-padded to a common length.

Why left padding in one batched cache (rather than a cache per sequence, or paged blocks):
- a decode step is then one plain forward of the model, (B, 1) tokens against a (B, H, T, D) cache
  with a (B, T) attention mask, exactly how ``model.generate`` runs a left-padded batch; no attention
  kernel of our own, so every transformers causal LM whose layers keep a full-attention cache works;
- the cache is only rebuilt when the batch changes (a request joins or leaves), not every step: a
  join pads the shorter side on the left and concatenates; a leave selects the remaining rows and
  drops leading columns that are padding in every row. Between changes, the model appends in place.
The price is padding: a short request that joins a batch of long ones carries empty columns until
the long ones finish. For the CPU and small models this serves, that costs far less than copying
per-sequence caches into a batch at every step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def check_supported(model) -> None:
    """Raise unless the model's cache is made of plain full-attention layers (left-pad merging is exact there).

    Raises:
        ValueError: the model uses sliding-window, linear-attention or other cache layers.
    """
    cache = DynamicCache(config=model.config)
    kinds = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if kinds:
        raise ValueError(
            f"deltatune serve batches sequences in a left-padded full-attention KV cache, but this model's cache has "
            f"{sorted(kinds)} layers (sliding window or recurrent state); serve it with vLLM instead"
        )


@dataclass
class BatchCache:
    """KV cache and attention mask of the running rows, in row order."""

    cache: DynamicCache
    mask: torch.Tensor  # (B, T) 1 where a real token sits, 0 for left padding

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def positions(self) -> torch.Tensor:
        """(B, 1) position of each row's next token: how many real tokens it has."""
        return self.mask.sum(-1, keepdim=True)  # positions count from 0

    def grow(self) -> torch.Tensor:
        """The mask for one more decode step (the model appends one column to every layer)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)  # (B, T + 1)
        return self.mask

    def select(self, rows: list[int]) -> "BatchCache":
        """Keep ``rows`` (in that order), dropping columns that are padding in all of them."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        real = mask.any(0).nonzero()
        start = int(real[0]) if real.numel() else mask.shape[1]
        out = DynamicCache()
        for i, layer in enumerate(self.cache.layers):
            out.update(layer.keys.index_select(0, index)[:, :, start:], layer.values.index_select(0, index)[:, :, start:], i)
        return BatchCache(out, mask[:, start:])


def left_padded(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (n, T) of ``prompts`` right-aligned (left-padded with ``pad``) and their mask (n, T)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    return ids.to(device), mask.to(device)


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    if width == 0:
        return t
    shape = list(t.shape)
    shape[dim] = width
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def merge(a: BatchCache | None, b: BatchCache) -> BatchCache:
    """Rows of ``a`` then rows of ``b``, left-padded to the longer of the two."""
    if a is None or a.rows == 0:
        return b
    T = max(a.mask.shape[1], b.mask.shape[1])
    pa, pb = T - a.mask.shape[1], T - b.mask.shape[1]
    out = DynamicCache()
    for i, (la, lb) in enumerate(zip(a.cache.layers, b.cache.layers)):
        keys = torch.cat([_pad_left(la.keys, pa, 2), _pad_left(lb.keys, pb, 2)], dim=0)  # (Ba + Bb, H, T, D)
        values = torch.cat([_pad_left(la.values, pa, 2), _pad_left(lb.values, pb, 2)], dim=0)
        out.update(keys, values, i)
    mask = torch.cat([_pad_left(a.mask, pa, 1), _pad_left(b.mask, pb, 1)], dim=0)  # (Ba + Bb, T)
    return BatchCache(out, mask)


def after_prefill(cache: DynamicCache, mask: torch.Tensor) -> BatchCache:
    """The cache a left-padded prefill produced, with its padding columns zeroed.

    A padding query attends to nothing, and its attention output (hence the next layer's key and value
    there) may be NaN; masked keys get zero weight, but 0 x NaN is NaN, so they are zeroed once here.
    """
    pad = (mask == 0)[:, None, :, None]  # (B, 1, T, 1)
    for layer in cache.layers:
        layer.keys.masked_fill_(pad, 0)
        layer.values.masked_fill_(pad, 0)
    return BatchCache(cache, mask)
