"""What a ``deltatune train`` run leaves in its output folder, each file written atomically.

::

    <output_dir>/
      config.yaml         the resolved config (every default made explicit); --resume reads it
      metrics.json        zero-shot and final accuracy, losses, timings, tokens/s, status
      loss.png            train and eval loss against the step (matplotlib)
      adapter/            the trained adapter in peft's format (adapter_config.json + safetensors)
      checkpoint-N/       resumable Trainer checkpoints (adapter + optimizer + scheduler + RNG + state)
      tensorboard/        TensorBoard event files
      .replaced-run/      with --overwrite: the previous run, until the new one has a checkpoint
      corrupt-checkpoint-N/  a checkpoint --resume found damaged and skipped
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from deltatune.atomic import atomic_write, atomic_write_text
from deltatune.io.checkpoint import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, load_weights

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
PLOT_FILE = "loss.png"
ADAPTER_DIR = "adapter"
TENSORBOARD_DIR = "tensorboard"
ASIDE_DIR = ".replaced-run"
"""Where ``--overwrite`` keeps the previous run's files until the new run has a checkpoint."""
CORRUPT_PREFIX = "corrupt-"
# Adapter weights (LoRA factors, IA³ vectors, prompts, a classifier copy) are O(1); weights 1e4 times
# that overflow half-precision activations and never come from a run that still converges. A
# checkpoint holding them is not a "good" one to resume from, even though every value is finite.
DIVERGED_WEIGHT = 1e4
"""Prefix a damaged checkpoint folder is renamed with, so that neither --resume nor the Trainer uses it."""
CHECKPOINT_FILES = ("adapter_config.json", "trainer_state.json", "optimizer.pt", "scheduler.pt")
"""Files a complete resumable checkpoint folder holds (``trainer_state.json`` is written last). Under DeepSpeed,
``latest`` (naming its ``global_stepN`` folder of per-rank optimizer files) stands in for ``optimizer.pt``."""


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
    marks = {CONFIG_FILE, METRICS_FILE, ADAPTER_DIR, ASIDE_DIR}
    return sorted(p.name for p in root.iterdir() if p.name in marks or p.name.startswith("checkpoint-"))


def run_outputs(output_dir: Path) -> list[str]:
    """Names in ``output_dir`` of everything a run writes there (what ``--overwrite`` replaces)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    names = {CONFIG_FILE, METRICS_FILE, PLOT_FILE, ADAPTER_DIR, TENSORBOARD_DIR}
    return sorted(p.name for p in root.iterdir()
                  if p.name in names or p.name.removeprefix(CORRUPT_PREFIX).startswith("checkpoint-"))


def unwritable_reason(output_dir: Path) -> str | None:
    """Why ``output_dir`` cannot be created or written to (a file in the way, no permission), or None."""
    path = Path(output_dir).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:  # exists() is False under a file, too
        existing = existing.parent
    if not existing.is_dir():
        where = "it" if existing == path else str(existing)
        return f"{where} is a file, not a folder; move the file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable (a read-only file system or no permission); make it writable"
    return None


@dataclass
class OutputPlan:
    """What :func:`plan_output_dir` decided; ``run_training``'s ``RunFolder`` carries it out once the run starts."""

    checkpoint: Path | None = None
    """The checkpoint to resume from (None: a fresh run)."""
    corrupt: list[tuple[Path, str]] = field(default_factory=list)
    """Damaged checkpoints newer than :attr:`checkpoint` and what is wrong with each; renamed
    ``corrupt-checkpoint-N`` when the run starts."""
    replaces: list[str] = field(default_factory=list)
    """An old run's files that ``--overwrite`` replaces (set aside at the start, deleted at the first checkpoint)."""


def plan_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> OutputPlan:
    """Check that the folder suits the request, without changing anything in it.

    Raises:
        ValueError: the folder cannot be written (a file in the way, no permission), a fresh run into
            a folder holding another run without ``overwrite``, or ``resume`` with no usable checkpoint.
    """
    reason = unwritable_reason(output_dir)
    if reason is not None:
        raise ValueError(f"output_dir {output_dir} cannot be written: {reason}, or choose another output_dir=PATH.")
    if resume:
        return resume_plan(output_dir)
    existing = run_contents(output_dir)
    if existing and not overwrite:
        raise ValueError(f"{output_dir} already holds a run ({', '.join(existing[:4])}). Pass --resume to continue "
                         "it, --overwrite to replace it, or choose another output_dir=...")
    return OutputPlan(replaces=run_outputs(output_dir) if overwrite else [])


def usable_checkpoint(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that :func:`checkpoint_problem` passes, and each newer one with what is wrong."""
    damaged: list[tuple[Path, str]] = []
    for checkpoint in complete_checkpoints(output_dir):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint, damaged
        damaged.append((checkpoint, problem))
    return None, damaged


def resume_plan(output_dir: Path) -> OutputPlan:
    """The newest checkpoint whose files all read back; each damaged newer one is named, with the reason."""
    checkpoint, damaged = usable_checkpoint(output_dir)
    if checkpoint is not None:
        return OutputPlan(checkpoint=checkpoint, corrupt=damaged)
    if damaged:
        listed = "; ".join(f"{folder.name}: {why}" for folder, why in damaged)
        raise ValueError(f"--resume: every checkpoint in {output_dir} is damaged ({listed}). Start afresh with "
                         "--overwrite (the damaged run is replaced) or choose another output_dir=...")
    raise ValueError(f"--resume: {output_dir} holds no complete checkpoint-N folder to resume from. "
                     "Run without --resume to start afresh (add --overwrite if the folder has old files).")


def check_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """:func:`plan_output_dir`, then delete the files ``overwrite`` replaces at once; the checkpoint to resume.

    For scratch folders (``deltatune tune``'s trials). ``run_training`` keeps an old run until the new
    one has a checkpoint instead (:class:`deltatune.train.run.RunFolder`).
    """
    plan = plan_output_dir(output_dir, resume, overwrite)
    remove_outputs(output_dir, plan.replaces)
    return plan.checkpoint


def remove_outputs(output_dir: Path, names: Sequence[str]) -> None:
    """Delete the entries ``names`` of ``output_dir`` (files or folders) that exist."""
    for name in names:
        path = Path(output_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def set_aside(output_dir: Path, names: Sequence[str]) -> Path:
    """Move the entries ``names`` of ``output_dir`` into :data:`ASIDE_DIR` (renames: no copying).

    An entry already in :data:`ASIDE_DIR` was set aside by an earlier ``--overwrite`` that was killed
    before its run had a checkpoint, so the copy there is the older, complete run's: the entry in
    ``output_dir`` (from the killed run) is deleted instead. A kill at any point thus keeps every
    file of the previous run, either in place or set aside.
    """
    root = Path(output_dir)
    aside = root / ASIDE_DIR
    aside.mkdir(exist_ok=True)
    for name in names:
        if (aside / name).exists():
            remove_outputs(root, [name])
        else:
            os.rename(root / name, aside / name)
    return aside


def restore_aside(output_dir: Path, new_names: Sequence[str]) -> bool:
    """Delete the entries ``new_names`` of ``output_dir`` and move back what :func:`set_aside` kept.

    Returns:
        Whether anything was set aside (and is now back).
    """
    root = Path(output_dir)
    remove_outputs(root, new_names)
    aside = root / ASIDE_DIR
    if not aside.is_dir():
        return False
    for child in aside.iterdir():
        os.rename(child, root / child.name)
    aside.rmdir()
    return True


def discard_aside(output_dir: Path) -> None:
    """Delete what :func:`set_aside` kept. The folder is renamed first, so a kill mid-delete leaves
    a ``.deleting-*`` folder (removed by the next call) rather than half a run that looks restorable."""
    root = Path(output_dir)
    aside = root / ASIDE_DIR
    if aside.is_dir():
        trash = Path(tempfile.mkdtemp(prefix=".deleting-", dir=root))
        os.rename(aside, trash / ASIDE_DIR)
    for trash in root.glob(".deleting-*"):
        shutil.rmtree(trash, ignore_errors=True)


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
    optimizer = "latest" if (folder / "latest").is_file() else "optimizer.pt"  # DeepSpeed's, or the Trainer's
    return folder.is_dir() and all((folder / f).is_file() for f in CHECKPOINT_FILES if f != "optimizer.pt") \
        and (folder / optimizer).is_file()


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete ``checkpoint-N`` folders in ``output_dir``, newest (highest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.glob("checkpoint-*"):
        suffix = child.name.removeprefix("checkpoint-")
        if suffix.isdigit() and is_complete_checkpoint(child):
            found.append((int(suffix), child))
    return [folder for _, folder in sorted(found, reverse=True)]


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete ``checkpoint-N`` folder with the highest N in ``output_dir``, or None."""
    found = complete_checkpoints(output_dir)
    return found[0] if found else None


def checkpoint_problem(folder: Path) -> str | None:
    """What makes the complete checkpoint ``folder`` unusable for a resume (a damaged file), or None.

    Reads every file a resume reads: the JSON files must parse, the adapter weights must load, and
    the torch files (zip archives) must pass their CRC checks. A save cut short or a bad disk fails here
    instead of in the middle of the Trainer's resume.
    """
    folder = Path(folder)
    for name in ("adapter_config.json", "trainer_state.json"):
        try:
            json.loads((folder / name).read_text())
        except (OSError, ValueError) as err:
            return f"{name} is not readable JSON ({err})"
    weights = WEIGHTS_NAME if (folder / WEIGHTS_NAME).exists() else LEGACY_WEIGHTS_NAME
    try:
        sd = load_weights(folder)  # NaN or inf is refused here
    except Exception as err:  # noqa: BLE001 - safetensors, torch and OS errors alike mean "damaged"
        return f"{weights} does not load ({type(err).__name__}: {err})"
    peak = max((float(t.abs().max()) for t in sd.values() if t.is_floating_point() and t.numel()), default=0.0)
    if peak > DIVERGED_WEIGHT:
        return f"its adapter weights reach {peak:.3g}, over {DIVERGED_WEIGHT:g}: training had diverged by then"
    for file in sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth")):
        try:
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile) as err:
            return f"{file.name} is damaged ({err})"
        if bad is not None:
            return f"{file.name} is damaged (a CRC error in {bad})"
    return None


def mark_corrupt(folder: Path) -> Path:
    """Rename a damaged checkpoint folder to ``corrupt-checkpoint-N`` (kept for a look, never resumed)."""
    folder = Path(folder)
    target, n = folder.with_name(CORRUPT_PREFIX + folder.name), 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{CORRUPT_PREFIX}{folder.name}-{n}")
    os.rename(folder, target)
    return target
