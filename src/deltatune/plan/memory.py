"""Training-memory model: what one training step holds at its peak, by component.

The estimate is built from the model's config alone (a meta-device model, see
:mod:`deltatune.plan.meta`) and a :class:`~deltatune.plan.setup.TrainSetup`:

========================  ==================================================================
component                 how it is computed
========================  ==================================================================
frozen weights            every frozen parameter at ``setup.dtype``; QLoRA's quantized Linear
                          weights at NF4 size (4 bits + block constants: ~4.13 bits with
                          double quantization, 4.5 without), the rest fp32 as
                          ``prepare_model_for_kbit_training`` leaves it
trainable weights         trainable parameters in fp32 (adapters; fp32 master weights for full
                          fine-tuning)
gradients                 one fp32 gradient per trainable parameter
optimizer state           AdamW: two fp32 moments (8 B/param); 8-bit AdamW: two 8-bit moments
                          plus block scales (~2.03 B/param); SGD: none
optimizer temporaries     AdamW's ``sqrt(v)`` and its quotient: two copies of the largest
                          tensor (CPU, one tensor at a time) or one copy of all (CUDA foreach)
activations               bytes autograd saves for backward, traced on the meta device (so
                          exact for this architecture and method); with gradient
                          checkpointing, every layer's input plus one layer recomputed
logits / loss             standard loss: the (tokens, vocab) logits, their fp32 log-softmax and
                          two gradients of that size; deltatune's fused loss: one chunk of
                          logits (64 MiB budget) and the (tokens, hidden) gradient
overhead                  CPU: the process's allocator and autograd bookkeeping (~2% + 12 MiB);
                          CUDA: the CUDA context (~500 MiB, outside the allocator's figure)
                          plus ~5% fragmentation
========================  ==================================================================

Not everything is alive at once. Gradients are freed by ``zero_grad`` before the next forward,
and activations are gone when the optimizer steps, so the peak is::

    frozen + trainable + optimizer state + overhead
        + max(activations + logits + gradients made in forward,   # end of forward / start of backward
              gradients + optimizer temporaries)                  # optimizer step

The table's "at peak" column shows which terms that maximum counts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from deltatune.plan.meta import ParamCount, build_meta_model, count_model, load_model_config, weight_bytes
from deltatune.plan.report import memory_table
from deltatune.plan.trace import ActivationTrace, trace_activations
from deltatune.plan.setup import TrainSetup
from deltatune.train.loss import _LOGIT_MODIFIERS, SUPPORTED_MODEL_TYPES, chunk_size_for_budget

MiB = 2**20
GiB = 2**30

CUDA_CONTEXT_BYTES = 500 * MiB
"""CUDA context and kernels loaded by PyTorch; not part of ``max_memory_allocated``."""

CUDA_FRAGMENTATION = 0.05
"""Share of the allocator's peak lost to block rounding and fragmentation on CUDA."""

CPU_OVERHEAD_BYTES = 12 * MiB
"""Allocator metadata, autograd graph nodes and Python objects of one training step on CPU."""

CPU_OVERHEAD_FRACTION = 0.02
"""Plus this share of the rest: small tensors below the mmap threshold and BLAS scratch buffers."""


def resolve_loss(setup: TrainSetup, config: Any) -> str:
    """``fused`` or ``standard``: which loss a training run of ``setup`` computes.

    ``auto`` follows :func:`deltatune.train.loss.causal_lm_loss`: fused for supported families
    (prompt and prefix tuning included), standard for families whose logits are post-processed.
    """
    if setup.loss != "auto":
        return setup.loss
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return "standard"
    if any(getattr(config, name, None) is not None for name in _LOGIT_MODIFIERS):
        return "standard"
    return "fused"


@dataclass(frozen=True)
class MemoryComponent:
    """One line of the memory table."""

    name: str
    """What it is (``frozen weights``, ``activations``...)."""

    bytes: int
    """Its size."""

    at_peak: int
    """How much of it is alive at the peak moment (0 for terms of the other phase)."""

    note: str = ""
    """How it was computed, in a few words."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated training memory of one ``TrainSetup`` on one model."""

    setup: TrainSetup
    """The estimated configuration."""

    params: ParamCount
    """Exact parameter counts."""

    components: tuple[MemoryComponent, ...]
    """The breakdown; ``sum(c.at_peak)`` is :attr:`peak_bytes`."""

    peak_phase: str
    """``forward/backward`` or ``optimizer step``: the phase that sets the peak."""

    activations: dict[str, int] = field(default_factory=dict)
    """Activation bytes ``{"without checkpointing": ..., "with checkpointing": ...}``."""

    @property
    def peak_bytes(self) -> int:
        """Estimated peak memory of a training step."""
        return sum(c.at_peak for c in self.components)

    def component(self, name: str) -> MemoryComponent:
        """The component called ``name``."""
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(f"no component {name!r}; have {[c.name for c in self.components]}")

    def fits(self, device_bytes: int) -> bool:
        """Whether the peak fits in ``device_bytes``."""
        return self.peak_bytes <= device_bytes

    def table(self) -> str:
        """The breakdown as a text table."""
        return memory_table(self)


def _optimizer_bytes(setup: TrainSetup, trainable: int) -> int:
    if setup.optimizer == "adamw":
        return 8 * trainable
    if setup.optimizer == "adamw8bit":
        return 2 * trainable + 8 * -(-trainable // 256)  # two uint8 moments + an fp32 scale per 256
    return 0


def _optimizer_temp_bytes(setup: TrainSetup, model: Any) -> int:
    if setup.optimizer != "adamw":
        return 0
    sizes = [4 * p.numel() for p in model.parameters() if p.requires_grad]
    if not sizes:
        return 0
    # CPU runs AdamW one tensor at a time (sqrt(v) and its quotient alive together); CUDA's
    # foreach implementation makes the sqrt of every moment at once.
    return 2 * max(sizes) if setup.device == "cpu" else sum(sizes)


def _logits_bytes(setup: TrainSetup, config: Any, loss: str) -> tuple[int, str]:
    """Working set of the output projection and the loss, beyond the saved activations."""
    vocab, hidden = config.vocab_size, config.hidden_size
    b, dt = setup.dtype_bytes, getattr(torch, setup.dtype)
    tokens = setup.batch_size * setup.seq_len
    # Prompt tuning's virtual tokens are positions of the sequence (they carry no label of their own).
    positions = setup.batch_size * (setup.seq_len + (setup.num_virtual_tokens if setup.method == "prompt" else 0))
    trunk_out = positions * hidden * b  # the final hidden state, alive while the loss runs
    if loss == "standard":
        tokens = positions
        upcast = 4 if b != 4 else 0
        # logits in the compute dtype, their fp32 copy, the saved log-softmax, and in backward its
        # gradient and the logits' gradient (fp32)
        per_token = vocab * (b + upcast + 8)
        return tokens * per_token + trunk_out, f"standard loss: {tokens:,} x {vocab:,} logits"
    chunk = min(tokens, chunk_size_for_budget(vocab, dt))
    per_chunk = chunk * vocab * (4 + (b if b != 4 else 0))
    grad_h = tokens * hidden * (4 if setup.dtype == "float16" else b)
    selected = tokens * hidden * b  # the supervised rows, gathered
    return per_chunk + grad_h + selected + trunk_out, f"fused loss: {chunk:,}-token chunks of {vocab:,} logits"


def _head_grad_in_forward(setup: TrainSetup, model: Any, loss: str) -> int:
    """The fused loss computes the output head's weight gradient during forward (full fine-tuning)."""
    if loss != "fused":
        return 0
    head = model.get_output_embeddings()
    if head is None or not head.weight.requires_grad:
        return 0
    n = head.weight.numel()
    low = setup.dtype_bytes if setup.dtype != "float32" else 0
    return 4 * n + low * n  # fp32 accumulator, plus the gradient cast to the weight's dtype


def estimate_memory(model: Any, setup: TrainSetup, *, activation_scale: float = 1.0,
                    meta_model: Any = None, trace: ActivationTrace | None = None) -> MemoryEstimate:
    """Estimate the peak memory of training ``setup`` on ``model``, from its config alone.

    Args:
        model: a registered name, a model folder, a config dict or a ``PretrainedConfig``.
        setup: method, shapes, precision and optimizer.
        activation_scale: multiplies the activation term (``--probe`` calibrates it from a
            measurement; 1.0 trusts the trace).
        meta_model: an already built meta model for ``setup`` (saves rebuilding it).
        trace: an already computed activation trace for ``setup``.

    Returns:
        The :class:`MemoryEstimate`, with exact parameter counts and the breakdown table.
    """
    config = load_model_config(model)
    meta = meta_model if meta_model is not None else build_meta_model(config, setup)
    params = count_model(meta)
    frozen, trainable_w = weight_bytes(meta, setup)
    trace = trace if trace is not None else trace_activations(meta, setup)
    loss = resolve_loss(setup, config)
    acts_full, acts_ckpt = trace.total, trace.checkpointed
    if setup.grad_checkpointing:
        # Layer inputs stay; one layer at a time is recomputed in backward, after the loss's working
        # set is gone, so the recompute and the logits never coexist.
        kept, recompute = acts_ckpt - max(trace.per_layer, default=0), max(trace.per_layer, default=0)
    else:
        kept, recompute = acts_full, 0
    kept, recompute = int(kept * activation_scale), int(recompute * activation_scale)
    acts = kept + recompute
    grads = trainable_w
    opt = _optimizer_bytes(setup, params.trainable)
    opt_tmp = _optimizer_temp_bytes(setup, meta)
    logits, logits_note = _logits_bytes(setup, config, loss)
    head_grad = _head_grad_in_forward(setup, meta, loss)
    forward_phase = kept + max(logits, recompute) + head_grad
    step_phase = grads + opt_tmp
    in_forward = forward_phase >= step_phase
    base = frozen + trainable_w + opt
    rest = base + max(forward_phase, step_phase)
    if setup.device == "cuda":
        overhead = CUDA_CONTEXT_BYTES + int(CUDA_FRAGMENTATION * rest)
        overhead_note = "CUDA context + 5% fragmentation"
    else:
        overhead = CPU_OVERHEAD_BYTES + int(CPU_OVERHEAD_FRACTION * rest)
        overhead_note = "allocator, autograd, BLAS scratch"
    weights_note = _weights_note(setup)
    ckpt = "with" if setup.grad_checkpointing else "without"
    components = (
        MemoryComponent("frozen weights", frozen, frozen, weights_note),
        MemoryComponent("trainable weights", trainable_w, trainable_w, "fp32"),
        MemoryComponent("gradients", grads, head_grad if in_forward else grads,
                        "fp32; freed before the next forward"),
        MemoryComponent("optimizer state", opt, opt, _OPT_NOTES[setup.optimizer]),
        MemoryComponent("optimizer temporaries", opt_tmp, 0 if in_forward else opt_tmp, "during the step only"),
        MemoryComponent("activations", acts, (kept + (recompute if recompute > logits else 0)) if in_forward else 0,
                        f"{ckpt} gradient checkpointing" + (" (incl. 1 layer recomputed)" if recompute else "")),
        MemoryComponent("logits / loss", logits, logits if in_forward and logits >= recompute else 0, logits_note),
        MemoryComponent("overhead", overhead, overhead, overhead_note),
    )
    return MemoryEstimate(setup=setup, params=params, components=components,
                          peak_phase="forward/backward" if in_forward else "optimizer step",
                          activations={"without checkpointing": acts_full, "with checkpointing": acts_ckpt})


_OPT_NOTES = {"adamw": "AdamW: 2 fp32 moments", "adamw8bit": "8-bit AdamW: 2 uint8 moments", "sgd": "SGD: none"}


def _weights_note(setup: TrainSetup) -> str:
    if setup.method == "qlora":
        bits = (4 + 8 / setup.quant_blocksize + 32 / (setup.quant_blocksize * 256)) if setup.double_quant else (
            4 + 32 / setup.quant_blocksize)
        return f"NF4 linear ({bits:.3f} bits/param), rest fp32"
    if setup.method == "full":
        return "none frozen"
    return setup.dtype
