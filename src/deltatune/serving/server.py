"""Serving many adapters at once: a standalone :class:`AdapterServer`, and ``adapter_names=[...]`` on PeftModel.

Both run each row of a batch with its own adapter (or "__base__") through a bank of stacked
adapters (:mod:`deltatune.serving.bank`), never through a per-layer dict of adapters.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from deltatune.serving.bank import BASE, AdapterBank
from deltatune.serving.routing import batch_size, check_names, expand_for_generate, routed
from deltatune.serving.sources import FolderSource, PeftModelSource
from deltatune.surgery import inject
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


# ---- PeftModel(..., adapter_names=[...]) ------------------------------------------------------------
class _PeftServing:
    """What a PeftModel keeps between mixed requests: its bank, the walk over its wrapped layers, and
    the lock that serialises them.

    A request works on modules the whole model shares (it disables the adapter wrappers and hooks
    each layer for its rows), so two at once would mix their rows and leave the wrappers as the
    other found them. One request runs at a time, as in :class:`AdapterServer`; a plain forward of a
    model that has served requests waits for the one in flight (``PeftModel.forward``).
    """

    def __init__(self) -> None:
        self.bank = AdapterBank(1)
        self.key: tuple = ()
        self.hosts: list[tuple[str, AdaptedLayer]] = []
        self.wrappers: list[tuple[str, ModulesToSaveWrapper]] = []
        self.lock = threading.RLock()

    def __getstate__(self) -> dict:  # deepcopy and pickle: a lock is not copied, a new one is made
        return {k: v for k, v in vars(self).items() if k != "lock"}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state, lock=threading.RLock())

    def refresh(self, peft_model: nn.Module) -> None:
        # Adapters are added and deleted through peft_config, so it tells when the layers must be found again.
        key = tuple((n, id(c)) for n, c in peft_model.peft_config.items())
        if key != self.key:
            model = peft_model.base_model.model
            self.hosts, self.wrappers = list(inject.adapted_layers(model)), list(inject.save_wrappers(model))
            self.key = key
        self.bank.max_slots = max(self.bank.max_slots, len(peft_model.peft_config))
        for name in self.bank.registered:
            if name not in peft_model.peft_config:
                self.bank.forget(name)  # deleted from the model
        for name in peft_model.peft_config:
            if name not in self.bank.registered:
                self.bank.register(name, PeftModelSource(self.current_hosts, name))

    def current_hosts(self) -> list[tuple[str, AdaptedLayer]]:
        # A bound method, not a lambda: deepcopy of the PeftModel then rebinds it to the copy's state.
        return self.hosts


_CREATE_LOCK = threading.Lock()  # two first requests at once must not build two states


def _serving_state(peft_model: nn.Module) -> _PeftServing:
    state = vars(peft_model).get("_serving_state")
    if state is None:
        with _CREATE_LOCK:
            state = vars(peft_model).get("_serving_state")
            if state is None:
                state = vars(peft_model)["_serving_state"] = _PeftServing()
    return state


def refresh_bank(peft_model: nn.Module) -> None:
    """Drop the cached copies of ``peft_model``'s adapters that ``adapter_names`` requests use.

    Adapter weights never need this: every request compares each adapter it names with what the bank
    was built from, bit for bit (:class:`~deltatune.serving.sources.PeftModelSource`), so any write is
    seen, ``.data`` writes included. Base weights are watched by storage and version counter only,
    and only DoRA's cached norm reads them; after writing a base weight under a DoRA adapter through
    ``.data`` (``layer.weight.data.copy_(w)``), call this. It also frees the bank's memory.
    """
    state = vars(peft_model).get("_serving_state")
    if state is None:
        return
    with state.lock:
        for name in list(state.bank.resident):
            state.bank.evict(name)


@contextlib.contextmanager
def serialised(peft_model: nn.Module) -> Iterator[None]:
    """Hold the model's request lock, if it has ever served ``adapter_names`` requests (else nothing to wait for)."""
    state = vars(peft_model).get("_serving_state")
    if state is None:
        yield
        return
    with state.lock:
        yield


def _check_peft(peft_model: nn.Module, names: list[str], state: _PeftServing) -> None:
    if peft_model.training:
        raise ValueError("adapter_names is for inference; call model.eval() first (peft raises the same)")
    for n in set(names) - {BASE}:
        if n not in peft_model.peft_config:
            raise ValueError(f"no adapter named {n!r}; this model has {sorted(peft_model.peft_config)} (and {BASE!r})")
        if peft_model.peft_config[n].is_prompt_learning:
            raise ValueError(
                f"adapter {n!r} is {peft_model.peft_config[n].peft_type.value}, which changes the model's inputs and "
                "cannot be mixed per row; run it alone with set_adapter"
            )
    merged = sorted({a for _, h in state.hosts for a in h.merged})
    if merged:
        raise ValueError(
            f"adapters {merged} are merged into the base weights; call unmerge_adapter() before using adapter_names"
        )


def _saved_copy_hook(names: list[str], wrapper: ModulesToSaveWrapper, args: tuple, out: Any):
    """modules_to_save: rows whose adapter trained this module in full run through its copy."""
    for name in dict.fromkeys(names):
        if name in wrapper.modules_to_save:
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=out.device)
            sub = [a.index_select(0, rows) if isinstance(a, torch.Tensor) else a for a in args]
            out = out.index_copy(0, rows, wrapper.modules_to_save[name](*sub))
    return out


@contextlib.contextmanager
def _peft_request(peft_model: nn.Module, names: list[str]) -> Iterator[None]:
    state = _serving_state(peft_model)
    with state.lock:
        state.refresh(peft_model)
        _check_peft(peft_model, names, state)
        with _routed_request(peft_model, names, state):
            yield


@contextlib.contextmanager
def _routed_request(peft_model: nn.Module, names: list[str], state: _PeftServing) -> Iterator[None]:
    model = peft_model.base_model.model
    hosts = [m for _, m in state.hosts] + [w for _, w in state.wrappers]
    disabled = [m.disabled for m in hosts]
    bases = {path: host.base_layer for path, host in state.hosts}
    module_for = lambda path: bases[path] if path in bases else model.get_submodule(path)  # noqa: E731
    with state.bank.request(names) as (ids, unique), routed(state.bank, ids, unique, module_for):
        handles = [
            w.register_forward_hook(lambda m, a, o: _saved_copy_hook(names, m, a, o))
            for _, w in state.wrappers
            if any(n in w.modules_to_save for n in names)
        ]
        for m in hosts:
            m.disabled = True  # the wrappers run their base layers; the hooks add each row's adapter
        try:
            yield
        finally:
            for m, was in zip(hosts, disabled):
                m.disabled = was
            for h in handles:
                h.remove()


def peft_forward(peft_model: nn.Module, adapter_names: Sequence[str], args: tuple, kwargs: dict) -> Any:
    """``peft_model(*args, adapter_names=..., **kwargs)``: row i through adapter ``adapter_names[i]``."""
    names = check_names(adapter_names, batch_size(args, kwargs))
    with _peft_request(peft_model, names):
        return peft_model.base_model.model(*args, **kwargs)


def peft_generate(peft_model: nn.Module, adapter_names: Sequence[str], args: tuple, kwargs: dict) -> Any:
    """``peft_model.generate(..., adapter_names=...)``: each input row generates with its own adapter."""
    names = check_names(adapter_names, batch_size(args, kwargs))
    model = peft_model.base_model.model
    with _peft_request(peft_model, expand_for_generate(names, model, kwargs)):
        return model.generate(*args, **kwargs)
