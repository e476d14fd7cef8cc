"""What a ``deltatune train`` run leaves in its output folder, each file written atomically.

::

    <output_dir>/
      config.yaml         the resolved config (every default made explicit); --resume reads it
      metrics.json        zero-shot and final accuracy, losses, timings, tokens/s, status
      loss.png            train and eval loss against the step (matplotlib)
      adapter/            the trained adapter in peft's format (adapter_config.json + safetensors)
      checkpoint-N/       resumable Trainer checkpoints (adapter + optimizer + scheduler + RNG + state)
      tensorboard/        TensorBoard event files
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from deltatune.io.atomic import atomic_write, atomic_write_text

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
PLOT_FILE = "loss.png"
ADAPTER_DIR = "adapter"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_FILES = ("adapter_config.json", "trainer_state.json", "optimizer.pt", "scheduler.pt")
"""Files a complete resumable checkpoint folder holds (``trainer_state.json`` is written last)."""


def write_config(output_dir: Path, config: Any) -> Path:
    """Write the resolved :class:`~deltatune.train.config.TrainConfig` as ``config.yaml``."""
    path = Path(output_dir) / CONFIG_FILE
    header = "# Resolved deltatune train config: every default made explicit. `deltatune train --resume` reads it.\n"
    atomic_write_text(path, header + config.to_yaml())
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; "nan" keeps the file valid and the value visible
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_metrics(output_dir: Path, metrics: dict[str, Any]) -> Path:
    """Write ``metrics.json`` (NaN/inf become strings so the file stays valid JSON)."""
    path = Path(output_dir) / METRICS_FILE
    atomic_write_text(path, json.dumps(_json_safe(metrics), indent=2) + "\n")
    return path


def read_metrics(output_dir: Path) -> dict[str, Any]:
    """The run's ``metrics.json``, or ``{}`` if there is none (or it is unreadable)."""
    path = Path(output_dir) / METRICS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def plot_losses(output_dir: Path, train: Sequence[tuple[int, float]], evaluation: Sequence[tuple[int, float]],
                title: str = "") -> Path | None:
    """Draw train and eval loss against the step into ``loss.png``.

    Returns:
        The path, or None (with a printed note) when matplotlib is not installed or there is
        nothing to plot.
    """
    if not train and not evaluation:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; must precede pyplot's import
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no loss.png was drawn; install it with "
              "pip install 'deltatune[plot]'")
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.5)
    if evaluation:
        ax.plot(*zip(*evaluation), "o-", label="eval loss", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(output_dir) / PLOT_FILE

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png")

    try:
        atomic_write(path, write)
    finally:
        plt.close(fig)
    return path


def run_contents(output_dir: Path) -> list[str]:
    """Names in ``output_dir`` that show a run already wrote there (config, metrics, checkpoints, adapter)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    marks = {CONFIG_FILE, METRICS_FILE, ADAPTER_DIR}
    return sorted(p.name for p in root.iterdir() if p.name in marks or p.name.startswith("checkpoint-"))


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux/macOS), 0 where unknown."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except (ImportError, OSError):
        return 0


def default_output_dir(root: str | os.PathLike = "runs") -> str:
    """``runs/<YYYYmmdd-HHMMSS>`` (a suffix is added if that folder exists)."""
    import time

    base = Path(root) / time.strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while path.exists():
        n += 1
        path = Path(f"{base}-{n}")
    return str(path)


def latest_run(root: str | os.PathLike = "runs") -> Path | None:
    """The most recently modified run folder (one holding ``config.yaml``) under ``root``, or None.

    A folder's modification time changes whenever a checkpoint is added or rotated away, so this is
    the run that last made progress."""
    root = Path(root)
    if not root.is_dir():
        return None
    runs = [p for p in root.iterdir() if (p / CONFIG_FILE).is_file()]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def is_complete_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds everything a resume needs (a crash mid-save leaves it incomplete)."""
    return folder.is_dir() and all((folder / f).is_file() for f in CHECKPOINT_FILES)


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete ``checkpoint-N`` folder with the highest N in ``output_dir``, or None."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = []
    for child in root.glob("checkpoint-*"):
        suffix = child.name.removeprefix("checkpoint-")
        if suffix.isdigit() and is_complete_checkpoint(child):
            found.append((int(suffix), child))
    return max(found)[1] if found else None
