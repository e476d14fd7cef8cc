"""Prefix tuning: learned key/value vectors prepended to the attention of every layer.

Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation" (arXiv:2101.00190),
section 4.2: every layer attends to ``num_virtual_tokens`` extra key/value pairs that no token
produced. Section 4.3's re-parameterisation (``prefix_projection=True``) learns a smaller
embedding and an MLP, ``P = W₂ tanh(W₁ E + b₁) + b₂``, which trains more stably; after training
only P matters.

The prefix enters through transformers' cache API: the model gets a ``DynamicCache`` whose layer
``i`` already holds the prefix keys/values, shaped (batch, num_key_value_heads, num_virtual_tokens,
head_dim). The model then numbers the real tokens from ``num_virtual_tokens`` on (it reads the
cache length), exactly as peft does. The attention mask gets ``num_virtual_tokens`` ones in front.
On an encoder-decoder model the prefix is the decoder's self-attention cache only (peft's layout, see
:func:`decoder_prefix`), and the decoder's attention mask gets the ones.

On disk (peft's format) the adapter is ``prompt_embeddings``: the final (num_virtual_tokens,
num_layers · 2 · token_dim) table P, also when it was trained through the MLP (the MLP is not
saved, so such an adapter loads for inference only).
"""
from __future__ import annotations

import types

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.config import PeftType, TaskType
from deltatune.methods.prompt_common import (
    PromptLearningConfig,
    cache_argument,
    cache_is_empty,
    fill_model_dims,
    first_input,
    text_config,
)
from deltatune.methods.prompt_method import PromptMethod
from deltatune.registry import register_method


@dataclass(frozen=True)
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (Li & Liang, 2021, arXiv:2101.00190) with peft's field names and semantics."""

    peft_type: ClassVar[PeftType] = PeftType.PREFIX_TUNING

    init_weights: str | None = None
    """None: random prefix. "zero": the prefix keys/values start at zero (the table, or the MLP's last layer)."""
    encoder_hidden_size: int | None = None
    """Hidden width of the re-parameterisation MLP (prefix_projection only). None: token_dim."""
    prefix_projection: bool = False
    """Train through the MLP re-parameterisation (section 4.3) instead of the table directly."""

    def validate(self) -> None:
        super().validate()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}")
        h = self.encoder_hidden_size
        if h is not None and not (isinstance(h, int) and h > 0):
            raise ValueError(f"encoder_hidden_size must be a positive integer or None (token_dim), got {h!r}")


# ---- functional core ----------------------------------------------------------------------------------
def prefix_key_values(table: torch.Tensor, batch: int, num_layers: int, num_heads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split the prefix table into one (keys, values) pair per layer.

    A row of the table is one virtual token: [layer 0 keys, layer 0 values, layer 1 keys, ...], each
    block num_heads · head_dim wide (peft's layout).

    Args:
        table: (n, num_layers · 2 · num_heads · head_dim).
        batch: rows to broadcast to.
        num_layers: layers of the model.
        num_heads: key/value heads per layer.

    Returns:
        ``num_layers`` pairs, each tensor (batch, num_heads, n, head_dim).
    """
    n = table.shape[0]
    kv = table.view(n, 2 * num_layers, num_heads, -1).permute(1, 2, 0, 3)  # (2L, H, n, D)
    kv = kv.unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (2L, B, H, n, D)
    return [(kv[2 * i], kv[2 * i + 1]) for i in range(num_layers)]


def prefilled_cache(cache: Any, key_values: list[tuple[torch.Tensor, torch.Tensor]], model_config: Any = None) -> Any:
    """An empty transformers ``Cache`` (or a new ``DynamicCache``) pre-filled with the prefix, layer by layer."""
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model_config) if model_config is not None else DynamicCache()
    if not cache_is_empty(cache):
        raise ValueError("the prefix can only be written into an empty cache")
    for layer_idx, (keys, values) in enumerate(key_values):
        cache.update(keys, values, layer_idx)
    return cache


def decoder_prefix(key_values: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """peft's encoder-decoder layout: decoder layer ``i``'s self-attention reads block ``2i mod L``.

    peft stacks the table's per-layer blocks [keys 0, values 0, keys 1, ...] twice (for the two
    stacks), regroups them four per decoder layer as (self keys, self values, cross keys, cross values),
    then empties the cross-attention part, so cross-attention reads the encoder as usual and layer ``i``
    keeps the pair that landed at position ``4i mod 2L``. Kept as is, so a table means the same in both
    libraries (with an even ``L``, the odd blocks are never read in either).

    Args:
        key_values: ``L`` (keys, values) pairs from :func:`prefix_key_values`, one per table block.

    Returns:
        ``L`` pairs, one per decoder layer.
    """
    n_blocks = len(key_values)
    return [key_values[(2 * i) % n_blocks] for i in range(n_blocks)]


def prefilled_decoder_cache(cache: Any, key_values: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """An empty ``EncoderDecoderCache`` (or a new one) whose self-attention part holds the decoder prefix.

    The cross-attention part stays empty: the decoder fills it from the encoder's outputs.
    """
    from transformers import DynamicCache, EncoderDecoderCache

    if cache is None:
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    if not isinstance(cache, EncoderDecoderCache):
        raise TypeError(
            f"prefix tuning on an encoder-decoder model needs an EncoderDecoderCache, got {type(cache).__name__}; "
            "pass none and one is made"
        )
    prefilled_cache(cache.self_attention_cache, decoder_prefix(key_values))
    return cache


# ---- module -------------------------------------------------------------------------------------------
class PrefixEncoder(nn.Module):
    """The prefix of one adapter: a table P, or an embedding plus MLP that computes it.

    Parameter names match peft's (``embedding``, ``transform.0``, ``transform.2``).
    """

    def __init__(self, n: int, width: int, token_dim: int, hidden: int | None, zero: bool) -> None:
        super().__init__()
        self.projected = hidden is not None
        if self.projected:
            self.embedding = nn.Embedding(n, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
            if zero:
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(n, width)
            if zero:
                nn.init.zeros_(self.embedding.weight)
        self.table_shape = (n, width)

    def forward(self) -> torch.Tensor:
        """The prefix table P: (n, num_layers · 2 · token_dim)."""
        if self.projected:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    @property
    def saved_shape(self) -> tuple[int, int]:
        """The shape of the table saved as ``prompt_embeddings``: ``(num_virtual_tokens, num_layers * 2 * token_dim)``."""
        return self.table_shape

    def table_to_save(self) -> torch.Tensor:
        """The prefix table saved as ``prompt_embeddings`` (peft's key); with ``prefix_projection`` the MLP's output, as peft saves it."""
        return self()

    def load_problem(self, shape: tuple[int, ...]) -> str | None:
        """Why a saved table of ``shape`` cannot be loaded into this encoder, or None when it can.

        A projected encoder (``prefix_projection=True``, training) cannot take a saved table: the MLP that made
        it is not saved, so only an inference copy (``is_trainable=False``) can load it.
        """
        if self.projected:
            return (
                "prompt_embeddings is the projected prefix table; the MLP (prefix_projection=True) that produced it "
                "is not saved, so it cannot be resumed for training: load it with is_trainable=False"
            )
        if shape != self.table_shape:
            return (
                f"shape mismatch at prompt_embeddings: checkpoint {shape} vs model {self.table_shape} "
                "(a different num_virtual_tokens, or a prefix made for another model?)"
            )
        return None

    def load_table(self, table: torch.Tensor) -> None:
        """Copy a saved ``prompt_embeddings`` table into the encoder's table, in its dtype."""
        self.embedding.weight.copy_(table.to(self.embedding.weight.dtype))


def build_prefix_encoder(config: PrefixTuningConfig, model: nn.Module) -> PrefixEncoder:
    """A table (or, when training with prefix_projection, the MLP re-parameterisation)."""
    if _checkpointing(model):
        raise ValueError(_GC_MESSAGE)
    width = config.num_layers * 2 * config.token_dim
    # A loaded adapter is the final table: the MLP is only built to train from scratch (as in peft).
    hidden = config.encoder_hidden_size if config.prefix_projection and not config.inference_mode else None
    return PrefixEncoder(config.num_virtual_tokens, width, config.token_dim, hidden, config.init_weights == "zero")


def _checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


_GC_MESSAGE = (
    "prefix tuning passes its prefix through the key/value cache, which gradient checkpointing disables in "
    "training; turn gradient checkpointing off (gradient_checkpointing=False) or use prompt tuning or LoRA"
)


def insert_prefix(base: nn.Module, config: PrefixTuningConfig, encoder: PrefixEncoder, kwargs: dict, fresh: bool) -> dict:
    """On a fresh sequence, hand the model a cache pre-filled with the prefix; decoding steps pass through."""
    if base.training and _checkpointing(base):
        raise ValueError(_GC_MESSAGE)
    if not fresh:
        return kwargs
    ref = first_input(kwargs)
    dtype = getattr(base, "dtype", None) or encoder.embedding.weight.dtype
    table = encoder().to(device=ref.device, dtype=dtype)  # (n, L · 2 · token_dim)
    kv = prefix_key_values(table, ref.shape[0], config.num_layers, config.num_attention_heads)
    name = cache_argument(base)
    if config.task_type == TaskType.SEQ_2_SEQ_LM:  # the decoder's self-attention only, as in peft
        cache = prefilled_decoder_cache(kwargs.get(name), kv)
    else:
        cache = prefilled_cache(kwargs.get(name), kv, getattr(base, "config", None))
    return {**kwargs, name: cache}


def prepare_prefix_config(config: PrefixTuningConfig, model: nn.Module) -> PrefixTuningConfig:
    """peft's defaults: dimensions from the model; on grouped-query models, one layer's key width and
    key/value heads (the prefix lives in the cache, which holds num_key_value_heads heads)."""
    given_token_dim = config.token_dim
    config = fill_model_dims(config, model)
    cfg = text_config(model)
    if config.task_type == TaskType.SEQ_2_SEQ_LM:
        config = _fit_decoder(config, cfg, given_token_dim)
    kv_heads = getattr(cfg, "num_key_value_heads", None)
    changes: dict[str, int] = {}
    if isinstance(kv_heads, int):  # as peft: always, so a saved config re-derives the same values
        head_dim = getattr(cfg, "head_dim", None)
        head_dim = head_dim if isinstance(head_dim, int) else config.token_dim // config.num_attention_heads
        changes = {"token_dim": head_dim * kv_heads, "num_attention_heads": kv_heads}
    if config.encoder_hidden_size is None:
        changes["encoder_hidden_size"] = changes.get("token_dim", config.token_dim)
    config = config.replace(**changes) if changes else config
    if config.token_dim % config.num_attention_heads:
        raise ValueError(
            f"token_dim={config.token_dim} is not a multiple of num_attention_heads={config.num_attention_heads}; "
            "token_dim must be head_dim × key/value heads"
        )
    return config


def _fit_decoder(config: PrefixTuningConfig, cfg: Any, given_token_dim: int | None) -> PrefixTuningConfig:
    """Encoder-decoder models: one table block per decoder layer, as wide as one layer's keys.

    T5's keys are ``num_heads × d_kv`` wide, which need not be ``d_model`` (flan-t5-small: 6 × 64 vs 512),
    so a ``token_dim`` left as None becomes that width; peft would use ``d_model`` and fail.

    Raises:
        ValueError: for a combination that cannot work, with the value to use instead.
    """
    if config.num_transformer_submodules != 2:
        raise ValueError(
            f"num_transformer_submodules={config.num_transformer_submodules}: prefix tuning on an encoder-decoder "
            "model needs 2 (or None); with 1 the decoder's cross-attention would read the prefix cache too"
        )
    depth = getattr(cfg, "num_decoder_layers", None) or getattr(cfg, "decoder_layers", None)
    if isinstance(depth, int) and depth != config.num_layers:
        raise ValueError(
            f"num_layers={config.num_layers} but the decoder has {depth} layers: the prefix fills the decoder's "
            f"cache, one block per decoder layer; pass num_layers={depth}"
        )
    d_kv = getattr(cfg, "d_kv", None)
    if isinstance(d_kv, int) and config.token_dim != d_kv * config.num_attention_heads:
        width = d_kv * config.num_attention_heads
        if given_token_dim is None:
            return config.replace(token_dim=width)
        raise ValueError(
            f"token_dim={config.token_dim} is not num_attention_heads × d_kv = {config.num_attention_heads} × {d_kv}: "
            f"a prefix block is one layer's keys; pass token_dim={width} (or leave it None)"
        )
    return config


register_method(PromptMethod(
    PeftType.PREFIX_TUNING, PrefixTuningConfig, prepare_config=prepare_prefix_config, name="prefix",
    train_preset=types.MappingProxyType({"num_virtual_tokens": 20}),
    build_encoder=build_prefix_encoder, insert=insert_prefix, inserts_tokens=False,
))
