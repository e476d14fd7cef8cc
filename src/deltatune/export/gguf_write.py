"""What every GGUF export shares: quant types, tensor encoding, metadata copying and the atomic write.

The ``gguf`` package (imported inside functions) writes float types and the legacy block quants
Q4_0..Q8_0 in numpy. It can read but not write K-quants (Q4_K_M, ...) and i-quants: those need
llama.cpp's ``llama-quantize``, so asking for one is an error that says how to get it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from deltatune.atomic import atomic_write

FLOAT_TYPES = ("f32", "f16", "bf16")
BLOCK_QUANTS = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
QUANT_TYPES = FLOAT_TYPES + BLOCK_QUANTS
"""Every ``--quant`` deltatune writes itself."""
LOSSY_QUANTS = ("q5_1", "q5_0", "q4_1", "q4_0")
"""Below 8 bits: measured on the default job, re-quantizing merged weights to Q4_1 dropped BBC accuracy
from 93.5% to 65% (the fine-tune's small weight changes fall inside one 4-bit step). Written only
when asked for explicitly (``allow_lossy``)."""
_LLAMA_QUANTIZE_TYPES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
                         "iq2_xxs", "iq2_xs", "iq3_xxs", "iq3_s", "iq4_nl", "iq4_xs", "tq1_0", "tq2_0")


def check_quant(quant: str, allowed: tuple[str, ...] = QUANT_TYPES, allow_lossy: bool = False) -> str:
    """``quant`` lower-cased, or a ValueError saying what can be written and how to get the rest."""
    q = quant.lower()
    if q in _LLAMA_QUANTIZE_TYPES:
        raise ValueError(
            f"--quant {quant}: the gguf package cannot write K-quants or i-quants. Export --quant f16 (or q8_0), then "
            f"quantize with llama.cpp: llama-quantize model-f16.gguf model-{q}.gguf {q.upper()}")
    if q not in allowed:
        raise ValueError(f"--quant {quant!r}: expected one of {', '.join(allowed)}")
    if q in LOSSY_QUANTS and not allow_lossy:
        raise ValueError(
            f"--quant {quant}: re-quantizing merged weights to {q.upper()} erases most of a fine-tune (measured on the "
            "default job: 93.5% -> 65% accuracy; q8_0 and f16 keep 93.5%). Use --quant q8_0 (the default) or f16, "
            "export the LoRA adapter on the 4-bit base instead (no --merged), or pass --allow-lossy to write it anyway.")
    return q


def encode(tensor: torch.Tensor, quant: str) -> tuple[np.ndarray, Any]:
    """``tensor`` as the numpy array and GGML type to hand to ``GGUFWriter.add_tensor``.

    Vectors (norms, biases) stay float32 and a matrix whose rows are not a whole number of quant blocks
    falls back to f16, as llama.cpp's own converter does.
    """
    import gguf

    T = gguf.GGMLQuantizationType
    data = tensor.detach().to(torch.float32).contiguous().numpy()
    if data.ndim < 2 or quant == "f32":
        return data, T.F32
    if quant == "f16":
        return data.astype(np.float16), T.F16
    qtype = T.BF16 if quant == "bf16" else T[quant.upper()]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        return data.astype(np.float16), T.F16
    return gguf.quants.quantize(data, qtype), qtype


def file_type(quant: str) -> int:
    """``general.file_type`` (llama.cpp's ``LLAMA_FTYPE``) for a whole file written as ``quant``."""
    import gguf

    names = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}
    return int(gguf.LlamaFileType[names.get(quant, "MOSTLY_" + quant.upper())])


def copy_metadata(reader: Any, writer: Any, skip: Callable[[str], bool]) -> list[str]:
    """Copy every key-value field of ``reader`` (a GGUFReader) into ``writer`` except those ``skip``
    accepts and the file header (``GGUF.*``); returns the copied keys."""
    import gguf

    copied = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or skip(key):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
        copied.append(key)
    return copied


def check_out_file(out: str | Path, force: bool) -> Path:
    """Refuse an existing ``out`` unless ``force``, before any slow work."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; a GGUF export writes one file, e.g. --out {out / 'model.gguf'}")
    if out.exists() and not force:
        raise ValueError(f"{out} exists; pass --force to replace it")
    if out.suffix.lower() != ".gguf":
        raise ValueError(f"--out {out}: expected a file name ending in .gguf")
    return out


def write_gguf(out: Path, arch_name: str, fill: Callable[[Any], None]) -> None:
    """Write a GGUF file atomically: ``fill(writer)`` adds keys and tensors, then the file is written to a
    temporary name next to ``out`` and renamed, so a failure at any point leaves no partial file."""
    import gguf

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch_name)
        try:
            fill(writer)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    atomic_write(out, write)
