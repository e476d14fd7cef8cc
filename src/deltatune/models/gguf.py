"""Convert a GGUF file, once, into a plain transformers model folder.

transformers 5.x loads GGUF weights by dequantizing them to float, but keeps a ``GgufHfQuantizer``
attached to the model: ``save_pretrained`` then refuses ("quantized with gguf and is not
serializable") and ``model.hf_quantizer.is_trainable`` is False, so the Trainer rejects it. It also
takes ~15 s to dequantize SmolLM2-135M on two CPU cores. We therefore rebuild the same architecture
from the config without ``quantization_config``, move the dequantized tensors in, and save a
safetensors folder that later runs load in a fraction of a second.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import logging
import time
from pathlib import Path
from typing import Iterator

import torch

from deltatune.models.cache import atomic_directory, read_marker, write_marker
from deltatune.models.registry import ModelSpec
from deltatune.models.tokenizer import normalize_tokenizer, sync_special_token_ids

logger = logging.getLogger(__name__)

CONVERSION_VERSION = 1
"""Bumped when the conversion changes, so older cache folders are converted again."""


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "Reading a .gguf file needs the `gguf` package, which is not installed. "
            "Install it with: pip install 'gguf>=0.10'"
        ) from err


def source_info(gguf_path: Path, spec: ModelSpec | None) -> dict:
    """What a converted folder records about its source, and is compared against to detect staleness."""
    info = {
        "conversion_version": CONVERSION_VERSION,
        "source_file": gguf_path.name,
        "source_size": gguf_path.stat().st_size,
        "model_name": spec.name if spec else None,
    }
    if spec is not None:
        try:
            info["source_package_version"] = importlib.metadata.version(spec.distribution)
        except importlib.metadata.PackageNotFoundError:
            info["source_package_version"] = None
    return info


def is_current(folder: Path, gguf_path: Path, spec: ModelSpec | None) -> bool:
    """True if ``folder`` holds a finished conversion of this exact source by this code version."""
    marker = read_marker(folder)
    if marker is None:
        return False
    expected = source_info(gguf_path, spec)
    return all(marker.get(key) == value for key, value in expected.items())


def _without_quantizer(quantized: torch.nn.Module) -> torch.nn.Module:
    """The same model as a plain, trainable, serialisable module, sharing no state with the input."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Built on the meta device so no random initialisation is paid for; assign=True then adopts
    # the dequantized tensors as the parameters.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises first; kept for clarity
        raise RuntimeError(f"GGUF state dict did not match the rebuilt model: {result}")
    # Re-tie lm_head to embed_tokens (SmolLM2 ties them); assign=True may have given them separate tensors.
    model.tie_weights()
    return model.eval()


@contextlib.contextmanager
def reading_gguf(gguf_path: Path) -> Iterator[None]:
    """Turn a failure to parse ``gguf_path`` (truncated, damaged or crafted: ``struct.error``, index and
    key errors from deep inside the parser) into a ValueError that names the file."""
    try:
        yield
    except (ImportError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as err:
        raise ValueError(
            f"{gguf_path} could not be read as a GGUF model ({type(err).__name__}: {err}); the file is truncated, "
            "damaged or not a GGUF model file. Download it again, or reinstall the package that ships it."
        ) from err


def convert_gguf(gguf_path: Path, out_dir: Path, spec: ModelSpec | None = None) -> Path:
    """Dequantize ``gguf_path`` into a transformers folder at ``out_dir`` (float32 safetensors).

    The folder is built under a temporary name and renamed into place, with a
    ``deltatune_source.json`` marker written last, so an interrupted conversion leaves nothing
    that a later run would mistake for a finished one.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: the folder to create (replaced if it exists).
        spec: the registry entry whose tokenizer fixes apply, or None for an unregistered file.

    Returns:
        ``out_dir``.
    """
    _require_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    logger.warning("Converting %s to a transformers folder at %s (one-time; ~20 s for 135M params)", gguf_path, out_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    with reading_gguf(gguf_path):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    normalize_tokenizer(tokenizer, spec)
    model = _without_quantizer(quantized)
    del quantized
    model.config._name_or_path = spec.name if spec else gguf_path.stem
    sync_special_token_ids(model, tokenizer)
    # GGUF tokenizers come back with an "unlimited" model_max_length; the context length is known.
    tokenizer.model_max_length = model.config.max_position_embeddings
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_marker(tmp, source_info(gguf_path, spec) | {"seconds": round(time.perf_counter() - start, 2)})
    logger.warning("Converted %s in %.1f s", gguf_path.name, time.perf_counter() - start)
    return out_dir


def ensure_converted(gguf_path: Path, out_dir: Path, spec: ModelSpec | None = None) -> Path:
    """Return ``out_dir``, converting ``gguf_path`` into it first unless a current conversion is there."""
    if not is_current(out_dir, gguf_path, spec):
        convert_gguf(gguf_path, out_dir, spec)
    return out_dir
