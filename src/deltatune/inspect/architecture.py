"""A model's architecture without its weights: build it on the meta device from its config.

Every tensor of a meta-device model has a shape and a dtype but no storage, so a 70B model is built
in about a second with no memory, and target resolution, parameter counts and adapter key checks
run on it exactly as they would on the real model.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.config import TaskType
from deltatune.methods.base import layer_dims
from deltatune.surgery.targets import iter_layers, output_head

_TASK_AUTO_CLASSES = {
    TaskType.SEQ_CLS: "AutoModelForSequenceClassification",
    TaskType.TOKEN_CLS: "AutoModelForTokenClassification",
    TaskType.CAUSAL_LM: "AutoModelForCausalLM",
    TaskType.FEATURE_EXTRACTION: "AutoModel",
}


def _candidate_builders(config: Any, task_type: TaskType | None) -> list[Any]:
    """Model classes to try, best first: the task's auto class, else the class the config names
    (``architectures[0]``, e.g. BertForSequenceClassification), then a causal LM, then the bare model."""
    import transformers

    names: list[str] = []
    if task_type in _TASK_AUTO_CLASSES:
        names.append(_TASK_AUTO_CLASSES[task_type])
    names += list(getattr(config, "architectures", None) or [])[:1]
    names += ["AutoModelForCausalLM", "AutoModel"]
    seen: dict[str, None] = dict.fromkeys(names)
    return [getattr(transformers, n) for n in seen if hasattr(transformers, n)]


def meta_model(config: Any, task_type: TaskType | str | None = None) -> nn.Module:
    """Instantiate the model described by ``config`` on the meta device (no weights, no memory).

    Args:
        config: a transformers config, e.g. from :func:`deltatune.models.model_config`.
        task_type: picks the head (``SEQ_CLS`` adds a classifier); None uses the class named in
            ``config.architectures``, else a causal LM, else the bare model.

    Returns:
        The model, in eval mode, with every parameter on the meta device.

    Raises:
        ValueError: transformers knows no model class for this config.
    """
    task = TaskType(task_type) if task_type is not None else None
    errors: list[str] = []
    for builder in _candidate_builders(config, task):
        quiet = logging.getLogger("transformers")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "Some weights are newly initialized" etc. mean nothing on meta
        try:
            with torch.device("meta"):
                make = builder.from_config if hasattr(builder, "from_config") else builder
                return make(config).eval()
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            errors.append(f"{getattr(builder, '__name__', builder)}: {err}")
        finally:
            quiet.setLevel(level)
    raise ValueError(
        f"transformers cannot build a model for model_type {getattr(config, 'model_type', None)!r}: "
        + "; ".join(errors) + ". Upgrade transformers, or inspect a model folder it supports."
    )


@dataclass(frozen=True)
class Architecture:
    """The headline numbers of a model, read from its config and its meta-device instance."""

    model_type: str
    """transformers' model type, e.g. ``llama``; picks the target presets."""
    architecture: str
    """The model class, e.g. ``LlamaForCausalLM``."""
    layers: int | None
    """Number of transformer blocks."""
    hidden_size: int | None
    """Width of the residual stream."""
    intermediate_size: int | None
    """Width of the feed-forward layer."""
    attention_heads: int | None
    """Query heads per layer."""
    kv_heads: int | None
    """Key/value heads per layer (fewer than query heads means grouped-query attention)."""
    vocab_size: int | None
    """Tokenizer vocabulary size."""
    max_positions: int | None
    """Longest sequence the position encoding was built for."""
    tied_embeddings: bool
    """True when the output head shares the input embedding matrix (counted once)."""
    parameters: int
    """Distinct parameters of the base model (tied matrices counted once)."""
    dtype: str | None
    """The dtype the checkpoint was saved in, per its config."""


def _first(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def describe(config: Any, model: nn.Module) -> Architecture:
    """Summarise ``config`` and the (meta) ``model`` built from it."""
    dtype = _first(config, "dtype", "torch_dtype")
    return Architecture(
        model_type=str(getattr(config, "model_type", "?")),
        architecture=type(model).__name__,
        layers=_first(config, "num_hidden_layers", "n_layer", "num_layers"),
        hidden_size=_first(config, "hidden_size", "n_embd", "d_model"),
        intermediate_size=_first(config, "intermediate_size", "n_inner", "ffn_dim"),
        attention_heads=_first(config, "num_attention_heads", "n_head"),
        kv_heads=_first(config, "num_key_value_heads", "num_kv_heads", "multi_query_group_num"),
        vocab_size=_first(config, "vocab_size"),
        max_positions=_first(config, "max_position_embeddings", "n_positions", "max_seq_len"),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        parameters=sum(p.numel() for p in model.parameters()),
        dtype=str(dtype).replace("torch.", "") if dtype is not None else None,
    )


@dataclass(frozen=True)
class LayerGroup:
    """Wrappable layers that differ only in their block index, e.g. every block's ``q_proj``."""

    pattern: str
    """The module path with block indices replaced by ``*``: ``model.layers.*.self_attn.q_proj``."""
    kind: str
    """Layer class name (``Linear``, ``Conv1D``, ``Embedding``)."""
    in_features: int
    """Input width (vocabulary size for an embedding)."""
    out_features: int
    """Output width."""
    count: int
    """How many layers share this pattern and shape."""
    is_output_head: bool
    """True for the LM head, which ``all-linear`` leaves out."""


def layer_groups(model: nn.Module, layer_types: tuple[type, ...]) -> list[LayerGroup]:
    """Group the layers of ``model`` that ``layer_types`` can wrap, in model order.

    A path component that is a number (a block index) becomes ``*``, so a 30-block model shows
    one line per projection instead of thirty.
    """
    head = output_head(model)
    groups: dict[tuple, list[Any]] = {}
    for name, module in iter_layers(model):
        if not isinstance(module, layer_types):
            continue
        pattern = re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", name)
        fan_out, fan_in = layer_dims(module)
        key = (pattern, type(module).__name__, fan_in, fan_out, module is head)
        groups.setdefault(key, []).append(name)
    return [LayerGroup(p, kind, i, o, len(names), is_head) for (p, kind, i, o, is_head), names in groups.items()]
