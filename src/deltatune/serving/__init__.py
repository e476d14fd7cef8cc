"""Serving adapters: many at once in one batch (stacked banks, per-row ids), or one merged and swapped.

- :class:`AdapterServer`: a plain model plus an LRU bank of saved adapters; ``server(ids,
  adapter_names=[...])`` and ``server.generate(...)`` run each row with its own adapter.
- ``PeftModel(..., adapter_names=[...])`` / ``PeftModel.generate(..., adapter_names=[...])``: the same
  for the adapters of a live PeftModel (peft's API for mixed-adapter batches). Every request checks that the
  cached adapters still match the model's; :func:`refresh_bank` after writing base weights under a
  DoRA adapter through ``.data``.
- :class:`MergedAdapterSwitcher`: one adapter merged into the weights at a time, swapped without drift.
"""
from deltatune.serving.bank import BASE, AdapterBank, LayerBank
from deltatune.serving.mixed import MixedBatches, refresh_bank
from deltatune.serving.server import AdapterServer
from deltatune.serving.sources import FolderSource, PeftModelSource, read_adapter
from deltatune.serving.switch import MergedAdapterSwitcher

__all__ = [
    "BASE", "AdapterBank", "AdapterServer", "FolderSource", "LayerBank", "MergedAdapterSwitcher",
    "PeftModelSource", "read_adapter", "refresh_bank",
]
