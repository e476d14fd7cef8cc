"""Run a patch on a module now if it is loaded, else the moment it loads.

Third-party modules bind names at import time (``from accelerate.utils import is_peft_model``), so a
patch must reach each module that holds the name, whichever of them is imported first: before
``import deltatune`` or after. A finder on ``sys.meta_path`` wraps the loader of each target module
so the patch runs right after the module executes; ``import deltatune`` itself imports none of them.
"""
from __future__ import annotations

import importlib.abc
import sys
from typing import Any, Callable

_TARGETS: dict[str, list[Callable[[Any], None]]] = {}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches a module of :data:`_TARGETS` right after it executes (for modules imported later)."""

    def find_spec(self, fullname, path, target=None):
        patches = _TARGETS.get(fullname)
        if not patches:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return None

        def exec_and_patch(module):
            exec_module(module)
            for patch in patches:
                patch(module)

        loader.exec_module = exec_and_patch  # this loader instance serves this one module
        return spec


def patch_module(name: str, patch: Callable[[Any], None]) -> None:
    """Apply ``patch`` to module ``name`` now if loaded, and whenever it loads. Patches must be idempotent."""
    patches = _TARGETS.setdefault(name, [])
    if patch not in patches:
        patches.append(patch)
    if name in sys.modules:
        patch(sys.modules[name])
    if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
