"""Checking JSON values against type hints, and naming types readably in the errors: what config errors
(``adapter_config.json``, ``deltatune train``'s keys) say when a value has the wrong type."""
from __future__ import annotations

import enum
import types
import typing
from collections import abc
from typing import Any


def type_name(hint: Any) -> str:
    """A readable name for a type hint: ``float``, ``list of str``, ``int or None``..."""
    if hint is Any:
        return "any value"
    if hint is type(None):
        return "None"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, abc.Sequence) or hint in (list, tuple):
        return f"a list of {type_name(args[0])}" if args else "a list"
    if origin in (dict, abc.Mapping) or hint is dict:
        return f"a mapping of {type_name(args[0])} to {type_name(args[1])}" if args else "a mapping"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    return getattr(hint, "__name__", str(hint))


def fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value has the type ``hint`` asks for; an int counts as a float, a bool as neither."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return not isinstance(value, bool) and isinstance(value, (int, float) if hint is float else int)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or value in {m.value for m in hint}
    if origin in (list, tuple, abc.Sequence):
        return isinstance(value, (list, tuple)) and (not args or all(fits(v, args[0]) for v in value))
    if origin in (dict, abc.Mapping):
        return isinstance(value, abc.Mapping) and (not args or all(fits(k, args[0]) and fits(v, args[1]) for k, v in value.items()))
    return isinstance(value, hint) if isinstance(hint, type) else True


def check_types(cls: type, values: dict[str, Any], source: str) -> None:
    """Raise ``ValueError`` for the first value of ``values`` whose type does not fit ``cls``'s field.

    Raises:
        ValueError: naming the file, the key, the expected type and the value found.
    """
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key in hints and not fits(value, hints[key]):
            raise ValueError(
                f"{source}: key {key!r} must be {type_name(hints[key])}; got {value!r} ({type(value).__name__}). "
                "Fix the value in the file (JSON writes true/false, null and numbers without quotes), "
                "or save the adapter again."
            )
