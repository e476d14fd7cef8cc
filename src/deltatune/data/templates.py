"""Render normalised examples into text segments, each marked trainable or not.

A segment list such as ``[("<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n", False),
("Hello!<|im_end|>\\n", True)]`` is what :mod:`deltatune.data.tokenize` turns into ``input_ids``
and ``labels``. The tokenizer's own chat template is used when it has one; which characters are
the assistant's is found by rendering the conversation up to each assistant turn with a
generation prompt and taking what the full render adds after that prefix.
"""
from __future__ import annotations

from typing import Any

from deltatune.models.tokenizer import prepends_bos

Segment = tuple[str, bool]
"""(text, trainable): a piece of an example's rendered text and whether its tokens get labels."""

BUILTIN_TEMPLATES = ("chatml", "llama2", "alpaca", "plain")
"""Templates deltatune renders itself, for tokenizers without a chat template."""

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


class TemplateError(ValueError):
    """A conversation could not be rendered with the chosen template."""


def resolve_template(name: str, tokenizer: Any) -> str:
    """Turn a config's template choice into ``"tokenizer"`` or a built-in name.

    ``auto`` picks the tokenizer's chat template when it has one, else ``chatml``.

    Raises:
        TemplateError: ``tokenizer`` was asked for but the tokenizer has no chat template, or
            the name is unknown.
    """
    has_own = bool(getattr(tokenizer, "chat_template", None))
    if name == "auto":
        return "tokenizer" if has_own else "chatml"
    if name == "tokenizer":
        if not has_own:
            raise TemplateError(
                f"template: tokenizer was requested but {type(tokenizer).__name__} has no chat template; "
                f"pick a built-in one: {', '.join(BUILTIN_TEMPLATES)}."
            )
        return name
    if name not in BUILTIN_TEMPLATES:
        raise TemplateError(f"Unknown template {name!r}; expected auto, tokenizer or one of {', '.join(BUILTIN_TEMPLATES)}.")
    return name


def _apply(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja2 TemplateError, raise_exception() calls in templates, KeyError...
        raise TemplateError(
            f"The tokenizer's chat template failed on roles {[m['role'] for m in messages]}: {type(err).__name__}: {err}. "
            "Fix the data (e.g. alternate user/assistant turns), or choose a built-in template: "
            f"{', '.join(BUILTIN_TEMPLATES)}."
        ) from err


def _render_with_tokenizer(messages: list[dict], tokenizer: Any) -> list[Segment]:
    segments: list[Segment] = []
    done = ""  # text rendered so far; every later render must extend it
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = _apply(tokenizer, messages[:i], generation_prompt=True)
        full = _apply(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise TemplateError(
                "The tokenizer's chat template does not render conversations prefix-consistently (the render up to an "
                "assistant turn is not a prefix of the full render), so the assistant's tokens cannot be located. "
                f"Choose a built-in template instead: {', '.join(BUILTIN_TEMPLATES)}."
            )
        segments += [(prefix[len(done):], False), (full[len(prefix):], True)]
        done = full
    if messages and messages[-1]["role"] != "assistant":
        # Turns after the last assistant reply are context the model is not trained to produce.
        rest = _apply(tokenizer, messages, generation_prompt=False)
        if rest.startswith(done):
            segments.append((rest[len(done):], False))
    return [s for s in segments if s[0]]


def _chatml(messages: list[dict], eos: str) -> list[Segment]:
    segs: list[Segment] = []
    for m in messages:
        if m["role"] == "assistant":
            segs += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            segs.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    return segs


def _llama2(messages: list[dict], eos: str) -> list[Segment]:
    # Llama-2-chat: the system prompt sits inside the first [INST] block; every user turn opens a block.
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    segs: list[Segment] = []
    first = True
    for m in messages:
        if m["role"] == "user":
            sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if first and system else ""
            segs.append((f"[INST] {sys_block}{m['content'].strip()} [/INST]", False))
            first = False
        elif m["role"] == "assistant":
            segs.append((f" {m['content'].strip()} {eos}", True))
    return segs


def _alpaca(messages: list[dict], eos: str) -> list[Segment]:
    system = "\n".join(m["content"] for m in messages if m["role"] == "system") or ALPACA_PREAMBLE
    segs: list[Segment] = [(system + "\n\n", False)]
    for m in messages:
        if m["role"] == "user":
            segs.append((f"### Instruction:\n{m['content']}\n\n### Response:\n", False))
        elif m["role"] == "assistant":
            segs.append((m["content"] + eos + "\n\n", True))
    return segs


def _plain(messages: list[dict], eos: str) -> list[Segment]:
    # Contents as they are, no separators: the data decides its own whitespace.
    return [(m["content"] + (eos if m["role"] == "assistant" else ""), m["role"] == "assistant") for m in messages]


_BUILTINS = {"chatml": _chatml, "llama2": _llama2, "alpaca": _alpaca, "plain": _plain}


def render_segments(example: dict, tokenizer: Any, template: str) -> list[Segment]:
    """Render one normalised example (see :mod:`deltatune.data.formats`) into segments.

    Args:
        example: a row with ``messages`` (list of role/content) and ``text`` (plain document).
        tokenizer: supplies the chat template, and the eos/BOS strings for built-in templates.
        template: ``"tokenizer"`` or a built-in name, as returned by :func:`resolve_template`.

    Returns:
        Non-empty segments whose texts concatenate to the full rendered example.

    Raises:
        TemplateError: the template cannot render this conversation.
    """
    eos = tokenizer.eos_token or ""
    if example.get("text"):
        # Whole documents are trained on in full, whatever the chat template, ending in eos.
        segs = [(example["text"] + eos, True)]
    elif template == "tokenizer":
        return _render_with_tokenizer(example["messages"], tokenizer)
    else:
        segs = _BUILTINS[template](example["messages"], eos)
    # Chat templates write their own BOS; built-in ones follow the tokenizer's habit.
    if prepends_bos(tokenizer):
        segs.insert(0, (tokenizer.bos_token, False))
    return [s for s in segs if s[0]]


def generation_prompt(messages: list[dict], tokenizer: Any, template: str) -> str:
    """The text to feed ``generate`` to get the reply to ``messages`` (e.g. for accuracy scoring).

    A final assistant message, if present, is dropped (it is the reference answer).
    """
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if template == "tokenizer":
        return _apply(tokenizer, messages, generation_prompt=True)
    probe = [*messages, {"role": "assistant", "content": ""}]
    segs = render_segments({"messages": probe, "text": ""}, tokenizer, template)
    # Everything before the (empty) assistant turn's trainable part is the prompt.
    cut = next((i for i, (_, trainable) in enumerate(segs) if trainable), len(segs))
    return "".join(text for text, _ in segs[:cut])
