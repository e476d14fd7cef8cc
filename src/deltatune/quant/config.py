"""QuantConfig: how to quantize the Linear layers of a model."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from deltatune.quant.codebooks import QUANT_TYPES
from deltatune.quant.nf4 import BLOCKSIZES

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Output heads of common architectures. Embeddings and norms need no entry: only nn.Linear
# modules are ever quantized.
DEFAULT_SKIP = ("lm_head", "embed_out", "score", "classifier", "qa_outputs")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Which Linear layers to quantize, and how. Validated when constructed."""

    bits: int = 4
    """4 (blockwise NF4/FP4, QLoRA) or 8 (row-wise absmax int8, LLM.int8() weights)."""

    quant_type: str = "nf4"
    """4-bit level set: ``"nf4"`` (NormalFloat, for normally distributed weights) or ``"fp4"``.
    Ignored when ``bits == 8``."""

    blocksize: int = 64
    """Values sharing one absmax scale (4-bit only); one of 32, 64, ..., 4096, as bitsandbytes."""

    double_quant: bool = True
    """Quantize the per-block absmax to 8 bits in blocks of 256 (QLoRA double quantization);
    4.127 instead of 4.5 bits per parameter at blocksize 64. 4-bit only."""

    compute_dtype: str = "float32"
    """dtype of the matmul: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (a ``torch.dtype`` is
    accepted and stored by name). Inputs are cast to it and outputs cast back."""

    skip_modules: tuple[str, ...] = DEFAULT_SKIP
    """Linear layers kept in full precision: a module whose qualified name equals an entry or
    ends with ``"." + entry``. The default keeps output heads (``lm_head``...) dense."""

    compile: bool = False
    """Run the 4-bit dequantize kernel through ``torch.compile`` (needs a C++ compiler on CPU; the
    first call per tile shape compiles, ~10-20 s). Same values as the eager kernel. On CPU it was
    not faster, and since compiled code is not thread-safe its tiles run on one thread
    (see benchmarks/bench_quant.py); meant for experiments on other devices."""

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"QuantConfig.bits must be 4 or 8, got {self.bits!r}")
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"QuantConfig.quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"QuantConfig.blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"QuantConfig.double_quant must be a bool, got {self.double_quant!r}")
        name = str(self.compute_dtype).removeprefix("torch.")
        if name not in _DTYPES:
            raise ValueError(
                f"QuantConfig.compute_dtype must be one of {sorted(_DTYPES)} (or the torch dtype), "
                f"got {self.compute_dtype!r}"
            )
        object.__setattr__(self, "compute_dtype", name)
        skip = (self.skip_modules,) if isinstance(self.skip_modules, str) else tuple(self.skip_modules)
        bad = [s for s in skip if not isinstance(s, str) or not s or s.startswith(".")]
        if bad:
            raise ValueError(f"QuantConfig.skip_modules must be non-empty module-name suffixes, got {bad!r}")
        object.__setattr__(self, "skip_modules", skip)

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        """``compute_dtype`` as a ``torch.dtype``."""
        return _DTYPES[self.compute_dtype]

    def skips(self, name: str) -> bool:
        """Whether the module called ``name`` (fully qualified) stays in full precision."""
        return any(name == s or name.endswith("." + s) for s in self.skip_modules)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``skip_modules`` as a list)."""
        d = dataclasses.asdict(self)
        d["skip_modules"] = list(self.skip_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        """Inverse of :meth:`to_dict`. Unknown keys (from a newer deltatune) are dropped with a warning."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            warnings.warn(f"ignoring unknown QuantConfig keys {unknown} (written by a newer deltatune?)", stacklevel=2)
        return cls(**{k: v for k, v in d.items() if k in known})
