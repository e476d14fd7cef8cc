"""Injection: wrap the resolved modules, attach adapters, and choose what trains.

This is the only place that replaces submodules of the user's model.
"""
from __future__ import annotations

import re
import warnings
from typing import Callable, Iterable

import torch
from torch import nn

from deltatune.config import PeftConfig, PeftType
from deltatune.registry import get_method
from deltatune.surgery.layer import AdaptedLayer, ModulesToSaveWrapper, TokenAdapterHolder
from deltatune.surgery.params import ParamAdaptedLayer, check_same_parameters, resolve_param_targets
from deltatune.surgery.targets import resolve_modules_to_save, resolve_targets


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule at dotted path ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _device_of(module: nn.Module):
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return None


# peft's PEFT_TYPE_TO_PREFIX_MAPPING for the layer methods: how a state_dict key names its module.
_STATE_DICT_PREFIX = {"LORA": "lora_", "ADALORA": "lora_", "IA3": "ia3_"}


def inject_adapter_in_model(
    config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Add adapter ``adapter_name`` described by ``config`` to ``model`` in place (peft's function of the
    same name): its method prepares the config and attaches the adapter to the layers. Returns ``model``.
    Only adapter parameters (and ``modules_to_save`` copies) are left trainable.

    As in peft, the prepared config is kept in ``model.peft_config[adapter_name]`` (a dict; a second
    injection adds to it), which :func:`deltatune.get_peft_model_state_dict` and
    :func:`deltatune.set_peft_model_state_dict` read on such a model.

    Args:
        config: the adapter's config (a layer method: LoRA, IA³, AdaLoRA, ...).
        model: the model to change.
        adapter_name: the new adapter's name.
        low_cpu_mem_usage: peft's option: the adapter's weights end up on the meta device (no memory,
            no values) until :func:`deltatune.set_peft_model_state_dict` loads them; the model cannot
            run before that. (deltatune initialises them first, then frees them.)
        state_dict: peft's option: when given, the adapted modules are the ones its keys name
            (``<module>.lora_A.weight`` -> ``<module>``), not the ones ``config.target_modules``
            selects; a ``RuntimeWarning`` lists any difference. Only the keys are used, never the values.
    """
    method = get_method(config.peft_type)
    if method.wraps_forward:
        raise ValueError(f"{config.peft_type.value} does not attach to layers; use get_peft_model instead")
    if state_dict is not None and getattr(config, "target_parameters", None):
        raise ValueError(  # peft's rule: the keys of a parameter's LoRA name its module, not the parameter
            "inject_adapter_in_model(state_dict=...) cannot be used with target_parameters (as in peft); inject "
            "without state_dict, then load the weights with set_peft_model_state_dict"
        )
    prepared = method.prepare(config, model)
    attach_config = prepared if state_dict is None else _targets_from_state_dict(prepared, model, state_dict)
    method.attach(model, attach_config, adapter_name)
    if low_cpu_mem_usage:
        for _, host in adapted_layers(model):
            if adapter_name in host.adapters:
                host.adapters[adapter_name].to_empty(device="meta")
    configs = model.__dict__.get("peft_config")
    if not isinstance(configs, dict):
        configs = {}
        model.peft_config = configs
    configs[adapter_name] = prepared
    return model


def _targets_from_state_dict(config: PeftConfig, model: nn.Module, state_dict) -> PeftConfig:
    """``config`` selecting exactly the modules that ``state_dict``'s keys name (peft's rule), warning about
    any difference from what ``config`` selects."""
    prefix = _STATE_DICT_PREFIX.get(config.peft_type.value)
    if prefix is None:
        raise ValueError(
            f"inject_adapter_in_model(state_dict=...) supports {sorted(_STATE_DICT_PREFIX)} adapters (their keys name "
            f"their modules); for {config.peft_type.value}, leave state_dict out and select modules with target_modules."
        )
    paths = {n.removeprefix("_orig_mod.") for n, _ in model.named_modules() if n}
    names = {k.rsplit("." + prefix, 1)[0].removeprefix("_orig_mod.") for k in state_dict}
    names = sorted(names & paths)
    if not names:
        raise ValueError(
            f"no key of the state_dict names a module of {type(model).__name__} (expected keys like "
            f"'<module path>.{prefix}...' without a 'base_model.model.' prefix, as get_peft_model_state_dict gives on "
            "an injected model)."
        )
    chosen = config.replace(
        target_modules="|".join(re.escape(n) for n in names), exclude_modules=None,
        **{k: None for k in ("layers_to_transform", "layers_pattern") if hasattr(config, k)},
    )
    try:
        from_config = set(resolve_targets(model, config))
    except ValueError:
        from_config = set()
    extra_config, extra_sd = sorted(from_config - set(names)), sorted(set(names) - from_config)
    if extra_config or extra_sd:
        warnings.warn(
            "While injecting the adapter, the config and the state_dict select different modules; the state_dict's "
            f"are used. Only in the config: {extra_config}. Only in the state_dict: {extra_sd}.",
            RuntimeWarning, stacklevel=3,
        )
    return chosen


def inject_layers(model: nn.Module, config: PeftConfig, adapter_name: str, make_adapter: Callable) -> list[str]:
    """Wrap every target layer of ``config`` with ``make_adapter(config, base_layer, path)`` and give every
    ``modules_to_save`` entry a trainable copy; only adapter parameters are left trainable.

    Returns:
        The dotted paths of the wrapped layers.
    """
    targets = resolve_targets(model, config)
    for name in targets:
        module = model.get_submodule(name)
        host = module if isinstance(module, AdaptedLayer) else AdaptedLayer(module)
        _install(model, name, module, host, adapter_name, make_adapter(config, host.base_layer, name))
    if getattr(config, "target_parameters", None):  # LoRA's option: adapters on nn.Parameters (MoE experts)
        inject_parameters(model, config, adapter_name, get_method(config.peft_type).make_param_adapter)
    add_modules_to_save(model, getattr(config, "modules_to_save", None), adapter_name)
    if getattr(config, "trainable_token_indices", None) is not None:  # LoRA's option: some embedding rows train
        get_method(PeftType.TRAINABLE_TOKENS).attach_rows(model, config, adapter_name)
    mark_trainable(model, [adapter_name], getattr(config, "bias", "none"))
    return targets


def inject_parameters(model: nn.Module, config: PeftConfig, adapter_name: str, make_adapter: Callable | None) -> list[str]:
    """Host each module that holds a ``config.target_parameters`` parameter in a
    :class:`~deltatune.surgery.params.ParamAdaptedLayer` and add ``make_adapter(config, module, path,
    parameter names)`` to it (peft's ``_inject_parameters``, after the module targets as in peft).

    Returns:
        The dotted paths of the adapted parameters.
    """
    if make_adapter is None:
        raise ValueError(f"{config.peft_type.value} cannot adapt nn.Parameters; remove target_parameters from its config")
    chosen = resolve_param_targets(model, config)
    check_same_parameters(model, chosen, adapter_name)
    for name, params in chosen.items():
        module = model.get_submodule(name)
        if not isinstance(module, ParamAdaptedLayer) and isinstance(module, (AdaptedLayer, ModulesToSaveWrapper)):
            raise ValueError(
                f"{name} is already wrapped as a whole ({type(module).__name__}: a target_modules or modules_to_save "
                f"entry) and target_parameters selects its {list(params)}; a module can be adapted one way only. "
                "Leave it out of target_modules (e.g. target_modules=[]) or out of target_parameters."
            )
        host = module if isinstance(module, ParamAdaptedLayer) else ParamAdaptedLayer(module)
        _install(model, name, module, host, adapter_name, make_adapter(config, host.base_layer, name, params))
    return [f"{n}.{p}" for n, ps in chosen.items() for p in ps]


def _install(model: nn.Module, name: str, module: nn.Module, host: nn.Module, adapter_name: str, adapter: nn.Module) -> None:
    """Add ``adapter`` to ``host`` on its base layer's device; a new ``host`` (not ``module``) replaces ``module`` at ``name``."""
    device = _device_of(host.base_layer)
    if device is not None:
        adapter.to(device)
    host.add(adapter_name, adapter)
    if host is not module:
        host.set_active((adapter_name,))
        set_submodule(model, name, host)


def add_modules_to_save(model: nn.Module, keys, adapter_name: str) -> list[str]:
    """Give ``adapter_name`` a trainable full copy of each module that ``keys`` selects (peft's ``modules_to_save``).

    A module is wrapped in a :class:`ModulesToSaveWrapper` the first time; a wrapper already there gets
    one more copy. A newly wrapped module starts with ``adapter_name`` active.

    Returns:
        The dotted paths of the selected modules.
    """
    names = resolve_modules_to_save(model, keys)
    for name in names:
        module = model.get_submodule(name)
        wrapper = module if isinstance(module, ModulesToSaveWrapper) else ModulesToSaveWrapper(module)
        wrapper.add(adapter_name)
        if wrapper is not module:
            wrapper.set_active((adapter_name,))
            set_submodule(model, name, wrapper)
    return names


def adapted_layers(model: nn.Module) -> Iterable[tuple[str, AdaptedLayer]]:
    """The ``(path, layer)`` pairs of every :class:`AdaptedLayer` in ``model``, found by type."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, AdaptedLayer))


def upcast_adapter(model: nn.Module, adapter_name: str) -> None:
    """Store ``adapter_name``'s bf16/fp16 weights in fp32 in every wrapped layer (peft's
    ``autocast_adapter_dtype``); the same Parameter objects, so nothing holding them goes stale."""
    for _, host in adapted_layers(model):
        adapter = host.adapters[adapter_name] if adapter_name in host.adapters else None
        for p in adapter.parameters() if adapter is not None else ():
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()


def save_wrappers(model: nn.Module) -> Iterable[tuple[str, ModulesToSaveWrapper]]:
    """The ``(path, wrapper)`` pairs of every :class:`ModulesToSaveWrapper` in ``model``."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper))


def mark_trainable(model: nn.Module, trainable: Iterable[str], bias: str = "none") -> None:
    """Freeze everything, then unfreeze the named adapters, their ``modules_to_save`` copies and the
    biases that ``bias`` asks for. Adapters are found by type, never by parameter-name substrings."""
    trainable = set(trainable)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, host in adapted_layers(model):
        for name, adapter in host.adapters.items():
            adapter.requires_grad_(name in trainable)
        if bias == "lora_only" and isinstance(getattr(host.base_layer, "bias", None), nn.Parameter):
            host.base_layer.bias.requires_grad_(True)
    for _, wrapper in save_wrappers(model):
        for name, copy_ in wrapper.modules_to_save.items():
            copy_.requires_grad_(name in trainable)
    if bias == "all":
        for module in model.modules():
            b = getattr(module, "bias", None)
            if isinstance(b, nn.Parameter):
                b.requires_grad_(True)
        # The original behind a modules_to_save copy stays frozen: only the copy trains (as in peft).
        for _, wrapper in save_wrappers(model):
            wrapper.original_module.requires_grad_(False)


def set_active(model: nn.Module, names: tuple[str, ...]) -> None:
    """Make ``names`` the active adapters of every adapted layer and ``modules_to_save`` wrapper of ``model``."""
    for _, host in adapted_layers(model):
        host.set_active(names)
    for _, wrapper in save_wrappers(model):
        wrapper.set_active(names)


def set_disabled(model: nn.Module, disabled: bool) -> None:
    """Bypass (``disabled=True``) or restore every adapted layer and ``modules_to_save`` wrapper of ``model``."""
    for _, m in list(adapted_layers(model)) + list(save_wrappers(model)):
        m.disabled = disabled


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` from every layer and wrapper of ``model``; a wrapper left without adapters is replaced by the module it wrapped."""
    for _, host in list(adapted_layers(model)):
        if adapter_name in host.adapters:
            host.remove(adapter_name)
    for _, wrapper in list(save_wrappers(model)):
        if adapter_name in wrapper.modules_to_save:
            wrapper.remove(adapter_name)
    # A wrapper left with no adapters goes away, so the model is exactly the base model again.
    for name, host in list(adapted_layers(model)):
        if not host.adapters:
            set_submodule(model, name, host.base_layer)
    for name, wrapper in list(save_wrappers(model)):
        if not wrapper.modules_to_save:
            set_submodule(model, name, wrapper.original_module)
    _drop_empty_holders(model)


def _drop_empty_holders(model: nn.Module) -> None:
    """Replace each :class:`TokenAdapterHolder` whose adapted layer is gone by the plain layer it held."""
    for name, holder in [(n, m) for n, m in model.named_modules() if isinstance(m, TokenAdapterHolder)]:
        if not isinstance(holder.token_adapter, AdaptedLayer):
            set_submodule(model, name, holder.token_adapter)


def unwrap(model: nn.Module, keep_trained_copies: bool = True) -> nn.Module:
    """Replace every wrapper by the plain module (the active trained copy for ``modules_to_save``)."""
    for name, host in list(adapted_layers(model)):
        set_submodule(model, name, host.base_layer)
    for name, wrapper in list(save_wrappers(model)):
        if keep_trained_copies and wrapper.active is not None and not wrapper.disabled:
            set_submodule(model, name, wrapper.modules_to_save[wrapper.active])
        else:
            set_submodule(model, name, wrapper.original_module)
    _drop_empty_holders(model)
    return model


def untie_before_merge(model: nn.Module, adapter_names: Iterable[str]) -> list[str]:
    """Give every layer about to merge one of ``adapter_names`` its own copy of a weight it shares with
    another module, and return their paths.

    With tied input and output embeddings (GPT-2, SmolLM2, Qwen2) ``lm_head.weight`` *is*
    ``embed_tokens.weight``: folding a LoRA on ``lm_head`` into it would change the input embedding
    too, and the merged model would differ from the adapted one (peft only warns). The adapted model
    already computes as if untied, so untying keeps its outputs; ``config.tie_word_embeddings`` is
    set to False so saving and reloading do not tie them again.
    """
    names = set(adapter_names)
    paths_of: dict[int, list[str]] = {}
    for path, p in model.named_parameters(remove_duplicate=False):
        paths_of.setdefault(id(p), []).append(path)
    untied = []
    for path, host in adapted_layers(model):
        weight = getattr(host.base_layer, "weight", None)
        wanted = names & set(host.adapters) - set(host.merged)
        if not isinstance(weight, nn.Parameter) or not wanted or len(paths_of.get(id(weight), ())) < 2:
            continue
        if all(getattr(host.adapters[n], "keeps_ties", False) for n in wanted):
            continue  # trainable tokens write the same rows into the shared matrix: the tie stays (as in peft)
        others = [p for p in paths_of[id(weight)] if not p.startswith(f"{path}.")]
        host.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        untied.append(path)
        warnings.warn(
            f"{path} shares its weight with {', '.join(others)} (tied embeddings); merging gives {path} its own "
            "copy so the other stays as it was, and sets config.tie_word_embeddings=False", stacklevel=3,
        )
    if untied:
        for cfg in (getattr(model, "config", None), _text_config(model)):
            if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False
    return untied


def _text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else None
