"""Reading and writing ``adapter_config.json`` in peft's format.

Newer peft versions write keys deltatune does not model. A key at its inert value (e.g.
``"eva_config": null``) is accepted silently; any other unknown key is reported in a warning that
names it; a known peft feature switched on that we do not implement is an error, because loading it
would silently give different outputs.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from deltatune.config import PeftConfig, PeftType
from deltatune.io.atomic import atomic_write_text

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
    from deltatune.methods.base import get_method

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
    return cls(**kwargs)


def read_config_json(path: str | os.PathLike, subfolder: str | None = None) -> tuple[Path, dict]:
    """``(file, parsed JSON)`` of an adapter folder's config (or of a config file given directly).

    Raises:
        FileNotFoundError: there is no config file there.
        ValueError: the file is not valid JSON.
    """
    folder = Path(path) / subfolder if subfolder else Path(path)
    file = folder / CONFIG_NAME if folder.is_dir() else folder
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


def save_config(config: PeftConfig, folder: str | os.PathLike) -> Path:
    data = config.to_dict()
    if isinstance(data.get("target_modules"), list):
        # peft stores target_modules as a set and writes it sorted; do the same so files diff cleanly.
        data["target_modules"] = sorted(set(data["target_modules"]))
    file = Path(folder) / CONFIG_NAME
    atomic_write_text(file, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return file
