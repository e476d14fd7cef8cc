"""An adapter merged into its base and written as one complete GGUF model for llama.cpp / Ollama.

Metadata: the architecture's hyperparameters are written from the transformers config (for a GGUF
base that config was read from the same file, so the values are the base's own); when the base came
from a GGUF file (a registered model or a user's ``.gguf``) every other key is copied from it as it
is: tokenizer, chat template, special tokens, rope settings, names. A base that is a transformers
folder gets tokenizer metadata built from its ``tokenizer.json`` (byte-level BPE only).

Supported architectures: the LLaMA family as transformers names it, ``llama``, ``mistral`` and
``qwen2`` (:data:`deltatune.export.tensor_names.ARCHITECTURES`); anything else is refused.

Quantization: the merge runs in float32 and each matrix is then written as ``quant`` (default q8_0);
norms stay float32. 4- and 5-bit types are refused unless ``allow_lossy`` (see
:data:`deltatune.export.gguf_write.LOSSY_QUANTS` for the measurement).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deltatune.export.gguf_write import check_out_file, check_quant, copy_metadata, encode, file_type, write_gguf
from deltatune.export.merging import NOT_MERGEABLE, base_model_for, merged_model, read_adapter_config, source_gguf
from deltatune.export.ollama import modelfile, write_modelfile
from deltatune.export.tensor_names import Arch, arch_for, gguf_tensor_name, to_llama_cpp_layout
from deltatune.export.tokenizer_meta import add_tokenizer_metadata

# Keys that describe the file rather than the model: rewritten for the new tensors, never copied.
_FILE_KEYS = ("general.file_type", "general.quantization_version", "general.architecture")


def _rope_theta(config: Any) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def _rope_scaling(config: Any) -> str | None:
    scaling = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return None if kind in (None, "default") else str(kind)


def add_hparams(writer: Any, config: Any, arch: Arch) -> None:
    """The llama.cpp hyperparameter keys (``llama.block_count``, ...) of a LLaMA-family config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)


def model_tensors(model: Any, arch: Arch) -> dict[str, torch.Tensor]:
    """``{gguf name: tensor}`` of a float LLaMA-family causal LM, in llama.cpp's layout. A tied
    ``lm_head`` is left out: llama.cpp reuses ``token_embd`` when ``output.weight`` is absent."""
    config = model.config
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight)
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        gguf_name = gguf_tensor_name(name, arch, config.num_hidden_layers)
        out[gguf_name] = to_llama_cpp_layout(gguf_name, tensor.detach().float(), arch, config)
    return out


def write_model_gguf(model: Any, tokenizer: Any, out: str | Path, quant: str = "q8_0",
                     base_gguf: Path | None = None) -> None:
    """Write a float causal LM as a GGUF model file (atomically).

    Args:
        model: A transformers LLaMA/Mistral/Qwen2 causal LM (float weights, no adapter layers).
        tokenizer: Its tokenizer; used only when ``base_gguf`` is None.
        out: The ``.gguf`` file.
        quant: One of :data:`deltatune.export.gguf_write.QUANT_TYPES` (checked by the caller).
        base_gguf: The GGUF file the model's base came from; every metadata key that is not a
            hyperparameter or a file property is copied from it.

    Raises:
        ValueError: an unsupported architecture or a tokenizer llama.cpp cannot be told about.
    """
    config = model.config
    arch = arch_for(config)
    if base_gguf is None and _rope_scaling(config):
        raise ValueError(f"rope scaling {_rope_scaling(config)!r} is not written by deltatune's GGUF export; convert "
                         "the `deltatune export` folder with llama.cpp's convert_hf_to_gguf.py instead")
    tensors = model_tensors(model, arch)

    def fill(writer: Any) -> None:
        add_hparams(writer, config, arch)
        writer.add_file_type(file_type(quant))
        if quant not in ("f32", "f16", "bf16"):
            writer.add_quantization_version(2)  # GGML_QNT_VERSION of the block layouts gguf.quants writes
        written = set(writer.kv_data[0]) | set(_FILE_KEYS)
        if base_gguf is not None:
            import gguf

            copy_metadata(gguf.GGUFReader(str(base_gguf)), writer, lambda key: key in written)
        else:
            writer.add_name(str(getattr(config, "_name_or_path", "") or "model").rstrip("/").split("/")[-1])
            add_tokenizer_metadata(writer, tokenizer)
        for name, tensor in tensors.items():
            data, qtype = encode(tensor, quant)
            writer.add_tensor(name, data, raw_dtype=qtype)

    write_gguf(Path(out), arch.gguf_name, fill)


def export_gguf_merged(adapter: str | Path, out: str | Path, model: str | None = None, quant: str = "q8_0",
                       force: bool = False, allow_lossy: bool = False, ollama: bool = False) -> dict[str, Any]:
    """Merge ``adapter`` into its base and write the result as a GGUF model ``out`` (atomically).

    Args:
        adapter: The adapter folder (any mergeable method: LoRA, rsLoRA, DoRA, IA³, ...).
        out: The ``.gguf`` file to write.
        model: The base model (registered name, folder or .gguf); default the adapter's own.
        quant: f32, f16, bf16, q8_0 (default); q5_1, q5_0, q4_1, q4_0 only with ``allow_lossy``.
        force: Replace an existing ``out``.
        allow_lossy: Allow 4/5-bit re-quantization of the merged weights.
        ollama: Also write ``<out>.Modelfile`` (``FROM`` this file).

    Returns:
        A summary: ``{"base": ..., "base_gguf": Path | None, "method": ..., "quant": ..., "untied": bool,
        "modelfile": Path | None}``.

    Raises:
        ValueError: an adapter that cannot be merged, an adapter for another base, an unsupported
            architecture, a quant type that cannot (or should not) be written, an existing ``out``
            without ``force``.
    """
    out = check_out_file(out, force)
    quant = check_quant(quant, allow_lossy=allow_lossy)
    config = read_adapter_config(adapter)
    kind = config.peft_type.value
    if kind in NOT_MERGEABLE:
        raise ValueError(f"{adapter} is a {kind} adapter and cannot be merged into the weights: {NOT_MERGEABLE[kind]}")
    base = base_model_for([config], [adapter], model)
    merged, tokenizer, untied = merged_model(adapter, base)
    arch_for(merged.config)  # an unsupported architecture is refused before anything is written
    text = modelfile(out, tokenizer) if ollama else None
    base_gguf = source_gguf(base)
    write_model_gguf(merged, tokenizer, out, quant, base_gguf)
    written = write_modelfile(out, text) if text else None
    return {"base": base, "base_gguf": base_gguf, "method": kind, "quant": quant, "untied": untied, "modelfile": written}
