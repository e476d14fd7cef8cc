"""Where converted models live on disk, and how a folder is written so no reader sees half of it."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

CACHE_ENV = "DELTATUNE_CACHE"
"""Environment variable that overrides the cache root (default ``~/.cache/deltatune``)."""

MARKER = "deltatune_source.json"
"""File written last into a converted folder; describes what it was converted from."""


def cache_root() -> Path:
    """The deltatune cache root: ``$DELTATUNE_CACHE``, else ``$XDG_CACHE_HOME/deltatune``, else ``~/.cache/deltatune``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "deltatune"


def models_dir() -> Path:
    """Folder holding one converted model per sub-folder."""
    return cache_root() / "models"


def gguf_cache_name(gguf_path: Path) -> str:
    """A cache folder name for an arbitrary GGUF file: its stem plus a hash of where it is.

    The hash covers the resolved path, size and modification time, so the same name in two
    places, or a file replaced in place, converts to a different folder.
    """
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return f"{gguf_path.stem.lower()}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def read_marker(folder: Path) -> dict | None:
    """The conversion marker of ``folder``, or None when the folder is absent or incomplete."""
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_marker(folder: Path, info: dict) -> None:
    """Write the marker through a temporary file and a rename, so it is whole or absent."""
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True))
    os.replace(tmp, folder / MARKER)


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``final`` that becomes ``final`` when the block succeeds.

    The temporary folder sits in the same parent so the rename is atomic. If the block raises,
    it is removed. If ``final`` already exists (a stale conversion, or another process that won
    a race), the old folder is moved aside first and deleted after the swap.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    # mkdtemp makes the folder private (0700); a cache folder should follow the umask like any other.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.rename(final, old / "model")
    try:
        os.rename(tmp, final)
    except OSError:
        # Another process renamed its finished copy into place between our check and rename;
        # theirs is as good as ours, so keep it.
        shutil.rmtree(tmp, ignore_errors=True)
        if read_marker(final) is None:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
