"""Modules that stand in for a wrapped layer of the user's model.

:class:`AdaptedLayer` holds the original layer as ``base_layer`` plus the adapters attached to it.
It decides which adapters run; the adapters themselves (in :mod:`deltatune.methods`) do the math.
:class:`ModulesToSaveWrapper` keeps a frozen original and trainable full copies (``modules_to_save``).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from deltatune.surgery.adapter import Adapter


class _Passthrough(nn.Module):
    """Attribute reads that the wrapper does not define fall through to the wrapped module, so model
    code reading e.g. ``self.q_proj.weight.dtype`` or ``self.lm_head.out_features`` keeps working."""

    _wrapped_attr = "base_layer"

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self._wrapped_attr:
                raise
            return getattr(super().__getattr__(self._wrapped_attr), name)


class AdaptedLayer(_Passthrough):
    """A base layer plus named adapters, of which an ordered subset is active."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []
        self.disabled = False

    def add(self, name: str, adapter: Adapter) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer; delete it first or pick another name")
        self.adapters[name] = adapter

    def remove(self, name: str) -> None:
        if name in self.merged:
            self.unmerge([name])
        del self.adapters[name]
        self.active = tuple(a for a in self.active if a != name)

    def set_active(self, names: tuple[str, ...]) -> None:
        self.active = tuple(n for n in names if n in self.adapters)

    def _live(self) -> list[Adapter]:
        return [self.adapters[n] for n in self.active if n not in self.merged]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        live = self._live()
        if not live:
            return self.base_layer(x, *args, **kwargs)
        if len(live) == 1 and live[0].fuses_base and not args and not kwargs:
            # One adapter that computes base + delta in a single autograd node (see methods/lora.py).
            return live[0](x, self.base_layer, None)
        h = x
        for adapter in live:
            h = adapter.transform_input(h)
        out = self.base_layer(h, *args, **kwargs)
        for adapter in live:
            out = adapter(x, self.base_layer, out)
        return out

    # ---- merging -------------------------------------------------------------------------------
    def merge(self, names: list[str] | tuple[str, ...] | None = None, safe_merge: bool = False) -> None:
        for name in names if names is not None else self.active:
            if name in self.merged or name not in self.adapters:
                continue  # merging twice is idempotent: the second call changes nothing
            adapter = self.adapters[name]
            if not adapter.mergeable:
                why = getattr(adapter, "not_mergeable_reason", "")  # e.g. ": a nonlinearity cannot be folded ..."
                raise ValueError(
                    f"adapter {name!r} ({type(adapter).__name__}) cannot be merged into the base weights{why}; "
                    "keep it unmerged, or use a mergeable method (LoRA, DoRA, IA³)"
                )
            if safe_merge:
                # Some adapters (IA³) also change the bias: snapshot every tensor of the base layer.
                before = {k: v.detach().clone() for k, v in self.base_layer.state_dict().items()}
                adapter.merge(self.base_layer)
                if not all(torch.isfinite(v).all() for v in self.base_layer.state_dict().values() if v.is_floating_point()):
                    self.base_layer.load_state_dict(before)
                    raise ValueError(f"merging adapter {name!r} produced NaN/inf weights; the base layer was restored")
            else:
                adapter.merge(self.base_layer)
            self.merged.append(name)

    def unmerge(self, names: list[str] | None = None) -> None:
        for name in reversed(list(self.merged)):
            if names is None or name in names:
                self.adapters[name].unmerge(self.base_layer)
                self.merged.remove(name)


class TokenAdapterHolder(_Passthrough):
    """peft's ``TrainableTokensWrapper`` layout for LoRA's ``trainable_token_indices``: the embedding's
    :class:`AdaptedLayer` one level down, at ``token_adapter``, so its keys (``<path>.token_adapter.
    trainable_tokens_delta``, ``<path>.token_adapter.base_layer.weight``) are peft's without renaming."""

    _wrapped_attr = "token_adapter"

    def __init__(self, token_adapter: nn.Module) -> None:
        super().__init__()
        self.token_adapter = token_adapter

    def forward(self, *args, **kwargs):
        return self.token_adapter(*args, **kwargs)


class ModulesToSaveWrapper(_Passthrough):
    """A frozen original module plus one trainable full copy per adapter (peft's ``modules_to_save``)."""

    _wrapped_attr = "original_module"

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def add(self, name: str) -> None:
        copy_ = copy.deepcopy(self.original_module)
        for p in copy_.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = copy_

    def remove(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active == name:
            self.active = None

    def set_active(self, names: tuple[str, ...]) -> None:
        present = [n for n in names if n in self.modules_to_save]
        self.active = present[0] if present else None

    def forward(self, *args, **kwargs):
        if self.disabled or self.active is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active](*args, **kwargs)
