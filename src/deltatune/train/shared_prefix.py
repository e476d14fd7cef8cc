"""Rows that begin with the same tokens compute that prefix once.

Chat data for one task usually starts every row with the same tokens: a fixed system prompt, an
instruction header (the default job's prompts share 49 of their 119 tokens). Attention is causal, so a
prefix token's hidden state and keys/values depend on the prefix alone and are the same in every row.
:func:`trunk_hidden` runs the prefix for one row, with a KV cache, then every row's remainder on top of
that cache; the prefix's hidden state is broadcast back to all rows. The result is the same function of
the weights (up to float summation order), gradients flow back through the broadcast cache into the
single prefix pass (autograd sums the rows' contributions), and the linear layers, most of the step,
see ``(B - 1) * P`` fewer rows. :func:`PrefixCache` does the same for first-token scoring, across all
batches of a scoring pass.

It runs only where the shortcut is exactly the model's computation, and falls back to the plain trunk
call otherwise:

- no active dropout (one prefix pass would draw one mask for all rows) and no gradient checkpointing
  (transformers turns the cache off under it);
- plain token inputs: no ``inputs_embeds`` (prompt tuning), no pre-filled cache (prefix tuning), no 4-D
  or packed masks; the prefix is unpadded and its positions are ``0..P-1``;
- a cache of plain full-attention layers (sliding windows keep a trimmed cache) on transformers'
  ``DynamicCache``;
- a single process: engines (DDP, FSDP, DeepSpeed) expect one forward of each module per step;
- for scoring, a family in ``deltatune.train.loss.SUPPORTED_MODEL_TYPES`` (plain causal trunks).

Nobody configures it: :data:`MIN_SHARED_TOKENS` shared tokens turn it on.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from deltatune.methods.prompt_common import cache_argument

MIN_SHARED_TOKENS = 16
"""Shortest common prefix worth a second trunk call (a few milliseconds of per-layer overhead)."""

_PLAIN_INPUTS = frozenset({"input_ids", "attention_mask", "position_ids", "use_cache"})


def common_prefix_length(ids: Tensor) -> int:
    """How many leading positions are equal in every row of ``ids`` (B, T)."""
    differs = (ids != ids[:1]).any(0)  # (T,)
    return int(differs.nonzero()[0]) if differs.any() else ids.shape[1]


def _dropout_active(model: nn.Module) -> bool:
    if not model.training:
        return False
    cfg = getattr(model, "config", None)
    if getattr(cfg, "attention_dropout", 0.0) or getattr(cfg, "hidden_dropout", 0.0):
        return True
    for m in model.modules():
        if isinstance(m, nn.Dropout) and m.p > 0 and m.training:
            return True
        # deltatune's LoRA draws its dropout functionally (methods/lora.py)
        if getattr(m, "dropout_p", 0.0) and m.training:
            return True
    return False


def _cache_classes():
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:  # a transformers without per-layer caches: no sharing
        return None
    return DynamicCache, DynamicLayer


def _empty_cache(lm: nn.Module):
    """A fresh ``DynamicCache`` for ``lm``, or None where its layers are not all plain full attention."""
    classes = _cache_classes()
    if classes is None:
        return None
    DynamicCache, DynamicLayer = classes
    try:
        cache = DynamicCache(config=lm.config)
    except Exception:  # noqa: BLE001 - a config this transformers cannot map to cache layers
        return None
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return cache


def _checkpointing(lm: nn.Module) -> bool:
    # transformers >= 5.25 names it is_activation_checkpointing (the old name warns)
    if hasattr(type(lm), "is_activation_checkpointing"):
        return bool(lm.is_activation_checkpointing)
    return bool(getattr(lm, "is_gradient_checkpointing", False))


def _single_process() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def _shared_length(inputs: dict[str, Any]) -> int | None:
    """The prefix to share for trunk ``inputs`` (one forward's kwargs), or None."""
    if {k for k, v in inputs.items() if v is not None} - _PLAIN_INPUTS:
        return None
    ids, mask, pos = inputs.get("input_ids"), inputs.get("attention_mask"), inputs.get("position_ids")
    if ids is None or ids.dim() != 2 or ids.shape[0] < 2:
        return None
    length = min(common_prefix_length(ids), ids.shape[1] - 1)  # every row keeps a token to run
    if mask is not None:
        if mask.dim() != 2 or mask.shape != ids.shape:
            return None
        zeros = (mask[:, :length] == 0).any(0).nonzero()
        length = min(length, int(zeros[0])) if len(zeros) else length
    if pos is not None:  # packed rows restart their positions: not one causal sequence
        expected = torch.arange(ids.shape[1], device=pos.device).expand_as(pos)
        if pos.shape != ids.shape or not torch.equal(pos, expected):
            return None
    return length if length >= MIN_SHARED_TOKENS else None


def _broadcast_rows(t: Tensor, batch: int) -> Tensor:
    """``t`` (1, ...) repeated to (batch, ...), its gradient summed over the rows in fp32.

    Under bf16 autocast the cached keys/values are bf16; summing the rows' gradients in bf16 would round at
    every add, where the unshared path accumulates them in fp32 inside the projections' matmuls.
    """
    wide = t if t.dtype in (torch.float32, torch.float64) else t.float()
    return wide.expand(batch, *t.shape[1:]).to(t.dtype)


def trunk_hidden(lm: nn.Module, inputs: dict[str, Any]) -> Tensor:
    """``lm.base_model(**inputs)[0]`` (B, T, H), computing a prefix common to every row once."""
    trunk = lm.base_model
    length = _shared_length(inputs)
    cache = None
    if length is not None and _single_process() and not _checkpointing(lm) and not _dropout_active(lm):
        cache = _empty_cache(lm)
    if cache is None:
        return trunk(**inputs)[0]
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    batch, total = ids.shape
    name = cache_argument(trunk)
    head = trunk(input_ids=ids[:1, :length], use_cache=True, **{name: cache})[0]  # (1, P, H); fills the cache
    for layer in cache.layers:  # (1, ...) -> (B, ...), a differentiable copy per layer
        layer.keys, layer.values = _broadcast_rows(layer.keys, batch), _broadcast_rows(layer.values, batch)
    positions = torch.arange(length, total, device=ids.device).expand(batch, -1)
    tail = trunk(input_ids=ids[:, length:], attention_mask=mask, position_ids=positions,
                 use_cache=True, **{name: cache})[0]  # (B, T - P, H)
    return torch.cat([head.expand(batch, -1, -1), tail], dim=1)


class PrefixCache:
    """Keys/values of a token prefix shared by every prompt of a scoring pass, computed once.

    ``PrefixCache.build(model, lm, prompts)`` returns None when the prompts share fewer than
    :data:`MIN_SHARED_TOKENS` tokens or the model does not qualify (see the module docstring);
    otherwise :meth:`forward` runs a batch of prompt remainders on top of it.
    """

    def __init__(self, length: int, layers: list[tuple[Tensor, Tensor]], kwarg: str) -> None:
        self.length, self.layers, self.kwarg = length, layers, kwarg

    @classmethod
    def build(cls, model: nn.Module, lm: nn.Module, prompts: list[list[int]], device) -> "PrefixCache | None":
        if len(prompts) < 2 or not _single_process() or _prompt_learning(model, device):
            return None
        width = min(len(p) for p in prompts)
        ids = torch.tensor([p[:width] for p in prompts])
        length = min(common_prefix_length(ids), width - 1)
        if length < MIN_SHARED_TOKENS:
            return None
        cache = _empty_cache(lm)
        if cache is None:
            return None
        name = cache_argument(lm)
        model(input_ids=ids[:1, :length].to(device), use_cache=True, logits_to_keep=1, **{name: cache})  # fills it
        return cls(length, [(layer.keys, layer.values) for layer in cache.layers], name)

    def forward(self, model: nn.Module, rows: list[list[int]], pad_id: int, device) -> Tensor:
        """Last-position logits (b, V) of prompts ``rows`` (each starting with the shared prefix)."""
        DynamicCache, _ = _cache_classes()
        tails = [r[self.length:] for r in rows]
        width = max(len(t) for t in tails)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), self.length + width), dtype=torch.long)
        mask[:, :self.length] = 1
        for i, t in enumerate(tails):  # left-padded: the pad sits between prefix and remainder, masked out
            ids[i, width - len(t):] = torch.tensor(t)
            mask[i, self.length + width - len(t):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, self.length:]
        b = len(rows)
        cache = DynamicCache(ddp_cache_data=[(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in self.layers])
        kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device),
                  "use_cache": True, self.kwarg: cache}
        try:
            out = model(**kwargs, logits_to_keep=1)
        except TypeError:  # a model whose forward predates logits_to_keep
            out = model(**kwargs)
        return out.logits[:, -1]


def _prompt_learning(model: nn.Module, device) -> bool:
    """Whether ``model``'s forward adds virtual tokens or a pre-filled cache (prompt/prefix tuning)."""
    probe = getattr(model, "model_inputs", None)  # deltatune's PeftModel: what its forward would pass on
    if callable(probe):
        extra = set(probe(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))) - {"input_ids"}
        return bool(extra)
    return bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))
