"""Named model loading: registered GGUF models converted once into a cached transformers folder.

Public API::

    load_model_and_tokenizer(name_or_path="smollm2-135m-instruct", dtype=torch.float32, device=None)
    resolve_model_path(name_or_path) -> Path
    model_config(name_or_path) -> transformers config (no weights loaded)
    MODEL_REGISTRY, DEFAULT_MODEL, ModelSpec
"""
from deltatune.models.loader import load_model_and_tokenizer, model_config, resolve_model_path
from deltatune.models.registry import DEFAULT_MODEL, MODEL_REGISTRY, ModelSpec
from deltatune.models.tokenizer import CHATML_TEMPLATE, normalize_tokenizer

__all__ = [
    "CHATML_TEMPLATE",
    "DEFAULT_MODEL",
    "MODEL_REGISTRY",
    "ModelSpec",
    "load_model_and_tokenizer",
    "model_config",
    "normalize_tokenizer",
    "resolve_model_path",
]
