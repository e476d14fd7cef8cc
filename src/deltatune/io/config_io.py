"""Reading and writing ``adapter_config.json`` in peft's format.

Newer peft versions write keys deltatune does not model. A key at its inert value (e.g.
``"eva_config": null``) is accepted silently; any other unknown key is reported in a warning that
names it; a known peft feature switched on that we do not implement is an error, because loading it
would silently give different outputs.

Values are checked against the config class's type hints before the config is built: JSON has real
types, so ``"use_rslora": "false"`` (a string) or ``"lora_alpha": true`` is refused with the file, the key
and the expected type, instead of loading as a truthy string or as 1.0. Unlike the training CLI's YAML,
no string is read as a number here.
"""
from __future__ import annotations

import enum
import json
import os
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deltatune.config import PeftConfig, PeftType, type_name
from deltatune.io.atomic import atomic_write_text, finish_interrupted_save
from deltatune.methods.base import get_method

CONFIG_NAME = "adapter_config.json"
_ANY = object()
# Keys peft writes that carry no meaning for the methods we implement, with their inert values.
PEFT_INERT_KEYS: dict[str, Any] = {
    "auto_mapping": _ANY, "peft_version": _ANY, "megatron_core": _ANY, "qalora_group_size": _ANY,
    "alora_invocation_tokens": None, "arrow_config": None, "corda_config": None, "eva_config": None,
    "kasa_config": None, "lora_ga_config": None, "megatron_config": None, "monteclora_config": None,
    "velora_config": None, "trainable_token_indices": None, "layer_replication": None,
    "target_parameters": None, "use_bdlora": None, "loftq_config": {}, "ensure_weight_tying": False,
    "lora_bias": False, "use_qalora": False, "runtime_config": _ANY, "num_transformer_submodules": _ANY,
    "num_attention_heads": _ANY, "num_layers": _ANY, "token_dim": _ANY, "modules_to_save": None,
}


def _inert(key: str, value: Any) -> bool:
    expected = PEFT_INERT_KEYS.get(key, object())
    return expected is _ANY or value == expected or (expected == {} and value in (None, {}))


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> PeftConfig:
    """Build the right config class from a peft-style dict; see the module docstring for unknown keys."""
    if "peft_type" not in data:
        raise ValueError(f"{source}: no 'peft_type' key; this is not an adapter_config.json written by peft or deltatune")
    try:
        peft_type = PeftType(data["peft_type"])
    except ValueError:
        raise ValueError(
            f"{source}: peft_type {data['peft_type']!r} is not supported by deltatune "
            f"(supported: {[t.value for t in PeftType]})"
        ) from None
    cls = get_method(peft_type).config_cls
    known = cls.field_names()
    kwargs = {k: v for k, v in data.items() if k in known}
    rest = {k: v for k, v in data.items() if k not in known and k != "peft_type"}
    active = {k: v for k, v in rest.items() if k in PEFT_INERT_KEYS and not _inert(k, v)}
    if active:
        raise ValueError(
            f"{source}: this adapter uses peft features deltatune does not implement: "
            + ", ".join(f"{k}={v!r}" for k, v in active.items())
            + ". Loading it would give different outputs; re-train or convert it without them."
        )
    unknown = sorted(k for k in rest if k not in PEFT_INERT_KEYS)
    if unknown:
        warnings.warn(
            f"{source}: ignoring config keys deltatune does not know (written by a newer peft?): {', '.join(unknown)}",
            stacklevel=3,
        )
    check_types(cls, kwargs, source)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None


# ---- value types ---------------------------------------------------------------------------------------
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
    if origin in (list, tuple, Sequence):
        return isinstance(value, (list, tuple)) and (not args or all(fits(v, args[0]) for v in value))
    if origin in (dict, Mapping):
        return isinstance(value, Mapping) and (not args or all(fits(k, args[0]) and fits(v, args[1]) for k, v in value.items()))
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


def read_config_json(path: str | os.PathLike, subfolder: str | None = None) -> tuple[Path, dict]:
    """``(file, parsed JSON)`` of an adapter folder's config (or of a config file given directly).

    Raises:
        FileNotFoundError: there is no config file there.
        ValueError: the file is not valid JSON.
    """
    folder = Path(path) / subfolder if subfolder else Path(path)
    file = folder / CONFIG_NAME if folder.is_dir() else folder
    finish_interrupted_save(file.parent)  # weights and config of one save, never of two
    if not file.is_file():
        raise FileNotFoundError(
            f"no {CONFIG_NAME} at {folder}; pass the folder that save_pretrained wrote "
            "(a non-default adapter lives in a subfolder named after it)"
        )
    try:
        return file, json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None


def load_config(path: str | os.PathLike, subfolder: str | None = None) -> PeftConfig:
    file, data = read_config_json(path, subfolder)
    return config_from_dict(data, source=str(file))


def config_json(config: PeftConfig, auto_mapping: dict[str, str] | None = None) -> str:
    """The text of ``adapter_config.json`` for ``config``, as peft writes it (with ``auto_mapping`` if given)."""
    data = config.to_dict()
    if auto_mapping is not None:
        data["auto_mapping"] = auto_mapping
    if isinstance(data.get("target_modules"), list):
        # peft stores target_modules as a set and writes it sorted; do the same so files diff cleanly.
        data["target_modules"] = sorted(set(data["target_modules"]))
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def save_config(config: PeftConfig, folder: str | os.PathLike) -> Path:
    """Write ``adapter_config.json`` alone (an adapter's weights and config together: ``checkpoint.save_adapter``)."""
    file = Path(folder) / CONFIG_NAME
    atomic_write_text(file, config_json(config))
    return file
