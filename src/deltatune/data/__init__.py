"""Training data for ``deltatune train``: sources, formats, templates, label-masked tokenization, packing.

Typical use::

    config = DataConfig(source="bbc-news", max_length=256, packing=True)
    examples = validate_data(config)                  # before any model is loaded
    model, tok = load_model_and_tokenizer()
    data = prepare_datasets(config, tok)              # tokenized, packed, with a collator
    loader = DataLoader(data.train, batch_size=8, collate_fn=data.collator, shuffle=True)
"""
from deltatune.data.bbc import BBC_TOPICS, build_bbc_datasets
from deltatune.data.config import DataConfig
from deltatune.data.formats import detect_format, normalize
from deltatune.data.packing import Collator, block_causal_mask, pack_examples
from deltatune.data.pipeline import Examples, PreparedData, load_examples, prepare_datasets, validate_data
from deltatune.data.sources import load_source
from deltatune.data.templates import TemplateError, generation_prompt, render_segments, resolve_template
from deltatune.data.tokenize import IGNORE_INDEX, TokenizeStats, tokenize_dataset, tokenize_segments

__all__ = [
    "BBC_TOPICS",
    "Collator",
    "DataConfig",
    "Examples",
    "IGNORE_INDEX",
    "PreparedData",
    "TemplateError",
    "TokenizeStats",
    "block_causal_mask",
    "build_bbc_datasets",
    "detect_format",
    "generation_prompt",
    "load_examples",
    "load_source",
    "normalize",
    "pack_examples",
    "prepare_datasets",
    "render_segments",
    "resolve_template",
    "tokenize_dataset",
    "tokenize_segments",
    "validate_data",
]
