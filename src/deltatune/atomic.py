"""Atomic writes: of one file, of a set of files in one folder, and of a whole output folder.

One file (:func:`atomic_write`): write a temporary file in the same folder, fsync, rename over the target.
A crash mid-save leaves the previous file intact (plus, at worst, a stray ``.tmp-*`` file).

A set of files (:func:`atomic_write_files`), e.g. an adapter's weights and config, which must never be
seen from two different saves. Each file is a separate rename, and a kill between two renames would
leave new weights next to the old config. So the renames are journaled: all new files are written and
fsynced under temporary names first, then a journal naming the renames is put in place atomically,
then the renames run and the journal is removed. The journal is the commit point: a folder without one
holds the old save or the new one whole; a folder with one is completed ("rolled forward") by
:func:`finish_interrupted_save`, which every loader calls first. This keeps the folder's files exactly
peft's (no extra keys or files once a save finishes) and never touches unrelated files next to them
(a Trainer checkpoint's ``optimizer.pt``, other adapters' subfolders), which swapping the folder would.
peft itself does not read the journal: it may see a half-done save until deltatune loads or saves there.

:func:`atomic_folder` replaces a whole output folder (exports).

New files follow the umask, as a plain ``open`` does; a file replaced keeps its mode.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

JOURNAL_NAME = ".deltatune-save-journal.json"
TMP_PREFIX = ".tmp-"


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` sets it, racing threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_tmp(path: Path) -> Path:
    """An empty, new file next to ``path``, created with mode 0666 minus the umask (mkstemp's is 0600)."""
    for _ in range(100):
        tmp = path.parent / f"{TMP_PREFIX}{path.name}-{secrets.token_hex(6)}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary file next to {path}")


def _write_tmp(path: Path, write: Callable[[str], None]) -> Path:
    """``write`` into a new temporary file next to ``path``, fsynced and with ``path``'s mode if it exists."""
    tmp = _new_tmp(path)
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        # Set again after writing: a writer may recreate the file (safetensors' does, private).
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened or synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` to produce the file, then atomically move it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_tmp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


# ---- several files in one folder, all or nothing ---------------------------------------------------------
def atomic_write_files(
    folder: str | os.PathLike, writers: Mapping[str, Callable[[str], None]], remove: Iterable[str] = ()
) -> None:
    """Replace the files ``writers`` names (``{file name: write(tmp_path)}``) and delete ``remove``, as one step.

    See the module docstring for the journal. Other files in ``folder`` are never touched.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    finish_interrupted_save(folder)  # an older interrupted save first, so its journal is not overwritten
    remove_stale_tmps(folder)
    tmps: dict[str, Path] = {}
    try:
        for name, write in writers.items():
            tmps[name] = _write_tmp(folder / name, write)
        journal = {"rename": [[tmp.name, name] for name, tmp in tmps.items()], "remove": sorted(set(remove) - set(writers))}
        atomic_write_text(folder / JOURNAL_NAME, json.dumps(journal))
    except BaseException:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(folder)  # the journal is durable before any old file goes
    try:
        _apply(folder, journal)
    except BaseException:
        with contextlib.suppress(OSError):
            _apply(folder, journal)  # roll forward: every new file is complete (Ctrl-C between renames)
        raise


STALE_TMP_SECONDS = 3600


def remove_stale_tmps(folder: Path, max_age: float = STALE_TMP_SECONDS) -> list[str]:
    """Delete our temporary files in ``folder`` that a killed save left behind, and return their names.

    Only files older than ``max_age`` seconds go: a save writing into the same folder right now (another
    process) has fresh ones, and no save takes an hour between creating a temporary file and renaming it.
    """
    import time

    gone = []
    for tmp in folder.glob(f"{TMP_PREFIX}*"):
        with contextlib.suppress(OSError):
            if tmp.is_file() and time.time() - tmp.stat().st_mtime > max_age:
                tmp.unlink()
                gone.append(tmp.name)
    return gone


def _apply(folder: Path, journal: dict) -> None:
    """Do the journal's renames and removals (each is skipped once done, so this may run again), then drop it."""
    for tmp, name in journal["rename"]:
        if (folder / tmp).exists():
            os.replace(folder / tmp, folder / name)
    for name in journal["remove"]:
        (folder / name).unlink(missing_ok=True)
    _fsync_dir(folder)
    (folder / JOURNAL_NAME).unlink(missing_ok=True)


def _read_journal(file: Path) -> dict:
    def simple(name: object, tmp: bool = False) -> bool:
        ok = isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
        return ok and name.startswith(TMP_PREFIX) == tmp

    try:
        journal = json.loads(file.read_text())
        renames, removes = journal["rename"], journal["remove"]
        # A journal may come with a downloaded folder: only our own temporary files may be moved, and only
        # onto plain names inside this folder.
        valid = all(len(pair) == 2 and simple(pair[0], tmp=True) and simple(pair[1]) for pair in renames)
        if valid and all(simple(n) for n in removes):
            return {"rename": renames, "remove": removes}
    except (ValueError, KeyError, TypeError):
        pass
    raise ValueError(
        f"{file} is not a save journal deltatune wrote; it marks an interrupted save, so the files next to it "
        "may come from different saves. Save the adapter again, or delete the journal if you know the files match."
    )


def finish_interrupted_save(folder: str | os.PathLike) -> bool:
    """Complete a save into ``folder`` that was killed between its renames; True if there was one.

    Raises:
        ValueError: the journal is not ours.
        PermissionError: the folder is read-only, so the save cannot be completed.
    """
    folder = Path(folder)
    file = folder / JOURNAL_NAME
    if not file.is_file():
        return False
    journal = _read_journal(file)
    try:
        _apply(folder, journal)
    except PermissionError:
        raise PermissionError(
            f"{folder} holds an interrupted save ({JOURNAL_NAME}): its files may come from two different saves, "
            "and the folder is read-only, so deltatune cannot complete it. Make the folder writable and load again "
            "(the save is completed first), or save the adapter again."
        ) from None
    warnings.warn(f"{folder}: completed a save that was interrupted between its file renames", stacklevel=3)
    return True


# ---- whole output folders ------------------------------------------------------------------------------
def check_output_folder(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an output folder that exists and is not empty (unless ``force``), or that is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output {path} exists and is a file; pass a folder path")
    here, target = Path.cwd().resolve(), path.resolve()
    if target == here or target in here.parents or target == Path.home().resolve():
        # Replacing it whole (force) would delete everything in it, the user's own files included.
        raise ValueError(
            f"output folder {path} is the current folder, one that contains it, or your home folder; an export "
            "replaces its output folder whole, so pass a new folder, e.g. --out exported/model"
        )
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
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes the folder private (0700); an output folder follows the umask
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
