"""What autograd keeps for backward, traced on a meta-device model: the activation term of the memory model.

The trace runs one forward pass on meta tensors with ``torch.autograd.graph.saved_tensors_hooks``:
every tensor autograd keeps for backward passes through the hook, which records its storage
(once, however many ops save it) unless it is a parameter or buffer. That is exactly what a real
forward keeps alive until backward, for this architecture, this method and its custom autograd
functions, with no hand-written formula per model family. Three things differ on meta tensors and
are put right while tracing (see :func:`_meta_forward_patches` and :class:`_AutocastEmulation`):
attention falls back to the math kernel, autocast does nothing, and transformers' packed-sequence
check reads values.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from deltatune.plan.setup import TrainSetup


@dataclass
class ActivationTrace:
    """Bytes autograd keeps for backward after one forward pass, by where they were saved."""

    per_layer: list[int] = field(default_factory=list)
    """Saved bytes inside each decoder layer."""

    outside: int = 0
    """Saved bytes outside the decoder layers (embeddings, final norm, prompt tokens, head)."""

    layer_input: int = 0
    """Bytes of one decoder layer's input hidden state: what gradient checkpointing keeps per layer."""

    @property
    def total(self) -> int:
        """Everything saved without gradient checkpointing."""
        return sum(self.per_layer) + self.outside

    def scaled(self, factor: float) -> "ActivationTrace":
        """The trace of a batch ``factor`` times larger: every saved tensor but a few small shared
        ones (RoPE's cos/sin tables) has a batch dimension, so this overcounts by well under 1%."""
        return ActivationTrace([int(b * factor) for b in self.per_layer], int(self.outside * factor),
                               int(self.layer_input * factor))

    @property
    def checkpointed(self) -> int:
        """Saved bytes with per-layer gradient checkpointing: every layer's input, everything outside
        the layers, and one layer's full activations while it is recomputed in backward."""
        return len(self.per_layer) * self.layer_input + self.outside + max(self.per_layer, default=0)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: its longest ``ModuleList``."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no ModuleList of layers; cannot trace activations per layer.")
    return max(lists, key=len)


def trace_activations(model: nn.Module, setup: TrainSetup) -> ActivationTrace:
    """Run one meta forward of ``model`` and measure what autograd saves for backward.

    The forward is the model's own (a prompt-learning wrapper inserts its virtual tokens) without
    labels: the output head's logits are accounted for separately by the memory model, since
    which loss runs decides whether they ever exist in full.

    Args:
        model: a meta-device model from :func:`build_meta_model`.
        setup: gives the batch shape and dtype.

    Returns:
        The saved bytes inside each decoder layer and outside them.
    """
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[setup.dtype]
    _cast_floating(model, dtype, setup)
    # Parameters and buffers are kept alive by the model anyway: saving them costs nothing.
    own = {p.untyped_storage()._cdata for p in model.parameters()} | {b.untyped_storage()._cdata for b in model.buffers()}
    trace = ActivationTrace()
    layers = decoder_layers(model)
    trace.per_layer = [0] * len(layers)
    seen: set[int] = set()
    keep: list[torch.Tensor] = []  # holds saved tensors so storage ids are not reused mid-trace
    current = [-1]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in own and key not in seen:
            seen.add(key)
            keep.append(t)
            nbytes = t.untyped_storage().nbytes()
            if current[0] >= 0:
                trace.per_layer[current[0]] += nbytes
            else:
                trace.outside += nbytes
        return t

    def enter(index: int):
        def hook(module, args, kwargs):
            current[0] = index
            hidden = args[0] if args else kwargs.get("hidden_states")
            if index == 0 and isinstance(hidden, torch.Tensor):
                trace.layer_input = hidden.numel() * hidden.element_size()
        return hook

    def leave(module, args, output):
        current[0] = -1

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(enter(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(leave))
    ids = torch.zeros(setup.batch_size, setup.seq_len, dtype=torch.long, device="meta")
    model.train()
    try:
        emulate = dtype != torch.float32
        autocast = _AutocastEmulation(dtype) if emulate else contextlib.nullcontext()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                _meta_forward_patches(dtype if emulate else None), autocast:
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return trace


class _FusedAttentionSaves(torch.autograd.Function):
    """Stands in for ``scaled_dot_product_attention`` during a meta trace.

    On meta tensors PyTorch falls back to the math kernel, which keeps the (T, T) attention
    matrix; the fused kernels that real training runs on CPU and CUDA (flash, memory-efficient)
    keep only q, k, v, the output, one log-sum-exp per query row and the mask, if one is passed.
    This saves exactly that.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])  # (B, H, T, Dv)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, H, T)
        # An explicit mask (padding, or a prefix in the KV cache) is kept for backward too.
        ctx.save_for_backward(q, k, v, out, lse, *(() if mask is None else (mask,)))
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - a trace never runs backward
        raise RuntimeError("the meta activation trace does not run backward")


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        # PyTorch's sdpa turns a boolean mask into an additive one in the query's dtype on every
        # call, and the kernel keeps that copy for backward: one (B, 1, T, S) tensor per layer.
        attn_mask = attn_mask.new_empty(attn_mask.shape, dtype=query.dtype)
    return _FusedAttentionSaves.apply(query, key, value, attn_mask)



class _AutocastEmulation(TorchFunctionMode):
    """``torch.autocast`` for meta tensors, which real autocast ignores.

    Matmul-like ops get their floating inputs cast to the compute dtype, as autocast's
    lower-precision op list does; casts of leaf tensors that require grad (fp32 master weights,
    fp32 adapters) are made once per forward and kept, like autocast's weight cache. The casted
    copies are what those ops save for backward, so the trace sees autocast's real footprint.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype, self.cache = dtype, {}
        import torch.nn.functional as F

        self.ops = {F.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.addmv,
                    torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.bmm}

    def _cast(self, t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == self.dtype:
            return t
        if t.is_leaf and t.requires_grad:
            if id(t) not in self.cache:
                self.cache[id(t)] = (t, t.to(self.dtype))
            return self.cache[id(t)][1]
        return t.to(self.dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.ops:
            args = tuple(self._cast(a) for a in args)
            kwargs = {k: self._cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextlib.contextmanager
def _meta_forward_patches(autocast_dtype: torch.dtype | None):
    """Make a transformers forward run on meta tensors as it would on real ones.

    * transformers looks at position_ids for packed sequences, which reads values (impossible on
      meta tensors); for the unpacked batch a trace models it returns None, so it is skipped.
    * ``scaled_dot_product_attention`` is replaced by :class:`_FusedAttentionSaves` (see there).
    * ``torch.is_autocast_enabled("meta")`` (an error in PyTorch) answers whether the trace
      emulates autocast, so code that branches on autocast takes the branch training would.
    """
    import torch.nn.functional as F
    from transformers import masking_utils

    originals = masking_utils.find_packed_sequence_indices, F.scaled_dot_product_attention, torch.is_autocast_enabled
    real_is_enabled = originals[2]

    def is_autocast_enabled(device_type: Any = None) -> bool:
        if device_type == "meta":
            return autocast_dtype is not None
        return real_is_enabled() if device_type is None else real_is_enabled(device_type)

    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    F.scaled_dot_product_attention = _fused_sdpa
    torch.is_autocast_enabled = is_autocast_enabled
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices, F.scaled_dot_product_attention, torch.is_autocast_enabled = originals


def _cast_floating(model: nn.Module, dtype: torch.dtype, setup: TrainSetup) -> None:
    """Meta-model dtypes as training has them: frozen weights in the compute dtype, trainable ones
    (adapters, full fine-tuning's master weights) in fp32; the forward runs under autocast."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
