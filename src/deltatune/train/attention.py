"""Attention for bf16 training on CPUs: eager attention's arithmetic with a fraction of its saved memory.

Under bf16 autocast on a CPU, transformers' ``eager`` attention trains faster than SDPA, whose fused
backward is slow there (train/precision.py). But eager leaves autograd holding, per layer, the fp32
softmax output and its bf16 cast (both batch x heads x queries x keys), and keys and values repeated
to every query head (grouped-query attention). On SmolLM2's default job that is ~80 MB of the ~400 MB
a training step saves.

:class:`_Attention` computes eager's forward (bf16 scores, the additive mask, a softmax in fp32, its
bf16 cast times V) with each key/value head's query heads stacked onto it, so K and V are never
repeated, and saves only the bf16 q, k, v and the mask. Backward recomputes the probabilities from
them (flash attention's trade: at training lengths of a few hundred tokens QKᵀ and the softmax are a
small part of a layer's work), so nothing of size queries x keys outlives the layer's forward.

It is registered with transformers as ``deltatune_eager`` (:data:`NAME`, with eager's mask), and
:func:`deltatune.train.precision.training_attention` selects it while training. Calls it does not
cover (attention dropout, soft-capping, attention sinks, a boolean mask) run through SDPA, the
model's own kernel before the switch (as do position biases).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

NAME = "deltatune_eager"

# keyword arguments whose non-default value this kernel does not implement (SDPA takes the call)
_UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias", "head_mask")


def _probs(q: Tensor, k: Tensor, mask: Tensor | None, scaling: float, groups: int) -> Tensor:
    """softmax(q kᵀ · scaling + mask) in fp32, as eager computes it: scores in q's dtype, then promoted by the
    mask (fp32) and by the softmax. q: (B, Hkv, g·Tq, D) with a key/value head's g query heads stacked."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # (B, Hkv, g·Tq, Tk)
    if mask is not None:
        b, hkv, rows, tk = scores.shape
        # the mask is per query position: (B|1, 1|H, Tq, Tk) -> broadcast over the stacked heads
        per_head = mask.reshape(mask.shape[0], -1, 1, mask.shape[-2], tk) if mask.shape[1] == 1 else \
            mask.reshape(mask.shape[0], hkv, groups, mask.shape[-2], tk)
        scores = (scores.view(b, hkv, groups, rows // groups, tk) + per_head).view(b, hkv, rows, tk)
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


class _Attention(torch.autograd.Function):
    """out = softmax(q kᵀ · s + mask) v per head, with head h reading key/value head h // g.

    Backward, with P the probabilities (recomputed), dO the output's gradient:
      dV = Pᵀ dO;  dP = dO Vᵀ;  dS = P ⊙ (dP − rowsum(dP ⊙ P)) (fp32: eager's softmax backward kernel);
      dQ = s · dS K;  dK = s · dSᵀ Q.
    dK and dV are formed per query head, cast to k's and v's own dtypes and then summed over a key/value
    head's query heads, in that order, as autograd does for eager's repeated K and V: the gradients are
    eager's to the bit.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, scaling, dtype):
        b, h, tq, d = q.shape
        hkv = k.shape[1]
        groups = h // hkv
        ctx.dtypes, ctx.scaling, ctx.groups = (q.dtype, k.dtype, v.dtype), scaling, groups
        with torch.autocast(q.device.type, enabled=False):
            qs = q.to(dtype).reshape(b, hkv, groups * tq, d)
            k, v = k.to(dtype), v.to(dtype)
            p = _probs(qs, k, mask, scaling, groups).to(dtype)
            out = torch.matmul(p, v)  # (B, Hkv, g·Tq, D)
        ctx.save_for_backward(qs, k, v, mask)
        return out.view(b, h, tq, d)

    @staticmethod
    def backward(ctx, grad_out):
        qs, k, v, mask = ctx.saved_tensors
        b, h, tq, d = grad_out.shape
        hkv, groups = k.shape[1], ctx.groups
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        per_head = (b, hkv, groups, tq, -1)  # the stacked rows, one block per query head

        def summed_over_heads(left: Tensor, right: Tensor, dtype: torch.dtype) -> Tensor:
            # Σ over a key/value head's query heads of leftᵀ right: per head, then cast, then summed
            return torch.matmul(left.view(per_head).transpose(-1, -2), right.view(per_head)).to(dtype).sum(2)

        with torch.autocast(qs.device.type, enabled=False):
            p32 = _probs(qs, k, mask, ctx.scaling, groups)
            g = grad_out.to(qs.dtype).reshape(qs.shape)
            dv = summed_over_heads(p32.to(qs.dtype), g, v_dtype)
            dp = torch.matmul(g, v.transpose(-1, -2)).float()
            ds = torch.ops.aten._softmax_backward_data(dp, p32, -1, torch.float32).to(qs.dtype) * ctx.scaling
            dq = torch.matmul(ds, k).view(b, h, tq, d)
            dk = summed_over_heads(ds, qs, k_dtype)
        return dq.to(q_dtype), dk, dv, None, None, None


def attention_forward(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' attention-function signature: q (B, H, Tq, D), k/v (B, Hkv, Tk, D) -> ((B, Tq, H, D), None)."""
    unsupported = (dropout and module.training) or any(kwargs.get(key_) is not None for key_ in _UNSUPPORTED) \
        or (attention_mask is not None and attention_mask.dtype == torch.bool) or query.shape[1] % key.shape[1]
    if unsupported:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]
    out = _Attention.apply(query, key, value, mask, scaling, dtype)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register :data:`NAME` with transformers (attention function and eager's mask); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, eager_mask)
    return NAME
