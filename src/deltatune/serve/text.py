"""Text in and out of the served model: prompts to token ids, generated ids to the text sent back.

A fast tokenizer's Rust object is borrowed mutably by some calls (padding and truncation settings),
and two threads borrowing it at once raise "Already borrowed"; the HTTP handlers encode and the
scheduler decodes, so every call goes through one lock.
"""
from __future__ import annotations

import threading
from typing import Any, Sequence


class TextCodec:
    """The tokenizer behind one lock, with the prompt rules of ``deltatune generate``."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._lock = threading.Lock()

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode_prompt(self, prompt: str) -> list[int]:
        """A completion prompt, with the tokenizer's own special tokens (as ``deltatune generate --raw``)."""
        with self._lock:
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Chat messages through the chat template, with the assistant's turn opened. The template holds
        every special token the model needs, so none is added again (that would double a BOS)."""
        if not self.has_chat_template:
            raise ValueError("this model's tokenizer has no chat template; use /v1/completions with a plain prompt")
        with self._lock:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        with self._lock:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """Each token's own text (what ``logprobs`` lists)."""
        with self._lock:
            return [self.tokenizer.decode([i]) for i in ids]


class TextStream:
    """The reply's text as tokens arrive: what may be sent now, and whether a stop string was reached.

    The streamed pieces concatenate to exactly the final text, so a streamed reply equals the
    non-streamed one: text that could still change is held back (a trailing U+FFFD, which is a
    multi-byte character still being decoded, and any tail that could be the start of a stop string).
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = tuple(stop)
        self.sent = ""

    def update(self, text: str, final: bool) -> tuple[str, bool]:
        """``text`` is the whole reply decoded so far. Returns (new text to send, stop string reached)."""
        stopped = False
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, stopped, final = text[:cut], True, True
        if not final:
            text = text.rstrip("\ufffd")
            text = text[: len(text) - self._held(text)]
        if not text.startswith(self.sent):
            # Decoding more tokens changed text already sent (rare tokenizer clean-ups): keep what was
            # sent, so the stream and the final text stay equal.
            return "", stopped
        delta = text[len(self.sent):]
        self.sent = text
        return delta, stopped

    def _held(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every token that ends a reply: the generation config's eos ids (what generate stops at) and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return set(ids)
