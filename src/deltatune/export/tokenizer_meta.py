"""A transformers tokenizer as GGUF tokenizer metadata, for a base model that did not come from a GGUF.

Only byte-level BPE tokenizers (``tokenizer.json`` with a BPE model: GPT-2, SmolLM, LLaMA-3, Qwen2)
are written. llama.cpp does not read the pre-tokenizer from the file: it picks a built-in regex by the
name in ``tokenizer.ggml.pre``, so we recognise the pre-tokenizers of those families and refuse others
rather than write a name that would split text differently from the model's own tokenizer.
"""
from __future__ import annotations

import json
from typing import Any

# Distinctive pieces of the Split regexes of LLaMA-3 and Qwen2 tokenizer.json files.
_LLAMA3_DIGITS = "\\p{N}{1,3}"
_QWEN2_PIECE = "[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name for a ``tokenizer.json`` pre_tokenizer.

    Raises:
        ValueError: a pre-tokenizer llama.cpp has no matching built-in for (as far as we know).
    """
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        pattern = str((steps[0].get("pattern") or {}).get("Regex", ""))
        if _LLAMA3_DIGITS in pattern:
            return "llama-bpe"
        if _QWEN2_PIECE in pattern:
            return "qwen2"
    raise ValueError(
        f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not one deltatune can name for "
        "llama.cpp (GPT-2, SmolLM, LLaMA-3, Qwen2). Convert the `deltatune export` folder with llama.cpp's "
        "convert_hf_to_gguf.py, which identifies tokenizers by hashing their output.")


def add_tokenizer_metadata(writer: Any, tokenizer: Any) -> None:
    """Add ``tokenizer.ggml.*`` and ``tokenizer.chat_template`` keys for a byte-level BPE tokenizer.

    Raises:
        ValueError: not a fast tokenizer, not BPE, or an unknown pre-tokenizer.
    """
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else {}
    model = state.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"the tokenizer is {model.get('type') or type(tokenizer).__name__}, not byte-level BPE; "
                         "deltatune writes GGUF tokenizer metadata for BPE tokenizers only. Use a GGUF base model, or "
                         "llama.cpp's convert_hf_to_gguf.py on the `deltatune export` folder.")
    vocab = dict(model["vocab"])
    added = {t["id"]: t for t in state.get("added_tokens", [])}
    vocab.update({t["content"]: i for i, t in added.items()})
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]  # ids no token uses, as llama.cpp's converter names them
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.NORMAL
    for i, t in added.items():
        types[i] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(state.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    for token, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                       ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        token_id = getattr(tokenizer, f"{token}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
