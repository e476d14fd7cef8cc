"""Serving many adapters at once from a plain model: :class:`AdapterServer` (``adapter_names=[...]`` on a
PeftModel is :mod:`deltatune.serving.mixed`).

Both run each row of a batch with its own adapter (or "__base__") through a bank of stacked
adapters (:mod:`deltatune.serving.bank`), never through a per-layer dict of adapters.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Iterator, Sequence

from torch import nn

from deltatune.serving.bank import AdapterBank
from deltatune.serving.routing import batch_size, check_names, expand_for_generate, routed
from deltatune.serving.sources import FolderSource
from deltatune.surgery.layer import AdaptedLayer, ModulesToSaveWrapper


class AdapterServer:
    """A plain transformers model that serves saved adapters per row, loading and evicting them as needed.

    Example:
        >>> server = AdapterServer(model, max_slots=16)
        >>> server.load("sql", "adapters/sql")          # peft- or deltatune-saved folder
        >>> server.load("chat", "adapters/chat")
        >>> out = server.generate(input_ids, adapter_names=["sql", "__base__", "chat"], max_new_tokens=20)

    Args:
        model: the base model, without adapters injected.
        max_slots: adapters resident at once; loading one more evicts the least recently used, which
            is read again from its folder when a later request names it.

    Calls are serialised by a lock: one request (one batch) runs at a time, and loading an adapter
    between requests does not disturb the other slots.
    """

    def __init__(self, model: nn.Module, max_slots: int = 8) -> None:
        if any(isinstance(m, (AdaptedLayer, ModulesToSaveWrapper)) for m in model.modules()):
            raise ValueError(
                "AdapterServer needs the plain base model, but this one has adapters injected; pass "
                "peft_model.unload() (or call peft_model(..., adapter_names=[...]) directly)"
            )
        self.model = model
        self.bank = AdapterBank(max_slots)
        self._lock = threading.RLock()

    @property
    def resident(self) -> list[str]:
        """Adapters in slots now, least recently used first."""
        return self.bank.resident

    def load(self, name: str, path: str | os.PathLike) -> None:
        """Register the adapter saved at ``path`` under ``name`` and put it in a slot (evicting if full).

        Raises:
            ValueError: the folder is not a servable adapter for this model (nothing is registered).
        """
        with self._lock:
            self.bank.register(name, FolderSource(self.model, path))
            self.bank.ensure([name])

    def unload(self, name: str) -> None:
        """Evict ``name`` and forget its path."""
        with self._lock:
            self.bank.forget(name)

    @contextlib.contextmanager
    def _request(self, names: list[str]) -> Iterator[None]:
        if self.model.training:
            raise ValueError("AdapterServer is for inference; call model.eval() first (dropout would be on)")
        with self._lock, self.bank.request(names) as (ids, unique):
            with routed(self.bank, ids, unique, self.model.get_submodule):
                yield

    def __call__(self, *args: Any, adapter_names: Sequence[str], **kwargs: Any):
        """The model's forward with row i run through adapter ``adapter_names[i]``."""
        names = check_names(adapter_names, batch_size(args, kwargs))
        with self._request(names):
            return self.model(*args, **kwargs)

    forward = __call__

    def generate(self, *args: Any, adapter_names: Sequence[str], **kwargs: Any):
        """``model.generate`` with each input row (and all its beams / samples) using its own adapter."""
        names = check_names(adapter_names, batch_size(args, kwargs))
        with self._request(expand_for_generate(names, self.model, kwargs)):
            return self.model.generate(*args, **kwargs)
