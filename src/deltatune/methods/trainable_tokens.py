"""Trainable tokens: train a few rows of an embedding matrix, leave the rest frozen (peft's
``TrainableTokensConfig``, and LoRA's ``trainable_token_indices``).

A user who adds special tokens (a chat template on a base model, tool-call tokens) needs those rows
trained, not the whole (vocab, dim) matrix. The adapter holds the chosen rows as one (k, dim) parameter
and *replaces* those rows of the base weight in the forward (peft's semantics: replacement, not addition,
so a resized embedding whose new rows were re-drawn at random still gives the trained values):

    E'[i] = delta[j] if i == indices[j] else E[i]

With tied input and output embeddings (``lm_head.weight is embed_tokens.weight``) the output layer gets
a follower adapter that reads the same rows, so the logits of the chosen tokens use them too and the
two stay tied (peft ties the lm_head wrapper to the embedding's). Merging writes the rows into the
weight; unmerging writes the originals back.

On disk (peft's keys): ``<embedding path>.trainable_tokens_delta`` for ``TrainableTokensConfig``, and
``<embedding path>.token_adapter.trainable_tokens_delta`` for LoRA's option, whose embedding sits one
level down in a :class:`~deltatune.surgery.layer.TokenAdapterHolder` as in peft's wrapper.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.config import PeftConfig, PeftType, check_token_indices
from deltatune.methods.base import Adapter, Method, register_method
from deltatune.surgery import inject
from deltatune.surgery.layer import AdaptedLayer, ModulesToSaveWrapper, TokenAdapterHolder


@dataclass(frozen=True)
class TrainableTokensConfig(PeftConfig):
    """Trainable tokens (peft's method): only the embedding rows of ``token_indices`` train.

    Written to ``adapter_config.json`` with ``peft_type: "TRAINABLE_TOKENS"``; weights under
    ``base_model.model.<embedding path>.trainable_tokens_delta``, shape (len(token_indices), dim).
    """

    peft_type: ClassVar[PeftType] = PeftType.TRAINABLE_TOKENS

    token_indices: Sequence[int] = ()
    """The token ids whose rows train (``tokenizer.convert_tokens_to_ids([...])``)."""
    target_modules: Sequence[str] | str | None = None
    """The embedding layer(s): names (suffix match) or a regex on the full path. None: the model's input
    embedding (``get_input_embeddings()``), written to disk as its full path, as peft does."""
    init_weights: bool = True
    """True: the rows start as the embedding's own (a no-op until trained). False: random (tests only)."""

    def validate(self) -> None:
        if self.token_indices:  # peft's default is [], so an empty list is a valid config until it is used
            object.__setattr__(self, "token_indices", check_token_indices(self.token_indices, False))


# ---- functional core -------------------------------------------------------------------------------
def rows_replaced(weight: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The (vocab, dim) ``weight`` with rows ``indices`` replaced by ``rows`` (k, dim): a new tensor."""
    return weight.index_copy(0, indices, rows.to(weight))


def embed_with_rows(ids: torch.Tensor, base_out: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor,
                    vocab: int, scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """An embedding lookup where the tokens of ``indices`` read ``rows`` instead of the base matrix.

    Equal to ``F.embedding(ids, rows_replaced(E, indices, rows)) * scale`` without copying E.

    Args:
        ids: token ids, any shape (B, T).
        base_out: the base embedding's output for ``ids``, (B, T, dim) (scale already applied).
        indices: (k,) token ids that the adapter replaces.
        rows: (k, dim) their trained rows.
        vocab: rows of the embedding matrix.
        scale: the embedding's own output scale (Gemma's ``embed_scale``), or None.
    """
    slot = torch.full((vocab,), -1, dtype=torch.long, device=ids.device)
    slot[indices] = torch.arange(len(indices), device=ids.device)
    where = slot[ids]  # (B, T): the row of each token in `rows`, or -1
    new = rows[where.clamp(min=0)]  # (B, T, dim)
    if scale is not None:
        new = new * (scale.to(new.dtype) if torch.is_tensor(scale) else scale)
    return torch.where((where >= 0).unsqueeze(-1), new.to(base_out.dtype), base_out)


def logits_with_rows(x: torch.Tensor, base_out: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A tied output layer's logits where the columns of ``indices`` use ``rows``: x (…, dim),
    base_out (…, vocab) = x·Eᵀ; the replaced columns are x·rowsᵀ (…, k)."""
    return base_out.index_copy(-1, indices, F.linear(x, rows.to(x.dtype)).to(base_out.dtype))


# ---- the adapter -----------------------------------------------------------------------------------
class TokenRows(Adapter):
    """Trained rows for one embedding (or, as a follower, the tied output layer reading a leader's rows).

    ``holder``: made for LoRA's ``trainable_token_indices`` (peft's wrapper layout), which changes what peft
    saves for a follower and what it lists as targeted.
    """

    keeps_ties = True  # merging writes the same rows into a shared matrix: no need to untie (see inject)
    peft_keys = {"trainable_tokens_delta": "trainable_tokens_delta"}

    def __init__(self, base_layer: nn.Module, token_indices: Sequence[int], init_weights: bool = True,
                 leader: "TokenRows | None" = None, holder: bool = False) -> None:
        super().__init__()
        # A follower keeps its leader outside its registered modules: one parameter, trained and saved once.
        self._leader = [leader] if leader is not None else []
        self.holder = holder
        self.targeted = leader is None and not holder  # what peft's targeted_module_names lists
        if leader is not None:
            return
        weight = base_layer.weight
        if max(token_indices) >= weight.shape[0]:
            raise ValueError(
                f"token id {max(token_indices)} is outside the embedding's {weight.shape[0]} rows; add the tokens to the "
                "tokenizer and call model.resize_token_embeddings(len(tokenizer)) before adding the adapter"
            )
        self.register_buffer("indices", torch.tensor(list(token_indices), dtype=torch.long, device=weight.device), persistent=False)
        original = weight.detach()[self.indices].clone()  # (k, dim)
        self.register_buffer("original", original, persistent=False)
        values = original.clone() if init_weights else torch.randn_like(original)
        self.trainable_tokens_delta = nn.Parameter(values)

    @property
    def leader(self) -> "TokenRows":
        """The adapter holding the rows: itself, or for a tied follower the input embedding's adapter."""
        return self._leader[0] if self._leader else self

    def _rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        lead = self.leader
        return lead.indices, lead.trainable_tokens_delta

    def forward(self, x: torch.Tensor, base_layer: nn.Module, base_out: torch.Tensor | None) -> torch.Tensor:
        indices, rows = self._rows()
        if base_out is None:
            base_out = base_layer(x)
        if isinstance(base_layer, nn.Embedding):
            return embed_with_rows(x, base_out, indices, rows, base_layer.num_embeddings, getattr(base_layer, "embed_scale", None))
        if isinstance(base_layer, nn.Linear):
            return logits_with_rows(x, base_out, indices, rows)
        raise ValueError(f"trainable tokens wrap an nn.Embedding (or its tied nn.Linear head), not {type(base_layer).__name__}")

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        if self._leader and self.holder:
            return {}  # LoRA's tied lm_head wrapper saves nothing of its own (peft)
        return {"trainable_tokens_delta": self._rows()[1]}

    def peft_embedding_state_dict(self) -> dict[str, torch.Tensor]:
        """What peft adds when it saves the embedding matrices (a resized vocabulary): LoRA's follower rows."""
        return {"trainable_tokens_delta": self._rows()[1]} if self._leader and self.holder else {}

    @torch.no_grad()
    def merge(self, base_layer: nn.Module) -> None:
        """Write the trained rows into the base weight (a tied follower writes the same rows: harmless)."""
        indices, rows = self._rows()
        base_layer.weight.data = rows_replaced(base_layer.weight.data, indices, rows)

    @torch.no_grad()
    def unmerge(self, base_layer: nn.Module) -> None:
        """Write back the rows the base weight had when the adapter was made (peft keeps them the same way)."""
        lead = self.leader
        base_layer.weight.data.index_copy_(0, lead.indices, lead.original.to(base_layer.weight))

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """ΔW as an (out, in) matrix, for code that adds deltas: rows - E[rows] placed at ``indices``."""
        indices, rows = self._rows()
        w = base_layer.weight
        delta = torch.zeros_like(w).index_copy(0, indices, rows.to(w) - w[indices])  # (vocab, dim)
        return delta.T if isinstance(base_layer, nn.Embedding) else delta


# ---- attaching -------------------------------------------------------------------------------------
def input_embedding_name(model: nn.Module) -> str:
    """The dotted path of ``model.get_input_embeddings()`` (peft's default target)."""
    layer = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    names = [n for n, m in model.named_modules() if layer is not None and m is layer]
    if not names:
        raise ValueError(f"{type(model).__name__} has no input embedding (get_input_embeddings()); name the "
                         "embedding layer: {'<layer name>': [token ids]}")
    return names[0]


def _embedding_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Embedding) and ".adapters." not in n]


def _resolve(model: nn.Module, key: str | Sequence[str]) -> list[str]:
    """Paths of the layers that ``key`` names: a regex on the full path (a string with regex characters),
    or names matched exactly or as a dotted suffix. Holders and their inner layers count as one."""
    keys = [key] if isinstance(key, str) else list(key)
    found = []
    for n, m in model.named_modules():
        if not n or n.endswith(".token_adapter") or n.endswith(".base_layer") or ".adapters." in n:
            continue
        if any(n == k or n.endswith("." + k) or re.fullmatch(k, n) for k in keys):
            found.append(n)
    if not found:
        raise ValueError(f"no layer named {key!r} in {type(model).__name__}; its embedding layers: {_embedding_paths(model)}")
    return found


def _host(model: nn.Module, path: str, holder: bool) -> tuple[AdaptedLayer, str]:
    """The AdaptedLayer for the layer at ``path`` (made if needed) and the path it lives at."""
    module = model.get_submodule(path)
    if isinstance(module, ModulesToSaveWrapper):
        raise ValueError(f"{path} is in modules_to_save (trained in full); train it fully or train some of its "
                         "rows with trainable_token_indices, not both")
    if holder:
        if not isinstance(module, TokenAdapterHolder):
            if isinstance(module, AdaptedLayer):
                raise ValueError(f"{path} is a LoRA target and would also get trainable_token_indices; take it out of "
                                 "target_modules (its new rows train through trainable_token_indices)")
            module = TokenAdapterHolder(AdaptedLayer(module))
            inject.set_submodule(model, path, module)
        return module.token_adapter, f"{path}.token_adapter"
    if not isinstance(module, AdaptedLayer):
        module = AdaptedLayer(module)
        inject.set_submodule(model, path, module)
    return module, path


def _add(host: AdaptedLayer, name: str, adapter: TokenRows) -> None:
    host.add(name, adapter)
    if not host.active:
        host.set_active((name,))


def _tied_output(model: nn.Module, embedding: nn.Module) -> str | None:
    """The path of the output layer that shares ``embedding``'s weight (tied word embeddings), if any."""
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if not getattr(text, "tie_word_embeddings", False) or not hasattr(model, "get_output_embeddings"):
        return None
    out = model.get_output_embeddings()
    base = out.base_layer if isinstance(out, AdaptedLayer) else out
    if base is None or getattr(base, "weight", None) is not embedding.weight:
        return None
    return next(n for n, m in model.named_modules() if m is out)


def attach_token_rows(model: nn.Module, layers: Mapping[str, Sequence[int]], name: str, init_weights: bool = True,
                      holder: bool = False) -> list[str]:
    """Give adapter ``name`` trainable rows in each layer of ``layers`` (``{layer name: token ids}``), and a
    follower on the output layer tied to the input embedding (peft's rule: when the tied layer is not
    named too, or is named with the same ids). ``holder``: peft's LoRA layout. Returns the wrapped paths."""
    tied = _tied_output(model, model.get_input_embeddings()) if hasattr(model, "get_input_embeddings") else None
    input_name = input_embedding_name(model) if hasattr(model, "get_input_embeddings") else None
    wanted = {path: tuple(ids) for key, ids in layers.items() for path in _resolve(model, key)}
    for path in wanted:  # every layer is checked before any is wrapped: a refusal leaves the model as it was
        layer = model.get_submodule(path)
        if isinstance(layer, ModulesToSaveWrapper):
            continue  # _host says why, before anything is wrapped (it is checked first below)
        layer = getattr(layer, "token_adapter", layer)
        layer = layer.base_layer if isinstance(layer, AdaptedLayer) else layer
        if not isinstance(layer, (nn.Embedding, nn.Linear)):
            raise ValueError(f"{path} is a {type(layer).__name__}; trainable tokens need an nn.Embedding")
    ids_in = wanted.get(input_name)
    follow = tied is not None and ids_in is not None and wanted.get(tied, ids_in) == ids_in
    for path in wanted:
        if isinstance(model.get_submodule(path), ModulesToSaveWrapper):
            _host(model, path, holder)  # raises
    wrapped = []
    for path, ids in wanted.items():
        if follow and path == tied:
            continue
        host, at = _host(model, path, holder)
        if not isinstance(host.base_layer, (nn.Embedding, nn.Linear)):
            raise ValueError(f"{path} is a {type(host.base_layer).__name__}; trainable tokens need an nn.Embedding")
        _add(host, name, TokenRows(host.base_layer, ids, init_weights, holder=holder))
        wrapped.append(at)
    if follow:
        lead_host, _ = _host(model, input_name, holder)
        host, at = _host(model, tied, holder)
        _add(host, name, TokenRows(host.base_layer, ids_in, leader=lead_host.adapters[name], holder=holder))
        wrapped.append(at)
    return wrapped


def attach_for_lora(model: nn.Module, config: Any, name: str) -> None:
    """LoRA's ``trainable_token_indices``: the rows, in peft's wrapper layout (surgery calls this)."""
    indices = config.trainable_token_indices
    layers = dict(indices) if isinstance(indices, Mapping) else {input_embedding_name(model): indices}
    attach_token_rows(model, layers, name, holder=True)


# ---- the method ------------------------------------------------------------------------------------
def _prepare(config: TrainableTokensConfig, model: nn.Module) -> TrainableTokensConfig:
    if config.target_modules is None:
        config = config.replace(target_modules=input_embedding_name(model))
    return config


@dataclass(frozen=True)
class TrainableTokensMethod(Method):
    """Trainable tokens as a method: attaches :class:`TokenRows` to the target embedding(s)."""

    def attach(self, model: nn.Module, config: PeftConfig, name: str) -> nn.Module | None:
        if not config.token_indices:
            raise ValueError("TrainableTokensConfig(token_indices=[]) trains nothing; list the token ids, e.g. "
                             "token_indices=tokenizer.convert_tokens_to_ids(['<tool>'])")
        targets = config.target_modules
        attach_token_rows(model, {t: config.token_indices for t in ([targets] if isinstance(targets, str) else targets)},
                          name, config.init_weights)
        inject.mark_trainable(model, [name])
        return None

    def attach_rows(self, model: nn.Module, config: PeftConfig, name: str) -> None:
        """LoRA's ``trainable_token_indices`` (injection calls this through the registry)."""
        attach_for_lora(model, config, name)


register_method(TrainableTokensMethod(
    PeftType.TRAINABLE_TOKENS, TrainableTokensConfig, prepare_config=_prepare, name="trainable_tokens",
    layer_types=(nn.Embedding,), merges=True,
))
