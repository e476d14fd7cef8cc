"""An adapter folder, the base model it names, and the two loaded together: what every export reads.

Shared by ``deltatune export`` (transformers folder), ``deltatune merge`` and the GGUF exports.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from deltatune.io.config_io import CONFIG_NAME, load_config
from deltatune.model import PeftModel
from deltatune.models import load_model_and_tokenizer
from deltatune.models.vocab import fit_embeddings, tokenizer_beside
from deltatune.models.cache import read_marker
from deltatune.models.registry import get_spec

NOT_MERGEABLE = {
    "PROMPT_TUNING": "prompt tuning adds virtual tokens to the input",
    "PREFIX_TUNING": "prefix tuning adds key/value prefixes to every attention layer",
    "BOTTLENECK": "a bottleneck adapter has a nonlinearity between its two projections",
}
"""Methods whose adapters can never be folded into the weights, and why."""


def read_adapter_config(folder: str | Path) -> Any:
    """The adapter's config, with an error that says what a valid adapter folder holds."""
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"no {CONFIG_NAME} in {folder}; pass the folder that save_pretrained (or deltatune train) wrote"
        )
    return load_config(folder)


def base_model_for(configs: Sequence[Any], folders: Sequence[str | Path], model: str | None) -> str:
    """``--model`` if given, else the base model the adapters name (which must agree)."""
    if model is not None:
        return model
    names = {str(c.base_model_name_or_path) for c in configs if c.base_model_name_or_path}
    if not names:
        raise ValueError(f"{folders[0]} does not name its base model (base_model_name_or_path); pass --model")
    if len(names) > 1:
        raise ValueError(f"the adapters name different base models {sorted(names)}; pass --model to choose one")
    return names.pop()


def _embeddings(model: Any) -> tuple[Any, Any]:
    inp = model.get_input_embeddings()
    try:
        out = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        out = None
    return inp, out


def untie_embeddings(model: Any) -> bool:
    """Give the output head its own copy of a tied embedding matrix; True if they were tied."""
    inp, out = _embeddings(model)
    if out is None or getattr(out, "weight", None) is None or out.weight is not inp.weight:
        return False
    out.weight = torch.nn.Parameter(inp.weight.detach().clone(), requires_grad=False)
    return True


def retie_or_record(model: Any) -> bool:
    """After merging an untied model: tie again if both matrices are still equal, else record in the
    config that they are separate. Returns True if the exported model has separate matrices."""
    inp, out = _embeddings(model)
    if torch.equal(inp.weight, out.weight):
        out.weight = inp.weight
        return False
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return True


def source_gguf(base: str) -> Path | None:
    """The GGUF file a base model came from, or None when it is a plain transformers folder.

    ``base`` is a registered name, a ``.gguf`` path, or a folder; deltatune's cache folder of a
    converted GGUF (what a trained adapter names as its base) leads back to the registered file.
    """
    spec = get_spec(base)
    if spec is not None:
        return spec.gguf_path()
    path = Path(base).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    marker = read_marker(path) if path.is_dir() else None
    if marker and marker.get("model_name") and get_spec(marker["model_name"]):
        return get_spec(marker["model_name"]).gguf_path()
    return None


def load_adapted(adapter: str | Path, base: str) -> Any:
    """Base model (float32) with the adapter attached, unmerged; a shape mismatch is an error that says
    the adapter belongs to another base."""
    model, tokenizer = load_model_and_tokenizer(base, dtype=torch.float32)
    tokenizer = _fit_to_adapter(model, adapter, tokenizer)
    return _attach(model, adapter, base), tokenizer


def merged_model(adapter: str | Path, base: str) -> tuple[Any, Any, bool]:
    """Base + adapter merged in float32: ``(model, tokenizer, untied)``. Tied embeddings are untied first
    so that a merge into one cannot change the other, and tied again if both stay equal; ``untied`` says
    they ended up separate."""
    base_model, tokenizer = load_model_and_tokenizer(base, dtype=torch.float32)
    tokenizer = _fit_to_adapter(base_model, adapter, tokenizer)
    # Trainable tokens write the same rows into tied embeddings, so the tie stays (as in peft).
    was_tied = False if _trains_token_rows(adapter) else untie_embeddings(base_model)
    peft_model = _attach(base_model, adapter, base)
    merged = peft_model.merge_and_unload()
    untied = retie_or_record(merged) if was_tied else False
    return merged, tokenizer, untied


def _fit_to_adapter(model: Any, adapter: str | Path, tokenizer: Any) -> Any:
    """The adapter folder's tokenizer if it has one (added tokens), with ``model`` grown to it; else ``tokenizer``."""
    own = tokenizer_beside(adapter)
    if own is None:
        return tokenizer
    fit_embeddings(model, own)
    return own


def _trains_token_rows(adapter: str | Path) -> bool:
    config = read_adapter_config(adapter)
    return config.peft_type.value == "TRAINABLE_TOKENS" or getattr(config, "trainable_token_indices", None) is not None


def _attach(model: Any, adapter: str | Path, base: str) -> Any:
    try:
        return PeftModel.from_pretrained(model, adapter)
    except (ValueError, RuntimeError) as err:
        raise ValueError(
            f"the adapter {adapter} does not fit the base model {base}: {err}\nIt was trained on another model; pass "
            "the model it was trained on with --model.") from err
