"""Where served adapters come from: a saved adapter folder (peft's format), or a live :class:`PeftModel`.

Reading a folder builds the method's own adapter modules for the target layers (the same
``make_adapter`` that ``get_peft_model`` uses, so rank/alpha patterns and rsLoRA scaling match
exactly), fills them from the file all-or-nothing, and never injects them into the model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Hashable

import torch
from torch import nn

from deltatune.io import checkpoint as ckpt
from deltatune.io.config_io import load_config
from deltatune.methods.base import Adapter, get_method
from deltatune.serving.slots import SlotWeights, slot_weights
from deltatune.surgery.layer import AdaptedLayer, ModulesToSaveWrapper
from deltatune.surgery.targets import resolve_targets


def _weight_versions(layer: nn.Module) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in layer.parameters(recurse=False))


def read_adapter(model: nn.Module, folder: str | os.PathLike) -> tuple[object, dict[str, Adapter]]:
    """Load the adapter saved in ``folder`` as {module path: adapter module} for the plain ``model``.

    The modules are not attached to the model; the base weights are never changed (PiSSA/OLoRA
    adapters are read as plain LoRA factors on the model as given).

    Raises:
        ValueError: the adapter is not a per-layer method, trains whole modules or biases, or its
            tensors do not fit the model (every problem is listed; nothing is half-loaded).
    """
    folder = Path(folder)
    config = load_config(folder)
    method = get_method(config.peft_type)
    if method.make_adapter is None:
        raise ValueError(
            f"{folder}: a {config.peft_type.value} adapter does not live in the model's layers, so it cannot be served "
            "from an adapter bank; load it with PeftModel.from_pretrained instead"
        )
    if getattr(config, "modules_to_save", None):
        raise ValueError(
            f"{folder}: the adapter trains whole modules ({list(config.modules_to_save)}), which a bank of low-rank "
            "factors cannot hold; serve it with PeftModel.from_pretrained(...) and model(..., adapter_names=[...])"
        )
    if getattr(config, "bias", "none") != "none":
        raise ValueError(
            f"{folder}: the adapter trains base biases (bias={config.bias!r}), which cannot differ per row of a batch; "
            "merge it (merge_and_unload) and serve that model instead"
        )
    if method.prepare_config is not None:
        config = method.prepare_config(config, model)
    if "init_lora_weights" in config.field_names():
        config = config.replace(init_lora_weights=True)  # PiSSA/OLoRA init would rewrite the shared base
    adapters: dict[str, Adapter] = {}
    for name in resolve_targets(model, config):
        layer = model.get_submodule(name)
        if isinstance(layer, (AdaptedLayer, ModulesToSaveWrapper)):
            raise ValueError(
                f"{name} already carries adapters; serve from the plain model (PeftModel.unload() gives it back)"
            )
        before = _weight_versions(layer)
        adapter = method.make_adapter(config, layer, name)
        if _weight_versions(layer) != before:
            raise RuntimeError(f"{name}: building a {config.peft_type.value} adapter changed the base weights")
        weight = next(layer.parameters(), None)
        adapters[name] = adapter.to(weight.device) if weight is not None else adapter
    _fill(adapters, ckpt.load_weights(folder), folder)
    return config, adapters


@torch.no_grad()
def _fill(adapters: dict[str, Adapter], state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    expected = {
        f"{ckpt.PREFIX}{name}.{suffix}": tensor
        for name, adapter in adapters.items()
        for suffix, tensor in adapter.peft_state_dict().items()
    }
    problems = [f"missing: {k} (shape {tuple(v.shape)})" for k, v in expected.items() if k not in state_dict]
    problems += [f"unexpected: {k}, no such adapter tensor for this model" for k in state_dict if k not in expected]
    problems += [
        f"shape mismatch at {k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        listing = "\n  ".join(problems[:20])
        raise ValueError(f"{folder} does not fit this model; nothing was loaded:\n  {listing}{more}")
    for k, tensor in expected.items():
        tensor.copy_(state_dict[k].to(tensor.dtype))


class FolderSource:
    """An adapter saved on disk; read again after each eviction."""

    def __init__(self, model: nn.Module, folder: str | os.PathLike) -> None:
        self.model, self.folder = model, Path(folder)
        # Read now, so a bad folder fails at registration rather than on the first request naming it.
        self._pending: dict[str, SlotWeights] | None = self.read()

    def read(self) -> dict[str, SlotWeights]:
        pending, self._pending = getattr(self, "_pending", None), None
        if pending is not None:
            return pending
        _, adapters = read_adapter(self.model, self.folder)
        return {name: slot_weights(a, self.model.get_submodule(name), name) for name, a in adapters.items()}

    def signature(self) -> Hashable:
        return None  # a file on disk is taken as fixed once registered


class PeftModelSource:
    """Adapter ``name`` of a live PeftModel; re-read whenever its tensors (or the base weights) change.

    Args:
        hosts: returns the model's wrapped layers as (path, AdaptedLayer); the caller caches this walk
            over the model, which costs more than everything else a request does.
        name: the adapter.
    """

    def __init__(self, hosts: Callable[[], list[tuple[str, AdaptedLayer]]], name: str) -> None:
        self.hosts, self.name = hosts, name
        self._watched: tuple[list | None, list[torch.Tensor]] = (None, [])

    def _mine(self) -> list[tuple[str, AdaptedLayer]]:
        return [(p, h) for p, h in self.hosts() if self.name in h.adapters]

    def read(self) -> dict[str, SlotWeights]:
        return {p: slot_weights(h.adapters[self.name], h.base_layer, p) for p, h in self._mine()}

    def signature(self) -> Hashable:
        hosts = self.hosts()
        if self._watched[0] is not hosts:  # the layers were found again: collect the tensors to watch
            tensors: list[torch.Tensor] = []
            for _, host in self._mine():
                tensors += host.adapters[self.name].parameters()
                tensors += host.base_layer.parameters(recurse=False)  # DoRA's norm reads the base weight
            self._watched = (hosts, tensors)
        return tuple((t.data_ptr(), t._version) for t in self._watched[1])
