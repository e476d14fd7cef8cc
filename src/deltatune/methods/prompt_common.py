"""What prompt tuning and prefix tuning share: the config base, the model's dimensions and input plumbing.

Both methods leave the model's layers alone. Their trainable state is one small module per adapter
(the "prompt encoder"), kept in ``PeftModel.prompt_encoder`` (a ``ModuleDict`` keyed by adapter
name, as in peft, so full-model state dicts use peft's parameter names). At every forward they
change the model's *inputs*: prompt tuning inserts virtual tokens into the sequence, prefix tuning
pre-fills the key/value cache. Either way the attention mask gains ``num_virtual_tokens`` ones in
front. On encoder-decoder models (task_type SEQ_2_SEQ_LM, as peft's ``PeftModelForSeq2SeqLM``) the
prompt goes in front of the encoder's inputs and the prefix into the decoder's self-attention cache
(so the mask that grows is the encoder's or the decoder's); labels and decoder inputs are untouched.
The method itself, :class:`~deltatune.methods.prompt_method.PromptMethod`, is in ``prompt_method.py``.

On disk (peft's format) the adapter is one tensor, ``prompt_embeddings``, plus any
``modules_to_save`` copies under ``base_model.<module path>.<param>`` (no ``.model.``: peft's prompt
learning keeps the user's model itself as ``base_model``).
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from deltatune.config import PeftConfig, PeftType, TaskType
# Tasks whose model reads token_type_ids (peft keeps them there and drops them elsewhere).
_KEEPS_TOKEN_TYPES = (TaskType.SEQ_CLS, TaskType.TOKEN_CLS, TaskType.QUESTION_ANS)
# Tasks whose labels are per position, so inserted virtual tokens need ignored (-100) labels.
_PER_TOKEN_LABELS = (TaskType.CAUSAL_LM, TaskType.TOKEN_CLS)


@dataclass(frozen=True)
class PromptLearningConfig(PeftConfig):
    """Fields every prompt-learning config shares (peft's ``PromptLearningConfig``).

    The model dimensions default to None and are read from the model's config when the adapter is
    added, as peft does; the filled-in values are what ``adapter_config.json`` records.
    """

    peft_type: ClassVar[PeftType]

    num_virtual_tokens: int | None = None
    """How many virtual tokens (soft-prompt vectors, or prefix key/value positions) to learn. Required."""
    token_dim: int | None = None
    """Width of one virtual token. None: the model's hidden size (prefix tuning on a grouped-query
    model: head_dim × num_key_value_heads, the width of one layer's keys)."""
    num_transformer_submodules: int | None = None
    """1 for decoder-only and encoder-only models, 2 for encoder-decoder ones (peft's prompt tables then
    have twice the rows). None: 2 for task_type SEQ_2_SEQ_LM, else 1."""
    num_attention_heads: int | None = None
    """Heads of the model (prefix tuning on a grouped-query model: the key/value heads). None: from the model."""
    num_layers: int | None = None
    """Transformer layers of the model. None: from the model."""
    modules_to_save: Sequence[str] | None = None
    """Modules (suffix match) trained in full and saved with the adapter; SEQ_CLS adds the classifier."""

    @property
    def is_prompt_learning(self) -> bool:
        return True

    def validate(self) -> None:
        n = self.num_virtual_tokens
        if not (isinstance(n, int) and not isinstance(n, bool) and n > 0):
            raise ValueError(f"num_virtual_tokens must be a positive integer (e.g. 20), got {n!r}")
        for name in ("token_dim", "num_attention_heads", "num_layers", "num_transformer_submodules"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive integer or None (read from the model), got {value!r}")
        seq2seq = self.task_type == TaskType.SEQ_2_SEQ_LM
        if self.num_transformer_submodules not in ((None, 1, 2) if seq2seq else (None, 1)):
            raise ValueError(
                f"num_transformer_submodules={self.num_transformer_submodules} with "
                f"task_type={getattr(self.task_type, 'value', self.task_type)!r}: "
                "use 1 for decoder-only and encoder-only models, 2 (or None) with task_type='SEQ_2_SEQ_LM' "
                "for encoder-decoder ones"
            )


# ---- model dimensions ------------------------------------------------------------------------------
def _first_attr(cfg: Any, names: Sequence[str]) -> int | None:
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    return None


def text_config(model: nn.Module) -> Any:
    """The model's (text) config: the language-model part of a vision-language config."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError(
            f"{type(model).__name__} has no .config; pass num_layers, token_dim and num_attention_heads explicitly"
        )
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def fill_model_dims(config: PromptLearningConfig, model: nn.Module) -> PromptLearningConfig:
    """Fill the dimension fields left as None from the model's config (peft's lookup order)."""
    cfg = text_config(model)
    lookups = {
        "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
        "token_dim": ("hidden_size", "n_embd", "d_model"),
        "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
    }
    changes: dict[str, int] = {}
    for field_name, names in lookups.items():
        if getattr(config, field_name) is None:
            value = _first_attr(cfg, names)
            if value is None:
                raise ValueError(f"cannot read {field_name} from {type(cfg).__name__}; pass {field_name}=... in the config")
            changes[field_name] = value
    if config.num_transformer_submodules is None:  # peft's default
        changes["num_transformer_submodules"] = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
    _check_task_fits(config, model)
    return config.replace(**changes) if changes else config


def _check_task_fits(config: PromptLearningConfig, model: nn.Module) -> None:
    """SEQ_2_SEQ_LM exactly on encoder-decoder models: only that task knows there are two stacks (the
    decoder-only plumbing on a T5 would, e.g., prepend -100 to labels its decoder reads as inputs)."""
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    task = getattr(config.task_type, "value", config.task_type)
    if encoder_decoder and task != TaskType.SEQ_2_SEQ_LM.value:
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model but task_type={task!r}: prompt learning on it "
            "needs task_type='SEQ_2_SEQ_LM' (the prompt goes into the encoder, the prefix into the decoder)"
        )
    if not encoder_decoder and task == TaskType.SEQ_2_SEQ_LM.value:
        raise ValueError(
            f"task_type='SEQ_2_SEQ_LM' needs an encoder-decoder model (T5, BART, mT5); {type(model).__name__} "
            "is not one (its config has no is_encoder_decoder=True): use task_type='CAUSAL_LM' for a decoder-only model"
        )


# ---- input plumbing ------------------------------------------------------------------------------------
def first_input(kwargs: dict[str, Any]) -> torch.Tensor:
    """The tensor that fixes the batch size and device: input_ids or inputs_embeds (or the decoder's)."""
    # generate calls an encoder-decoder model with encoder_outputs and decoder inputs only
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds"):
        if kwargs.get(key) is not None:
            return kwargs[key]
    raise ValueError("prompt learning needs input_ids or inputs_embeds to know the batch size; pass one of them")


def extend_attention_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Prepend ``n`` ones (the virtual tokens are always attended to) to a (B, T) mask."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError(
            f"prompt learning extends 2-D (batch, seq) attention masks; got a {mask.dim()}-D mask. "
            "Pass the 2-D padding mask and let the model build the 4-D one."
        )
    ones = torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device)
    return torch.cat([ones, mask], dim=1)  # (B, n + T)


def prepend(t: torch.Tensor, n: int, value: int) -> torch.Tensor:
    """Prepend ``n`` columns filled with ``value`` to a (B, T) tensor (labels, token types)."""
    pad = torch.full((t.shape[0], n), value, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=1)  # (B, n + T)


def adjust_inputs(config: PromptLearningConfig, kwargs: dict[str, Any], inserts_tokens: bool, fresh: bool) -> dict[str, Any]:
    """Make the base model's keyword inputs consistent with ``num_virtual_tokens`` extra positions.

    Args:
        config: the adapter's config.
        kwargs: the base model's keyword inputs (changed copy returned).
        inserts_tokens: True if the method puts virtual tokens into the sequence (prompt tuning);
            False if they only live in the key/value cache (prefix tuning).
        fresh: True if this forward starts a sequence (the virtual tokens are added now); False for a
            decoding step whose cache already holds them.
    """
    n, task = config.num_virtual_tokens, config.task_type
    kwargs = dict(kwargs)
    # On encoder-decoder models a prefix lives in the decoder's self-attention only (as in peft), so the
    # decoder's mask grows there and the encoder's does not; a prompt goes into the encoder's inputs.
    mask = "decoder_attention_mask" if task == TaskType.SEQ_2_SEQ_LM and not inserts_tokens else "attention_mask"
    kwargs[mask] = extend_attention_mask(kwargs.get(mask), n)
    if kwargs.get("position_ids") is not None:
        if inserts_tokens:
            warnings.warn("position_ids are not supported with prompt tuning and are ignored (as in peft)", stacklevel=4)
            kwargs["position_ids"] = None
        else:
            kwargs["position_ids"] = kwargs["position_ids"] + n  # the prefix occupies positions 0..n-1
    if kwargs.get("token_type_ids") is not None:
        if task not in _KEEPS_TOKEN_TYPES:
            warnings.warn("token_type_ids are not supported with prompt learning and are ignored (as in peft)", stacklevel=4)
            kwargs["token_type_ids"] = None
        elif inserts_tokens and fresh:
            kwargs["token_type_ids"] = prepend(kwargs["token_type_ids"], n, 0)
    if inserts_tokens and fresh and kwargs.get("labels") is not None and task in _PER_TOKEN_LABELS:
        kwargs["labels"] = prepend(kwargs["labels"], n, -100)
    return kwargs


# transformers 5.25 renamed the models' ``past_key_values`` argument to ``cache``; ``generate`` passes the
# new name, and a forward given both silently uses ``cache`` and drops ``past_key_values`` (the old name
# is accepted, with a FutureWarning, until 5.40). So the cache is read under either name and handed on
# under the one the model's forward declares: writing the old name while generate passes the new one is
# how a prefix got lost and prompt tokens got re-inserted at every decoding step on 5.25.
CACHE_NAMES = ("cache", "past_key_values")


def cache_argument(model: nn.Module) -> str:
    """The name under which ``model.forward`` takes its key/value cache (``cache`` from transformers 5.25 on)."""
    seen: set[int] = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        params = inspect.signature(model.forward).parameters
        for name in CACHE_NAMES:
            if name in params:
                return name
        # a task head (BertForSequenceClassification) may take **kwargs only and hand them to its backbone
        model = getattr(model, "base_model", None)
    return "past_key_values"


def take_cache(kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The cache passed under either name, and the inputs without both names.

    Raises:
        ValueError: if two different caches were passed, one under each name.
    """
    rest = {k: v for k, v in kwargs.items() if k not in CACHE_NAMES}
    given = [kwargs[k] for k in CACHE_NAMES if kwargs.get(k) is not None]
    if len(given) == 2 and given[0] is not given[1]:
        raise ValueError("two key/value caches were passed (cache= and past_key_values=); pass one, as cache=")
    return (given[0] if given else None), rest


def cache_is_empty(cache: Any) -> bool:
    """True if ``cache`` holds no tokens yet (None or an empty transformers ``Cache``)."""
    if cache is None:
        return True
    if not hasattr(cache, "get_seq_length"):
        raise TypeError(
            f"past_key_values of type {type(cache).__name__} is not supported; pass a transformers Cache "
            "(e.g. DynamicCache) — legacy tuple caches were removed in transformers 5"
        )
    return cache.get_seq_length() == 0


# An insert function turns the (adjusted) base-model inputs into ones that carry the virtual tokens:
# (peft_model, config, encoder, kwargs, fresh) -> kwargs.
def keyword_inputs(args: tuple, kwargs: dict) -> dict:
    """The inputs by keyword (``input_ids`` may come first by position), checked to fix a batch size."""
    if args:
        if len(args) > 1 or "input_ids" in kwargs:
            raise TypeError("pass the model's inputs by keyword (input_ids=..., attention_mask=...)")
        kwargs = {**kwargs, "input_ids": args[0]}
    first_input(kwargs)  # a clear error when neither input_ids nor inputs_embeds is given
    return kwargs
