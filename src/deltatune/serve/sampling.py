"""How each served sequence picks its next token: greedy, or temperature + top-p with its own generator.

Sampling runs per row on the logits of one batched forward, so two requests in the same batch never
share random state: each has its own ``torch.Generator`` (seeded from the request's ``seed``, else
from the OS), which makes a seeded request reproducible whatever else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """What one request asked for (OpenAI's names and defaults)."""

    max_tokens: int = 16
    """Stop after this many generated tokens (finish_reason "length")."""
    temperature: float = 1.0
    """Divides the logits before sampling; 0 means greedy (always the most likely token)."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p."""
    seed: int | None = None
    """Seed of this request's own generator, for a reproducible sample."""
    stop: tuple[str, ...] = ()
    """Generation stops before the first occurrence of any of these strings (finish_reason "stop")."""
    logprobs: int | None = None
    """Return the chosen token's log-probability and the ``logprobs`` most likely alternatives."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be between 0 and 2 (0 means greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a probability in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop) or len(self.stop) > 4:
            raise ValueError(f"stop must be up to 4 non-empty strings, got {list(self.stop)!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator | None:
        """A fresh generator for one request (None when greedy: nothing is drawn)."""
        if self.greedy:
            return None
        g = torch.Generator()
        if self.seed is None:
            g.seed()  # from the OS: unseeded requests differ
        else:
            g.manual_seed(self.seed)
        return g


@dataclass(frozen=True)
class TokenChoice:
    """One generated token, with what ``logprobs`` asked for."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


@torch.no_grad()
def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> TokenChoice:
    """The next token from one row's logits (V,).

    Greedy is ``argmax`` of the raw logits, as ``model.generate(do_sample=False)`` takes it, so a greedy
    request reproduces ``deltatune generate --greedy`` token for token. Log-probabilities are those of
    the model's own distribution (before temperature and top-p), as vLLM and OpenAI report them.
    """
    logits = logits.float()  # (V,)
    if params.greedy:
        token = int(torch.argmax(logits))
    else:
        probs = torch.softmax(logits / params.temperature, dim=-1)  # (V,)
        if params.top_p < 1:
            sorted_p, order = torch.sort(probs, descending=True)
            # keep a token while the mass before it is under top_p (the first token is always kept)
            keep = (torch.cumsum(sorted_p, 0) - sorted_p) < params.top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        token = int(torch.multinomial(probs, 1, generator=generator))
    if params.logprobs is None:
        return TokenChoice(token)
    logp = torch.log_softmax(logits, dim=-1)  # (V,)
    top = ()
    if params.logprobs > 0:
        values, ids = torch.topk(logp, params.logprobs)
        top = tuple(zip(ids.tolist(), values.tolist()))
    return TokenChoice(token, float(logp[token]), top)
