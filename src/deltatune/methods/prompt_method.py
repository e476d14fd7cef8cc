"""The prompt-learning method (prompt tuning, prefix tuning): one encoder module per adapter, outside the
model's layers, whose output goes into the model's inputs at every forward and ``generate``.

The encoder is what :meth:`PromptMethod.attach` returns; :class:`~deltatune.model.PeftModel` keeps it in
``prompt_encoder`` (a ``ModuleDict`` keyed by adapter name, as in peft, so full-model state dicts use
peft's parameter names) and hands it back as ``site.own``. What each method inserts is its ``insert``
function; see :mod:`deltatune.methods.prompt_common` for the shared plumbing and the on-disk format.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from deltatune.config import TaskType
from deltatune.methods.base import Method, Site
from deltatune.methods.prompt_common import (
    PromptLearningConfig, adjust_inputs, cache_argument, cache_is_empty, keyword_inputs, take_cache,
)
from deltatune.surgery import inject
from deltatune.surgery.targets import check_modules_to_save

SAVED_TABLE_KEY = "prompt_embeddings"

InsertFn = Callable[[nn.Module, PromptLearningConfig, nn.Module, dict, bool], dict]
"""``(model, config, encoder, kwargs, fresh) -> kwargs`` with the virtual tokens (or prefix) added."""


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _saved_module_tensors(site: Site) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, wrapper in inject.save_wrappers(site.model):
        if site.name in wrapper.modules_to_save:
            for pname, tensor in wrapper.modules_to_save[site.name].state_dict(keep_vars=True).items():
                out[f"base_model.{name}.{pname}"] = tensor
    return out


@dataclass(frozen=True)
class PromptMethod(Method):
    """A prompt-learning method: ``build_encoder`` makes the adapter's module, ``insert`` puts its output
    into the model's inputs; everything else (storing, saving, forward, generate) is shared."""

    build_encoder: Callable[[PromptLearningConfig, nn.Module], nn.Module] | None = None
    """``(config, model) -> encoder`` (prompt tuning's embedding table, prefix tuning's encoder)."""
    insert: InsertFn | None = None
    """Adds the encoder's output to one forward's inputs (see :data:`InsertFn`)."""
    inserts_tokens: bool = False
    """True when ``insert`` adds positions to the sequence (prompt tuning), False for a cache prefix."""
    wraps_forward: bool = True
    plannable: bool = True

    def attach(self, model: nn.Module, config: PromptLearningConfig, name: str) -> nn.Module:
        """Build the adapter's encoder (returned: the PeftModel keeps it) and wrap its ``modules_to_save``."""
        keys = tuple(dict.fromkeys(config.modules_to_save or ()))
        check_modules_to_save(model, keys)
        encoder = self.build_encoder(config, model).to(_device_of(model))
        inject.add_modules_to_save(model, keys, name)
        return encoder

    def refresh(self, sites: Sequence[Site], trainable: Sequence[str]) -> None:
        """Exactly the trainable adapters' encoders get gradients (the base model is already frozen)."""
        for site in sites:
            site.own.requires_grad_(site.name in trainable)

    # ---- saving and loading (peft's format) ---------------------------------------------------------------
    def state_dict(self, site: Site, save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
        """``{"prompt_embeddings": table}`` plus the ``modules_to_save`` copies, as peft writes them."""
        out = {SAVED_TABLE_KEY: site.own.table_to_save()}
        out.update(_saved_module_tensors(site))
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}

    def load_state_dict(self, site: Site, sd: Mapping[str, torch.Tensor]) -> None:
        """Load a peft-format state dict into the adapter, all or nothing.

        Raises:
            ValueError: listing every missing key, unexpected key and shape mismatch; nothing is copied then.
        """
        encoder = site.own
        modules = _saved_module_tensors(site)
        problems = [f"missing: {k} (expected shape {tuple(v.shape)})" for k, v in modules.items() if k not in sd]
        if SAVED_TABLE_KEY not in sd:
            problems.append(f"missing: {SAVED_TABLE_KEY} (expected shape {tuple(encoder.saved_shape)})")
        else:
            why = encoder.load_problem(tuple(sd[SAVED_TABLE_KEY].shape))
            if why:
                problems.append(why)
        for k, v in sd.items():
            if k != SAVED_TABLE_KEY and k not in modules:
                problems.append(f"unexpected: {k} (shape {tuple(v.shape)}), no such adapter tensor in this model")
            elif k in modules and tuple(v.shape) != tuple(modules[k].shape):
                problems.append(f"shape mismatch at {k}: checkpoint {tuple(v.shape)} vs model {tuple(modules[k].shape)}")
        if problems:
            raise ValueError(f"adapter {site.name!r} does not fit this model; nothing was loaded:\n  " + "\n  ".join(problems))
        with torch.no_grad():
            encoder.load_table(sd[SAVED_TABLE_KEY])
            for k, target in modules.items():
                target.copy_(sd[k].to(device=target.device, dtype=target.dtype))

    # ---- forward and generate -------------------------------------------------------------------------------
    def _inputs_for_base(self, site: Site, kwargs: dict, generating: bool) -> dict:
        """The base model's inputs for one forward."""
        config = site.config
        cache, kwargs = take_cache(kwargs)
        if generating and kwargs.get("use_cache") is False:
            # Without a cache every step is a fresh full sequence; the cache the previous step returned
            # (transformers hands it back even with use_cache=False) must not be reused.
            cache = None
        fresh = cache_is_empty(cache)  # else a decoding step: the cache has the tokens
        if self.inserts_tokens and config.task_type == TaskType.SEQ_2_SEQ_LM:
            fresh = kwargs.get("encoder_outputs") is None  # the prompt is the encoder's: new whenever the encoder runs
        kwargs = adjust_inputs(config, kwargs, self.inserts_tokens, fresh)
        if cache is not None:
            kwargs[cache_argument(site.model)] = cache
        return self.insert(site.model, config, site.own, kwargs, fresh)

    def model_inputs(self, site: Site, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The base model's inputs for one forward, virtual tokens added.

        Prompt tuning returns ``inputs_embeds`` with the prompt in front (and, for per-token tasks, ``labels``
        with ``-100`` in front); prefix tuning returns a pre-filled cache and ``position_ids`` shifted past it.
        Either way the attention mask gains ``num_virtual_tokens`` ones in front. A non-empty cache is a
        decoding step: the cache already holds the virtual tokens.
        """
        return self._inputs_for_base(site, keyword_inputs((), kwargs), generating=False)

    def forward(self, site: Site, *args: Any, **kwargs: Any) -> Any:
        """The base model run on :meth:`model_inputs`' result."""
        return site.model(**self.model_inputs(site, keyword_inputs(args, kwargs)))

    def generate(self, site: Site, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate`` with the virtual tokens added to every forward.

        A forward pre-hook on the base model rewrites each step's inputs while ``generate`` runs: the first
        step (empty cache), or every step with ``use_cache=False``, gets the virtual tokens; every step
        gets the extended attention mask. The hook is removed when ``generate`` returns or raises.

        Prompt tuning on an encoder-decoder model needs no hook: ``generate`` runs the encoder once, outside
        the model's forward, so (as in peft) the prompt goes into the ``inputs_embeds`` handed to it.
        """

        base = site.model
        if self.inserts_tokens and site.config.task_type == TaskType.SEQ_2_SEQ_LM:
            kwargs = keyword_inputs(args, kwargs)
            if kwargs.get("encoder_outputs") is not None:
                raise ValueError(
                    "generate with prompt tuning runs the encoder itself, with the soft prompt in front of the "
                    "input; pass input_ids (or inputs_embeds) and attention_mask instead of encoder_outputs"
                )
            return base.generate(**self._inputs_for_base(site, kwargs, generating=False))

        def pre_hook(module, hook_args, hook_kwargs):
            if hook_args:
                raise TypeError("prompt learning expects generate to call the model with keyword inputs")
            if self.inserts_tokens:
                # generate derives position ids from the attention mask on its own; with virtual tokens in
                # the sequence they are dropped (as in peft) and the model counts positions from 0.
                hook_kwargs.pop("position_ids", None)
            return hook_args, self._inputs_for_base(site, hook_kwargs, generating=True)

        handle = base.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            return base.generate(*args, **kwargs)
        finally:
            handle.remove()
