"""Write a recommendation (or a tuned trial) as a ready ``deltatune train`` YAML config.

The tree follows :class:`deltatune.train.config.TrainConfig`: ``model``, ``method`` (``name`` plus
the method config's fields), ``train``, ``data``. Every written file is loaded back with
``load_train_config`` before it is moved into place, so a config this module writes always runs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from deltatune.atomic import atomic_write_text
from deltatune.plan.report import fmt_bytes
from deltatune.train.config import load_train_config


def train_tree(rec: Any) -> dict[str, Any]:
    """The :class:`~deltatune.plan.recommend.Recommendation` as a train-config mapping."""
    s = rec.setup
    method: dict[str, Any] = {"name": s.method}
    if s.is_lora_family:
        targets = rec.target_modules
        method.update(r=s.r, lora_alpha=s.alpha, lora_dropout=s.lora_dropout,
                      target_modules=targets if isinstance(targets, str) else list(targets))
    elif s.is_prompt_learning:
        method["num_virtual_tokens"] = s.num_virtual_tokens
    tree: dict[str, Any] = {"model": rec.model or None, "method": method,
                            "train": {"lr": rec.lr, "batch_size": s.batch_size, "grad_accum": rec.grad_accum,
                                      "gradient_checkpointing": s.grad_checkpointing},
                            "data": {"max_length": s.seq_len}}
    if s.method == "qlora":
        tree["quant"] = {"bits": 4, "quant_type": "nf4", "double_quant": s.double_quant,
                         "blocksize": s.quant_blocksize}
    if tree["model"] is None:
        del tree["model"]
    return tree


_COMMENT_KEYS = {("method", "name"): "method", ("method", "r"): "r", ("method", "lora_alpha"): "alpha",
                 ("method", "target_modules"): "targets", ("train", "lr"): "lr",
                 ("train", "batch_size"): "batch_size", ("train", "grad_accum"): "grad_accum",
                 ("train", "gradient_checkpointing"): "grad_checkpointing"}


def render_yaml(tree: Mapping[str, Any], reasons: Mapping[str, str] | None = None, header: str = "") -> str:
    """YAML text of a two-level config tree, with ``reasons`` as comments above the keys they explain."""
    reasons = reasons or {}
    lines = [f"# {line}" for line in header.splitlines()]
    for key, value in tree.items():
        if not isinstance(value, Mapping):
            lines.append(yaml.safe_dump({key: value}, default_flow_style=False, sort_keys=False).rstrip())
            continue
        lines.append(f"{key}:")
        for sub, v in value.items():
            why = reasons.get(_COMMENT_KEYS.get((key, sub), ""), "")
            if why:
                lines.append(f"  # {why}")
            text = yaml.safe_dump({sub: v}, default_flow_style=True, sort_keys=False, width=1000).strip()
            lines.append("  " + text.removeprefix("{").removesuffix("}"))
    return "\n".join(lines) + "\n"


def write_yaml_checked(text: str, path: str | os.PathLike) -> Path:
    """Check ``text`` loads as a train config, then write it to ``path`` atomically.

    Raises:
        ValueError: the config does not validate (the message says which key and why).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.check.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(text)
    try:
        load_train_config(tmp)
    except Exception as err:  # ConfigError or a config class's ValueError: name the file we made
        raise ValueError(f"the generated train config does not validate ({err}); this is a deltatune bug, "
                         f"the text was:\n{text}") from err
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(path, text)
    return path


def write_train_config(rec: Any, path: str | os.PathLike) -> Path:
    """Write ``rec`` as a commented ``deltatune train`` YAML config at ``path`` (validated first)."""
    s = rec.setup
    header = (f"deltatune train config recommended by `deltatune plan --recommend`.\n"
              f"Estimated peak memory: {fmt_bytes(rec.estimate.peak_bytes)} of {fmt_bytes(rec.device_memory)} "
              f"({s.device}, {s.dtype}, {s.seq_len}-token sequences).\n"
              "Set data.source to your dataset (a .jsonl/.json/.csv/.parquet file); without it the default "
              "BBC news job runs.\nRun it with: deltatune train THIS_FILE")
    return write_yaml_checked(render_yaml(train_tree(rec), rec.reasons, header), path)
