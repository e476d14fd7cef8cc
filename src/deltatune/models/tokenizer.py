"""Tokenizer fixes applied to every loaded model, so training and generation agree on special tokens.

What transformers' GGUF reader produces has varied by version: 4.x set SmolLM2's eos to
``<|im_start|>`` and prepended a BOS; 5.23 gets eos/pad ``<|im_end|>`` and no BOS right but keeps
``bos_token = <|im_start|>``. :func:`normalize_tokenizer` pins the registry's choices either way
and checks the result by encoding a string, not by trusting attributes.
"""
from __future__ import annotations

from typing import Any

from deltatune.models.registry import ModelSpec

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""Plain ChatML (no default system message), set when a ChatML model's file carries no template."""

NAMED_CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE}
"""Names a :class:`ModelSpec` may use instead of spelling out a Jinja template."""


def prepends_bos(tokenizer: Any) -> bool:
    """True if encoding plain text with special tokens puts the BOS token first."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def _token_in_vocab(tokenizer: Any, token: str) -> bool:
    ids = tokenizer.convert_tokens_to_ids([token])
    return ids[0] is not None and ids[0] != tokenizer.unk_token_id


def normalize_tokenizer(tokenizer: Any, spec: ModelSpec | None = None) -> Any:
    """Pin eos/pad/BOS and the chat template to ``spec``'s choices; give every tokenizer a pad token.

    Args:
        tokenizer: a transformers tokenizer; changed in place.
        spec: the registered model's expectations, or None for an unregistered model (then only
            a missing pad token is filled with eos).

    Returns:
        The same tokenizer, for chaining.

    Raises:
        ValueError: a token the spec asks for is not in the vocabulary, or BOS could not be
            switched off.
    """
    if spec is not None:
        for attr in ("eos_token", "pad_token"):
            token = getattr(spec, attr)
            if token is None:
                continue
            if not _token_in_vocab(tokenizer, token):
                raise ValueError(
                    f"Model {spec.name!r} expects {attr} {token!r}, but the tokenizer's vocabulary has no such token; "
                    "the GGUF file is not the one the registry describes. Reinstall the package or pass a model path."
                )
            setattr(tokenizer, attr, token)
        if spec.add_bos_token is not None and prepends_bos(tokenizer) != spec.add_bos_token:
            # Fast tokenizers rebuild their post-processor when this property is set (5.x).
            tokenizer.add_bos_token = spec.add_bos_token
            if prepends_bos(tokenizer) != spec.add_bos_token:
                raise ValueError(
                    f"Could not {'enable' if spec.add_bos_token else 'disable'} the BOS token of "
                    f"{type(tokenizer).__name__} for model {spec.name!r}; expected a tokenizer whose "
                    "`add_bos_token` setter updates its post-processor (a fast tokenizer)."
                )
        if not getattr(tokenizer, "chat_template", None) and spec.chat_template:
            tokenizer.chat_template = NAMED_CHAT_TEMPLATES.get(spec.chat_template, spec.chat_template)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def sync_special_token_ids(model: Any, tokenizer: Any) -> None:
    """Make the model's config and generation config use the tokenizer's eos/pad ids.

    ``generate`` stops on ``generation_config.eos_token_id``; if it disagreed with the tokenizer,
    a fine-tuned model would learn to emit ``<|im_end|>`` and then never stop.
    """
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        eos = tokenizer.eos_token_id
        if eos is not None:
            current = getattr(cfg, "eos_token_id", None)
            # Some models stop on several ids (a list); keep them and add ours rather than replace.
            if isinstance(current, (list, tuple)):
                cfg.eos_token_id = list(current) if eos in current else [*current, eos]
            else:
                cfg.eos_token_id = eos
        if tokenizer.pad_token_id is not None:
            cfg.pad_token_id = tokenizer.pad_token_id
