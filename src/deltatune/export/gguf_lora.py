"""A LoRA adapter as a GGUF LoRA file that llama.cpp loads next to its base (``--lora``, ``lora_path=``).

llama.cpp computes ``W x + s * B (A x)`` per adapted weight with ``s = adapter.lora.alpha / r_t`` where
``r_t`` is that tensor's own rank (``llama_adapter_lora_weight::get_scale``), and reads one alpha for the
whole file. peft scales by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), with per-module ranks and
alphas from ``rank_pattern``/``alpha_pattern``. llama.cpp's own ``convert_lora_to_gguf.py`` writes
``lora_alpha`` and ignores rsLoRA (logits off by up to 13 on the default job). We therefore fold each
module's true scaling into its B and write ``alpha = r`` (the config's rank): a tensor of rank ``r_t``
then gets ``B_t * scaling_t * r_t / r`` and llama.cpp multiplies by ``r / r_t``, giving exactly
``scaling_t * B_t A_t`` for every module, whatever its rank, and ``llama-cli --lora-scaled`` still scales
from 1. (Writing alpha = 0, which llama.cpp reads as "scale 1", would also work but means "unset" to
other readers.)

Layout: A is written ``(r, in)`` and B ``(out, r)``, i.e. the torch layouts, which llama.cpp checks as
``a.ne[0] == W.ne[0]`` (in) and ``b.ne[1] == W.ne[1]`` (out). B of attention Q/K gets llama.cpp's row
permutation (:mod:`deltatune.export.tensor_names`), since ``B A`` is added to permuted rows.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from deltatune.export.gguf_write import check_out_file, check_quant, encode, write_gguf
from deltatune.export.merging import NOT_MERGEABLE, base_model_for, load_adapted, read_adapter_config, source_gguf
from deltatune.export.tensor_names import arch_for, gguf_tensor_name, to_llama_cpp_layout
from deltatune.export.ollama import modelfile, write_modelfile
from deltatune.io.checkpoint import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from deltatune.io.config_io import CONFIG_NAME
from deltatune.methods.lora import LoraLinear
from deltatune.surgery.inject import adapted_layers

_WHY_NOT = {
    "IA3": "IA³ multiplies activations by learned vectors; a GGUF LoRA carries only low-rank B·A updates",
    "ADALORA": "AdaLoRA stores an SVD-form update (P, Λ, Q) with a rank mask, not the B·A pair a GGUF LoRA carries",
    "BITFIT": "BitFit trains biases, which a GGUF LoRA cannot carry",
    "PARTIAL": "partial fine-tuning stores whole weight rows, which a GGUF LoRA cannot carry",
}
ADAPTER_QUANTS = ("f32", "f16")
"""A LoRA file is small; llama.cpp multiplies it in f32 or f16, so no block quants."""


def gguf_lora_problems(raw_config: dict[str, Any], tensor_names: list[str] | None = None) -> list[str]:
    """Why this adapter cannot be written as a GGUF LoRA (empty if it can), read from its
    ``adapter_config.json`` and saved tensor names only. Each reason says what to do instead."""
    kind = str(raw_config.get("peft_type"))
    if kind in NOT_MERGEABLE:
        return [f"{kind}: {NOT_MERGEABLE[kind]}; llama.cpp has no way to run it, merged or not"]
    merged = "export it with --merged (the update folded into the weights)"
    if kind != "LORA":
        return [f"{kind}: {_WHY_NOT.get(kind, 'not a LoRA adapter')}; {merged}"]
    problems = []
    if raw_config.get("use_dora"):
        problems.append("DoRA rescales every column of the updated weight by a learned magnitude, which llama.cpp's "
                        f"W x + s·B·A x cannot express; {merged}")
    if raw_config.get("modules_to_save"):
        problems.append(f"modules_to_save {raw_config['modules_to_save']} are whole trained copies, which a GGUF LoRA "
                        f"cannot carry; {merged}")
    if raw_config.get("bias", "none") != "none":
        problems.append(f"bias={raw_config['bias']!r} trains biases, which a GGUF LoRA cannot carry; {merged}")
    names = tensor_names or []
    if any("lora_embedding_" in n for n in names):
        problems.append(f"LoRA on the token embedding is not written by deltatune's GGUF LoRA export; {merged}")
    if any(n.endswith("lora_magnitude_vector") for n in names) and not raw_config.get("use_dora"):
        problems.append(f"the weights hold DoRA magnitude vectors; {merged}")
    return problems


def _tensor_names(adapter: str | Path) -> list[str]:
    """The saved tensors' names, read from the file header only."""
    folder = Path(adapter)
    if (folder / WEIGHTS_NAME).is_file():
        from safetensors import safe_open

        with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
            return list(f.keys())
    if (folder / LEGACY_WEIGHTS_NAME).is_file():
        return list(torch.load(folder / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True, mmap=True))
    raise FileNotFoundError(f"{folder} has no {WEIGHTS_NAME}; pass the folder that save_pretrained wrote")


def lora_tensors(peft_model: Any, alpha_written: float) -> tuple[dict[str, tuple[Any, Any]], Any]:
    """``{gguf weight name: (A, B)}`` in llama.cpp's layout with every scale folded into B, and the Arch.

    Raises:
        ValueError: an unsupported architecture, or an adapted module llama.cpp has no tensor for.
    """
    model = peft_model.get_base_model()
    config = model.config
    arch = arch_for(config)
    tied = getattr(config, "tie_word_embeddings", False)
    out: dict[str, tuple[Any, Any]] = {}
    for path, host in adapted_layers(model):
        adapter = host.adapters["default"] if "default" in host.adapters else None
        if not isinstance(adapter, LoraLinear):
            raise ValueError(f"{path} carries a {type(adapter).__name__}, not a LoRA on a linear layer; export with --merged")
        if path == "lm_head" and tied:
            raise ValueError("the adapter trains lm_head, which this model ties to the token embedding; llama.cpp has "
                             "no separate output tensor to apply it to. Export with --merged.")
        name = gguf_tensor_name(path + ".weight", arch, config.num_hidden_layers)
        with torch.no_grad():
            A = adapter.lora_A.detach().float()  # (r_t, in)
            # llama.cpp scales by alpha_written / r_t; this makes the product the module's true scaling.
            B = adapter.lora_B.detach().float() * (adapter.scaling * adapter.r / alpha_written)  # (out, r_t)
            B = to_llama_cpp_layout(name, B, arch, config)
        out[name] = (A, B)
    if not out:
        raise ValueError("the adapter has no LoRA layers on this model; nothing to export")
    return out, arch


def export_gguf_lora(adapter: str | Path, out: str | Path, model: str | None = None, quant: str = "f32",
                     force: bool = False, ollama: bool = False) -> dict[str, Any]:
    """Write ``adapter`` as a GGUF LoRA file ``out`` for llama.cpp (atomically).

    Args:
        adapter: The adapter folder (a LoRA or rsLoRA, any rank/alpha pattern).
        out: The ``.gguf`` file to write.
        model: The base model (registered name, folder or .gguf); default the adapter's own. Only its
            config and shapes matter: the file holds the adapter alone.
        quant: ``f32`` (default, exact) or ``f16``.
        force: Replace an existing ``out``.
        ollama: Also write ``<out>.Modelfile`` (``FROM`` the base GGUF, ``ADAPTER`` this file).

    Returns:
        A summary: ``{"base": ..., "base_gguf": Path | None, "tensors": int, "quant": ..., "modelfile": Path | None}``.

    Raises:
        ValueError: an adapter a GGUF LoRA cannot express (the reason says to use ``--merged``), an
            adapter for another base, an unsupported architecture or quant type, an existing ``out``
            without ``force``.
    """
    out = check_out_file(out, force)
    quant = check_quant(quant, ADAPTER_QUANTS)
    config = read_adapter_config(adapter)
    problems = gguf_lora_problems(json.loads((Path(adapter) / CONFIG_NAME).read_text()), _tensor_names(adapter))
    if problems:
        raise ValueError(f"{adapter} cannot be written as a GGUF LoRA: " + "; ".join(problems))
    base = base_model_for([config], [adapter], model)
    base_gguf = source_gguf(base)
    if ollama and base_gguf is None:
        raise ValueError(f"Ollama's ADAPTER needs the base model as a GGUF file, and {base} is a transformers folder; "
                         "export with --merged (one GGUF holding both), or pass --model with the base's .gguf")
    peft_model, tokenizer = load_adapted(adapter, base)
    alpha = float(config.r)
    tensors, arch = lora_tensors(peft_model, alpha)
    text = modelfile(base_gguf, tokenizer, out) if ollama else None  # a template problem stops before writing

    def fill(writer: Any) -> None:
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", alpha)
        writer.add_name(f"{Path(adapter).resolve().name} (deltatune LoRA)")
        for name, (A, B) in tensors.items():
            for suffix, tensor in (("lora_a", A), ("lora_b", B)):
                data, qtype = encode(tensor, quant)
                writer.add_tensor(f"{name}.{suffix}", data, raw_dtype=qtype)

    write_gguf(out, arch.gguf_name, fill)
    written = write_modelfile(out, text) if text else None
    return {"base": base, "base_gguf": base_gguf, "tensors": len(tensors), "quant": quant, "modelfile": written}
