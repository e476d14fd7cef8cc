"""PeftModel: the user's model plus named adapters, with peft's names and semantics.

Layout mirrors peft so state-dict paths read the same: ``PeftModel.base_model`` is a thin
:class:`AdapterModel` whose ``.model`` is the user's model with wrapped layers inside.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from torch import nn
from transformers.utils import PushToHubMixin

from deltatune.config import PeftConfig, TaskType
from deltatune.forward_signature import presents_base_signature
from deltatune.combine.adapters import add_weighted_adapter
from deltatune.io import checkpoint as ckpt
from deltatune.methods.base import Method, Site
from deltatune.model_files import AdapterFiles
from deltatune.status import ModelReport
from deltatune.registry import get_method
from deltatune.serving.mixed import MixedBatches
from deltatune.surgery import inject
from deltatune.surgery.layer import AdaptedLayer
from deltatune.surgery.targets import CLASSIFIER_NAMES, check_modules_to_save
from deltatune.tuner import AdapterModel


class PeftModel(AdapterFiles, ModelReport, PushToHubMixin, nn.Module):
    """A model with one or more adapters. Build with :func:`get_peft_model` or :meth:`from_pretrained`.

    ``push_to_hub`` (transformers' mixin, as in peft) uploads what :meth:`save_pretrained` writes: the adapter.

    It holds all adapter state itself, in the attributes below, and hands each adapter's method a
    :class:`deltatune.methods.base.Site` (plain modules and the config), never itself.
    """

    base_model: AdapterModel
    """peft's tuner; its ``.model`` is the user's model with the wrapped layers inside."""
    peft_config: dict[str, PeftConfig]
    """adapter name -> config, in the order the adapters were added."""
    prompt_encoder: nn.ModuleDict
    """adapter name -> the adapter's own module outside the layers (prompt and prefix tuning), as in
    peft; created with the first such adapter."""
    _active: tuple[str, ...]
    """The active adapters' names (``set_adapter``)."""
    _disabled: bool
    """True between ``disable_adapter_layers()`` and ``enable_adapter_layers()`` (and in ``disable_adapter()``)."""
    _method_state: dict[str, dict[str, Any]]
    """adapter name -> its method's run-time state (:attr:`Site.state`)."""
    mixed_batches: MixedBatches
    """The bank and lock of ``adapter_names=[...]`` requests (:mod:`deltatune.serving.mixed`)."""

    def __init__(
        self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", autocast_adapter_dtype: bool = True
    ) -> None:
        super().__init__()
        self.base_model = AdapterModel(model, self)
        self.peft_config: dict[str, PeftConfig] = {}
        self._active: tuple[str, ...] = ()
        self._disabled = False
        self._method_state = {}
        self.mixed_batches = MixedBatches()
        self.add_adapter(adapter_name, peft_config, autocast_adapter_dtype=autocast_adapter_dtype)
        self.set_adapter(adapter_name)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "for_task" in cls.__dict__:  # a task class (deltatune.tasks): the class for configs of that task_type
            _TASK_CLASSES[cls.for_task] = cls
        forward = cls.__dict__.get("forward")
        if forward is not None and not isinstance(forward, presents_base_signature):
            cls.forward = presents_base_signature(forward)

    # ---- attribute passthrough (peft forwards unknown attributes to the base model) ----------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def model(self) -> nn.Module:
        """The user's model, with the adapter layers inside it (the same as :meth:`get_base_model`)."""
        return self.base_model.model

    def get_base_model(self) -> nn.Module:
        """The user's model (with adapters still inside it)."""
        return self.base_model.model

    # ---- forward / generate --------------------------------------------------------------------
    @classmethod
    def class_for(cls, config: PeftConfig) -> type["PeftModel"]:
        """The class a model with ``config``'s adapter is built as: the task class of its ``task_type``
        (:mod:`deltatune.tasks`), else :class:`PeftModel`."""
        return _TASK_CLASSES.get(config.task_type, PeftModel)

    def _method(self, adapter_name: str) -> Method:
        return get_method(self.peft_config[adapter_name].peft_type)

    def _site(self, adapter_name: str) -> Site:
        """What the adapter's method sees of it: the user's model, the name, the config, its own module."""
        own = self._modules.get("prompt_encoder")
        return Site(
            self.base_model.model, adapter_name, self.peft_config[adapter_name],
            own[adapter_name] if own is not None and adapter_name in own else None,
            self._method_state.setdefault(adapter_name, {}),
        )

    def _running(self) -> str | None:
        """The adapter whose method runs the forward: the first active one, unless adapters are disabled."""
        return self._active[0] if self._active and not self._disabled else None

    @presents_base_signature
    def forward(self, *args, **kwargs):
        # one adapter per row (see deltatune.serving), unless inside disable_adapter(): that wins, as in peft
        if kwargs.get("adapter_names") is not None and not self._disabled:
            return self.mixed_batches.forward(self.base_model.model, self.peft_config, kwargs.pop("adapter_names"), args, kwargs)
        kwargs.pop("adapter_names", None)
        with self.mixed_batches.serialised():  # a plain call waits for an adapter_names request in flight
            name = self._running()
            if name is None:
                return self.base_model.model(*args, **kwargs)
            return self._method(name).forward(self._site(name), *args, **kwargs)

    def model_inputs(self, **kwargs: Any) -> dict[str, Any]:
        """The keyword inputs :meth:`forward` hands the user's model (:attr:`model`) for ``kwargs``.

        ``kwargs`` themselves, except under an active prompt-learning adapter: prompt tuning puts its
        virtual tokens in front of ``inputs_embeds`` (and ``-100`` in front of per-token ``labels``), prefix
        tuning pre-fills the cache; both extend the attention mask. Code that runs the model's trunk itself
        (the fused loss, :func:`deltatune.train.loss.causal_lm_loss`) starts from these.
        """
        name = self._running()
        return kwargs if name is None else self._method(name).model_inputs(self._site(name), kwargs)

    def loss_penalty(self) -> Any:
        """The term :meth:`forward` adds to a loss computed from labels (AdaLoRA's orthogonality penalty
        while it trains), as a scalar tensor, or None."""
        name = self._running()
        return None if name is None else self._method(name).loss_penalty(self._site(name))

    def generate(self, *args, **kwargs):
        """Generate with the user's model's ``generate``, through the active adapter.

        Arguments are transformers' ``generate``'s. ``adapter_names=[...]`` (one name per row, ``"__base__"``
        for none) runs each row with its own adapter, as in peft (see :mod:`deltatune.serving`). A prompt or
        prefix tuning adapter adds its virtual tokens or key/value prefix at the first step.

        Returns:
            What the user's model's ``generate`` returns.
        """
        if kwargs.get("adapter_names") is not None and not self._disabled:  # see forward
            return self.mixed_batches.generate(self.base_model.model, self.peft_config, kwargs.pop("adapter_names"), args, kwargs)
        kwargs.pop("adapter_names", None)
        with self.mixed_batches.serialised():
            name = self._running()
            if name is None:
                return self.base_model.model.generate(*args, **kwargs)
            return self._method(name).generate(self._site(name), *args, **kwargs)

    # ---- adapters --------------------------------------------------------------------------------
    @property
    def active_adapter(self) -> str:
        """The name of the first active adapter, or ``""`` when none is active (peft's attribute)."""
        return self._active[0] if self._active else ""

    @property
    def active_adapters(self) -> list[str]:
        """The names of the active adapters, in the order :meth:`set_adapter` was given them."""
        return list(self._active)

    def _prepare_config(self, config: PeftConfig) -> PeftConfig:
        # SEQ_CLS and TOKEN_CLS train the classifier head in full, as peft does ('classifier' or 'score').
        if config.task_type in (TaskType.SEQ_CLS, TaskType.TOKEN_CLS) and hasattr(config, "modules_to_save"):
            extra = [n for n in CLASSIFIER_NAMES if n not in (config.modules_to_save or ())]
            config = config.replace(modules_to_save=tuple(config.modules_to_save or ()) + tuple(extra))
        base = self.base_model.model
        name = getattr(getattr(base, "config", None), "_name_or_path", None)
        if config.base_model_name_or_path is None and name:
            config = config.replace(base_model_name_or_path=name)
        return get_method(config.peft_type).prepare(config, base)

    def add_adapter(
        self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False, autocast_adapter_dtype: bool = True
    ) -> None:
        """Attach a new adapter. It is not made active: call :meth:`set_adapter` for that.

        ``autocast_adapter_dtype`` (peft's default, True): on a bf16/fp16 base, the injected adapter's
        weights are kept in fp32, so small optimizer updates are not rounded away; its products are
        computed in fp32 and cast back to the layer's dtype.
        """
        ckpt.check_adapter_name(adapter_name)  # it becomes a folder name on save
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; delete_adapter it first or pick another name")
        if adapter_name == "__base__":
            raise ValueError("'__base__' is reserved for 'no adapter' in mixed batches; pick another name")
        config = self._prepare_config(peft_config)
        if self.peft_config and config.peft_type != next(iter(self.peft_config.values())).peft_type:
            _check_mixable(next(iter(self.peft_config.values())), config)
        method = get_method(config.peft_type)
        method.check_addable(config, adapter_name, self.peft_config)
        check_modules_to_save(self.base_model.model, getattr(config, "modules_to_save", None))
        own = method.attach(self.base_model.model, config, adapter_name)
        if own is not None:
            if "prompt_encoder" not in self._modules:
                self.prompt_encoder = nn.ModuleDict()
            self.prompt_encoder[adapter_name] = own
        if autocast_adapter_dtype:
            inject.upcast_adapter(self.base_model.model, adapter_name)
        self.peft_config[adapter_name] = config
        self._refresh()

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make the named adapter (or several at once) active and trainable; every other one is bypassed and frozen.

        An adapter loaded with ``is_trainable=False`` (``inference_mode``) becomes active but stays frozen.

        Args:
            adapter_name: one adapter's name, or a list of names to apply together.

        Raises:
            ValueError: a name that is not one of this model's adapters.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"no adapter named {n!r}; this model has {sorted(self.peft_config)}")
        self._active = tuple(names)
        self._refresh()

    def _refresh(self) -> None:
        """Push the active set into every wrapper and make exactly the active adapters trainable."""
        model = self.base_model.model
        inject.set_active(model, self._active)
        trainable = [n for n in self._active if not self.peft_config[n].inference_mode]
        bias = self.peft_config[self._active[0]].bias if self._active and hasattr(self.peft_config[self._active[0]], "bias") else "none"
        inject.mark_trainable(model, trainable, bias)
        for peft_type in dict.fromkeys(c.peft_type for c in self.peft_config.values()):
            sites = [self._site(n) for n, c in self.peft_config.items() if c.peft_type == peft_type]
            get_method(peft_type).refresh(sites, trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter: its layers, its weights and its config.

        The other active adapters stay active; when none is left, the first remaining adapter becomes active.

        Args:
            adapter_name: the adapter to remove.

        Raises:
            ValueError: a name that is not one of this model's adapters.
        """
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; this model has {sorted(self.peft_config)}")
        self._method(adapter_name).detach(self._site(adapter_name))
        inject.delete_adapter(self.base_model.model, adapter_name)
        own = self._modules.get("prompt_encoder")
        if own is not None and adapter_name in own:
            del own[adapter_name]
        self._method_state.pop(adapter_name, None)
        del self.peft_config[adapter_name]
        self._active = tuple(n for n in self._active if n != adapter_name) or tuple(self.peft_config)[:1]
        self._refresh()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model: inside the block every adapter is bypassed (merged ones are unmerged first)."""
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            self.base_model.enable_adapter_layers()

    # ---- merging ---------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the (given or active) adapters into the base weights; forward then skips them."""
        names = adapter_names or list(self._active)
        prompts = [n for n in names if self.peft_config[n].is_prompt_learning]
        if prompts:
            raise ValueError(
                f"adapter {prompts[0]!r} is {self.peft_config[prompts[0]].peft_type.value}: virtual tokens and prefixes "
                "are inputs, not weight changes, so they cannot be merged; keep the PeftModel for inference"
            )
        hosts = [host for _, host in inject.adapted_layers(self.base_model.model)]
        # Check every adapter first, so a non-mergeable one (bottleneck) never leaves the model half merged.
        for host in hosts:
            for n in names:
                adapter = host.adapters[n] if n in host.adapters else None
                if adapter is not None and not adapter.mergeable:
                    host.merge([n])  # raises the adapter's own explanation; nothing has been merged yet
        inject.untie_before_merge(self.base_model.model, names)  # tied embeddings: merge into a copy
        for host in hosts:
            host.merge(names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Undo :meth:`merge_adapter`: take the merged adapters back out of the base weights, so forward applies them unmerged again."""
        for _, host in inject.adapted_layers(self.base_model.model):
            host.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge, then return the user's model with every wrapper removed."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self.unload()

    def unload(self) -> nn.Module:
        """Return the user's model with every wrapper removed (unmerged adapters are dropped)."""
        return inject.unwrap(self.base_model.model)

    def get_adapter_state_dict(self, adapter_name: str, save_embedding_layers: bool | str = "auto") -> dict:
        """The adapter's tensors under peft's on-disk keys: what :meth:`save_pretrained` writes.

        Args:
            adapter_name: the adapter.
            save_embedding_layers: peft's option: also save the input/output embedding matrices. ``"auto"``
                saves them when an embedding layer is itself a target.

        Returns:
            ``{key: tensor}``, each tensor a detached CPU copy of its own (tied weights are not shared).
        """
        return self._method(adapter_name).state_dict(self._site(adapter_name), save_embedding_layers)

    def load_adapter_state_dict(self, state_dict: dict, adapter_name: str = "default") -> None:
        """Load peft-keyed tensors (what :meth:`get_adapter_state_dict` gives) into an existing adapter, all
        or nothing (peft's ``set_peft_model_state_dict``).

        Raises:
            ValueError: the tensors do not fit the adapter (the message says which).
        """
        self._method(adapter_name).load_state_dict(self._site(adapter_name), state_dict)

    def update_and_allocate(self, global_step: int) -> None:
        """peft's AdaLoRA call after each optimizer step (after ``loss.backward()`` and ``optimizer.step()``,
        before ``optimizer.zero_grad()``): the trainable adapter's method updates itself for ``global_step``
        (0-based); AdaLoRA re-allocates its rank budget. Also reachable as ``model.base_model.update_and_allocate``.

        Raises:
            ValueError: no trainable adapter of a method that does this (AdaLoRA).
        """
        names = [n for n, c in self.peft_config.items() if not c.inference_mode and self._method(n).steps]
        if not names:
            raise ValueError(
                "update_and_allocate needs a trainable AdaLoRA adapter; this model has none (loaded for inference? "
                "use PeftModel.from_pretrained(..., is_trainable=True))"
            )
        for name in names:
            changed = self._method(name).on_optimizer_step(self._site(name), global_step)
            if changed is not None:
                self.peft_config[name] = changed

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, **kwargs: Any) -> None:
        """Combine existing LoRA adapters into a new one (peft's semantics); see :mod:`deltatune.combine`."""
        add_weighted_adapter(self, adapters, weights, adapter_name, **kwargs)


_TASK_CLASSES: dict[Any, type[PeftModel]] = {}
"""task_type -> the PeftModel subclass for it (:mod:`deltatune.tasks`); each adds itself when defined."""


def _model_class(config: PeftConfig) -> type[PeftModel]:
    return PeftModel.class_for(config)


def _check_mixable(first: PeftConfig, new: PeftConfig) -> None:
    if first.is_prompt_learning or new.is_prompt_learning:
        raise ValueError(
            f"cannot add a {new.peft_type.value} adapter next to a {first.peft_type.value} one on the same PeftModel: "
            "prompt-learning methods change the model's inputs and do not mix with other methods; use a separate model"
        )


_MIXED_MODEL: list[type[PeftModel]] = []  # what get_peft_model(mixed=True) builds (register_mixed_model)


def register_mixed_model(cls: type[PeftModel]) -> None:
    """Called by :mod:`deltatune.mixed_model` for its ``PeftMixedModel`` (it imports this module, not the reverse)."""
    _MIXED_MODEL[:] = [cls]


def get_peft_model(
    model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", mixed: bool = False,
    autocast_adapter_dtype: bool = True, **_: Any
) -> PeftModel:
    """Wrap ``model`` with a new trainable adapter (peft's entry point; see :meth:`PeftModel.add_adapter`
    for ``autocast_adapter_dtype``). ``mixed=True``: a ``PeftMixedModel`` (:mod:`deltatune.mixed_model`)."""
    if isinstance(model, PeftModel):
        raise ValueError("model is already a PeftModel; use model.add_adapter(name, config) to add another adapter")
    if any(isinstance(m, AdaptedLayer) for m in model.modules()):
        raise ValueError("model already has adapters injected (inject_adapter_in_model); wrap the original model instead")
    return (_MIXED_MODEL[0] if mixed else _model_class(peft_config))(model, peft_config, adapter_name, autocast_adapter_dtype)


def count_trainable(module: nn.Module) -> int:
    """The number of elements in ``module``'s parameters that require grad."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

