"""Load a causal LM and its tokenizer by registered name, local folder or ``.gguf`` file."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from deltatune.models.cache import gguf_cache_name, models_dir, read_marker
from deltatune.models.gguf import ensure_converted, is_current, reading_gguf
from deltatune.models.registry import DEFAULT_MODEL, MODEL_REGISTRY, ModelSpec, get_spec
from deltatune.models.tokenizer import normalize_tokenizer, sync_special_token_ids

PathLike = str | os.PathLike


def _unknown_model(name_or_path: PathLike) -> FileNotFoundError:
    return FileNotFoundError(
        f"Unknown model {str(name_or_path)!r}: it is not a registered name ({', '.join(sorted(MODEL_REGISTRY))}), "
        "an existing transformers model folder (with config.json) or a .gguf file. "
        "Pass one of the registered names, or a path to a local model."
    )


def _locate(name_or_path: PathLike) -> tuple[str, Path, ModelSpec | None]:
    """Classify the argument without converting anything.

    Returns:
        ``(kind, path, spec)`` with kind ``"folder"`` (path is the model folder) or ``"gguf"``
        (path is the GGUF file to convert, spec its registry entry or None).
    """
    spec = get_spec(str(name_or_path)) if isinstance(name_or_path, str) else None
    if spec is not None:
        return "gguf", spec.gguf_path(), spec
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is a folder but has no config.json; expected a transformers model folder "
                "(config.json, weights and tokenizer files), e.g. one written by save_pretrained."
            )
        return "folder", path, None
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"{path} is a file of type {path.suffix or '(none)'!r}; expected a .gguf file, a model folder "
                f"or a registered name ({', '.join(sorted(MODEL_REGISTRY))})."
            )
        return "gguf", path, None
    raise _unknown_model(name_or_path)


def _cache_folder(gguf_path: Path, spec: ModelSpec | None) -> Path:
    return models_dir() / (spec.name if spec else gguf_cache_name(gguf_path))


def resolve_model_path(name_or_path: PathLike = DEFAULT_MODEL) -> Path:
    """Return a transformers model folder for ``name_or_path``, converting a GGUF source once.

    Args:
        name_or_path: a registered name (see :data:`MODEL_REGISTRY`; ``smollm2-135m-instruct`` is
            the default), a local transformers model folder, or a path to a ``.gguf`` file.
            GGUF sources are converted into ``$DELTATUNE_CACHE/models/<name>`` (default
            ``~/.cache/deltatune/models``) the first time and reused afterwards.

    Returns:
        The folder to pass to ``from_pretrained``.

    Raises:
        FileNotFoundError: the name is not registered and no such folder or file exists, the
            folder has no config.json, or the registered model's package is missing.
        ValueError: the path is a file that is not ``.gguf``.
    """
    kind, path, spec = _locate(name_or_path)
    if kind == "folder":
        return path
    return ensure_converted(path, _cache_folder(path, spec), spec)


def model_config(name_or_path: PathLike = DEFAULT_MODEL) -> Any:
    """The transformers config of a model, without loading (or converting) its weights.

    A GGUF source not yet converted has its config read from the file's metadata (~5 s for
    SmolLM2, spent parsing the vocabulary); a converted or local folder reads config.json.
    """
    from transformers import AutoConfig

    kind, path, spec = _locate(name_or_path)
    if kind == "folder":
        return AutoConfig.from_pretrained(path)
    folder = _cache_folder(path, spec)
    if is_current(folder, path, spec):
        return AutoConfig.from_pretrained(folder)
    with reading_gguf(path):
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # describes the file, not the float model we will build
    return config


def load_model_and_tokenizer(
    name_or_path: PathLike = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    **from_pretrained: Any,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, with the registry's tokenizer fixes applied.

    Args:
        name_or_path: as for :func:`resolve_model_path`.
        dtype: parameter dtype of the returned model.
        device: where to put the model; None leaves it on the CPU.
        **from_pretrained: passed to transformers' ``from_pretrained`` (e.g. ``distributed_config``).

    Returns:
        ``(model, tokenizer)``. The model is in eval mode, has no quantizer attached, and its
        config/generation config use the tokenizer's eos and pad ids.

    Raises:
        FileNotFoundError, ValueError: as for :func:`resolve_model_path`.
        RuntimeError: the folder exists but transformers could not load it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_path(name_or_path)
    marker = read_marker(folder) or {}
    spec = (get_spec(name_or_path) if isinstance(name_or_path, str) else None) or (
        get_spec(marker["model_name"]) if marker.get("model_name") else None
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **from_pretrained)
    except (OSError, ValueError) as err:
        hint = (
            f" It is a deltatune cache folder: delete it ({folder}) and run again to convert afresh."
            if marker else " Check that it holds config.json, the weights and the tokenizer files."
        )
        raise RuntimeError(f"Could not load a causal LM and tokenizer from {folder}: {err}.{hint}") from err
    normalize_tokenizer(tokenizer, spec)
    sync_special_token_ids(model, tokenizer)
    if tokenizer.model_max_length > 10**9 and getattr(model.config, "max_position_embeddings", None):
        tokenizer.model_max_length = model.config.max_position_embeddings
    if device is not None:
        model.to(device)
    return model, tokenizer
