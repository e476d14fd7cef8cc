"""The method registry: ``peft_type`` -> the registered :class:`deltatune.methods.base.Method`.

It sits at the bottom of the package, next to the configs, so that model surgery, file reading and every
application can look a method up without importing the methods themselves (they import surgery). The
built-in methods register themselves when :mod:`deltatune.methods` is imported, which ``import deltatune``
does; a plugin or a test registers its own with :func:`register_method`.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from deltatune.config import PeftType

if TYPE_CHECKING:
    from deltatune.methods.base import Method, Variant

METHODS: dict[PeftType, "Method"] = {}
"""peft_type -> method, in registration order."""


def register_method(method: "Method") -> "Method":
    """Add ``method`` to the registry (replacing one with the same ``peft_type``) and return it."""
    METHODS[method.peft_type] = method
    return method


def _load_builtin() -> None:
    # `import deltatune` has done this already; a bare `import deltatune.registry` has not.
    importlib.import_module("deltatune.methods")


def get_method(peft_type: PeftType | str) -> "Method":
    """The registered method for ``peft_type`` (a :class:`PeftType` or its value, e.g. ``"LORA"``).

    Raises:
        ValueError: no method has that ``peft_type`` (the message lists the known ones).
    """
    if peft_type not in METHODS:
        _load_builtin()
    if peft_type in METHODS:
        return METHODS[peft_type]
    try:
        return METHODS[PeftType(peft_type)]
    except (ValueError, KeyError):
        known = [str(getattr(t, "value", t)) for t in METHODS]
        raise ValueError(f"unknown peft_type {peft_type!r}; deltatune supports {known}") from None


def all_methods() -> list["Method"]:
    """Every method: the built-in ones in :class:`PeftType` order, then any registered since (a plugin,
    a test's toy method) in registration order."""
    _load_builtin()
    order = {t: i for i, t in enumerate(PeftType)}
    return sorted(METHODS.values(), key=lambda m: order.get(m.peft_type, len(order)))


def method_names() -> dict[str, tuple["Method", "Variant"]]:
    """Every name a user can pick a method by (``lora``, ``dora``, ``qlora``, ``ia3``...), in order, with
    its method and variant."""
    return {v.name: (m, v) for m in all_methods() for v in m.named()}
