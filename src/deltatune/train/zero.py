"""DeepSpeed ZeRO through transformers' Trainer (``train.distributed: deepspeed``, ``train.deepspeed``).

We write no engine: the Trainer gets a DeepSpeed config (``TrainingArguments(deepspeed=...)``) and
accelerate builds DeepSpeed's engine from it. ``train.deepspeed`` names one of the shipped configs,
``zero2`` or ``zero3`` (:data:`SHIPPED`, also in ``configs/deepspeed/*.json`` for other tools), or a
path to the user's own JSON. The shipped ones leave batch sizes, accumulation, clipping and bf16 to the
Trainer (``"auto"``), so ``train.*`` stays the single place they are set.

- ZeRO-2 partitions optimizer state and gradients; every rank keeps the whole model.
- ZeRO-3 partitions the parameters too, the adapter's included. deltatune gathers them where it reads
  tensors itself (:mod:`deltatune.surgery.partitioned`): saving, the fused loss's head, the fused
  LoRA kernels. The model is loaded whole on each rank and partitioned when the engine starts.

A DeepSpeed checkpoint keeps the optimizer state in DeepSpeed's own per-rank files
(``global_stepN/``), so it resumes under DeepSpeed with the same number of processes
(:func:`check_resume`); its adapter (``adapter_model.safetensors``) is complete and loads anywhere.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from deltatune.train.config_check import ConfigError

_AUTO = {
    # "auto": the Trainer fills these from TrainingArguments (train.batch_size, grad_accum, max_grad_norm, bf16)
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
}
SHIPPED: dict[str, dict[str, Any]] = {
    "zero2": {"zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True}, **_AUTO},
    "zero3": {"zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                                    # the adapter is gathered by deltatune itself; the base is never saved
                                    "stage3_gather_16bit_weights_on_model_save": False}, **_AUTO},
}
"""The configs ``train.deepspeed`` names (``configs/deepspeed/<name>.json`` holds the same)."""

def check_deepspeed(method: str, quantized: bool = False) -> None:
    """DeepSpeed is installed and can train ``method``.

    Raises:
        ConfigError: DeepSpeed is missing, or the method is QLoRA (DeepSpeed cannot partition the packed
            4-bit weights, which are buffers) or AdaLoRA (its rank allocator reads each step's gradients,
            which DeepSpeed moves into its own partitioned buffers).
    """
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("train.distributed=deepspeed needs DeepSpeed, which is not installed: "
                          "pip install 'deltatune[deepspeed]' (or pip install deepspeed).")
    why = ("DeepSpeed cannot partition its packed 4-bit weights (they are buffers). Use train.distributed=fsdp, "
           "which shards them, or ddp" if quantized else
           "its rank allocator reads each step's gradients, which DeepSpeed moves into its own partitioned buffers. "
           "Use train.distributed=ddp, or method.name=lora" if method == "adalora" else None)
    if why:
        raise ConfigError(f"train.distributed=deepspeed does not support method.name={method}: {why}.")


def check_setting(value: str) -> None:
    """``train.deepspeed`` names a shipped config or an existing JSON file.

    Raises:
        ConfigError: neither.
    """
    if value in SHIPPED:
        return
    if not value.endswith(".json") or not Path(value).is_file():
        raise ConfigError(f"Config key 'train.deepspeed' is {value!r}; expected {' or '.join(SHIPPED)} (the shipped "
                          "ZeRO configs) or the path of an existing DeepSpeed JSON config file.")


def deepspeed_config(value: str) -> dict[str, Any]:
    """The DeepSpeed config ``train.deepspeed`` names, as the dict ``TrainingArguments(deepspeed=...)`` takes.

    Raises:
        ConfigError: a file that is not a JSON object.
    """
    check_setting(value)
    if value in SHIPPED:
        return json.loads(json.dumps(SHIPPED[value]))  # a copy: transformers fills in the "auto" values
    try:
        config = json.loads(Path(value).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"train.deepspeed: {value} is not a readable JSON file ({err}).") from None
    if not isinstance(config, dict):
        raise ConfigError(f"train.deepspeed: {value} holds a JSON {type(config).__name__}, not a DeepSpeed config object.")
    return config


def checkpoint_ranks(folder: Path) -> int | None:
    """How many processes wrote DeepSpeed checkpoint ``folder`` (its per-rank ZeRO files), or None if it is not one."""
    latest = Path(folder) / "latest"
    if not latest.is_file():
        return None
    step = Path(folder) / latest.read_text().strip()
    ranks = {m.group(1) for f in step.glob("*optim_states.pt") if (m := re.search(r"zero_pp_rank_(\d+)_", f.name))}
    return len(ranks) or None


def check_resume(checkpoint: Path, mode: str, world_size: int) -> None:
    """A DeepSpeed checkpoint resumes under DeepSpeed with the processes that wrote it; other runs' checkpoints
    do not resume under DeepSpeed (it would look for its own optimizer files).

    Raises:
        ValueError: otherwise, saying what would have been lost and what to run instead.
    """
    ranks = checkpoint_ranks(checkpoint)
    if ranks is None and mode == "deepspeed":
        raise ValueError(f"{checkpoint} was not written by DeepSpeed (no 'latest' file), so DeepSpeed cannot resume "
                         "its optimizer state. Resume it with the train.distributed it was written with.")
    if ranks is not None and (mode != "deepspeed" or ranks != world_size):
        now = f"train.distributed={mode} with {world_size} process{'es' if world_size > 1 else ''}"
        raise ValueError(
            f"{checkpoint} is a DeepSpeed checkpoint written by {ranks} processes, whose optimizer state is split "
            f"into DeepSpeed's per-rank files; it cannot resume as {now}. Resume with train.distributed=deepspeed "
            f"on {ranks} processes, or start a new run from its adapter ({checkpoint}, complete in peft's format).")
