"""``PeftModel(..., adapter_names=[...])`` and ``generate(..., adapter_names=[...])``: row i of a batch through
adapter ``adapter_names[i]`` (or ``"__base__"``), as in peft, through a bank of stacked adapters
(:mod:`deltatune.serving.bank`) rather than a per-layer loop over adapters.

A PeftModel keeps one :class:`MixedBatches` (its ``mixed_batches``); it is handed the user's model and
the adapters' configs on each request, never the PeftModel.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from deltatune.config import PeftConfig
from deltatune.registry import all_methods, get_method
from deltatune.serving.bank import BASE, AdapterBank
from deltatune.serving.routing import batch_size, check_names, expand_for_generate, routed
from deltatune.serving.sources import PeftModelSource
from deltatune.surgery import inject
from deltatune.surgery.layer import AdaptedLayer, ModulesToSaveWrapper


class MixedBatches:
    """What a PeftModel keeps between mixed requests: its bank, the walk over its wrapped layers, and
    the lock that serialises them.

    A request works on modules the whole model shares (it disables the adapter wrappers and hooks
    each layer for its rows), so two at once would mix their rows and leave the wrappers as the
    other found them. One request runs at a time, as in :class:`~deltatune.serving.server.AdapterServer`;
    once the model has served one, a plain forward waits for the one in flight (:meth:`serialised`).
    """

    def __init__(self) -> None:
        self.bank = AdapterBank(1)
        self.key: tuple = ()
        self.hosts: list[tuple[str, AdaptedLayer]] = []
        self.wrappers: list[tuple[str, ModulesToSaveWrapper]] = []
        self.used = False
        self.lock = threading.RLock()

    def __getstate__(self) -> dict:  # deepcopy and pickle: a lock is not copied, a new one is made
        return {k: v for k, v in vars(self).items() if k != "lock"}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state, lock=threading.RLock())

    def forward(self, model: nn.Module, configs: Mapping[str, PeftConfig], adapter_names: Sequence[str], args: tuple, kwargs: dict) -> Any:
        """``model(*args, **kwargs)`` with row i through adapter ``adapter_names[i]``."""
        names = check_names(adapter_names, batch_size(args, kwargs))
        with self._request(model, configs, names):
            return model(*args, **kwargs)

    def generate(self, model: nn.Module, configs: Mapping[str, PeftConfig], adapter_names: Sequence[str], args: tuple, kwargs: dict) -> Any:
        """``model.generate``: each input row (and all its beams / samples) with its own adapter."""
        names = check_names(adapter_names, batch_size(args, kwargs))
        with self._request(model, configs, expand_for_generate(names, model, kwargs)):
            return model.generate(*args, **kwargs)

    def serialised(self) -> contextlib.AbstractContextManager:
        """The request lock, once a mixed request has run (before that there is nothing to wait for)."""
        return self.lock if self.used else contextlib.nullcontext()

    def evict_all(self) -> None:
        """Drop every cached adapter copy (see :func:`refresh_bank`)."""
        with self.lock:
            for name in list(self.bank.resident):
                self.bank.evict(name)

    # ---- one request ---------------------------------------------------------------------------------
    def _refresh(self, model: nn.Module, configs: Mapping[str, PeftConfig]) -> None:
        # Adapters are added and deleted through the configs, so they tell when the layers must be found again.
        key = tuple((n, id(c)) for n, c in configs.items())
        if key != self.key:
            self.hosts, self.wrappers = list(inject.adapted_layers(model)), list(inject.save_wrappers(model))
            self.key = key
        self.bank.max_slots = max(self.bank.max_slots, len(configs))
        for name in self.bank.registered:
            if name not in configs:
                self.bank.forget(name)  # deleted from the model
        for name in configs:
            if name not in self.bank.registered:
                self.bank.register(name, PeftModelSource(self.current_hosts, name))

    def current_hosts(self) -> list[tuple[str, AdaptedLayer]]:
        """The wrapped layers as of the last request (what each adapter's bank source reads)."""
        # A bound method, not a lambda: deepcopy of the PeftModel then rebinds it to the copy's state.
        return self.hosts

    def _check(self, model: nn.Module, configs: Mapping[str, PeftConfig], names: list[str]) -> None:
        if model.training:
            raise ValueError("adapter_names is for inference; call model.eval() first (peft raises the same)")
        for n in set(names) - {BASE}:
            if n not in configs:
                raise ValueError(f"no adapter named {n!r}; this model has {sorted(configs)} (and {BASE!r})")
            if configs[n].is_prompt_learning:
                raise ValueError(
                    f"adapter {n!r} is {configs[n].peft_type.value}, which changes the model's inputs and "
                    "cannot be mixed per row; run it alone with set_adapter"
                )
            if getattr(configs[n], "target_parameters", None):
                raise ValueError(
                    f"adapter {n!r} adapts nn.Parameters (target_parameters: MoE experts), which cannot be mixed per row: "
                    "a batch sees one expert weight (peft refuses this too); run it alone with set_adapter"
                )
            if not get_method(configs[n].peft_type).servable:
                raise ValueError(
                    f"adapter {n!r} is {configs[n].peft_type.value}, which cannot be served in a mixed-adapter batch "
                    f"(servable: {', '.join(m.name for m in all_methods() if m.servable)}); run it alone with set_adapter"
                )
        merged = sorted({a for _, h in self.hosts for a in h.merged})
        if merged:
            raise ValueError(
                f"adapters {merged} are merged into the base weights; call unmerge_adapter() before using adapter_names"
            )

    @contextlib.contextmanager
    def _request(self, model: nn.Module, configs: Mapping[str, PeftConfig], names: list[str]) -> Iterator[None]:
        with self.lock:
            self.used = True
            self._refresh(model, configs)
            self._check(model, configs, names)
            with self._routed(model, names):
                yield

    @contextlib.contextmanager
    def _routed(self, model: nn.Module, names: list[str]) -> Iterator[None]:
        hosts = [m for _, m in self.hosts] + [w for _, w in self.wrappers]
        disabled = [m.disabled for m in hosts]
        bases = {path: host.base_layer for path, host in self.hosts}
        module_for = lambda path: bases[path] if path in bases else model.get_submodule(path)  # noqa: E731
        with self.bank.request(names) as (ids, unique), routed(self.bank, ids, unique, module_for):
            handles = [
                w.register_forward_hook(lambda m, a, o: _saved_copy_hook(names, m, a, o))
                for _, w in self.wrappers
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


def refresh_bank(peft_model: nn.Module) -> None:
    """Drop the cached copies of ``peft_model``'s adapters that ``adapter_names`` requests use.

    Adapter weights never need this: every request compares each adapter it names with what the bank
    was built from, bit for bit (:class:`~deltatune.serving.sources.PeftModelSource`), so any write is
    seen, ``.data`` writes included. Base weights are watched by storage and version counter only,
    and only DoRA's cached norm reads them; after writing a base weight under a DoRA adapter through
    ``.data`` (``layer.weight.data.copy_(w)``), call this. It also frees the bank's memory.
    """
    peft_model.mixed_batches.evict_all()


def _saved_copy_hook(names: list[str], wrapper: ModulesToSaveWrapper, args: tuple, out: Any):
    """modules_to_save: rows whose adapter trained this module in full run through its copy."""
    for name in dict.fromkeys(names):
        if name in wrapper.modules_to_save:
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=out.device)
            sub = [a.index_select(0, rows) if isinstance(a, torch.Tensor) else a for a in args]
            out = out.index_copy(0, rows, wrapper.modules_to_save[name](*sub))
    return out
