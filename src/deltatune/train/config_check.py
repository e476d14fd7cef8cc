"""Checking user-written config values against dataclass fields: unknown keys and wrong types.

Every section of a training config (``train``, ``data``, ``method``, ``eval``, ``quant``) is a
dataclass whose type hints say what each key accepts. :func:`check_section` compares a plain dict
(from YAML or ``key=value`` overrides) against those hints before the dataclass is built, so the
error names the dotted key, what was expected and what was given, and suggests the closest valid key
for a typo (``train.lr`` vs ``train.lrr``).

Values are coerced only where YAML is known to surprise: ``2e-4`` is a *string* in YAML 1.1 (a
float needs a dot), so a string that parses as a number is accepted for a ``float``/``int`` field.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from deltatune.config_types import type_name


class ConfigError(ValueError):
    """A training config key is unknown, or its value has the wrong type or range."""


def did_you_mean(key: str, valid: Sequence[str]) -> str:
    """``" Did you mean 'lr'?"`` for the closest valid key, or ``""`` when none is close."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def unknown_key_error(section: str, key: str, valid: Sequence[str]) -> ConfigError:
    where = f"{section}.{key}" if section else key
    return ConfigError(
        f"Unknown config key {where!r}.{did_you_mean(key, valid)} "
        f"Valid keys{' in ' + repr(section) if section else ''}: {', '.join(sorted(valid))}."
    )


def field_hints(cls: type) -> dict[str, Any]:
    """Type hints of a dataclass's init fields (ClassVars and ``init=False`` fields excluded)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


class _Mismatch(Exception):
    pass


def _parse_number(value: str, kind: type) -> Any:
    try:
        parsed = float(value) if kind is float else int(value)
    except ValueError:
        raise _Mismatch from None
    return parsed


def coerce(value: Any, hint: Any, lenient: bool = True) -> Any:
    """``value`` checked against ``hint`` (and converted where YAML is ambiguous).

    Raises:
        _Mismatch: the value does not fit.
    """
    if hint is Any or hint is object:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        # Exact matches first, so "5" stays a string for an ``int | str`` field.
        for strict in (True, False) if lenient else (True,):
            for arg in args:
                try:
                    return coerce(value, arg, lenient=not strict)
                except _Mismatch:
                    continue
        raise _Mismatch
    if origin is typing.Literal:
        if value in args:
            return value
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint in (int, float):
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int) or (hint is float and isinstance(value, float)):
            return hint(value)
        if lenient and isinstance(value, str):
            return _parse_number(value, hint)
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if isinstance(value, hint):
            return value
        if value in {m.value for m in hint}:
            return value
        raise _Mismatch
    if origin in (list, tuple, Sequence, typing.Sequence) or hint in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise _Mismatch
        if not args:
            return list(value)
        return [coerce(v, args[0], lenient) for v in value]
    if origin in (dict, Mapping, typing.Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        if not args:
            return dict(value)
        return {coerce(k, args[0], lenient): coerce(v, args[1], lenient) for k, v in value.items()}
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _Mismatch
    return value  # a hint we do not model (e.g. torch.dtype strings): the dataclass validates it


def check_value(where: str, value: Any, hint: Any) -> Any:
    """Coerced ``value`` for the key ``where``, or a :class:`ConfigError` saying what was expected."""
    try:
        return coerce(value, hint)
    except _Mismatch:
        shown = f"{value!r} ({type(value).__name__})"
        raise ConfigError(f"Config key {where!r} must be {type_name(hint)}; got {shown}.") from None


def check_section(section: str, values: Mapping[str, Any], cls: type, extra: Mapping[str, Any] | None = None) -> dict:
    """Check every key of ``values`` against the fields of dataclass ``cls``.

    Args:
        section: dotted name for messages (``"train"``).
        values: the user's keys and values.
        cls: the dataclass the section becomes.
        extra: additional accepted keys and their hints (e.g. ``method.name``).

    Returns:
        The values with numbers parsed (``"2e-4"`` -> ``0.0002``) and lists as lists.

    Raises:
        ConfigError: an unknown key (with a did-you-mean suggestion) or a value of the wrong type.
    """
    if not isinstance(values, Mapping):
        raise ConfigError(f"Config section {section!r} must be a mapping of keys to values; got {values!r}.")
    hints = {**field_hints(cls), **(extra or {})}
    out = {}
    for key, value in values.items():
        if key not in hints:
            raise unknown_key_error(section, str(key), list(hints))
        out[key] = check_value(f"{section}.{key}" if section else key, value, hints[key])
    return out


def build_section(section: str, cls: type, values: Mapping[str, Any]) -> Any:
    """``cls(**values)``, with the dataclass's own validation error prefixed by the section name."""
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"Invalid {section!r} config: {err}") from err


# ---- dotted overrides ------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=2e-4"`` -> ``(["train", "lr"], 0.0002-or-"2e-4")``; the value is parsed as YAML.

    Raises:
        ConfigError: no ``=``, or an empty key part.
    """
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(
            f"Cannot read override {text!r}: expected key=value with a dotted key, e.g. train.lr=2e-4 or "
            "method.target_modules=[q_proj,v_proj]."
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. an unbalanced bracket): keep the text and let the type check speak
    return parts, value


def set_dotted(tree: dict, parts: list[str], value: Any) -> None:
    """Set ``tree[a][b] = value`` for parts ``[a, b]``, creating the intermediate mappings."""
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"Config key {'.'.join(parts)!r}: {'.'.join(parts[: i + 1])!r} is a value, not a section."
            )
        node = child
    node[parts[-1]] = value
