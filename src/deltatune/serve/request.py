"""One generation request as the scheduler sees it, and the events it sends back to the HTTP handler."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from deltatune.serve.sampling import SamplingParams, TokenChoice
from deltatune.serve.text import TextStream


class QueueFull(Exception):
    """The waiting queue is at ``--max-queue`` (or the server is shutting down); the client should retry."""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass(frozen=True)
class Event:
    """What the scheduler tells a request's handler: new text, the end, or a failure of this request alone."""

    kind: Literal["text", "done", "error"]
    text: str = ""
    choices: tuple[TokenChoice, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    """A request in the scheduler: its prompt, options and the tokens generated so far.

    ``emit`` must be callable from the scheduler thread (the app wraps ``loop.call_soon_threadsafe``).
    ``cancelled`` is set by the handler when the client goes away; the scheduler drops the sequence
    before its next step.
    """

    adapter: str
    """Adapter name, or ``deltatune.serving.BASE`` for the base model."""
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    generator: torch.Generator | None = field(init=False)
    stream: TextStream = field(init=False)

    def __post_init__(self) -> None:
        self.generator = self.params.generator()
        self.stream = TextStream(self.params.stop)

    @property
    def usage(self) -> Usage:
        return Usage(len(self.prompt), len(self.tokens))
