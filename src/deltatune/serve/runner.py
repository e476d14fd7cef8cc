"""Putting a server together (and ``deltatune serve``'s entry point, :func:`main`): options, the model and its adapters, the app, and uvicorn around it.

:func:`build` gives the FastAPI app for a set of :class:`ServeOptions`; :func:`serve` runs it until
Ctrl-C / SIGTERM (uvicorn lets in-flight requests finish, then the engine drains); :class:`ServerThread`
runs one in a background thread on a free port (tests, benchmarks).
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltatune.models import load_model_and_tokenizer
from deltatune.serve.app import create_app
from deltatune.serve.engine import Engine
from deltatune.serve.metrics import Metrics
from deltatune.serve.text import TextCodec
from deltatune.serving import AdapterServer
from deltatune.train.precision import choose_precision


@dataclass(frozen=True)
class ServeOptions:
    """What ``deltatune serve`` was asked for."""

    model: str
    """A registered name (``smollm2-135m-instruct``), a transformers folder or a .gguf file; requests name it to
    reach the base model."""
    adapters: tuple[tuple[str, str], ...] = ()
    """(name, folder) adapters served from the start."""
    adapter_root: str | None = None
    """/v1/load_lora_adapter may load folders under this one only; None turns loading over HTTP off."""
    host: str = "127.0.0.1"
    port: int = 8000
    max_adapters: int = 8
    """Adapters resident in bank slots at once; more are evicted least-recently-used and reloaded on demand."""
    max_batch_size: int = 32
    """Most sequences decoded together in one forward."""
    max_queue: int = 256
    """Most requests waiting to join the batch; beyond it a request gets 429."""
    max_model_len: int | None = None
    """Longest prompt + completion in tokens (default: the model's max_position_embeddings)."""
    api_key: str | None = None
    """Required as ``Authorization: Bearer KEY`` on every /v1 route when set."""
    dtype: str = "auto"
    """Weights and activations: auto (bfloat16 where this machine runs bf16 fast, as ``train.bf16: auto`` decides;
    else float32), float32 or bfloat16. Not autocast: the mixed-adapter banks take the model's own dtype."""

    def __post_init__(self) -> None:
        checks = [("--max-adapters", self.max_adapters), ("--max-batch-size", self.max_batch_size),
                  ("--max-queue", self.max_queue)]
        for flag, value in checks:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} {value!r}: expected a positive integer")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"--max-model-len {self.max_model_len}: expected at least 2 tokens")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port}: expected 0-65535 (0 picks a free port)")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"--dtype {self.dtype!r}: expected auto, float32 or bfloat16")
        names = [n for n, _ in self.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"--adapter names must be unique; {dupes} given more than once")
        if self.model in names:
            raise ValueError(f"--adapter {self.model}=...: that name is the base model's; pick another")
        if self.adapter_root is not None and not Path(self.adapter_root).is_dir():
            raise FileNotFoundError(f"--adapter-root {self.adapter_root}: no such folder")

    @property
    def bf16(self) -> bool:
        if self.dtype == "auto":
            return choose_precision("auto").bf16
        return self.dtype == "bfloat16"


def build(options: ServeOptions, model: Any = None, tokenizer: Any = None):
    """The app for ``options``: loads the model (unless given) and every ``--adapter``, all before serving.

    Returns:
        ``(app, engine)``; the engine starts and stops with the app.
    """
    if model is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if options.bf16 else torch.float32
        model, tokenizer = load_model_and_tokenizer(options.model, dtype=dtype, device=device)
    model.eval()
    limit = options.max_model_len or int(getattr(model.config, "max_position_embeddings", 2048))
    engine = Engine(AdapterServer(model, max_slots=options.max_adapters), TextCodec(tokenizer),
                    max_batch_size=options.max_batch_size, max_queue=options.max_queue, metrics=Metrics())
    for name, folder in options.adapters:
        try:
            engine.load(name, folder)  # the scheduler has not started: this thread owns the model for now
        except (ValueError, FileNotFoundError, OSError) as e:
            raise ValueError(f"--adapter {name}={folder}: {e}") from None
    app = create_app(engine, options.model, limit, options.api_key, options.adapter_root)
    return app, engine


def _config(app, host: str, port: int):
    import uvicorn  # the optional extra, loaded when a server runs

    # timeout_graceful_shutdown None: on Ctrl-C / SIGTERM, wait for every in-flight request (drain)
    return uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=None)


def serve(options: ServeOptions, announce=print) -> None:
    """Serve until Ctrl-C / SIGTERM; ``announce`` gets the ready line (URL and served names)."""
    import uvicorn  # the optional extra, loaded when a server runs

    app, engine = build(options)
    server = uvicorn.Server(_config(app, options.host, options.port))

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            host, port = server.servers[0].sockets[0].getsockname()[:2]
            names = [options.model, *sorted(engine.served())]
            announce(f"deltatune serve: ready at http://{host}:{port}/v1 serving {', '.join(names)} "
                     "(Ctrl-C drains in-flight requests, then exits)")
        await task

    asyncio.run(main())


class ServerThread:
    """An app served by uvicorn in a daemon thread on 127.0.0.1 and a free port; ``stop()`` drains and joins.

    Example:
        >>> with ServerThread(app) as url:        # "http://127.0.0.1:PORT"
        ...     requests.get(url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn  # the optional extra, loaded when a server runs

        config = _config(app, host, port)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="deltatune-http", daemon=True)

    def start(self, timeout: float = 30) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start; see the log above")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def stop(self, timeout: float = 30) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(args) -> int:
    """Entry point of ``deltatune serve`` (``args`` from :mod:`deltatune.cli.serve`'s parser, which has
    checked that the server extra is installed)."""
    options = ServeOptions(
        model=args.model, adapters=tuple(args.adapter), adapter_root=args.adapter_root, host=args.host,
        port=args.port, max_adapters=args.max_adapters, max_batch_size=args.max_batch_size,
        max_queue=args.max_queue, max_model_len=args.max_model_len, api_key=args.api_key, dtype=args.dtype)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bar would bury the ready line
    serve(options, announce=lambda line: print(line, flush=True))
    return 0
