"""An Ollama Modelfile for an exported GGUF: ``FROM`` + ``ADAPTER``, ``TEMPLATE``, ``SYSTEM`` and stop tokens.

Ollama does not run the Jinja chat template stored in a GGUF; it needs a Go template, and a wrong one
(or missing stop tokens) makes a model ramble or loop, the most reported problem with fine-tune exports.
We translate the two families we can recognise exactly, by rendering the tokenizer's own template on a
probe conversation:

* ChatML (SmolLM2, Qwen2): ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` ... ``<|im_start|>assistant\\n``;
* LLaMA-3: ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`` ... (the BOS token is
  left to the tokenizer, which llama.cpp and Ollama add from the GGUF's ``add_bos_token``).

A default system prompt that the template inserts when the conversation has none (SmolLM2 has one)
becomes the Modelfile's ``SYSTEM``: Ollama prepends it exactly when the first message is not a
system message, which is what the Jinja template does. Any other template is an error that says to
write TEMPLATE by hand, rather than a Modelfile that silently formats prompts differently.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltatune.atomic import atomic_write_text

_PROBE = "deltatune-probe-7Q"


@dataclass(frozen=True)
class ChatStyle:
    """One chat-template family: how a message and the generation prompt are written."""

    name: str
    before_role: str
    after_role: str
    after_content: str
    stops: tuple[str, ...]

    def go_template(self) -> str:
        """The Ollama TEMPLATE: every message of ``.Messages``, then the assistant's header."""
        message = f"{self.before_role}{{{{ .Role }}}}{self.after_role}{{{{ .Content }}}}{self.after_content}"
        return f"{{{{- range .Messages }}}}{message}{{{{ end }}}}{self.before_role}assistant{self.after_role}"

    def render(self, messages: list[dict[str, str]]) -> str:
        """What :meth:`go_template` renders for ``messages`` (used to check the translation)."""
        body = "".join(f"{self.before_role}{m['role']}{self.after_role}{m['content']}{self.after_content}" for m in messages)
        return body + f"{self.before_role}assistant{self.after_role}"


STYLES = (
    ChatStyle("chatml", "<|im_start|>", "\n", "<|im_end|>\n", ("<|im_end|>", "<|im_start|>")),
    ChatStyle("llama3", "<|start_header_id|>", "<|end_header_id|>\n\n", "<|eot_id|>", ("<|eot_id|>", "<|start_header_id|>")),
)


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The Jinja template's text, less a leading BOS token: llama.cpp and Ollama add that as a token (from
    the GGUF's add_bos_token), so it is not part of TEMPLATE. A BOS that is the template's own first
    marker (tokenizers that name <|im_start|> as BOS) stays."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and any(text[len(bos):].startswith(s.before_role) for s in STYLES):
        return text[len(bos):]
    return text


def chat_style(tokenizer: Any) -> tuple[ChatStyle, str | None]:
    """The tokenizer's chat-template family and its default system prompt (None if it has none).

    Raises:
        ValueError: no chat template, or one that is neither ChatML nor LLaMA-3 style.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template, so there is no TEMPLATE to translate; write the "
                         "Modelfile's TEMPLATE by hand (https://github.com/ollama/ollama/blob/main/docs/template.md)")
    user = [{"role": "user", "content": _PROBE}]
    text = _render(tokenizer, user)
    for style in STYLES:
        plain = style.render(user)
        if text == plain:
            return style, None
        head = f"{style.before_role}system{style.after_role}"
        if text.endswith(plain) and text.startswith(head) and text[: -len(plain)].endswith(style.after_content):
            return style, text[len(head): len(text) - len(plain) - len(style.after_content)]
    raise ValueError(
        "the chat template is neither ChatML nor LLaMA-3 style (it renders a user message as "
        f"{text!r}); deltatune translates only those two. Write the Modelfile's TEMPLATE by hand "
        "(https://github.com/ollama/ollama/blob/main/docs/template.md)")


def check_translation(tokenizer: Any, style: ChatStyle, system: str | None) -> None:
    """Render a few conversations with the Jinja template and with the Go template's equivalent
    (plus Ollama's SYSTEM rule); a difference is an error, never a Modelfile that formats differently."""
    conversations = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
         {"role": "user", "content": "Another one?"}],
    ]
    for messages in conversations:
        with_default = messages if system is None or messages[0]["role"] == "system" else (
            [{"role": "system", "content": system}] + messages)
        if _render(tokenizer, messages) != style.render(with_default):
            raise ValueError(f"the {style.name} TEMPLATE does not reproduce the tokenizer's chat template on "
                             f"{messages}; write the Modelfile's TEMPLATE by hand")


def modelfile(from_path: Path, tokenizer: Any, adapter_path: Path | None = None) -> str:
    """The Modelfile text: ``FROM`` (and ``ADAPTER``), ``TEMPLATE``, ``SYSTEM`` and ``PARAMETER stop``."""
    style, system = chat_style(tokenizer)
    check_translation(tokenizer, style, system)
    stops = list(dict.fromkeys([*style.stops, *([tokenizer.eos_token] if tokenizer.eos_token else [])]))
    lines = [f"FROM {from_path.resolve()}"]
    if adapter_path is not None:
        lines.append(f"ADAPTER {adapter_path.resolve()}")
    lines.append(f'TEMPLATE """{style.go_template()}"""')
    if system is not None:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def modelfile_path(out_gguf: Path) -> Path:
    """Where the Modelfile of an exported GGUF goes: ``<out>.Modelfile`` next to it."""
    return Path(out_gguf).with_suffix(".Modelfile")


def write_modelfile(out_gguf: Path, text: str) -> Path:
    """Write ``text`` (from :func:`modelfile`) next to the exported GGUF, atomically; returns its path."""
    path = modelfile_path(out_gguf)
    atomic_write_text(path, text)
    return path
