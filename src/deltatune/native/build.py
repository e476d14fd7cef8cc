"""Compile a C source on first use and load it with ctypes: the one build every compiled CPU path shares.

How it starts: the first call that wants a kernel calls :func:`build`, which compiles the source with the
system C compiler (``$CC``, else ``cc``/``gcc``; well under a second) into ``$DELTATUNE_CACHE_DIR/kernels``
(default ``~/.cache/deltatune/kernels``), named by a hash of the source (and the headers next to it),
compiler and flags, so an edited source or another flag set never loads a stale library. The shared
object is written under a temporary name and renamed into place: concurrent builds (torchrun's ranks) or
an interrupted one never leave a half-written file.

Where it runs: x86-64 Linux, a CPU torch itself drives at AVX2 or better, and a torch whose intra-op
threads are GNU OpenMP. The kernels are built with ``-fopenmp`` and link the same ``libgomp``, so they share
torch's thread pool instead of starting a second one (:func:`platform_problem` says what is missing).
``DELTATUNE_CPU_KERNEL=0`` switches every compiled path off (:data:`ENV`).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

ENV = "DELTATUNE_CPU_KERNEL"
BASE_FLAGS = ("-O3", "-std=c99", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared")
AVX512_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")
"""What torch's own ``AVX512`` capability level requires of the CPU (and so guarantees)."""


def switched_on_by_env() -> bool:
    """False where ``DELTATUNE_CPU_KERNEL=0`` asks for the pure-torch paths."""
    return os.environ.get(ENV, "1") != "0"


def cache_dir() -> Path:
    """Where built libraries go: ``$DELTATUNE_CACHE_DIR/kernels``, else ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    root = os.environ.get("DELTATUNE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "deltatune"
    )
    return Path(root) / "kernels"


def platform_problem() -> str | None:
    """Why no compiled kernel can run in this process, or None."""
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs x86-64 Linux (this is {sys.platform}/{platform.machine()})"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"needs a CPU with AVX2 and FMA (torch reports {capability})"
    if "OpenMP" not in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]:
        return "needs torch's OpenMP thread pool (this torch uses another parallel backend)"
    with open("/proc/self/maps") as maps:  # the runtime the kernel will share, already in the process
        if "libgomp" not in maps.read():
            return "needs torch built against GNU OpenMP (libgomp is not loaded)"
    return None


def has_avx512() -> bool:
    """Whether torch drives this CPU at its AVX512 level (so :data:`AVX512_FLAGS` code runs here)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def compiler() -> str | None:
    """The C compiler to use: ``$CC``, else ``cc`` or ``gcc`` on the PATH; None if there is none."""
    for cc in (os.environ.get("CC"), "cc", "gcc"):
        if cc and shutil.which(cc):
            return cc
    return None


def build(cc: str, source: Path, flags: Sequence[str]) -> Path:
    """The shared library built from ``source`` with ``flags``, compiled now unless the cache has it.

    Raises:
        RuntimeError: the compiler failed (its last lines of stderr are in the message); nothing is left behind.
    """
    # the headers next to the source are part of what it compiles to: an edited header must rebuild too
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    digest = hashlib.sha256(text + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, str(source), "-o", tmp], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-400:]}")
        os.replace(tmp, target)  # atomic: a reader sees no file or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(source: Path, flags: Sequence[str] | None = None,
         problem: Callable[[], str | None] | None = None) -> tuple[ctypes.CDLL | None, str | None]:
    """``source`` built and loaded: (library, None), or (None, why it cannot run here).

    ``flags`` default to this CPU's: AVX-512 where torch drives it at its AVX512 level, else AVX2. ``problem``
    adds a check of its own to :func:`platform_problem` (a CPU feature the flags need)."""
    why = platform_problem() or (problem() if problem else None)
    if why:
        return None, why
    cc = compiler()
    if cc is None:
        return None, "no C compiler found (set $CC, or install gcc)"
    if flags is None:
        flags = (*BASE_FLAGS, *AVX512_FLAGS) if has_avx512() else BASE_FLAGS
    try:
        return ctypes.CDLL(str(build(cc, source, flags))), None
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        return None, f"could not build {source.name}: {err}"


class Library:
    """One compiled source, built and loaded on first use: :meth:`get` the library (None where it cannot run
    or is switched off), :meth:`unavailable_reason` why not, :meth:`switched` to compare paths in tests and
    benchmarks.

    ``declare`` sets the exported functions' ctypes signatures once loaded, and may refuse the library by
    returning why (a constant the source and its caller disagree on). ``flags`` and ``problem`` go to
    :func:`load`."""

    def __init__(self, source: Path, declare: Callable[[ctypes.CDLL], str | None], flags: Sequence[str] | None = None,
                 problem: Callable[[], str | None] | None = None) -> None:
        self.source, self.declare, self.flags, self.problem = source, declare, flags, problem
        self.enabled = switched_on_by_env()
        self._loaded: tuple[ctypes.CDLL | None, str | None] | None = None

    def _load(self) -> tuple[ctypes.CDLL | None, str | None]:
        lib, why = load(self.source, self.flags, self.problem)
        refused = None if lib is None else self.declare(lib)
        return (None, refused) if refused else (lib, why)

    def get(self) -> ctypes.CDLL | None:
        if not self.enabled:
            return None
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded[0]

    def unavailable_reason(self) -> str | None:
        if not self.enabled:
            return f"switched off ({ENV}=0 or switched(False))"
        self.get()
        return self._loaded[1]

    @contextlib.contextmanager
    def switched(self, on: bool) -> Iterator[None]:
        was, self.enabled = self.enabled, on
        try:
            yield
        finally:
            self.enabled = was
