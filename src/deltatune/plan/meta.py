"""Models on the meta device: exact parameter counts and traced activations, without any weights.

A model built under ``torch.device("meta")`` has every parameter's shape and dtype but no storage,
so a 70B model costs nothing to build. ``get_peft_model`` works on it too (the adapters are made on
the meta device as well), which gives parameter counts identical to a real model's.

The activation trace runs one forward pass on meta tensors with
``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd keeps for backward passes
through the hook, which records its storage (once, however many ops save it) unless it is a
parameter or buffer. That is exactly what a real forward keeps alive until backward, for this
architecture, this method and its custom autograd functions, with no hand-written formula per
model family.
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from deltatune.plan.setup import TrainSetup, peft_config_for


def load_model_config(model: Any) -> Any:
    """A transformers config from a registered name, a local folder, a config dict or a config.

    Args:
        model: ``"smollm2-135m-instruct"`` (or another registered name), a path to a transformers
            model folder (only its config.json is read), a ``dict`` with a ``model_type`` key, or a
            ``PretrainedConfig``.

    Raises:
        FileNotFoundError, ValueError: as :func:`deltatune.models.model_config`.
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    if isinstance(model, dict):
        d = dict(model)
        if "model_type" not in d:
            raise ValueError(f"a config dict needs a 'model_type' key (e.g. 'llama'); got keys {sorted(d)}")
        return AutoConfig.for_model(d.pop("model_type"), **d)
    from deltatune.models import model_config

    return model_config(model)


def build_meta_model(config: Any, setup: TrainSetup | None = None) -> nn.Module:
    """The causal LM of ``config`` on the meta device, with ``setup``'s adapter attached.

    QLoRA is built as LoRA on a dense base: the counts are the same (the quantized weights are
    frozen) and :func:`weight_bytes` accounts for the 4-bit storage.
    """
    from transformers import AutoModelForCausalLM

    from deltatune import get_peft_model

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        if setup is None:
            return model
        peft_config = peft_config_for(setup, model)
        if peft_config is None:  # full fine-tuning: everything trains
            model.requires_grad_(True)
            return model
        return get_peft_model(model, peft_config)


@dataclass(frozen=True)
class ParamCount:
    """Exact parameter counts of a model with a method applied."""

    trainable: int
    """Parameters that receive gradients."""

    total: int
    """All parameters, the adapter's included (tied weights counted once, as peft does)."""

    @property
    def percent(self) -> float:
        """``100 * trainable / total``."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


def count_model(model: nn.Module) -> ParamCount:
    """Count a built model's parameters (meta or real), as ``get_nb_trainable_parameters`` does."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for m in model.modules():
        total += getattr(m, "num_quantized_parameters", lambda: 0)()
    return ParamCount(trainable, total)


def count_parameters(model: Any, setup: TrainSetup | str | None = None, **changes: Any) -> ParamCount:
    """Exact trainable/total parameter counts of ``model`` with a method applied, from its config alone.

    Args:
        model: a registered name, a model folder, a config dict or a ``PretrainedConfig``.
        setup: a :class:`TrainSetup`, or just a method name (``"lora"``, ``"ia3"``, ``"full"``...).
            None counts the bare model (everything trainable).
        **changes: :class:`TrainSetup` fields to set (``r=32``, ``targets="attention"``).

    Returns:
        The :class:`ParamCount`, identical to ``get_nb_trainable_parameters()`` of the real model.
    """
    if isinstance(setup, str):
        setup = TrainSetup(method=setup, **changes)
    elif setup is not None and changes:
        setup = setup.replace(**changes)
    elif setup is None:
        setup = TrainSetup(method="full", **changes)
    return count_model(build_meta_model(load_model_config(model), setup))


def _quant_bytes(numel: int, blocksize: int, double_quant: bool) -> int:
    """Bytes of one NF4 weight as :class:`deltatune.quant.Linear4bit` stores it."""
    n_blocks = -(-numel // blocksize)
    packed = (numel + 1) // 2
    if not double_quant:
        return packed + 4 * n_blocks
    return packed + n_blocks + 4 * -(-n_blocks // 256) + 4


def weight_bytes(model: nn.Module, setup: TrainSetup) -> tuple[int, int]:
    """``(frozen_bytes, trainable_bytes)`` of a meta model built for ``setup``.

    Frozen weights are stored in ``setup.dtype``; under QLoRA the Linear layers that
    :func:`deltatune.quant.plan_quantization` would pick are NF4 (with double quantization ~4.13
    bits per weight) and the rest is fp32, as ``prepare_model_for_kbit_training`` leaves it.
    Trainable parameters are fp32 (adapters are kept in fp32; full fine-tuning keeps fp32 master
    weights under mixed precision).
    """
    quantized = _quantized_weights(model, setup) if setup.method == "qlora" else set()
    frozen = trainable = 0
    frozen_dtype = 4 if setup.method == "qlora" else setup.dtype_bytes
    for p in model.parameters():
        if p.requires_grad:
            trainable += 4 * p.numel()
        elif id(p) in quantized:
            frozen += _quant_bytes(p.numel(), setup.quant_blocksize, setup.double_quant)
        else:
            frozen += frozen_dtype * p.numel()
    return frozen, trainable


def _quantized_weights(model: nn.Module, setup: TrainSetup) -> set[int]:
    """ids of the weights QLoRA stores in 4 bits: every ``nn.Linear`` (wrapped by an adapter or not)
    that :class:`deltatune.quant.QuantConfig`'s ``skip_modules`` keeps in (e.g. not ``lm_head``),
    unless tied to another parameter, as :func:`deltatune.quant.plan_quantization` decides."""
    from deltatune.quant import QuantConfig
    from deltatune.quant.model import tied_parameter_names
    from deltatune.surgery.layer import AdaptedLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    qc = QuantConfig(blocksize=setup.quant_blocksize, double_quant=setup.double_quant)
    tied = {id(base.get_parameter(n)) for n in tied_parameter_names(base) if _has_parameter(base, n)}
    out: set[int] = set()
    for name, module in base.named_modules():
        layer = module.base_layer if isinstance(module, AdaptedLayer) else module
        if type(layer) is nn.Linear and not qc.skips(name) and id(layer.weight) not in tied:
            out.add(id(layer.weight))
    return out


def _has_parameter(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
        return True
    except AttributeError:
        return False


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
    keep only q, k, v, the output and one log-sum-exp per query row. This saves exactly that.
    """

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])  # (B, H, T, Dv)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, H, T)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - a trace never runs backward
        raise RuntimeError("the meta activation trace does not run backward")


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _FusedAttentionSaves.apply(query, key, value)



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
