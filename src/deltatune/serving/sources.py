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
    config = method.prepare(config, model)
    if "init_lora_weights" in config.field_names():
        no_loftq = {"loftq_config": {}} if "loftq_config" in config.field_names() else {}
        config = config.replace(init_lora_weights=True, **no_loftq)  # PiSSA/OLoRA/LoftQ init would rewrite the shared base
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
        """{module path: its weights in bank form}, read from the folder (the first read was done when registered)."""
        pending, self._pending = getattr(self, "_pending", None), None
        if pending is not None:
            return pending
        _, adapters = read_adapter(self.model, self.folder)
        return {name: slot_weights(a, self.model.get_submodule(name), name) for name, a in adapters.items()}

    def signature(self) -> Hashable:
        """Always None: a folder on disk is taken as fixed once registered."""
        return None  # a file on disk is taken as fixed once registered


class PeftModelSource:
    """Adapter ``name`` of a live PeftModel; read again whenever its tensors (or the base weights) change.

    Every request checks the adapter exactly, so no write can leave the bank stale: the tensors are
    compared bit for bit with a copy taken when they were read, which catches writes that PyTorch's
    version counters miss (``p.data.copy_(w)``, ``p.data[...] = w``: a ``.data`` tensor has a counter
    of its own). Swapped storage (``p.data = w``, ``.to(...)``) and replaced Parameters
    (``load_state_dict(assign=True)``) change the tensors' identity, which is checked first. The base
    weights, which DoRA's cached norm reads, are watched by storage and version counter only:
    comparing them would read, and the copy would double, the model's weights. The check reads the
    adapter's bytes twice, about 1-2% of one forward of a small model and 0.1-0.2% of a generate call
    (docs/serving.md has the measurements).

    Args:
        hosts: returns the model's wrapped layers as (path, AdaptedLayer); the caller caches this walk
            over the model, which costs more than everything else a request does.
        name: the adapter.
    """

    def __init__(self, hosts: Callable[[], list[tuple[str, AdaptedLayer]]], name: str) -> None:
        self.hosts, self.name = hosts, name
        self._layers: tuple[list | None, list[tuple[nn.Module, nn.Module]]] = (None, [])  # (hosts, [(adapter, base)])
        self._read_state: tuple[tuple, list] | None = None  # (identities, watched bits) when last read
        self._changes = 0

    def _mine(self) -> list[tuple[str, AdaptedLayer]]:
        return [(p, h) for p, h in self.hosts() if self.name in h.adapters]

    def _tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        hosts = self.hosts()
        if self._layers[0] is not hosts:  # the layers were found again
            self._layers = (hosts, [(h.adapters[self.name], h.base_layer) for _, h in self._mine()])
        # The Parameters are looked up on every request, not cached, so that a replaced one is the one
        # compared; through ``_parameters`` because ``parameters(recurse=False)`` costs 12x as much.
        layers = self._layers[1]
        own = [t for adapter, _ in layers for t in adapter._parameters.values() if t is not None]
        base = [t for _, layer in layers for t in layer._parameters.values() if t is not None]  # DoRA's norm reads it
        return own, base

    def read(self) -> dict[str, SlotWeights]:
        """{module path: its weights in bank form}, taken from the live model; remembers what it read."""
        weights = {p: slot_weights(h.adapters[self.name], h.base_layer, p) for p, h in self._mine()}
        own, base = self._tensors()
        self._read_state = (_identities(own, base), _watch_bits(own))
        return weights

    def signature(self) -> Hashable:
        """How many changes to the adapter's tensors this source has seen; the bank reloads when it moves."""
        own, base = self._tensors()
        seen = self._read_state
        if seen is None or _identities(own, base) != seen[0] or not _unchanged(seen[1]):
            self._changes += 1
        return self._changes


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _identities(own: list[torch.Tensor], base: list[torch.Tensor]) -> tuple:
    # The adapter's bytes are compared as well, so its storages are enough; the base's version counters
    # stand in for its bytes.
    return (*(t.data_ptr() for t in own), *((t.data_ptr(), t._version) for t in base))


@torch.no_grad()
def _watch_bits(tensors: list[torch.Tensor]) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """Flat integer views of the tensors' storages (later writes show through them), grouped by dtype
    and device so that one ``torch.cat`` gathers a group, each with a copy of the group as it is now.

    Seen as integers of the same width, the bytes compare bit for bit: a NaN equals itself (an adapter
    holding one is not re-read on every request) and -0.0 differs from 0.0.
    """
    groups: dict[object, list[torch.Tensor]] = {}
    for t in tensors:
        v = t.detach().view(_SAME_SIZE_INT.get(t.element_size(), t.dtype))
        if v.is_contiguous():
            groups.setdefault((v.dtype, v.device), []).append(v.view(-1))
        else:
            groups[id(v)] = [v]  # only a contiguous tensor flattens to a view: compared on its own
    return [(views, _joined(views).clone()) for views in groups.values()]


def _joined(views: list[torch.Tensor]) -> torch.Tensor:
    return views[0] if len(views) == 1 else torch.cat(views)


@torch.no_grad()
def _unchanged(watched: list[tuple[list[torch.Tensor], torch.Tensor]]) -> bool:
    # One cat and one torch.equal per group, not per tensor: on CUDA each torch.equal synchronises.
    return all(torch.equal(_joined(views), copy) for views, copy in watched)
