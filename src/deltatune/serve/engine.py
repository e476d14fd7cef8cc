"""The scheduler: one thread owns the model and runs continuous batching over many adapters.

Each turn of the loop, between two decode steps:
1. runs the queued control commands (load / unload an adapter), so the model and the bank are never
   touched from two threads;
2. drops cancelled sequences, and admits waiting requests up to ``max_batch_size`` rows and
   ``max_adapters`` distinct adapters (a request whose adapter would not fit waits; later ones may pass);
3. prefills the joining requests together in one left-padded forward, samples their first tokens and
   merges their KV cache into the running batch (:mod:`deltatune.serve.kvcache`);
4. runs ONE decode forward for all running sequences, whatever their adapters: each row goes through
   its own adapter via the bank's per-row slot ids (:func:`deltatune.serving.routing.routed`, the fused
   CPU kernel where it applies), never a loop over adapters. The per-layer gathers of slot factors are
   done when the batch changes and reused by every step until it changes again.
Finished sequences leave after the step that finished them.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

import torch
from transformers import DynamicCache

from deltatune.serve import kvcache
from deltatune.serve.metrics import Metrics
from deltatune.serve.request import Event, QueueFull, Sequence
from deltatune.serve.sampling import TokenChoice, choose
from deltatune.serve.text import TextCodec, eos_ids
from deltatune.serving import BASE, AdapterServer, FolderSource
from deltatune.serving.routing import routed

log = logging.getLogger(__name__)


class Engine:
    """Continuous batching over the adapters of one :class:`AdapterServer`.

    Args:
        server: the plain base model and its LRU bank (``max_slots`` = ``--max-adapters``).
        codec: the tokenizer (decoding the replies; the HTTP side encodes prompts).
        max_batch_size: most sequences in one forward.
        max_queue: most requests waiting to join; one more is refused with :class:`QueueFull`.
    """

    def __init__(self, server: AdapterServer, codec: TextCodec, max_batch_size: int = 32, max_queue: int = 256,
                 metrics: Metrics | None = None) -> None:
        self.server, self.model, self.bank, self.codec = server, server.model, server.bank, codec
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.metrics = metrics or Metrics()
        self.device = next(self.model.parameters()).device
        kvcache.check_supported(self.model)
        self.eos = eos_ids(self.model, codec.tokenizer)
        # transformers renamed ``past_key_values`` to ``cache`` (the old name warns, then goes in 5.40)
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        pad = codec.tokenizer.pad_token_id
        self.pad = pad if pad is not None else min(self.eos, default=0)
        self.adapters: dict[str, str] = {}  # served name -> folder; read by the HTTP threads under _lock
        self._unloading: set[str] = set()
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._commands: deque[tuple[Callable[[], Any], Future]] = deque()
        self._holds = 0
        self._stopping = False
        self._running: list[Sequence] = []
        self._batch: kvcache.BatchCache | None = None
        self._route: contextlib.ExitStack | None = None
        self._thread = threading.Thread(target=self._loop, name="deltatune-scheduler", daemon=True)

    # ---- called from the HTTP side ------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every admitted and waiting request, then end the scheduler thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def served(self) -> dict[str, str]:
        """Adapter name -> folder, for every adapter a request may name now."""
        with self._lock:
            return dict(self.adapters)

    def submit(self, seq: Sequence) -> None:
        """Queue ``seq``; raises :class:`QueueFull` when ``max_queue`` requests already wait."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue}); retry later")
            self._waiting.append(seq)
            self.metrics.set("deltatune_queue_length", len(self._waiting))
            self._cond.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the scheduler thread between two steps (load / unload); its result in a Future."""
        future: Future = Future()
        with self._cond:
            self._commands.append((fn, future))
            self._cond.notify()
        return future

    def load(self, name: str, folder: str) -> None:
        """Serve the adapter in ``folder`` as ``name`` (scheduler thread only: see :meth:`call`).

        The folder is read and checked now, all or nothing (a bad one raises and nothing is registered),
        but takes a bank slot only when a request first names it, so loading never evicts an adapter
        that running requests use.
        """
        if name in self._unloading:
            raise ValueError(f"adapter {name!r} is still being unloaded (requests were using it); retry shortly")
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
        self.bank.register(name, FolderSource(self.model, folder))
        with self._lock:
            self.adapters[name] = str(folder)
        self._gauges()

    def unload(self, name: str) -> None:
        """Stop serving ``name``; requests already admitted or waiting for it still finish first."""
        with self._lock:
            if name not in self.adapters:
                raise KeyError(name)
            del self.adapters[name]
        self._unloading.add(name)

    @contextlib.contextmanager
    def hold(self):
        """Pause the scheduler between two steps for the block (tests: fill the queue deterministically)."""
        with self._cond:
            self._holds += 1
        try:
            yield
        finally:
            with self._cond:
                self._holds -= 1
                self._cond.notify()

    # ---- the scheduler thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while (self._holds and not self._stopping) or not (
                        self._waiting or self._commands or self._running or self._unloading or self._stopping):
                    self._cond.wait()
                if self._stopping and not (self._waiting or self._commands or self._running):
                    break
                commands = list(self._commands)
                self._commands.clear()
            try:
                self._turn(commands)
            except Exception as e:  # a fault outside any one request: fail the running ones, keep serving
                log.exception("scheduler step failed")
                for s in self._running:
                    self._fail(s, e)
                self._running, self._batch = [], None
                self._close_route()
        self._close_route()

    def _turn(self, commands: list) -> None:
        if commands:
            self._close_route()  # commands may change the bank: no request's plans may be live
            for fn, future in commands:
                try:
                    future.set_result(fn())
                except Exception as e:
                    future.set_exception(e)
        if any(s.cancelled for s in self._running):
            self._leave([i for i, s in enumerate(self._running) if not s.cancelled])
        self._forget_unloaded()
        joining = self._admit()
        if joining:
            self._close_route()
            self._prefill_isolated(joining)
        if self._running:
            self._decode()
        self._gauges()

    def _admit(self) -> list[Sequence]:
        names = {s.adapter for s in self._running}
        joining: list[Sequence] = []
        with self._cond:
            for s in list(self._waiting):
                if len(self._running) + len(joining) >= self.max_batch_size:
                    break
                if s.cancelled:  # counted by the handler that saw its client leave
                    self._waiting.remove(s)
                    continue
                if s.adapter != BASE and s.adapter not in names and len(names - {BASE}) >= self.bank.max_slots:
                    continue  # its adapter would not fit in the bank next to the running ones: it waits
                self._waiting.remove(s)
                names.add(s.adapter)
                joining.append(s)
            self.metrics.set("deltatune_queue_length", len(self._waiting))
        for s in [s for s in joining if s.adapter != BASE and s.adapter not in self.bank.registered]:
            joining.remove(s)
            self._fail(s, ValueError(f"adapter {s.adapter!r} was unloaded before this request started"))
        return joining

    def _prefill_isolated(self, joining: list[Sequence]) -> None:
        """Prefill together; if that fails, one by one, so an exception fails only its own request."""
        try:
            self._prefill(joining)
        except Exception as e:
            if len(joining) == 1:
                self._fail(joining[0], e)
                return
            for s in joining:
                try:
                    self._prefill([s])
                except Exception as e1:
                    self._fail(s, e1)

    @torch.no_grad()
    def _prefill(self, seqs: list[Sequence]) -> None:
        ids, mask = kvcache.left_padded([s.prompt for s in seqs], self.pad, self.device)  # (n, T) each
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        names = [s.adapter for s in seqs]
        cache = DynamicCache()
        with self._routed(names):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                             logits_to_keep=1, **{self._cache_kw: cache})
        self.metrics.inc("deltatune_prefill_batches_total")
        self.metrics.inc("deltatune_prompt_tokens_total", int(mask.sum()))
        batch = kvcache.after_prefill(cache, mask)  # the model filled it in place
        logits = out.logits[:, -1]  # (n, V)
        for i, s in enumerate(seqs):
            self._sample(s, logits[i])
        keep = [i for i, s in enumerate(seqs) if not s.done]
        if keep:
            self._batch = kvcache.merge(self._batch, batch if len(keep) == len(seqs) else batch.select(keep))
            self._running += [seqs[i] for i in keep]

    @torch.no_grad()
    def _decode(self) -> None:
        batch, running = self._batch, self._running
        if self._route is None:  # the batch changed: gather each layer's per-row factors once, for many steps
            self._route = contextlib.ExitStack()
            self._route.enter_context(self._routed([s.adapter for s in running]))
        last = torch.tensor([[s.tokens[-1]] for s in running], device=self.device)  # (B, 1)
        position_ids = batch.positions()  # (B, 1)
        mask = batch.grow()  # (B, T + 1)
        out = self.model(input_ids=last, attention_mask=mask, position_ids=position_ids, use_cache=True,
                         **{self._cache_kw: batch.cache})
        logits = out.logits[:, -1]  # (B, V)
        self.metrics.inc("deltatune_decode_steps_total")
        self.metrics.inc("deltatune_decode_rows_total", len(running))
        self.metrics.set_max("deltatune_batch_size_max", len(running))
        if len({s.adapter for s in running}) > 1:
            self.metrics.inc("deltatune_mixed_adapter_steps_total")
        for i, s in enumerate(running):
            self._sample(s, logits[i])
        if any(s.done for s in running):
            self._leave([i for i, s in enumerate(running) if not s.done])

    def _sample(self, s: Sequence, logits: torch.Tensor) -> None:
        try:
            self._accept(s, choose(logits, s.params, s.generator))
        except Exception as e:  # this request's own failure (its decoding, its callback)
            self._fail(s, e)

    def _accept(self, s: Sequence, choice: TokenChoice) -> None:
        s.tokens.append(choice.token)
        self.metrics.inc("deltatune_generation_tokens_total")
        finish = "stop" if choice.token in self.eos else "length" if len(s.tokens) >= s.params.max_tokens else None
        delta, stopped = s.stream.update(self.codec.decode(s.tokens), final=finish is not None)
        finish = "stop" if stopped else finish
        s.emit(Event("text", delta, choices=(choice,)))
        if finish is not None:
            s.done = True
            s.emit(Event("done", finish_reason=finish, usage=s.usage))
            self.metrics.inc("deltatune_requests_total", outcome="ok")

    def _fail(self, s: Sequence, error: BaseException) -> None:
        s.done = True
        self.metrics.inc("deltatune_requests_total", outcome="error")
        log.warning("request %s failed: %s", s.id, error)
        with contextlib.suppress(Exception):
            s.emit(Event("error", error=f"{type(error).__name__}: {error}"))

    def _leave(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` of the running batch (the others finished or were cancelled)."""
        for i, s in enumerate(self._running):
            if i not in keep:
                s.done = True
        self._close_route()
        self._running = [self._running[i] for i in keep]
        self._batch = self._batch.select(keep) if keep else None

    def _forget_unloaded(self) -> None:
        in_use = {s.adapter for s in self._running}
        with self._cond:
            in_use |= {s.adapter for s in self._waiting}
        for name in [n for n in self._unloading if n not in in_use]:
            self._close_route()
            self.bank.forget(name)
            self._unloading.discard(name)

    @contextlib.contextmanager
    def _routed(self, names: list[str]):
        """Each row through its adapter; loads evicted ones from their folders and counts evictions."""
        before, loads = set(self.bank.resident), self.bank.loads
        with self.bank.request(names, device=self.device) as (ids, unique):
            evicted = before - set(self.bank.resident)
            self.metrics.inc("deltatune_evictions_total", len(evicted))
            self.metrics.inc("deltatune_adapter_loads_total", self.bank.loads - loads)
            with routed(self.bank, ids, unique, self.model.get_submodule):
                yield

    def _close_route(self) -> None:
        if self._route is not None:
            route, self._route = self._route, None
            route.close()

    def _gauges(self) -> None:
        self.metrics.set("deltatune_batch_size", len(self._running))
        self.metrics.set("deltatune_adapters_loaded", len(self.adapters))
        self.metrics.set("deltatune_adapters_resident", len(self.bank.resident))

