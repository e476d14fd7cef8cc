"""A method: the typed interface every adapter method implements, and what the registry holds.

A :class:`Method` declares the facts every list of methods derives from (names, presets, default targets,
what it supports) and implements the calls :class:`deltatune.model.PeftModel` makes: ``prepare``,
``attach``, ``detach``, ``state_dict``, ``load_state_dict``, and the forward-side calls. It works on plain
modules through a :class:`Site` (the user's model, the adapter's name, its config and its own module) and
never sees the PeftModel. The base class is the default layer method, one :class:`Adapter` per wrapped
layer (LoRA, IA³, bottleneck); BitFit, partial fine-tuning, AdaLoRA and the prompt-learning methods
subclass it. The registry itself is :mod:`deltatune.registry`.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from deltatune.config import PeftConfig, PeftType
from deltatune.io import checkpoint as ckpt
from deltatune.registry import METHODS, all_methods, get_method, method_names, register_method  # noqa: F401 (re-exported)
from deltatune.surgery import inject
from deltatune.surgery.adapter import (  # noqa: F401 (re-exported: the contract methods implement)
    Adapter, adapter_dtype, dense_weight, layer_dims, linear_layer_types, set_dense_weight,
)

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
class Site:
    """One adapter as its method sees it: plain modules and a config, never the PeftModel."""

    model: nn.Module
    """The user's model, with the adapter's layers inside it."""
    name: str
    """The adapter's name."""
    config: PeftConfig
    """The adapter's config."""
    own: nn.Module | None = None
    """The module :meth:`Method.attach` returned (prompt tuning's embedding, prefix tuning's encoder), which
    the PeftModel keeps in ``prompt_encoder``; None for layer methods."""
    state: dict[str, Any] = field(default_factory=dict)
    """Run-time state the PeftModel keeps for this adapter between calls, neither config nor weights
    (AdaLoRA's rank allocator)."""


@dataclass(frozen=True)
class Method:
    """A registered adapter method: its facts and the calls PeftModel makes.

    This base class is the layer method: ``attach`` wraps each target layer with the adapter that
    ``make_adapter`` builds, and the weights are saved under peft's keys for the wrapped layers. Methods
    that differ subclass it and override the calls that differ. Register one with
    :func:`deltatune.registry.register_method`.
    """

    peft_type: PeftType
    config_cls: type[PeftConfig]
    make_adapter: Callable[[PeftConfig, nn.Module, str], Adapter] | None = None
    """``(config, base_layer, module_name) -> Adapter``, or raises ValueError for an unsupported layer."""
    layer_types: tuple[type, ...] = ()
    """Layer types the method can wrap (target resolution's errors and ``"all-linear"``)."""
    prepare_config: Callable[[PeftConfig, nn.Module], PeftConfig] | None = None
    """``(config, model) -> config`` with model-dependent defaults filled in (IA³'s per-family targets),
    run before targets are resolved; its result is what gets saved. See :meth:`prepare`."""
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
    callbacks: tuple[Callable[[], Any], ...] = ()
    """Factories of the transformers ``TrainerCallback``s that training with this method needs
    (AdaLoRA's rank allocation); ``deltatune train`` adds them."""
    make_param_adapter: Callable[[PeftConfig, nn.Module, str, tuple[str, ...]], Adapter] | None = None
    """``(config, module, module_name, parameter names) -> ParameterAdapter`` for ``target_parameters``
    (LoRA on MoE expert stacks, :mod:`deltatune.methods.lora_param`); None: the method cannot adapt parameters."""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", str(getattr(self.peft_type, "value", self.peft_type)).lower())

    def named(self) -> tuple[Variant, ...]:
        """The method's own name first, then its variants."""
        return (Variant(self.name), *self.variants)

    # ---- the calls PeftModel makes -------------------------------------------------------------------
    def prepare(self, config: PeftConfig, model: nn.Module) -> PeftConfig:
        """``config`` with model-dependent defaults filled in (``prepare_config``); what gets saved."""
        return config if self.prepare_config is None else self.prepare_config(config, model)

    def check_addable(self, config: PeftConfig, name: str, others: Mapping[str, PeftConfig]) -> None:
        """Raise ValueError if an adapter with ``config`` cannot join ``others`` (the model's adapters)."""

    def attach(self, model: nn.Module, config: PeftConfig, name: str) -> nn.Module | None:
        """Add adapter ``name`` to ``model`` in place (``config`` is prepared). Returns the adapter's own
        module outside the model's layers, if it has one (see :attr:`Site.own`)."""
        if self.make_adapter is None:
            raise ValueError(f"{self.name} does not attach to layers; use get_peft_model instead")
        inject.inject_layers(model, config, name, self.make_adapter)
        return None

    def detach(self, site: Site) -> None:
        """Undo what :meth:`attach` did beyond the wrapped layers, which the PeftModel removes itself."""

    def refresh(self, sites: Sequence[Site], trainable: Sequence[str]) -> None:
        """After the active set changed: ``sites`` are this method's adapters, ``trainable`` the adapter
        names that now train (the wrapped layers have been updated already)."""

    def state_dict(self, site: Site, save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
        """The adapter's tensors under peft's on-disk keys (detached CPU copies)."""
        return ckpt.get_peft_model_state_dict(site.model, site.name, site.config, save_embedding_layers)

    def load_state_dict(self, site: Site, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load peft-keyed tensors into the adapter, all or nothing (ValueError naming what does not fit)."""
        ckpt.set_peft_model_state_dict(site.model, dict(state_dict), site.name, site.config)

    def model_inputs(self, site: Site, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The keyword inputs the user's model gets for ``kwargs`` (prompt and prefix tuning add theirs)."""
        return kwargs

    def loss_penalty(self, site: Site) -> torch.Tensor | None:
        """What :meth:`forward` adds to a loss computed from labels (AdaLoRA's orthogonality term), or None."""
        return None

    def forward(self, site: Site, *args: Any, **kwargs: Any) -> Any:
        """Run the user's model with the adapter applied."""
        return site.model(*args, **kwargs)

    def generate(self, site: Site, *args: Any, **kwargs: Any) -> Any:
        """The user's model's ``generate`` with the adapter applied."""
        return site.model.generate(*args, **kwargs)

    def on_optimizer_step(self, site: Site, global_step: int) -> PeftConfig | None:
        """Called after each optimizer step of a trainable adapter (peft's ``update_and_allocate``);
        returns a changed config to keep, or None. The layer method has nothing to do."""
        return None

    @property
    def steps(self) -> bool:
        """Whether :meth:`on_optimizer_step` does anything (the method overrides it)."""
        return type(self).on_optimizer_step is not Method.on_optimizer_step
