"""IA³: learned vectors that rescale a layer's output, or for feed-forward layers its input.

Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning" (arXiv:2205.05638), section 3.3. For attention keys and values the vector rescales the
layer's output, ``l ⊙ (W x + b)``; for the second feed-forward layer it rescales the input (the
feed-forward's hidden activations), ``W (l ⊙ x) + b``. Both are linear in the weight, so merging
multiplies the weight's rows (output) or columns (input), and the bias for output scaling.

On disk each vector is ``base_model.model.<module>.ia3_l``, shaped (out, 1) for output scaling and
(1, in) for input scaling, exactly as peft writes it. Convolutions scale channels instead
(:mod:`deltatune.methods.ia3_conv`, on disk (1, n, 1, …)).
"""
from __future__ import annotations

import re
import types
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from deltatune.config import PeftConfig, PeftType
from deltatune.methods.base import Adapter, Method, adapter_dtype, dense_weight, linear_layer_types, register_method, set_dense_weight
from deltatune.methods.default_targets import IA3_DEFAULT_TARGETS, model_type, present
from deltatune.methods.ia3_conv import CONV_TYPES, IA3Conv
from deltatune.surgery.targets import linear_layer_names, resolve_targets

# peft's per-family defaults: (target_modules, feedforward_modules) when target_modules is None.
IA3_DEFAULTS = IA3_DEFAULT_TARGETS


# ---- config ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IA3Config(PeftConfig):
    """IA³ (Liu et al., 2022, arXiv:2205.05638) with peft's field names and semantics."""

    peft_type: ClassVar[PeftType] = PeftType.IA3

    target_modules: Sequence[str] | str | None = None
    """Module names (suffix match on the dotted path), a regex matched against the full path, or
    ``"all-linear"``. None: peft's default for the model family (e.g. k_proj, v_proj, down_proj for
    LLaMA; c_attn, mlp.c_proj for GPT-2; key, value, output.dense for BERT)."""
    exclude_modules: Sequence[str] | str | None = None
    """Names (suffix match) or a regex of modules never to wrap, even if ``target_modules`` matches."""
    feedforward_modules: Sequence[str] | str | None = None
    """Targets whose INPUT is scaled (the paper's feed-forward vector); all other targets scale their
    output. A regex (full match) or names; a name matches every module path that ends with it as a
    plain string, as in peft (so "output.dense" also matches BERT's "attention.output.dense"). Must
    be a subset of ``target_modules`` when both are lists. None: the family default, or no
    feed-forward modules for a family deltatune has no default for."""
    fan_in_fan_out: bool = False
    """Informational: deltatune reads the weight layout from the layer type. Set to True when a
    target is GPT-2's Conv1D, as peft does, so saved configs match peft's."""
    modules_to_save: Sequence[str] | None = None
    """Modules (suffix match) trained in full and saved with the adapter, e.g. a classifier head."""
    init_ia3_weights: bool = True
    """True: vectors start at 1 (the adapted model equals the base). False: random (tests only)."""
    layers_to_transform: Sequence[int] | int | None = None
    """Only wrap modules inside these layer indices (not in peft's IA3Config; omitted on disk when None)."""
    layers_pattern: Sequence[str] | str | None = None
    """Name of the layer list (e.g. "layers", "h") used to read a module's layer index."""

    def validate(self) -> None:
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, tuple) and isinstance(targets, tuple) and not set(ff) <= set(targets):
            raise ValueError(
                f"feedforward_modules must be a subset of target_modules (peft's rule); "
                f"{sorted(set(ff) - set(targets))} are not in target_modules={list(targets)}. "
                "Add them to target_modules or remove them from feedforward_modules."
            )
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("layers_pattern only makes sense together with layers_to_transform; set both or neither")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # peft's IA3Config has no layer selection; leave the keys out unless used, so files match peft's.
        for key in ("layers_to_transform", "layers_pattern"):
            if out[key] is None:
                del out[key]
        return out


def is_feedforward(feedforward_modules: Sequence[str] | str | None, module_name: str) -> bool:
    """peft's rule: a regex must match the whole path; a name matches any path ending with it."""
    if not feedforward_modules:
        return False
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, module_name) is not None
    return any(module_name.endswith(key) for key in feedforward_modules)


def prepare_ia3_config(config: IA3Config, model: nn.Module) -> IA3Config:
    """Fill in the family's default targets and feed-forward modules, and ``fan_in_fan_out`` for Conv1D.

    Raises:
        ValueError: ``target_modules`` is None and deltatune has no default for the model's family.
    """
    from transformers.pytorch_utils import Conv1D

    kind = model_type(model)
    defaults = IA3_DEFAULTS.get(kind)
    changes: dict[str, Any] = {}
    if config.target_modules is None:
        if defaults is None:
            names = ", ".join(linear_layer_names(model, _supported_types()))
            raise ValueError(
                f"IA3Config.target_modules is not set and deltatune has no IA³ default for model type "
                f"{kind!r}; pass target_modules=[...] and feedforward_modules=[...]. "
                f"Layers that can be targeted: {names}"
            )
        changes["target_modules"] = present(model, defaults[0])
    if config.feedforward_modules is None:
        feedforward = defaults[1] if defaults is not None else ()
        if "target_modules" in changes:  # keep the subset rule where present() dropped a missing layer (Mixtral's w2)
            feedforward = tuple(f for f in feedforward if f in changes["target_modules"])
        changes["feedforward_modules"] = feedforward
    config = config.replace(**changes) if changes else config
    if not config.fan_in_fan_out:
        modules = dict(model.named_modules())
        targets = resolve_targets(model, config)
        if any(isinstance(getattr(modules[n], "base_layer", modules[n]), Conv1D) for n in targets):
            config = config.replace(fan_in_fan_out=True)
    return config


# ---- functional core -------------------------------------------------------------------------------
def ia3_scale(h: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """l ⊙ h for h (..., n) and l (n,), computed in l's dtype and returned in h's."""
    return (h.to(l.dtype) * l).to(h.dtype)  # (..., n)


def ia3_merged_weight(W: torch.Tensor, l: torch.Tensor, feedforward: bool) -> torch.Tensor:
    """W·diag(l) (columns, input scaling) or diag(l)·W (rows, output scaling) for W (out, in)."""
    return W * (l[None, :] if feedforward else l[:, None])  # (out, in)


# ---- module ----------------------------------------------------------------------------------------
class IA3Scale(Adapter):
    """One IA³ vector on one layer: scales the output, or the input when ``feedforward`` is True.

    The vector is created in the base layer's dtype and, by default (``autocast_adapter_dtype``), stored
    in float32 on a half-precision base: it starts at 1, and in bfloat16 an update smaller than 2⁻⁸ to a
    value near 1 rounds away, so the vector could not learn.
    """

    peft_keys = {"ia3_l": "ia3_l"}

    def __init__(
        self, in_features: int, out_features: int, feedforward: bool, init_ones: bool = True, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.feedforward = feedforward
        shape = (1, in_features) if feedforward else (out_features, 1)  # peft's on-disk shapes
        self.ia3_l = nn.Parameter((torch.ones(shape) if init_ones else 1 + 0.5 * torch.randn(shape)).to(dtype))
        # Original weight rows/columns (and bias entries) where l == 0, which division cannot restore.
        self._zeroed: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    @property
    def vector(self) -> torch.Tensor:
        """The learned scaling vector l, flattened: ``(out_features,)``, or ``(in_features,)`` for a feed-forward layer."""
        return self.ia3_l.flatten()  # (n,)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return ia3_scale(x, self.vector) if self.feedforward else x

    def forward(self, x: torch.Tensor, base_layer: nn.Module, base_out: torch.Tensor | None) -> torch.Tensor:
        if base_out is None:
            base_out = base_layer(self.transform_input(x))
        return base_out if self.feedforward else ia3_scale(base_out, self.vector)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """What merging adds to the (out, in) weight: (l - 1) scaling of W (the bias is scaled too)."""
        W = dense_weight(base_layer, torch.float32)
        return ia3_merged_weight(W, self.vector.float(), self.feedforward) - W

    @torch.no_grad()
    def merge(self, base_layer: nn.Module) -> None:
        """Fold l into ``base_layer``'s weight: W's rows (and the bias) times l, or W's columns for a feed-forward layer.

        Rows or columns that l sets to zero are kept aside, so :meth:`unmerge` restores them exactly.
        """
        l = self.vector.float()
        W = dense_weight(base_layer, torch.float32)
        bias = getattr(base_layer, "bias", None)
        scales_bias = not self.feedforward and isinstance(bias, torch.Tensor)
        zero = l == 0
        if zero.any():
            saved = W[:, zero] if self.feedforward else W[zero]
            self._zeroed = (zero, saved.clone(), bias[zero].clone() if scales_bias else None)
        set_dense_weight(base_layer, ia3_merged_weight(W, l, self.feedforward))
        if scales_bias:
            bias.copy_((bias.float() * l).to(bias.dtype))

    @torch.no_grad()
    def unmerge(self, base_layer: nn.Module) -> None:
        """Divide what :meth:`merge` multiplied back out of the weight and bias, restoring the rows or columns l zeroed."""
        l = self.vector.float()
        safe = torch.where(l == 0, torch.ones_like(l), l)
        W = ia3_merged_weight(dense_weight(base_layer, torch.float32), 1 / safe, self.feedforward)
        bias = getattr(base_layer, "bias", None)
        scales_bias = not self.feedforward and isinstance(bias, torch.Tensor)
        if scales_bias:
            bias.copy_((bias.float() / safe).to(bias.dtype))
        if self._zeroed is not None:
            zero, saved_w, saved_b = self._zeroed
            if self.feedforward:
                W[:, zero] = saved_w
            else:
                W[zero] = saved_w
            if saved_b is not None:
                bias[zero] = saved_b
            self._zeroed = None
        set_dense_weight(base_layer, W)


# ---- construction ----------------------------------------------------------------------------------
def _features(layer: nn.Module) -> tuple[int, int]:
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return layer.in_features, layer.out_features
    out_f, in_f = dense_weight(layer).shape
    return in_f, out_f


def make_ia3_adapter(config: IA3Config, base_layer: nn.Module, module_name: str) -> IA3Scale | IA3Conv:
    """Build one IA³ vector for ``base_layer``; input scaling if ``module_name`` is a feed-forward module.

    Convolutions get channel vectors (:mod:`deltatune.methods.ia3_conv`), other layers feature vectors.
    """
    ff = is_feedforward(config.feedforward_modules, module_name)
    dtype = adapter_dtype(base_layer)
    if isinstance(base_layer, CONV_TYPES):
        return IA3Conv(base_layer, ff, init_ones=config.init_ia3_weights, dtype=dtype)
    in_f, out_f = _features(base_layer)
    return IA3Scale(in_f, out_f, ff, init_ones=config.init_ia3_weights, dtype=dtype)


def _supported_types() -> tuple[type, ...]:
    # "all-linear" leaves the convolutions out (surgery/targets.py), as peft's does.
    return (*linear_layer_types(), *CONV_TYPES)


register_method(
    Method(
        PeftType.IA3, IA3Config, make_ia3_adapter, layer_types=_supported_types(), prepare_config=prepare_ia3_config,
        name="ia3", default_targets=types.MappingProxyType(IA3_DEFAULTS), merges=True, servable=True, plannable=True,
    )
)
