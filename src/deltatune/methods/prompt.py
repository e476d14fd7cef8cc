"""Prompt tuning: a learned soft prompt prepended to the input embeddings.

Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning" (arXiv:2104.08691),
section 2: the frozen model reads ``[P; E(x)]`` where ``P`` is a (num_virtual_tokens, d) matrix of
trainable vectors and ``E(x)`` the input embeddings. Section 3.2's initialisations are the options
here: random, sampled vocabulary embeddings, or the embeddings of a text (e.g. the class labels).

The attention mask gets ``num_virtual_tokens`` ones in front; for causal LM (and token
classification) the labels get ``-100`` in front, so the virtual positions carry no loss. On disk
(peft's format) the prompt is ``prompt_embeddings``, shaped (num_virtual_tokens, token_dim); on an
encoder-decoder model (num_transformer_submodules=2) twice the rows, of which the encoder reads the first half.
"""
from __future__ import annotations

import enum
import types
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from deltatune.config import PeftType
from deltatune.methods.prompt_common import PromptLearningConfig, fill_model_dims
from deltatune.methods.prompt_method import PromptMethod
from deltatune.registry import register_method


class PromptTuningInit(str, enum.Enum):
    """How the soft prompt starts (peft's values)."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclass(frozen=True)
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al., 2021, arXiv:2104.08691) with peft's field names and semantics."""

    peft_type: ClassVar[PeftType] = PeftType.PROMPT_TUNING

    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    """"RANDOM": N(0, 1) vectors (may lie off the embedding manifold). "SAMPLE_VOCAB": embeddings of
    random vocabulary tokens. "TEXT": embeddings of ``prompt_tuning_init_text``'s tokens, repeated or
    cut to ``num_virtual_tokens``."""
    prompt_tuning_init_text: str | None = None
    """The text whose token embeddings start the prompt (TEXT only), e.g. "Classify the sentiment:"."""
    tokenizer_name_or_path: str | None = None
    """Local folder of the tokenizer for ``prompt_tuning_init_text`` (TEXT only; never downloaded)."""
    tokenizer_kwargs: Mapping[str, Any] | None = None
    """Extra ``AutoTokenizer.from_pretrained`` arguments (TEXT only); ``trust_remote_code`` is refused."""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "prompt_tuning_init", PromptTuningInit(self.prompt_tuning_init))
        except ValueError:
            raise ValueError(
                f"prompt_tuning_init={self.prompt_tuning_init!r} is not known; use one of {[i.value for i in PromptTuningInit]}"
            ) from None
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        text = self.prompt_tuning_init == PromptTuningInit.TEXT
        if text and not self.tokenizer_name_or_path:
            raise ValueError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a local tokenizer folder)")
        if text and self.prompt_tuning_init_text is None:
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text, the text to start from")
        if self.tokenizer_kwargs and not text:
            raise ValueError("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'; remove it or set TEXT")


# ---- functional core ----------------------------------------------------------------------------------
def fit_token_ids(ids: list[int], n: int) -> list[int]:
    """Repeat or cut ``ids`` to exactly ``n`` entries (peft's TEXT initialisation)."""
    if not ids:
        raise ValueError("prompt_tuning_init_text tokenizes to no tokens; use a non-empty text")
    return (ids * math.ceil(n / len(ids)))[:n]


def prepend_prompt(prompt: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """[P; E(x)] for every row of the batch: prompt (n, d), embeds (B, T, d) -> (B, n + T, d)."""
    batch = embeds.shape[0]
    prompt = prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, n, d)
    return torch.cat([prompt, embeds], dim=1)  # (B, n + T, d)


# ---- module -------------------------------------------------------------------------------------------
class PromptEmbedding(nn.Module):
    """The soft prompt of one adapter: ``embedding.weight`` is P, shaped (num_virtual_tokens, token_dim)."""

    def __init__(self, num_tokens: int, token_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_tokens, token_dim)  # N(0, 1) rows: the RANDOM initialisation

    def forward(self) -> torch.Tensor:
        return self.embedding.weight  # (n, d)

    @property
    def saved_shape(self) -> tuple[int, int]:
        """The shape of the table saved as ``prompt_embeddings``: the prompt's own, ``(rows, token_dim)``."""
        return tuple(self.embedding.weight.shape)

    def table_to_save(self) -> torch.Tensor:
        """The prompt table, saved as ``prompt_embeddings`` (peft's key)."""
        return self.embedding.weight

    def load_problem(self, shape: tuple[int, ...]) -> str | None:
        """Why a saved table of ``shape`` cannot be loaded into this prompt (the message names both shapes), or None when it can."""
        if shape != self.saved_shape:
            return (
                f"shape mismatch at prompt_embeddings: checkpoint {shape} vs model {self.saved_shape} "
                "(a different num_virtual_tokens, or a prompt made for another model?)"
            )
        return None

    def load_table(self, table: torch.Tensor) -> None:
        """Copy a saved ``prompt_embeddings`` table into the prompt, in the prompt's dtype."""
        self.embedding.weight.copy_(table.to(self.embedding.weight.dtype))


def _init_rows(config: PromptTuningConfig, word_embeddings: nn.Module, n: int) -> torch.Tensor | None:
    """The starting prompt rows (fp32), or None for RANDOM."""
    if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
        ids = torch.randint(0, word_embeddings.num_embeddings, (n,), dtype=torch.long)
    elif config.prompt_tuning_init == PromptTuningInit.TEXT:
        from transformers import AutoTokenizer

        kwargs = dict(config.tokenizer_kwargs or {})
        if kwargs.pop("trust_remote_code", None):
            raise ValueError("tokenizer_kwargs may not set trust_remote_code: loading a prompt must never run code")
        try:
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, local_files_only=True, **kwargs)
        except OSError as e:
            raise ValueError(
                f"cannot load a tokenizer from {config.tokenizer_name_or_path!r} (local files only): {e}"
            ) from None
        ids = torch.tensor(fit_token_ids(list(tokenizer(config.prompt_tuning_init_text)["input_ids"]), n))
    else:
        return None
    device = word_embeddings.weight.device
    with torch.no_grad():
        return word_embeddings(ids.to(device)).detach().to(torch.float32)  # (n, d)


def build_prompt_embedding(config: PromptTuningConfig, model: nn.Module) -> PromptEmbedding:
    """The adapter's prompt, initialised as the config asks (nothing to initialise when loading)."""
    n = config.num_virtual_tokens * config.num_transformer_submodules
    encoder = PromptEmbedding(n, config.token_dim)
    if not config.inference_mode:
        rows = _init_rows(config, _word_embeddings(model), n)
        if rows is not None:
            if rows.shape[1] != config.token_dim:
                raise ValueError(f"token_dim={config.token_dim} but the model's embeddings are {rows.shape[1]} wide")
            encoder.embedding.weight = nn.Parameter(rows.cpu())
    return encoder


def _word_embeddings(model: nn.Module) -> nn.Module:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        raise ValueError(f"{type(model).__name__} has no input embeddings (get_input_embeddings()); prompt tuning needs them")
    return emb


def insert_prompt(model: nn.Module, config: PromptTuningConfig, encoder: PromptEmbedding, kwargs: dict, fresh: bool) -> dict:
    """On a fresh sequence, replace input_ids/inputs_embeds by [P; E(x)]; decoding steps pass through.

    On an encoder-decoder model these are the encoder's inputs, and only the first ``num_virtual_tokens``
    rows of the table are read: peft keeps a second block for the decoder that prompt tuning never uses.
    """
    if not fresh:
        return kwargs
    embeds = kwargs.pop("inputs_embeds", None)
    ids = kwargs.pop("input_ids", None)
    if embeds is None and ids is None:
        raise ValueError("prompt tuning needs the encoder's input_ids or inputs_embeds (or its encoder_outputs)")
    if embeds is None:
        embeds = _word_embeddings(model)(ids)  # (B, T, d)
    prompt = encoder()[: config.num_virtual_tokens]  # (n, d)
    return {**kwargs, "inputs_embeds": prepend_prompt(prompt, embeds)}


def prepare_prompt_config(config: PromptTuningConfig, model: nn.Module) -> PromptTuningConfig:
    """``config`` with the dimension fields left as None (``token_dim``, ``num_layers``, ...) read from ``model``'s config."""
    return fill_model_dims(config, model)


register_method(PromptMethod(
    PeftType.PROMPT_TUNING, PromptTuningConfig, prepare_config=prepare_prompt_config, name="prompt",
    train_preset=types.MappingProxyType({"num_virtual_tokens": 20}),
    build_encoder=build_prompt_embedding, insert=insert_prompt, inserts_tokens=True,
))
