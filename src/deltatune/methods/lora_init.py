"""Initialisations of the LoRA factors A (r × in) and B (out × r).

- True (default): A Kaiming-uniform, B zero, so the adapter starts as the identity change
  (Hu et al., 2021). Embeddings: A zero, B normal, as peft does.
- "gaussian": A ~ N(0, 1/r), B zero.
- False: both factors random; only useful in tests, where a zero B would hide bugs.
- "pissa" / "pissa_niter_K" (Meng et al., 2024, arXiv:2404.02948): A, B from the top-r singular
  triplets of W, and W keeps the residual, so the wrapped layer is unchanged at start.
- "olora" (Büyükakyüz, 2024, arXiv:2406.01775): A, B from a QR decomposition of W; W keeps the residual.
- "loftq" (Li et al., 2023, arXiv:2310.08659): :mod:`deltatune.methods.lora_loftq`; W becomes its quantization.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from deltatune.config import PeftConfig, PeftType, load_config
from deltatune.io import checkpoint as ckpt
from deltatune.io.config_io import save_config
from deltatune.methods.lora_loftq import loftq_init_
from deltatune.surgery.adapter import dense_weight, set_dense_weight


@torch.no_grad()
def init_factors(adapter: nn.Module, base_layer: nn.Module, how: bool | str, loftq_config=None) -> None:
    A, B = adapter.lora_A, adapter.lora_B
    embedding = isinstance(base_layer, nn.Embedding)
    if how is True:
        if embedding:
            nn.init.zeros_(A)
            nn.init.normal_(B)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)
    elif how is False:
        if embedding:
            nn.init.normal_(A)
            nn.init.normal_(B)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
    elif how == "gaussian":
        if embedding:
            nn.init.normal_(A)
            nn.init.normal_(B)
        else:
            nn.init.normal_(A, std=1 / adapter.r)
            nn.init.zeros_(B)
    elif isinstance(how, str) and how.startswith("pissa"):
        _principal_init(adapter, base_layer, how)
    elif how == "olora":
        _residual_init(adapter, base_layer, *_qr_factors(dense_weight(base_layer, torch.float32), adapter.r))
    elif how == "loftq":
        loftq_init_(adapter, base_layer, loftq_config or {})
    else:
        raise ValueError(f"init_lora_weights={how!r} is not supported")


def _qr_factors(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    Q, R = torch.linalg.qr(W)  # W (out, in) = Q R
    return R[:r].contiguous(), Q[:, :r].contiguous()  # A (r, in), B (out, r)


def _principal_init(adapter: nn.Module, base_layer: nn.Module, how: str) -> None:
    W = dense_weight(base_layer, torch.float32)  # (out, in)
    r = adapter.r
    if how == "pissa":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        niter = int(how.split("_niter_")[1])
        U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
        Vh = V.T
    # The factors carry sqrt(S / s) each, so s · B A reproduces the top-r part of W exactly.
    root = torch.sqrt(S / adapter.scaling)
    _residual_init(adapter, base_layer, root[:, None] * Vh, U * root[None, :])


def _residual_init(adapter: nn.Module, base_layer: nn.Module, A: torch.Tensor, B: torch.Tensor) -> None:
    if getattr(base_layer, "dequantize_weight", None) is not None:
        raise ValueError(
            "PiSSA/OLoRA initialisation rewrites the base weight; initialise on a full-precision model, then quantize"
        )
    adapter.lora_A.copy_(A.to(adapter.lora_A.dtype))
    adapter.lora_B.copy_(B.to(adapter.lora_B.dtype))
    W = dense_weight(base_layer, torch.float32)
    set_dense_weight(base_layer, W - adapter.scaling * (B @ A))


def mutated_to_lora(trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], config):
    """A PiSSA/OLoRA adapter as a plain LoRA on the *original* weights (peft's
    ``save_pretrained(path_initial_model_for_weight_conversion=...)``).

    Those initialisations move W to W_res = W - s·B₀A₀, so after training the model is
    W_res + s·BA = W + s·(BA - B₀A₀) = W + s·[B | -B₀][A ; A₀]: a LoRA of rank 2r on W itself.
    The scale s is kept by doubling alpha (alpha/r) or multiplying it by √2 (rsLoRA, alpha/√r).

    Args:
        trained: the adapter's tensors under peft's keys, after training.
        initial: the same adapter's tensors saved before training (same keys).
        config: its ``LoraConfig``.

    Returns:
        The converted tensors and config (``init_lora_weights=True``, ranks and alphas adjusted).

    Raises:
        ValueError: a key of ``trained`` is missing from ``initial``, or a factor's shape differs.
    """
    if config.use_dora:
        raise ValueError("converting a PiSSA/OLoRA adapter to LoRA is not defined for DoRA (use_dora=True)")
    out = {}
    for key, tensor in trained.items():
        if key not in initial:
            raise ValueError(f"the initial adapter has no {key}; was it saved from this adapter before training?")
        if ".lora_A." in key or ".lora_B." in key:
            if initial[key].shape != tensor.shape:
                raise ValueError(f"{key}: initial {tuple(initial[key].shape)} vs trained {tuple(tensor.shape)}")
            a_side = ".lora_A." in key
            parts = [tensor, initial[key].to(tensor.dtype)] if a_side else [tensor, -initial[key].to(tensor.dtype)]
            out[key] = torch.cat(parts, dim=0 if a_side else 1)
        else:
            out[key] = tensor  # biases, modules_to_save: unchanged
    alpha = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)
    converted = config.replace(
        init_lora_weights=True, r=2 * config.r, lora_alpha=alpha,
        rank_pattern={k: 2 * v for k, v in (config.rank_pattern or {}).items()},
        alpha_pattern={k: 2 * v for k, v in (config.alpha_pattern or {}).items()},
    )
    return out, converted


def mutated_to_lora_on_save(sd: dict, config: PeftConfig, initial: Path) -> tuple[dict, PeftConfig]:
    """peft's ``path_initial_model_for_weight_conversion``: ``sd`` (trained) against the adapter saved in
    ``initial`` before training, as a LoRA of twice the rank (see :func:`mutated_to_lora`)."""
    if config.peft_type != PeftType.LORA:
        raise ValueError(
            f"path_initial_model_for_weight_conversion converts LoRA adapters (PiSSA, OLoRA); this one is {config.peft_type.value}"
        )
    sd, converted = mutated_to_lora(sd, ckpt.load_weights(initial), config)
    # As peft does: the initial folder's config no longer asks for PiSSA/OLoRA, so loading it does not move W again.
    save_config(load_config(initial).replace(init_lora_weights=True), initial)
    return sd, converted
