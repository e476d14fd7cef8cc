"""LoftQ initialisation of LoRA for a quantized base (Li et al., 2023, arXiv:2310.08659).

QLoRA starts from Q(W) + s·B·A with B = 0, so the model starts at Q(W), off from W by the whole
quantization error. LoftQ picks Q and the factors together, alternating T times (Algorithm 1):

    Q_t = q(W - L_{t-1} R_{t-1})            quantize what the low-rank part does not cover (L_0 R_0 = 0)
    L_t R_t = SVD_r(W - Q_t)                the best rank-r fit of what the quantization missed

and the adapter starts at s·B·A = L_T R_T, so Q_T + s·B·A is closer to W than Q(W) is.

Two ways in, as in peft:

- ``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits, loftq_iter))`` on a
  full-precision model (:func:`loftq_init_`, called by ``init_factors``): peft's semantics. The base
  weight is *replaced by the dequantized* Q_T (still a dense layer, in its dtype) and A, B are set. The
  user then quantizes the base with the same quantizer, or saves it and loads it 4-bit. q is
  bitsandbytes' as peft calls it: NF4 in blocks of 64 without double quantization (``Params4bit(...,
  compress_statistics=False)``), or row-wise int8 for 8 bits; deltatune's quantizers give the same codes.
- On a model whose base layers are already deltatune 4-bit/8-bit layers (QLoRA),
  :func:`replace_lora_weights_loftq` (peft's name): given the full-precision weights, each layer is
  its own quantizer (``requantize_`` / ``dequantize_weight``), so the adapter is fitted against exactly
  the quantization the layer computes with (its blocksize, quant type, double quantization), and the
  layer ends up holding Q_T. ``deltatune train`` with ``method.name=qlora`` and
  ``method.init_lora_weights=loftq`` does this.

One deliberate difference from peft 0.21.2: peft sets A = R, B = L whatever the scaling s, so its
initial model is Q + s·L·R, LoftQ's only when ``lora_alpha == r`` (peft issue #1982). Here the factors
carry 1/sqrt(s) each, so Q + s·B·A = Q + L·R for any alpha; with s = 1 both are the same.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from deltatune.lora_options import LoftQConfig, as_loftq_dict
from deltatune.quant import dequantize, dequantize_int8, quantize_4bit, quantize_int8, quantized_linear_types
from deltatune.surgery.adapter import dense_weight, set_dense_weight
from deltatune.surgery.inject import adapted_layers

Roundtrip = Callable[[torch.Tensor], torch.Tensor]
"""X (out, in) -> dequantize(quantize(X)), in float32."""

__all__ = ["LoftQConfig", "loftq_decompose", "loftq_init_", "peft_roundtrip", "replace_lora_weights_loftq"]


# ---- functional core -------------------------------------------------------------------------------
def peft_roundtrip(bits: int) -> Roundtrip:
    """The quantize-dequantize peft's LoftQ uses: NF4, blocks of 64, no double quantization; or int8 rows."""
    if bits == 4:
        return lambda X: dequantize(quantize_4bit(X, "nf4", 64, double_quant=False), torch.float32)
    if bits == 8:
        return lambda X: dequantize_int8(quantize_int8(X), torch.float32)
    raise ValueError(f"LoftQ quantizes to 4 or 8 bits, got loftq_bits={bits!r}")


def low_rank(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with L R the best rank-r approximation of ``residual`` (out, in), each side carrying sqrt(S)."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    root = S[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r]  # L (out, r), R (r, in)


@torch.no_grad()
def loftq_decompose(
    W: torch.Tensor, r: int, num_iter: int, roundtrip: Roundtrip
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ's alternating steps on one weight (see the module docstring).

    Args:
        W: the full-precision weight (out, in).
        r: the rank of the low-rank part.
        num_iter: T, the number of alternating steps (>= 1).
        roundtrip: quantize-then-dequantize; called once per step. A layer's own quantizer may be
            passed (it then holds the last quantization, Q_T's, on return).

    Returns:
        (Q, L, R): Q = roundtrip(W - L_{T-1} R_{T-1}) in float32 (out, in); L (out, r), R (r, in) with
        L R = SVD_r(W - Q).
    """
    if num_iter < 1:
        raise ValueError(f"loftq_iter must be >= 1, got {num_iter}")
    W = W.float()
    target = W
    for step in range(num_iter):
        Q = roundtrip(target)
        L, R = low_rank(W - Q, r)
        if step + 1 < num_iter:
            target = W - L @ R  # the next quantization covers what the low-rank part leaves
    return Q, L, R


def _set_factors(adapter: nn.Module, L: torch.Tensor, R: torch.Tensor) -> None:
    # s·B·A = L·R whatever s: each factor takes 1/sqrt(s) (peft takes none, see the module docstring)
    root = math.sqrt(adapter.scaling)
    adapter.lora_A.copy_((R / root).to(adapter.lora_A.dtype))
    adapter.lora_B.copy_((L / root).to(adapter.lora_B.dtype))


def _read_weights(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if isinstance(source, Mapping):
        return source
    from safetensors.torch import load_file  # a dependency of transformers; only this path needs it

    path = Path(source)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"replace_lora_weights_loftq: no safetensors file at {file} (sharded checkpoints: pass a dict)")
    return load_file(file)


# ---- the two ways in -------------------------------------------------------------------------------
@torch.no_grad()
def loftq_init_(adapter: nn.Module, base_layer: nn.Module, loftq_config: Mapping[str, int]) -> None:
    """``init_lora_weights="loftq"`` on a full-precision layer: set A and B, and replace the base
    weight by the dequantized Q (peft's semantics).

    Raises:
        ValueError: the base layer is quantized already (its full-precision weight is gone), or an embedding.
    """
    if isinstance(base_layer, quantized_linear_types()):
        raise ValueError(
            "init_lora_weights='loftq' needs the full-precision weight, but this layer is quantized already. Either "
            "initialise on the full-precision model (the base weight becomes LoftQ's dequantized Q; quantize it "
            "afterwards), or wrap the quantized model with init_lora_weights=True and call "
            "deltatune.replace_lora_weights_loftq(model, full_precision_weights)"
        )
    if isinstance(base_layer, nn.Embedding):
        raise ValueError("init_lora_weights='loftq' applies to linear layers; exclude the embedding from target_modules")
    cfg = LoftQConfig(**as_loftq_dict(loftq_config))
    Q, L, R = loftq_decompose(dense_weight(base_layer, torch.float32), adapter.r, cfg.loftq_iter, peft_roundtrip(cfg.loftq_bits))
    _set_factors(adapter, L, R)
    set_dense_weight(base_layer, Q)


@torch.no_grad()
def replace_lora_weights_loftq(
    model: nn.Module, model_path: str | os.PathLike | Mapping[str, torch.Tensor], adapter_name: str = "default",
    callback: None = None, *, loftq_iter: int = 1,
) -> list[str]:
    """LoftQ for LoRA on deltatune's 4-bit/8-bit layers (peft's ``replace_lora_weights_loftq``, which
    reads the weights from a safetensors file and does one step; here also from a dict, any steps).

    Each quantized layer wrapped by ``adapter_name`` is requantized from its full-precision weight
    through LoftQ's steps with its own quantizer, and the adapter's A and B are set, so Q + s·B·A is
    LoftQ's approximation of W for exactly the quantization the layer computes with.

    Args:
        model: a PeftModel (or any module holding wrapped layers).
        model_path: the full-precision weights: a ``model.safetensors`` file or the folder holding it, or a dict
            by module name as in the base model (``"model.layers.0.self_attn.q_proj"``), with or without the
            ``.weight`` suffix, shaped (out, in) as ``nn.Linear`` stores them.
        adapter_name: the LoRA adapter to initialise.
        callback: peft's per-layer accept/roll-back hook; not supported (must be None).
        loftq_iter: LoftQ's alternating steps (peft's function does 1).

    Returns:
        The names of the layers initialised.

    Raises:
        ValueError: no quantized layer carries ``adapter_name``, a weight is missing, or its shape differs.
    """
    if callback is not None:
        raise ValueError("replace_lora_weights_loftq(callback=...) is not supported by deltatune; compare the logits yourself")
    weights = _read_weights(model_path)
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    done = []
    for name, host in adapted_layers(root):
        base = host.base_layer
        if adapter_name not in host.adapters or not isinstance(base, quantized_linear_types()):
            continue
        W = weights.get(name + ".weight", weights.get(name))
        if W is None:
            raise ValueError(f"replace_lora_weights_loftq: no full-precision weight for {name} (keys are module names)")
        if tuple(W.shape) != (base.out_features, base.in_features):
            raise ValueError(f"{name}: weight {tuple(W.shape)} does not fit the layer ({base.out_features}, {base.in_features})")
        adapter = host.adapters[adapter_name]

        def roundtrip(X: torch.Tensor, base=base) -> torch.Tensor:
            base.requantize_(X)  # the layer quantizes; it keeps the last one, Q_T
            return base.dequantize_weight(torch.float32)

        _, L, R = loftq_decompose(W.to(base.qweight.device), adapter.r, loftq_iter, roundtrip)
        _set_factors(adapter, L, R)
        done.append(name)
    if not done:
        raise ValueError(
            f"replace_lora_weights_loftq: no 4-bit/8-bit layer carries the LoRA adapter {adapter_name!r}; quantize the "
            "base (deltatune.quant.quantize_model) before wrapping it, or use init_lora_weights='loftq' on a dense model"
        )
    return done
