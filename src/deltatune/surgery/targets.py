"""Target resolution: which modules a config would wrap, as an explicit list, before anything changes.

``resolve_targets(model, config)`` is the dry run. Unlike peft, a ``target_modules`` entry that
matches nothing is an error (peft silently ignores it when another entry matches), and the error
lists the layer names that do exist, with the closest match.
"""
from __future__ import annotations

import difflib
import re
from typing import Any, Iterator, Mapping, Sequence

from torch import nn

from deltatune.config import PeftType
from deltatune.registry import get_method
from deltatune.surgery.layer import AdaptedLayer, ModulesToSaveWrapper

LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")


def iter_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) for every module a method could wrap. An already-wrapped layer counts as its base
    layer, and the inside of our wrappers is skipped, so resolving twice gives the same names."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in skip):
            continue
        if isinstance(module, AdaptedLayer):
            skip.append(name + ".")
            yield name, module.base_layer
        elif isinstance(module, ModulesToSaveWrapper):
            skip.append(name + ".")
            yield name, module.original_module
        else:
            yield name, module


def name_matches(name: str, key: str) -> bool:
    """peft's suffix rule on dotted paths: 'q_proj' matches 'model.layers.0.self_attn.q_proj'."""
    return name == key or name.endswith("." + key)


def _matches(name: str, spec: Sequence[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name_matches(name, key) for key in spec)


def pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """Per-module override from ``rank_pattern``/``alpha_pattern`` (first key matching as a suffix regex)."""
    for key, value in dict(patterns).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def layer_index(name: str, layers_pattern: Sequence[str] | str | None) -> int | None:
    """The block index in module path ``name`` (``model.layers.3.mlp`` -> 3), or None.

    Args:
        name: a dotted module path.
        layers_pattern: the name(s) of the block list (``layers``, ``h``, ...); None tries the usual ones.
    """
    patterns = (layers_pattern,) if isinstance(layers_pattern, str) else (layers_pattern or LAYER_PATTERNS)
    for pattern in patterns:
        m = re.match(rf"(?:.*\.)?{pattern}\.(\d+)(?:\.|$)", name)
        if m:
            return int(m.group(1))
    return None


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's LM head (``get_output_embeddings``), or None; ``all-linear`` leaves it out."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None


def linear_layer_names(model: nn.Module, layer_types: tuple[type, ...]) -> list[str]:
    """Unique last components of wrappable layers, in model order (for error messages and presets)."""
    seen: dict[str, None] = {}
    for name, module in iter_layers(model):
        if isinstance(module, layer_types):
            seen.setdefault(name.rsplit(".", 1)[-1], None)
    return list(seen)


def _no_match_error(model: nn.Module, entry: str, layer_types: tuple[type, ...]) -> ValueError:
    names = linear_layer_names(model, layer_types)
    close = difflib.get_close_matches(entry, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(
        f"target_modules entry {entry!r} matches no module in {type(model).__name__}.{hint} "
        f"Layers that can be targeted: {', '.join(names) or '(none)'}"
    )


# Roles of the linear layers inside attention modules, by the names transformers' architectures give them
# (last path component, case-insensitive). peft's table picks the query and value projections, or the fused
# projection that computes them, for almost every family; these patterns recover exactly that.
QUERY_NAMES = r"(q|query|wq|to_q)(_proj|_lin|_linear)?"
VALUE_NAMES = r"(v|value|wv|to_v)(_proj|_lin|_linear)?"
FUSED_QKV_NAMES = r"qkv|qkv_proj|qkv_lin|query_key_value|c_attn|wqkv|w_pack|in_proj"
ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)


def derived_attention_targets(model: nn.Module, layer_types: tuple[type, ...]) -> tuple[str, ...]:
    """LoRA's default targets read from the architecture: the query and value projections of its attention.

    An attention module is one whose class or attribute name contains ``attn`` or ``attention``; the linear
    layers under it get a role from their own name (:data:`QUERY_NAMES`, :data:`VALUE_NAMES`). When the
    model has both roles the result is their names (``("q_proj", "v_proj")``); otherwise the fused
    projections (:data:`FUSED_QKV_NAMES`, e.g. ``("query_key_value",)``); otherwise ``()``.

    Returns:
        Module names (suffix match, as in peft's table), in model order.
    """
    linear = tuple(t for t in layer_types if not issubclass(t, (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)))
    attention = [  # path prefixes of the attention modules
        n + "." for n, m in model.named_modules()
        if n and (ATTENTION.search(type(m).__name__) or ATTENTION.search(n.rsplit(".", 1)[-1]))
    ]
    roles: dict[str, dict[str, None]] = {"q": {}, "v": {}, "qkv": {}}
    for name, module in iter_layers(model):
        if not isinstance(module, linear) or not any(name.startswith(a) for a in attention):
            continue
        last = name.rsplit(".", 1)[-1]
        for role, pattern in (("q", QUERY_NAMES), ("v", VALUE_NAMES), ("qkv", FUSED_QKV_NAMES)):
            if re.fullmatch(pattern, last, re.IGNORECASE):
                roles[role].setdefault(last, None)
    if roles["q"] and roles["v"]:
        return (*roles["q"], *roles["v"])
    return tuple(roles["qkv"])


def _default_targets(model: nn.Module, layer_types: tuple[type, ...]) -> tuple[str, ...] | str:
    # peft's LoRA defaults per family (deltatune.methods.default_targets, declared by the LoRA method) serve
    # every layer method; a value is names or, for gemma4, one regex. A transformers model of a family with
    # no row gets them from its architecture, so that a new family needs no row; a model without a
    # transformers config (a custom nn.Module) names its targets, as in peft.
    defaults = get_method(PeftType.LORA).default_targets
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in defaults:
        return defaults[model_type]
    derived = derived_attention_targets(model, layer_types) if model_type is not None else ()
    if derived:
        return derived
    raise ValueError(
        f"target_modules is not set and deltatune has no default for model type {model_type!r}"
        + (" (and found no attention query/value projections to derive one from)" if model_type is not None else "")
        + f"; pass target_modules=[...] or 'all-linear'. Layers that can be targeted: "
        f"{', '.join(linear_layer_names(model, layer_types))}"
    )


def default_targets(model: nn.Module, peft_type: Any) -> tuple[str, ...] | str:
    """peft's default ``target_modules`` for the model's family, else those derived from its attention
    (:func:`derived_attention_targets`); an error naming the layers if neither."""
    return _default_targets(model, get_method(peft_type).layer_types)


def resolve_targets(model: nn.Module, config: Any) -> list[str]:
    """The fully qualified names of the modules ``config`` would wrap, in model order.

    Raises:
        ValueError: nothing matches, a ``target_modules`` entry matches nothing, or a matched module
            is of a type the method cannot wrap. The message lists the layers that do exist.
    """
    layer_types = get_method(config.peft_type).layer_types
    spec = config.target_modules if config.target_modules is not None else _default_targets(model, layer_types)
    head = output_head(model)
    layers = list(iter_layers(model))
    if spec == "all-linear":
        # peft's all-linear: linear layers only, never embeddings or convolutions (which LoRA can also wrap)
        linear = tuple(t for t in layer_types if not issubclass(t, (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)))
        chosen = [n for n, m in layers if isinstance(m, linear) and m is not head]
    else:
        chosen = [n for n, _ in layers if _matches(n, spec)]
        # A default row may name layers a model lacks (peft skips them); an explicit entry must match.
        if not isinstance(spec, str) and config.target_modules is not None:
            for entry in spec:
                if not any(name_matches(n, entry) for n in chosen):
                    raise _no_match_error(model, entry, layer_types)
        modules = dict(layers)
        bad = [n for n in chosen if not isinstance(modules[n], layer_types)]
        if bad:
            kinds = sorted({type(modules[n]).__name__ for n in bad})
            raise ValueError(
                f"target_modules matched {bad[0]!r} (a {kinds[0]}), which {config.peft_type.value} cannot wrap; "
                f"supported layer types: {', '.join(t.__name__ for t in layer_types)}. "
                "Name the linear layers inside it instead."
            )
    if config.exclude_modules:
        chosen = [n for n in chosen if not _matches(n, config.exclude_modules)]
    layers_to_transform = getattr(config, "layers_to_transform", None)
    if layers_to_transform is not None:
        wanted = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
        chosen = [n for n in chosen if layer_index(n, getattr(config, "layers_pattern", None)) in wanted]
    if not chosen and not getattr(config, "target_parameters", None):  # with it, target_modules=[] is valid
        raise ValueError(
            f"no module of {type(model).__name__} matches target_modules={spec!r} after exclude_modules / "
            f"layers_to_transform. Layers that can be targeted: {', '.join(linear_layer_names(model, layer_types))}"
        )
    return chosen


# The classifier heads a task type adds to ``modules_to_save`` on its own: peft adds both names, so one
# of them matching nothing is expected.
CLASSIFIER_NAMES = ("classifier", "score")


def resolve_modules_to_save(model: nn.Module, keys: Sequence[str] | None) -> list[str]:
    """Names of the modules trained in full (``modules_to_save``), matched as path suffixes."""
    if not keys:
        return []
    layers = [n for n, _ in iter_layers(model)]
    found = [n for n in layers if any(name_matches(n, k) for k in keys)]
    return found


def check_modules_to_save(model: nn.Module, keys: Sequence[str] | None) -> None:
    """Raise ``ValueError`` for a ``modules_to_save`` entry that matches no module of ``model``
    (except :data:`CLASSIFIER_NAMES`), before anything is changed."""
    for key in keys or ():
        if key not in CLASSIFIER_NAMES and not resolve_modules_to_save(model, [key]):
            raise ValueError(f"modules_to_save entry {key!r} matches no module of {type(model).__name__}")
