"""Check a saved adapter folder against a model without loading any weights.

The adapter's tensors are read as shapes only (safetensors headers), the model is built on the meta
device from its config, and the adapter is attached to it as :meth:`PeftModel.from_pretrained`
would. The method's own all-or-nothing loader then compares keys and shapes: on meta tensors its
copy is a no-op, so what it reports is exactly what a real load would refuse.
"""
from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltatune.config import PeftConfig, PeftType
from deltatune.export.gguf_lora import gguf_lora_problems
from deltatune.export.tensor_names import ARCHITECTURES
from deltatune.io.adapter_guard import describe_problems, saved_adapter_problems
from deltatune.io.checkpoint import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, reading_weights
from deltatune.io.config_io import CONFIG_NAME, config_from_dict, read_config_json
from deltatune.inspect.architecture import meta_model
from deltatune.model import get_peft_model
from deltatune.models.vocab import tokenizer_beside

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class AdapterFiles:
    """What an adapter folder holds, read without loading tensor data."""

    folder: Path
    """The adapter folder."""
    raw_config: dict[str, Any]
    """``adapter_config.json`` as written (any peft type, known to deltatune or not)."""
    weights_file: Path
    """``adapter_model.safetensors`` (or the legacy ``adapter_model.bin``)."""
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]
    """peft key -> (shape, dtype) of every saved tensor."""

    @property
    def parameters(self) -> int:
        """Number of saved values."""
        total = 0
        for shape, _ in self.tensors.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


def _read_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    with reading_weights(path):  # a damaged file is an answer to "will it load?", not a traceback
        return _shapes(path)


def _shapes(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if path.name == WEIGHTS_NAME:
        from safetensors import safe_open

        out = {}
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                out[key] = (tuple(piece.get_shape()), _SAFETENSORS_DTYPES.get(piece.get_dtype(), torch.float32))
        return out
    # weights_only: a pickled checkpoint must never run code; mmap avoids reading the data.
    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}


def read_adapter(folder: str | os.PathLike) -> AdapterFiles:
    """Read an adapter folder's config and tensor shapes.

    Raises:
        FileNotFoundError: no ``adapter_config.json`` or no weights file in ``folder``.
        ValueError: the config is not valid JSON or has no ``peft_type``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}: it is not a folder; pass the adapter folder "
                                "that save_pretrained wrote")
    config_file, raw = read_config_json(folder)
    if not isinstance(raw, dict) or "peft_type" not in raw:
        raise ValueError(f"{config_file} has no 'peft_type' key; it is not an adapter config written by peft or deltatune")
    for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        if (folder / name).is_file():
            return AdapterFiles(folder, raw, folder / name, _read_shapes(folder / name))
    raise FileNotFoundError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME} or {LEGACY_WEIGHTS_NAME}")


def parse_config(files: AdapterFiles) -> PeftConfig:
    """The adapter's config as a deltatune config (warns about unknown keys, as loading does).

    Raises:
        ValueError: the peft type or an active feature is not supported by deltatune.
    """
    return config_from_dict(files.raw_config, source=str(files.folder / CONFIG_NAME))


def _shape_only(config: PeftConfig) -> PeftConfig:
    """The same adapter layout with initialisations that need no data (PiSSA/OLoRA decompose the base
    weight, text-initialised prompts need the tokenizer): shapes are identical, nothing is computed."""
    changes: dict[str, Any] = {"inference_mode": True}
    if isinstance(getattr(config, "init_lora_weights", None), str):
        changes["init_lora_weights"] = True
        if getattr(config, "loftq_config", None):
            changes["loftq_config"] = {}  # LoftQ's settings go with its initialisation
    if getattr(config, "prompt_tuning_init", None) == "TEXT":
        changes.update(prompt_tuning_init="RANDOM", tokenizer_kwargs=None)
    return config.replace(**changes)


def load_problems(files: AdapterFiles, config: PeftConfig, model_config: Any) -> list[str]:
    """Why the adapter would not load on the model described by ``model_config``; empty if it loads.

    Runs the same steps as ``PeftModel.from_pretrained`` (attach, then the method's all-or-nothing
    loader) on a meta-device model with meta tensors of the saved shapes.
    """
    vocab = adapter_vocab(files)
    if vocab is not None and tokenizer_beside(files.folder) is not None and hasattr(model_config, "vocab_size"):
        # the loaders grow the base to the tokenizer saved beside the adapter first (tokenizer_verdict says so)
        model_config = copy.copy(model_config)
        model_config.vocab_size = vocab
    model = meta_model(model_config, config.task_type)
    try:
        with torch.device("meta"):
            peft_model = get_peft_model(model, _shape_only(config))
    except ValueError as err:
        return [f"its targets do not fit this model: {err}"]
    state = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in files.tensors.items()}
    try:
        peft_model.load_adapter_state_dict(state, "default")
    except ValueError as err:
        return [str(err)]
    return _prompt_size_problems(config, model_config)


_EMBEDDING_KEY = re.compile(r"(embed_tokens|wte|word_embeddings|lm_head)(\.token_adapter)?(\.base_layer)?\.weight$")


def adapter_vocab(files: AdapterFiles) -> int | None:
    """The vocabulary the adapter was trained with: its saved tokenizer's size, else the rows of a saved
    embedding matrix (peft saves them when the vocabulary was resized); None if neither is there."""
    tokenizer = tokenizer_beside(files.folder)
    if tokenizer is not None:
        return len(tokenizer)
    rows = [shape[0] for k, (shape, _) in files.tensors.items() if len(shape) == 2 and _EMBEDDING_KEY.search(k)]
    return max(rows) if rows else None


def tokenizer_verdict(files: AdapterFiles, model_config: Any) -> str | None:
    """Which tokenizer the adapter needs when its vocabulary differs from the base model's; None when it does not."""
    vocab, base = adapter_vocab(files), getattr(model_config, "vocab_size", None)
    if vocab is None or base is None or vocab <= base:
        return None
    if tokenizer_beside(files.folder) is not None:
        return (f"the adapter's vocabulary has {vocab} tokens, the base model's {base}: use the tokenizer saved in "
                f"{files.folder} and resize the base's embeddings to it before loading (deltatune generate and "
                "export, and AutoPeftModel, do)")
    return (f"the adapter's vocabulary has {vocab} tokens, the base model's {base}, and no tokenizer is saved beside "
            "it: add the same tokens to the base tokenizer, then model.resize_token_embeddings(len(tokenizer))")


def whole_verdict(files: AdapterFiles) -> tuple[bool, str]:
    """Was every tensor saved whole? The checks :mod:`deltatune.io.adapter_guard` runs on each save, on the
    folder's config and saved shapes alone (empty tensors, flattened 1-D factors, FSDP1 wrapper keys, ranks
    that disagree): what ZeRO-3 and FSDP runs wrote before that guard existed.

    Returns:
        ``(whole, text)``; when not whole, the text names each tensor, the cause and the fix.
    """
    problems = saved_adapter_problems(files.raw_config, {k: shape for k, (shape, _) in files.tensors.items()})
    if not problems:
        return True, "yes (no empty, flattened or FSDP-wrapped tensors; ranks agree with the config)"
    return False, f"NO: {len(problems)} tensors were not saved whole\n{describe_problems(problems)}"


def _model_value(model_config: Any, names: tuple[str, ...]) -> Any:
    return next((getattr(model_config, n) for n in names if getattr(model_config, n, None) is not None), None)


def _prompt_size_problems(config: PeftConfig, model_config: Any) -> list[str]:
    """Prompt and prefix tables are built from sizes stored in the adapter config, so on a model of
    another size they load without error (in peft too) and fail only at the first forward: a prefix
    holds keys/values for ``num_layers`` layers, a soft prompt has ``token_dim`` = the hidden size."""
    checks = {
        PeftType.PREFIX_TUNING: ("num_layers", ("num_hidden_layers", "n_layer", "num_layers"), "depth"),
        PeftType.PROMPT_TUNING: ("token_dim", ("hidden_size", "n_embd", "d_model"), "hidden size"),
    }
    if config.peft_type not in checks:
        return []
    field, names, what = checks[config.peft_type]
    saved, have = getattr(config, field, None), _model_value(model_config, names)
    if saved is None or have is None or saved == have:
        return []
    return [f"{field}={saved} in the adapter config, but this model has {have}: the adapter was made for another "
            f"model {what} and would fail at the first forward pass"]


def _norm_name(name: str) -> str:
    return os.path.basename(str(name).rstrip("/\\")).lower()


def base_model_verdict(adapter_base: str | None, model: str) -> tuple[bool | None, str]:
    """Does the base model the adapter names match ``model``?

    Names are compared by their last path component, case-insensitively, so a deltatune cache folder
    ``~/.cache/deltatune/models/smollm2-135m-instruct`` matches the registered name.

    Returns:
        ``(True | False | None, sentence)``; None when the adapter names no base model.
    """
    if not adapter_base:
        return None, "the adapter does not name its base model (base_model_name_or_path is empty)"
    if _norm_name(adapter_base) == _norm_name(model):
        return True, f"matches: the adapter was trained on {adapter_base}"
    return False, (
        f"differs: the adapter was trained on {adapter_base!r}, checked here on {model!r}. A different model "
        "of the same shape loads without error but gives outputs the adapter was not trained for"
    )


def llama_cpp_verdict(files: AdapterFiles, model_config: Any | None = None) -> tuple[bool, str]:
    """Can ``deltatune export --format gguf`` write this adapter as a GGUF LoRA for llama.cpp / Ollama?

    Reads the config and tensor names only; with ``model_config`` also checks the architecture and an
    ``lm_head`` LoRA on tied embeddings (llama.cpp then has no output tensor to apply it to).

    Returns:
        ``(yes, sentence)``; a "no" says why and what to do instead (usually ``--merged``).
    """
    problems = gguf_lora_problems(files.raw_config, list(files.tensors))
    if model_config is not None:
        model_type = getattr(model_config, "model_type", None)
        if model_type not in ARCHITECTURES:
            problems.append(f"GGUF export supports {', '.join(sorted(ARCHITECTURES))}, not {model_type!r}; export a "
                            "transformers folder and convert it with llama.cpp's convert_hf_to_gguf.py")
        targets = files.raw_config.get("target_modules") or []
        if getattr(model_config, "tie_word_embeddings", False) and "lm_head" in targets:
            problems.append("it trains lm_head, which this model ties to the token embedding; llama.cpp has no "
                            "separate output tensor for it; export with --merged")
    if problems:
        return False, "no GGUF LoRA: " + "; ".join(problems)
    return True, ("yes: deltatune export --format gguf writes a GGUF LoRA (llama-cli --lora, Ollama ADAPTER); "
                  "rsLoRA and rank/alpha patterns are folded into B")
