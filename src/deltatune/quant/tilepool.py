"""Running the tiles of a quantized matmul on a few threads, each single-threaded.

Why: with torch's intra-op parallelism every op on a tile (index conversion, gather, scaling,
matmul) is a fork/join of all threads, about a hundred per 4096x4096 layer. On idle cores a join
costs microseconds; on shared cores (other processes, data-loader workers) one descheduled thread
stalls every join, and we measured a forward at 8 rows go from 1.2x to 10-30x the time of an fp32
``nn.Linear`` (which joins once). Giving each of W threads a contiguous share of the tiles, with
its ops single-threaded, leaves one join per call and keeps each tile in the cache of the core
that made it.

It is not always the faster choice: while the pool's workers run, the caller's OpenMP threads spin for
a while after its last parallel op and hold cores, so a call of a few large tiles runs at about half
speed. :func:`deltatune.quant.matmul._pool_pays` decides per call (many tiles, or few input rows).
Set the environment variable ``DELTATUNE_TILE_THREADS=0`` to run tiles with ordinary intra-op
parallelism always.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

ENABLED = os.environ.get("DELTATUNE_TILE_THREADS", "1") != "0"
_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}
_local = threading.local()  # .worker is True inside a pool worker


def _forget_pools_in_child() -> None:
    # A forked child inherits the executors but not their threads; work submitted there would
    # never run. Start over with fresh pools (and a fresh lock).
    global _lock
    _lock = threading.Lock()
    _pools.clear()


os.register_at_fork(after_in_child=_forget_pools_in_child)


def _make_single_threaded(barrier: threading.Barrier) -> None:
    # torch initialises a thread's OpenMP/MKL thread count lazily on its first parallel op, from
    # the process-wide setting; trigger that first, or it would undo the set_num_threads(1).
    torch.get_num_threads()
    torch.set_num_threads(1)  # the OpenMP and MKL counts it sets are per thread
    _local.worker = True
    barrier.wait()


def _pool(workers: int) -> ThreadPoolExecutor:
    with _lock:
        pool = _pools.get(workers)
        if pool is None:
            restore = torch.get_num_threads()
            barrier = threading.Barrier(workers + 1)
            pool = ThreadPoolExecutor(workers, thread_name_prefix="deltatune-tiles",
                                      initializer=_make_single_threaded, initargs=(barrier,))
            for _ in range(workers):  # start every worker now: each submit spawns one while others block
                pool.submit(lambda: None)
            barrier.wait()
            # set_num_threads(1) also changed torch's process-wide default; put it back.
            torch.set_num_threads(restore)
            _pools[workers] = pool
    return pool


def _use_pool(device: torch.device, parallel: bool) -> bool:
    # inside a worker, submitting to the (busy) pool and waiting could deadlock: run inline
    return (ENABLED and parallel and device.type == "cpu" and torch.get_num_threads() > 1
            and not getattr(_local, "worker", False))


def _in_caller_modes(fn: Callable[..., R]) -> Callable[..., R]:
    """``fn`` wrapped to run with grad mode off and the caller's inference mode (both thread-local)."""
    inference = torch.is_inference_mode_enabled()

    def task(*args):
        with torch.inference_mode(inference), torch.no_grad():
            return fn(*args)

    return task


def run_split(fn: Callable[[Sequence[T]], R], items: Sequence[T], device: torch.device,
              parallel: bool = True) -> list[R]:
    """``[fn(group) for group in groups]`` where the groups split ``items`` into contiguous parts.

    On CPU with more than one torch thread, the groups run on a pool of that many single-threaded
    workers (see the module docstring); elsewhere ``fn(items)`` runs once, inline. Grad mode is
    off in the workers and inference mode follows the caller's, so ``fn`` may write into tensors
    the caller created.

    Args:
        fn: work on one group of items; must only write to memory no other group writes.
        items: the work items (e.g. tile row ranges), in order.
        device: where the tensors live.
        parallel: allow the pool (False for code that is not thread-safe, e.g. torch.compile-d).

    Returns:
        The results of ``fn``, one per group, in item order.
    """
    workers = min(torch.get_num_threads(), len(items))
    if workers <= 1 or not _use_pool(device, parallel):
        return [fn(items)]
    n, task = len(items), _in_caller_modes(fn)
    groups = [items[i * n // workers:(i + 1) * n // workers] for i in range(workers)]
    return [f.result() for f in [_pool(workers).submit(task, g) for g in groups]]


def run_single_threaded(fn: Callable[[], R], device: torch.device) -> R:
    """``fn()`` on one pool worker, so its (small) ops skip the fork/join of intra-op threads.

    For a sequence of ops on tensors too small to gain from several threads (e.g. the per-block
    constants of a layer); on shared cores each fork/join can stall. Inline when the pool is off.
    """
    if not _use_pool(device, True):
        return fn()
    return _pool(torch.get_num_threads()).submit(_in_caller_modes(fn)).result()
