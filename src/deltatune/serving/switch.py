"""Single-adapter serving at base-model speed: one adapter merged into the weights, swapped on demand.

Swapping A for B means W ← W − ΔA + ΔB. Done literally in floating point, each swap rounds twice
and the rounding errors add up as a random walk: after n swaps W is off from W₀ + ΔB by about
√n · ulp(W), and the error never goes away (measured in ``tests/test_serving_switch.py``). Two
exact remedies cost the same memory, one extra copy of every targeted weight: a Kahan-style
compensation buffer, or a pristine copy of W₀. We keep the pristine copy: a swap is then
"restore W₀, merge ΔB", which is exactly a fresh merge (bit-identical after any number of swaps),
and it is also cheaper than compensated arithmetic, which must read and write W and its buffer
twice per swap. ``exact=False`` gives the literal subtract-then-add for when that memory is not
available.

Merging goes through each adapter's own :meth:`Adapter.merge`, so LoRA, rsLoRA, DoRA and IA³ (and
any mergeable method) swap alike; plain LoRA on an ``nn.Linear`` takes a one-pass fused
``addmm`` (W ← W₀ + s·B A).
"""
from __future__ import annotations

import os
from typing import Iterable

import torch
from torch import nn

from deltatune.methods.base import Adapter, dense_weight, set_dense_weight
from deltatune.methods.lora import LoraLinear
from deltatune.serving.sources import read_adapter


class MergedAdapterSwitcher:
    """Keeps one adapter merged into a plain model's weights and swaps it for another in place.

    Example:
        >>> switcher = MergedAdapterSwitcher(model)
        >>> switcher.load("sql", "adapters/sql"); switcher.load("chat", "adapters/chat")
        >>> switcher.switch("sql")    # model now computes base + sql, at base speed
        >>> switcher.switch("chat")
        >>> switcher.switch(None)     # the base model again, bit for bit

    Args:
        model: the plain base model (no adapters injected).
        exact: keep a pristine copy of each targeted weight so that swaps never drift (default). With
            False, swaps unmerge then merge in place and accumulate rounding error.
    """

    def __init__(self, model: nn.Module, exact: bool = True) -> None:
        self.model, self.exact = model, exact
        self.adapters: dict[str, dict[str, Adapter]] = {}
        self.current: str | None = None
        self._pristine: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def load(self, name: str, path: str | os.PathLike) -> None:
        """Read the adapter saved at ``path`` (peft's format) and keep it, unmerged, under ``name``."""
        _, adapters = read_adapter(self.model, path)
        self.add(name, adapters)

    def add(self, name: str, adapters: dict[str, Adapter]) -> None:
        """Keep already built adapters ({module path: adapter}) under ``name``.

        Raises:
            ValueError: the name is taken or an adapter cannot be merged.
        """
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded; pick another name or remove it first")
        for path, adapter in adapters.items():
            if not adapter.mergeable:
                raise ValueError(f"{path}: {type(adapter).__name__} cannot be merged, so it cannot be served merged")
            self.model.get_submodule(path)  # fails early on a path this model does not have
        self.adapters[name] = dict(adapters)

    def remove(self, name: str) -> None:
        """Forget adapter ``name``; if it is the merged one, the base weights are restored first."""
        if self.current == name:
            self.switch(None)
        del self.adapters[name]

    @torch.no_grad()
    def switch(self, name: str | None) -> None:
        """Make ``name`` the merged adapter (None: the base model)."""
        if name is not None and name not in self.adapters:
            raise ValueError(f"no adapter named {name!r}; loaded: {sorted(self.adapters)}")
        if name == self.current:
            return
        old = self.adapters.get(self.current, {}) if self.current is not None else {}
        new = self.adapters.get(name, {}) if name is not None else {}
        for path in dict.fromkeys([*old, *new]):
            layer = self.model.get_submodule(path)
            if self.exact:
                self._restore(path, layer)
            elif path in old:
                old[path].unmerge(layer)
            if path in new:
                _merge(new[path], layer, self._pristine.get(path))
        self.current = name

    def _restore(self, path: str, layer: nn.Module) -> None:
        bias = getattr(layer, "bias", None)
        bias = bias if isinstance(bias, torch.Tensor) else None
        if path not in self._pristine:
            saved_bias = None if bias is None else bias.detach().clone()
            self._pristine[path] = (dense_weight(layer).detach().clone(), saved_bias)
            return
        weight, b = self._pristine[path]
        set_dense_weight(layer, weight)
        if b is not None:
            bias.copy_(b)

    def pristine_paths(self) -> Iterable[str]:
        """The paths of the layers whose original weights are kept (those touched by a merge so far)."""
        return self._pristine.keys()


def _merge(adapter: Adapter, layer: nn.Module, pristine: tuple[torch.Tensor, torch.Tensor | None] | None) -> None:
    if (
        pristine is not None
        and type(adapter) is LoraLinear
        and not adapter.use_dora
        and type(layer) is nn.Linear
        and layer.weight.dtype == adapter.lora_A.dtype
    ):
        # One pass over W: W ← W₀ + s·B A (the generic merge reads W, forms ΔW, then writes W again).
        torch.addmm(pristine[0], adapter.lora_B, adapter.lora_A, alpha=adapter.scaling, out=layer.weight.data)
        return
    adapter.merge(layer)
