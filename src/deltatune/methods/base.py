"""The protocol every layer-level adapter implements, and the method registry.

An :class:`Adapter` is one adapter for one base layer. It never owns the base layer: the hosting
:class:`deltatune.surgery.layer.AdaptedLayer` passes it in, so the same adapter object can be moved,
saved or deleted without touching the base weights.
"""
from __future__ import annotations

import importlib
import types
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from deltatune.config import PeftConfig, PeftType


class Adapter(nn.Module):
    """One adapter attached to one base layer.

    Subclasses implement :meth:`forward`; mergeable ones also :meth:`delta_weight` (or override
    :meth:`merge`/:meth:`unmerge`). :attr:`peft_keys` is the explicit mapping from our parameter names
    to the suffix peft writes on disk, e.g. ``{"lora_A": "lora_A.weight"}``.
    """

    mergeable: ClassVar[bool] = True
    # True if forward(x, base_layer, None) computes the base output itself (a fused kernel).
    fuses_base: ClassVar[bool] = False
    peft_keys: dict[str, str]

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """Change the layer's input before the base layer runs (IA³ on feed-forward layers)."""
        return x

    def forward(self, x: torch.Tensor, base_layer: nn.Module, base_out: torch.Tensor | None) -> torch.Tensor:
        """Return the layer output with this adapter applied on top of ``base_out``."""
        raise NotImplementedError

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """The change to the base weight, as an (out, in) matrix, that merging adds."""
        raise NotImplementedError(f"{type(self).__name__} does not define delta_weight")

    @torch.no_grad()
    def merge(self, base_layer: nn.Module) -> None:
        set_dense_weight(base_layer, dense_weight(base_layer) + self.delta_weight(base_layer))

    @torch.no_grad()
    def unmerge(self, base_layer: nn.Module) -> None:
        set_dense_weight(base_layer, dense_weight(base_layer) - self.delta_weight(base_layer))

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under peft's on-disk suffixes."""
        return {disk: getattr(self, ours) for ours, disk in self.peft_keys.items() if getattr(self, ours, None) is not None}


def _stores_transposed(layer: nn.Module) -> bool:
    # Conv1D (GPT-2) stores (in, out); an Embedding, read as a linear map from one-hot ids, does too.
    from transformers.pytorch_utils import Conv1D

    return isinstance(layer, (Conv1D, nn.Embedding))


def dense_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The layer's weight as a dense (out, in) matrix: transposed for Conv1D/Embedding, dequantized for
    4-bit/8-bit layers (which implement ``dequantize_weight``)."""
    if hasattr(layer, "dequantize_weight"):
        w = layer.dequantize_weight()
    else:
        w = layer.weight.T if _stores_transposed(layer) else layer.weight
    return w if dtype is None else w.to(dtype)


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a layer as the linear map the math sees: nn.Linear and quantized linears (their
    ``out/in_features``), GPT-2's Conv1D (stored (in, out)), nn.Embedding (one-hot ids to vectors: (dim,
    vocab)), a convolution's (out, in) channels. Reads shapes only, so meta-device models work."""
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return int(layer.out_features), int(layer.in_features)
    if isinstance(layer, nn.Embedding):
        return int(layer.embedding_dim), int(layer.num_embeddings)
    shape = layer.weight.shape
    return (int(shape[1]), int(shape[0])) if _stores_transposed(layer) else (int(shape[0]), int(shape[1]))


@torch.no_grad()
def adapter_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a new adapter on ``layer`` is created in: the layer's float weight dtype, or a quantized
    layer's compute dtype. (PeftModel then stores half-precision adapters in fp32: autocast_adapter_dtype.)"""
    w = getattr(layer, "weight", None)
    if w is not None and w.is_floating_point():
        return w.dtype
    return getattr(layer, "compute_dtype", torch.float32)


def set_dense_weight(layer: nn.Module, w: torch.Tensor) -> None:
    """Write an (out, in) matrix back into the layer's own storage layout (requantizing if needed)."""
    if hasattr(layer, "requantize_"):
        layer.requantize_(w)
        return
    target = layer.weight
    target.data.copy_((w.T if _stores_transposed(layer) else w).to(target.dtype))


def linear_layer_types() -> tuple[type, ...]:
    """Layers with an (out, in) weight that adapter methods wrap: nn.Linear, transformers' Conv1D and
    our quantized linears (their ``dense_weight`` dequantizes)."""
    from transformers.pytorch_utils import Conv1D

    from deltatune.quant import quantized_linear_types

    return (nn.Linear, Conv1D, *quantized_linear_types())


_EMPTY: Mapping[str, Any] = types.MappingProxyType({})

LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every linear layer of a LLaMA block: what ``deltatune train``'s presets adapt (its default model is
LLaMA-shaped)."""


@dataclass(frozen=True)
class Variant:
    """A name under which a method is chosen (``deltatune train``'s ``method.name``, ``plan --method``).

    Every method has one for its own name; LoRA also has ``dora``, ``rslora`` and ``qlora``, the same
    method with an option fixed or the base model quantized.
    """

    name: str
    """The name users type (``lora``, ``dora``...)."""
    fixed: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    """Options the name implies (``dora`` -> ``use_dora: true``); setting them otherwise is an error."""
    quantized: bool = False
    """Quantize the base model's linear layers to 4 bits first (QLoRA)."""


@dataclass(frozen=True)
class Method:
    """A registered adapter method: which config it reads, how it builds one layer's adapter, and the
    facts every list of methods derives from (names, presets, default targets, what it supports)."""

    peft_type: PeftType
    config_cls: type[PeftConfig]
    # (config, base_layer, module_name) -> Adapter, or raises ValueError for an unsupported layer.
    make_adapter: Callable[[PeftConfig, nn.Module, str], Adapter] | None
    # Layer types the method can wrap; used by target resolution for errors and "all-linear".
    layer_types: tuple[type, ...] = ()
    # Optional hooks for methods that are not "one adapter per wrapped layer" (prompts, prefixes,
    # selective fine-tuning). Each receives the PeftModel. When set, they replace the default step.
    attach: Callable | None = None  # (peft_model, config, adapter_name) -> None
    detach: Callable | None = None  # (peft_model, adapter_name) -> None
    state_dict: Callable | None = None  # (peft_model, adapter_name) -> {peft key: tensor}
    load_state_dict: Callable | None = None  # (peft_model, state_dict, adapter_name) -> None, all or nothing
    forward: Callable | None = None  # (peft_model, adapter_name, *args, **kwargs) -> model output
    # (peft_model, adapter_name, kwargs) -> the keyword inputs ``forward`` hands the user's model (prompt and
    # prefix tuning add their virtual tokens); lets the fused loss run the model's trunk on them itself.
    model_inputs: Callable | None = None
    # (peft_model, adapter_name) -> scalar tensor or None: what ``forward`` adds to a loss computed from
    # labels (AdaLoRA's orthogonality penalty); the fused loss adds it too.
    loss_penalty: Callable | None = None
    generate: Callable | None = None  # (peft_model, adapter_name, *args, **kwargs) -> token ids
    refresh: Callable | None = None  # (peft_model, trainable_adapter_names) -> None, after set_adapter etc.
    # (config, model) -> config with model-dependent defaults filled in (e.g. IA³'s per-family targets);
    # runs before targets are resolved, and its result is what gets saved.
    prepare_config: Callable | None = None
    # Facts. The CLI, ``deltatune train``'s method table and ``deltatune plan`` read them from here.
    name: str = ""
    """The method's own name (``lora``, ``ia3``...); defaults to ``peft_type``'s value in lower case."""
    variants: tuple[Variant, ...] = ()
    """Other names for this method with some options fixed (LoRA: ``dora``, ``rslora``, ``qlora``)."""
    train_preset: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    """Options ``deltatune train`` uses when the user sets none (written into the run's config file)."""
    default_targets: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    """model_type -> the targets used when ``target_modules`` is None (peft's per-family defaults; IA³:
    a ``(target_modules, feedforward_modules)`` pair)."""
    merges: bool = False
    """Whether ``merge_and_unload`` can fold the adapter into the base weights."""
    servable: bool = False
    """Whether it can be served in mixed batches (per-row adapters from a bank, :mod:`deltatune.serving`)."""
    wraps_forward: bool = False
    """Whether it changes the model's inputs rather than its layers (prompt and prefix tuning)."""
    plannable: bool = False
    """Whether ``deltatune plan`` counts and estimates it."""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", str(getattr(self.peft_type, "value", self.peft_type)).lower())

    def named(self) -> tuple[Variant, ...]:
        """The method's own name first, then its variants."""
        return (Variant(self.name), *self.variants)


METHODS: dict[PeftType, Method] = {}
"""The registry: peft_type -> :class:`Method`. A method module registers itself when imported."""


def register_method(method: Method) -> Method:
    METHODS[method.peft_type] = method
    return method


# Which module defines each method; imported on first use so `import deltatune` stays cheap and a
# method's optional dependencies load only when that method is used.
METHOD_MODULES = {
    PeftType.LORA: "lora", PeftType.ADALORA: "adalora", PeftType.IA3: "ia3", PeftType.PROMPT_TUNING: "prompt",
    PeftType.PREFIX_TUNING: "prefix", PeftType.BOTTLENECK: "bottleneck", PeftType.BITFIT: "bitfit",
    PeftType.PARTIAL: "partial",
}


def get_method(peft_type: PeftType | str) -> Method:
    """The registered method for ``peft_type``, importing its module on first use.

    Raises:
        ValueError: no method has that ``peft_type`` (the message lists the known ones).
    """
    if peft_type in METHODS:
        return METHODS[peft_type]
    try:
        peft_type = PeftType(peft_type)
    except ValueError:
        known = [t.value for t in PeftType] + [str(getattr(t, "value", t)) for t in METHODS if t not in METHOD_MODULES]
        raise ValueError(f"unknown peft_type {peft_type!r}; deltatune supports {known}") from None
    if peft_type not in METHODS:
        importlib.import_module(f"deltatune.methods.{METHOD_MODULES[peft_type]}")
    return METHODS[peft_type]


def all_methods() -> list[Method]:
    """Every method: the built-in ones in :data:`METHOD_MODULES` order (imported now if they were not),
    then any registered since (a plugin, a test's toy method) in registration order."""
    builtin = [get_method(t) for t in METHOD_MODULES]
    return builtin + [m for t, m in METHODS.items() if t not in METHOD_MODULES]


def method_names() -> dict[str, tuple[Method, Variant]]:
    """Every name a user can pick a method by (``lora``, ``dora``, ``qlora``, ``ia3``...), in order, with
    its method and variant."""
    return {v.name: (m, v) for m in all_methods() for v in m.named()}
