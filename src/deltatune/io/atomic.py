"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename over the target.

A crash mid-save leaves the previous file intact (plus, at worst, a stray ``.tmp-*`` file).
:func:`atomic_folder` does the same for a whole output folder.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` to produce the file, then atomically move it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def check_output_folder(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an output folder that exists and is not empty (unless ``force``), or that is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output {path} exists and is a file; pass a folder path")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise ValueError(f"output folder {path} exists and is not empty; pass --force (force=True) to replace it, or pick another folder")
    return path


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``path`` that replaces ``path`` only when the block succeeds.

    If the block raises, the temporary folder is removed and ``path`` is left as it was, so a failed
    export never leaves a half-written folder. An existing non-empty ``path`` is refused unless
    ``force``; with ``force`` it is replaced whole.
    """
    path = check_output_folder(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)  # mkdtemp makes the folder private (0700); an output folder follows the umask
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, old / path.name)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
