"""Writing ``adapter_config.json`` in peft's format (reading it, and what is accepted there, is
:mod:`deltatune.config`'s; re-exported here)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from deltatune.atomic import atomic_write_text
from deltatune.config import (  # noqa: F401 (re-exported: reading)
    CONFIG_NAME, PEFT_INERT_KEYS, PeftConfig, config_from_dict, load_config, read_config_json,
)
from deltatune.config_types import check_types, fits  # noqa: F401 (re-exported)


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
