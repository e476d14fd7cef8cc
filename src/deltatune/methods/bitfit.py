"""BitFit: train only the bias terms (Ben Zaken, Ravfogel & Goldberg, 2022, arXiv:2106.10199).

Every selected module ``m`` with a bias keeps its frozen weights; only its bias vector changes:
y = f(x; W) + b  becomes  y = f(x; W) + b', with b' trained. The adapter stores b' (the trained bias
itself, written to disk as ``base_model.model.<module path>.bias``) and a frozen copy of the original b,
and adds Δb = b' - b to the base output. Keeping b untouched inside the base layer is what makes
``disable_adapter`` give the base model and lets several BitFit adapters live on one model: the
hosting :class:`~deltatune.surgery.layer.AdaptedLayer` picks which adapters run, exactly as for LoRA.
Several BitFit adapters active at once add their Δb, like stacked LoRA adapters do.

Merging writes b' into the base layer's bias (and unmerging restores b), so ``merge_and_unload`` gives
a plain model with the trained biases.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import nn

from deltatune.config import PeftConfig, PeftType
from deltatune.methods.base import Adapter, Method, register_method
from deltatune.methods.partial import iter_unwrapped_modules
from deltatune.surgery import inject
from deltatune.surgery.layer import AdaptedLayer
from deltatune.surgery.targets import check_modules_to_save, name_matches, resolve_modules_to_save


@dataclass(frozen=True)
class BitFitConfig(PeftConfig):
    """BitFit (Ben Zaken et al., 2022): only bias terms train.

    Written to ``adapter_config.json`` with ``peft_type: "BITFIT"`` (deltatune's own value; peft has no
    BitFit). Weights: one tensor per module, ``base_model.model.<module path>.bias`` (the trained bias).
    """

    peft_type: ClassVar[PeftType] = PeftType.BITFIT

    target_modules: Sequence[str] | str | None = None
    """Whose biases train. None: every module with a bias (except ``modules_to_save``, trained in full).
    A list: module names, matched as suffixes of the dotted path ("query" matches
    "bert.encoder.layer.0.attention.self.query"). A string: a regex matched against the full path."""
    exclude_modules: Sequence[str] | str | None = None
    """Names (suffix match) or a regex of modules whose bias never trains, even if selected."""
    modules_to_save: Sequence[str] | None = None
    """Modules (suffix match) trained in full and saved with the adapter, e.g. a classifier head;
    ``task_type="SEQ_CLS"`` adds the classifier on its own."""

    def validate(self) -> None:
        for field_name in ("target_modules", "exclude_modules"):
            spec = getattr(self, field_name)
            if not isinstance(spec, str) and spec is not None and (not spec or not all(isinstance(k, str) and k for k in spec)):
                raise ValueError(
                    f"{field_name} must be None, a regex string or a non-empty list of module names, got {spec!r}"
                )


# ---- functional core -------------------------------------------------------------------------------
def bias_delta(trained: torch.Tensor, original: torch.Tensor, out: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Δb = b' - b, shaped to broadcast against ``out``.

    Args:
        trained: b', the adapter's bias, shape (C,) or the normalized shape of a LayerNorm.
        original: b, the base layer's bias at the time the adapter was made, same shape.
        out: the base layer's output.
        channel_dim: -1 when the bias is added on the trailing dims (Linear, Conv1D, LayerNorm);
            1 when it is added per channel (Conv*d, GroupNorm, BatchNorm: (B, C, *spatial)).
    """
    delta = trained - original  # (C,)
    if channel_dim == 1:
        return delta.view(-1, *([1] * (out.dim() - 2)))  # (C, 1, ..., 1)
    return delta


def _trailing_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D, nn.LayerNorm)


# Bias added per channel on dim 1 of a (B, C, *spatial) output.
_CHANNEL_TYPES: tuple[type, ...] = (nn.modules.conv._ConvNd, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def supported_types() -> tuple[type, ...]:
    """Layer types whose output is ``f(x; W) + bias``, so that a bias change is an additive Δb."""
    return _trailing_types() + _CHANNEL_TYPES


# ---- module ----------------------------------------------------------------------------------------
class BitFitBias(Adapter):
    """The trained bias b' of one layer, plus the frozen original b it replaces.

    The original is a non-persistent buffer: it is never trained or saved, and is read again from
    the base layer whenever an adapter is built.
    """

    peft_keys = {"bias": "bias"}

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        original = base_layer.bias.detach()
        self.bias = nn.Parameter(original.clone())
        self.register_buffer("original_bias", original.clone(), persistent=False)
        self.channel_dim = 1 if isinstance(base_layer, _CHANNEL_TYPES) else -1

    def forward(self, x: torch.Tensor, base_layer: nn.Module, base_out: torch.Tensor | None) -> torch.Tensor:
        if base_out is None:
            base_out = base_layer(x)
        delta = bias_delta(self.bias, self.original_bias, base_out, self.channel_dim)
        return base_out + delta.to(base_out.dtype)

    @torch.no_grad()
    def merge(self, base_layer: nn.Module) -> None:
        """Add the trained change of the bias, b' - b, to ``base_layer``'s bias."""
        base_layer.bias.add_((self.bias - self.original_bias).to(base_layer.bias.dtype))

    @torch.no_grad()
    def unmerge(self, base_layer: nn.Module) -> None:
        """Subtract what :meth:`merge` added from ``base_layer``'s bias."""
        base_layer.bias.sub_((self.bias - self.original_bias).to(base_layer.bias.dtype))


# ---- target resolution -----------------------------------------------------------------------------
def _selected(name: str, spec: Sequence[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name_matches(name, key) for key in spec)


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), nn.Parameter)


def _inside(name: str, roots: Sequence[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _no_bias_error(model: nn.Module, config: BitFitConfig) -> ValueError:
    which = "" if config.target_modules is None else f" among the modules matched by target_modules={config.target_modules!r}"
    return ValueError(
        f"BitFit found no bias parameters in {type(model).__name__}{which}"
        f"{' after exclude_modules' if config.exclude_modules else ''}, so it would train nothing. "
        "Some model families are built without biases (LLaMA, Mistral, Qwen, Gemma ...); "
        "use LoRA (LoraConfig) or IA³ for them, or select modules that have a bias."
    )


def resolve_bitfit_targets(model: nn.Module, config: BitFitConfig) -> list[str]:
    """The dotted paths of the modules whose bias ``config`` would train, in model order (a dry run).

    Args:
        model: the user's model (``PeftModel.base_model.model``), possibly with adapters already in it.
        config: the BitFit config; its ``modules_to_save`` are excluded (they train in full).

    Raises:
        ValueError: no selected module has a bias; a ``target_modules`` entry matches no module with a
            bias; a selected bias belongs to a layer type BitFit cannot adapt, or lies inside a module
            another adapter already trains in full.
    """
    saved = resolve_modules_to_save(model, config.modules_to_save)
    holders = [(n, m, enc) for n, m, enc in iter_unwrapped_modules(model) if _has_bias(m) and not _inside(n, saved)]
    spec = config.target_modules
    chosen = holders if spec is None else [h for h in holders if _selected(h[0], spec)]
    if spec is not None and not isinstance(spec, str):
        short = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, _, _ in holders))
        for entry in spec:
            if not any(_selected(n, [entry]) for n, _, _ in chosen) and holders:
                close = difflib.get_close_matches(entry, short, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"target_modules entry {entry!r} matches no module with a bias in {type(model).__name__}.{hint} "
                    f"Modules with a bias: {', '.join(short)}"
                )
    if config.exclude_modules:
        chosen = [h for h in chosen if not _selected(h[0], config.exclude_modules)]
    if not chosen:
        raise _no_bias_error(model, config)
    _check_adaptable(model, chosen)
    return [n for n, _, _ in chosen]


def _check_adaptable(model: nn.Module, chosen: list[tuple[str, nn.Module, str | None]]) -> None:
    mha = {n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    ok = supported_types()
    for name, module, enclosing in chosen:
        if enclosing is not None:
            raise ValueError(
                f"BitFit cannot train the bias of {name}: it lies inside {enclosing}, which another adapter "
                "trains in full (modules_to_save or partial fine-tuning). Add it to this config's "
                f"modules_to_save to train it in full here too, or leave it out with exclude_modules=[{name!r}]"
            )
        if not isinstance(module, ok) or name.rpartition(".")[0] in mha:
            # nn.MultiheadAttention reads out_proj.bias directly instead of calling out_proj.
            raise ValueError(
                f"BitFit cannot adapt the bias of {name} ({type(module).__name__}): only layers whose output is "
                f"f(x) + bias are supported ({', '.join(t.__name__ for t in ok)}). "
                f"Leave it out with exclude_modules=[{name!r}] or name other modules in target_modules"
            )


# ---- attach ----------------------------------------------------------------------------------------
def attach_bitfit(model: nn.Module, config: BitFitConfig, adapter_name: str) -> None:
    """Wrap every selected module of ``model`` and give it a :class:`BitFitBias` for ``adapter_name``.

    Everything is checked before the model changes, so a failed attach leaves it as it was.
    """
    check_modules_to_save(model, config.modules_to_save)
    names = resolve_bitfit_targets(model, config)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, AdaptedLayer) and module.merged:
            raise ValueError(
                f"{name} has merged adapters {module.merged}; unmerge_adapter() before adding a BitFit adapter, "
                "whose bias delta is measured from the unmerged bias"
            )
    for name in names:
        module = model.get_submodule(name)
        host = module if isinstance(module, AdaptedLayer) else AdaptedLayer(module)
        host.add(adapter_name, BitFitBias(host.base_layer))
        if host is not module:
            inject.set_submodule(model, name, host)
    inject.add_modules_to_save(model, config.modules_to_save, adapter_name)


class BitFitMethod(Method):
    """BitFit: the layer method, with its own choice of layers (every module with a bias)."""

    def attach(self, model: nn.Module, config: PeftConfig, name: str) -> None:
        attach_bitfit(model, config, name)


register_method(BitFitMethod(PeftType.BITFIT, BitFitConfig, layer_types=supported_types(), name="bitfit", merges=True))
