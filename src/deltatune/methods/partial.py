"""Partial (selective) fine-tuning: chosen transformer blocks or modules train in full, the rest is frozen.

The classic recipe is to unfreeze the last few blocks (plus the head): the lower layers hold general
features and the upper ones the task-specific ones (Yosinski et al., 2014, arXiv:1411.1792; for
transformers e.g. Lee et al., 2019, arXiv:1911.03090 "What would Elsa do? Freezing layers during
transformer fine-tuning"). It is "selective" PEFT in the taxonomy of Lialin et al., 2023
(arXiv:2303.15647), next to BitFit.

It reuses peft's ``modules_to_save`` machinery: each selected module is wrapped in a
:class:`~deltatune.surgery.layer.ModulesToSaveWrapper` that keeps the frozen original and one trainable
full copy per adapter. So ``disable_adapter`` runs the originals, several partial adapters switch with
``set_adapter``, and the disk format is peft's for ``modules_to_save``:
``base_model.model.<module path>.<parameter>`` with ``peft_type: "PARTIAL"``.
"""
from __future__ import annotations

import difflib
import re
import types
from dataclasses import dataclass
from typing import ClassVar, Iterator, Sequence

from torch import nn

from deltatune.config import PeftConfig, PeftType
from deltatune.methods.base import Method, register_method
from deltatune.surgery import inject
from deltatune.surgery.layer import AdaptedLayer, ModulesToSaveWrapper
from deltatune.surgery.targets import LAYER_PATTERNS, check_modules_to_save, name_matches, resolve_modules_to_save

_FIRST_LAST = re.compile(r"(first|last):([1-9]\d*)")


@dataclass(frozen=True)
class PartialConfig(PeftConfig):
    """Partial fine-tuning: train whole blocks (``layers_to_train``) and/or named modules (``modules``) in full.

    Written to ``adapter_config.json`` with ``peft_type: "PARTIAL"`` (deltatune's own value). Weights:
    every parameter and persistent buffer of every selected module, ``base_model.model.<path>.<name>``.
    """

    peft_type: ClassVar[PeftType] = PeftType.PARTIAL

    layers_to_train: str | int | Sequence[int] | None = None
    """Blocks of the model's layer list to train: "last:N", "first:N", one index, or a list of indices
    (negative ones count from the end, as in Python)."""
    modules: Sequence[str] | str | None = None
    """Other modules trained in full: names matched as suffixes of the dotted path (["lm_head"],
    ["norm"]) or one regex matched against the full path."""
    layers_pattern: str | None = None
    """The layer list ``layers_to_train`` indexes: its name ("layers", "h", "layer") or full dotted path.
    None: the one ``nn.ModuleList`` named like a layer list (layers, h, block, blocks, layer)."""
    modules_to_save: Sequence[str] | None = None
    """peft's field for extra full copies (suffix match); ``task_type="SEQ_CLS"`` puts the classifier here.
    Same mechanism as ``modules``."""

    def validate(self) -> None:
        if self.layers_to_train is None and not self.modules:
            raise ValueError(
                "PartialConfig selects nothing to train: set layers_to_train (e.g. 'last:2') and/or modules "
                "(e.g. ['lm_head']); for a linear probe use modules=['classifier']"
            )
        _validate_layers(self.layers_to_train)
        if not isinstance(self.modules, str) and self.modules is not None and not all(isinstance(k, str) and k for k in self.modules):
            raise ValueError(f"modules must be a regex string or a list of module names, got {self.modules!r}")
        if self.layers_pattern is not None:
            if not isinstance(self.layers_pattern, str) or not self.layers_pattern:
                raise ValueError(f"layers_pattern must be one name or dotted path, got {self.layers_pattern!r}")
            if self.layers_to_train is None:
                raise ValueError("layers_pattern only makes sense together with layers_to_train; set both or neither")


def _validate_layers(spec: object) -> None:
    if spec is None:
        return
    if isinstance(spec, str):
        if _FIRST_LAST.fullmatch(spec) is None:
            raise ValueError(f"layers_to_train={spec!r} is not understood; use 'last:N', 'first:N' or a list of indices")
        return
    indices = [spec] if isinstance(spec, int) else spec
    if isinstance(spec, bool) or not isinstance(indices, (list, tuple)) or not indices or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in indices
    ):
        raise ValueError(f"layers_to_train must be 'last:N', 'first:N', an int or a non-empty list of ints, got {spec!r}")


# ---- functional core -------------------------------------------------------------------------------
def select_layer_indices(spec: str | int | Sequence[int], num_layers: int, where: str = "the layer list") -> list[int]:
    """Resolve ``layers_to_train`` against a list of ``num_layers`` blocks: sorted, unique, non-negative.

    Raises:
        ValueError: an index is out of range, or "first:N"/"last:N" asks for more blocks than exist.
    """
    if isinstance(spec, str):
        kind, count = _FIRST_LAST.fullmatch(spec).groups()
        if int(count) > num_layers:
            raise ValueError(f"layers_to_train={spec!r} asks for {count} blocks but {where} has {num_layers}")
        return list(range(num_layers - int(count), num_layers)) if kind == "last" else list(range(int(count)))
    indices = [spec] if isinstance(spec, int) else list(spec)
    bad = [i for i in indices if not -num_layers <= i < num_layers]
    if bad:
        raise ValueError(
            f"layers_to_train index {bad[0]} is out of range: {where} has {num_layers} blocks "
            f"(valid: 0..{num_layers - 1}, or -{num_layers}..-1 from the end)"
        )
    return sorted({i % num_layers for i in indices})


def drop_nested(names: Sequence[str]) -> list[str]:
    """Keep the outermost of overlapping module paths ('a.b' covers 'a.b.c'); order and duplicates removed."""
    unique = list(dict.fromkeys(names))
    return [n for n in unique if not any(n != o and n.startswith(o + ".") for o in unique)]


# ---- walking a model that may already hold adapters ------------------------------------------------
def iter_unwrapped_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, str | None]]:
    """(path, module, enclosing) for every module at its path in the unwrapped model.

    Our wrappers are seen through: an ``AdaptedLayer`` stands for its base layer and a
    ``ModulesToSaveWrapper`` for its original module, and adapter copies are never visited.
    ``enclosing`` is the path of the nearest ``ModulesToSaveWrapper`` strictly around the module
    (a module some adapter already trains in full), or None. A module reachable by several paths is
    reported once, at its first path, as ``nn.Module.named_modules`` does.
    """
    seen: set[int] = set()

    def walk(parent: nn.Module, prefix: str, enclosing: str | None):
        for name, child in parent.named_children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = prefix + name
            inner = enclosing
            if isinstance(child, ModulesToSaveWrapper):
                child, inner = child.original_module, enclosing or path
            elif isinstance(child, AdaptedLayer):
                child = child.base_layer
            yield path, child, enclosing
            yield from walk(child, path + ".", inner)

    yield from walk(model, "", None)


def _other_adapters_inside(module: nn.Module) -> list[str]:
    root = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
    found = []
    for sub, m in root.named_modules():
        if isinstance(m, AdaptedLayer):
            found.append(f"{sub or '(itself)'} holds adapters {list(m.adapters)}")
        elif isinstance(m, ModulesToSaveWrapper):
            found.append(f"{sub or '(itself)'} is trained in full by adapters {list(m.modules_to_save)}")
    return found


# ---- target resolution -----------------------------------------------------------------------------
def find_layer_list(model: nn.Module, layers_pattern: str | None) -> tuple[str, int]:
    """(path, length) of the ``nn.ModuleList`` of blocks that ``layers_to_train`` indexes.

    Raises:
        ValueError: no list, or more than one, matches; the message lists the ModuleLists that exist.
    """
    lists = [(n, m) for n, m, enc in iter_unwrapped_modules(model) if isinstance(m, nn.ModuleList) and len(m) and enc is None]
    if layers_pattern is None:
        found = [(n, m) for n, m in lists if n.rsplit(".", 1)[-1] in LAYER_PATTERNS]
    else:
        found = [(n, m) for n, m in lists if name_matches(n, layers_pattern)]
    if len(found) == 1:
        return found[0][0], len(found[0][1])
    existing = ", ".join(f"{n} ({len(m)})" for n, m in lists) or "(none)"
    if not found:
        what = f"layers_pattern={layers_pattern!r} matches" if layers_pattern else "no layers_pattern was given and found"
        raise ValueError(
            f"{what} no list of blocks in {type(model).__name__}; set layers_pattern to one of its ModuleLists: {existing}"
        )
    raise ValueError(
        f"layers_to_train is ambiguous in {type(model).__name__}: several layer lists match "
        f"({', '.join(n for n, _ in found)}); set layers_pattern to the full path of one of them"
    )


def _match_modules(entries: list[tuple[str, nn.Module, str | None]], spec: Sequence[str] | str, model: nn.Module) -> list[str]:
    if isinstance(spec, str):
        chosen = [n for n, _, _ in entries if re.fullmatch(spec, n)]
        if not chosen:
            raise ValueError(f"modules regex {spec!r} matches no module path of {type(model).__name__}")
        return chosen
    chosen: list[str] = []
    short = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, _, _ in entries))
    for key in spec:
        hits = [n for n, _, _ in entries if name_matches(n, key)]
        if not hits:
            close = difflib.get_close_matches(key.rsplit(".", 1)[-1], short, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"modules entry {key!r} matches no module of {type(model).__name__}.{hint}")
        chosen += hits
    return chosen


def resolve_partial_targets(model: nn.Module, config: PartialConfig) -> list[str]:
    """The dotted paths of the modules ``config`` trains in full (blocks, ``modules``, ``modules_to_save``),
    outermost only, in model order: a dry run that changes nothing.

    Raises:
        ValueError: a selection matches nothing or is out of range; a selected module is a container,
            has no parameters, lies inside a module another adapter trains in full, or holds other
            adapters (whose weights a full copy would duplicate).
    """
    entries = list(iter_unwrapped_modules(model))
    names: list[str] = []
    if config.layers_to_train is not None:
        list_name, length = find_layer_list(model, config.layers_pattern)
        names += [f"{list_name}.{i}" for i in select_layer_indices(config.layers_to_train, length, list_name)]
    if config.modules:
        names += _match_modules(entries, config.modules, model)
    names += resolve_modules_to_save(model, config.modules_to_save)
    order = {n: i for i, (n, _, _) in enumerate(entries)}
    names = sorted(drop_nested(names), key=order.__getitem__)
    by_name = {n: (m, enc) for n, m, enc in entries}
    for name in names:
        _check_selectable(model, name, *by_name[name])
    return names


def _check_selectable(model: nn.Module, name: str, module: nn.Module, enclosing: str | None) -> None:
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        raise ValueError(f"{name} is a {type(module).__name__}, not a module that runs; select its blocks with layers_to_train")
    if not any(True for _ in module.parameters()):
        raise ValueError(f"{name} ({type(module).__name__}) has no parameters to train; select another module")
    if enclosing is not None:
        raise ValueError(
            f"{name} lies inside {enclosing}, which another adapter already trains in full; nested full copies "
            f"are not supported: select {enclosing} itself, or use a separate model"
        )
    inside = _other_adapters_inside(model.get_submodule(name))
    if inside:
        raise ValueError(
            f"cannot train {name} in full: {'; '.join(inside[:3])}. A full copy would duplicate those adapters. "
            "Add the partial adapter before the others, select modules without adapters, or use a separate model"
        )


# ---- attach ----------------------------------------------------------------------------------------
def attach_partial(model: nn.Module, config: PartialConfig, adapter_name: str) -> None:
    """Give every selected module of ``model`` a trainable full copy for ``adapter_name``.

    Everything is checked before the model changes, so a failed attach leaves it as it was.
    """
    check_modules_to_save(model, config.modules_to_save)
    names = resolve_partial_targets(model, config)
    # add_modules_to_save matches keys as path suffixes; make sure each full path names only itself.
    extra = sorted(set(inject.resolve_modules_to_save(model, names)) - set(names))
    if extra:
        raise ValueError(f"module paths {names} also match {extra} as suffixes; select modules by a regex instead")
    inject.add_modules_to_save(model, names, adapter_name)


class PartialMethod(Method):
    """Partial fine-tuning: no adapter layers, only full trainable copies of the selected modules."""

    def attach(self, model: nn.Module, config: PeftConfig, name: str) -> None:
        attach_partial(model, config, name)


register_method(PartialMethod(
    PeftType.PARTIAL, PartialConfig, merges=True,  # merge_and_unload puts the trained copies in the model
    name="partial", train_preset=types.MappingProxyType({"layers_to_train": "last:2"}),
))
