"""Adapter weights in peft's exact on-disk format.

Every key goes through one mapping, :func:`adapter_key_map`: for adapter ``name`` it pairs each
peft key (``base_model.model.<module path>.<peft suffix>``, adapter name stripped) with the tensor it
stands for in our model. Saving reads through the map; loading checks the file against it (missing,
unexpected, wrong shape) before copying anything, so a load is all or nothing.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.io.atomic import atomic_write
from deltatune.surgery.inject import adapted_layers, save_wrappers
from deltatune.surgery.layer import AdaptedLayer

PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # peft's names for the "auto" rule


def _wants_embedding_layers(config: Any, save_embedding_layers: bool | str) -> bool:
    if save_embedding_layers != "auto":
        return bool(save_embedding_layers)
    # peft's "auto": save the embedding matrices too when an embedding layer is itself a target.
    targets = getattr(config, "target_modules", None)
    return isinstance(targets, (list, tuple)) and any(k in targets for k in EMBEDDING_LAYER_NAMES)


def adapter_key_map(
    model: nn.Module, adapter_name: str, config: Any, save_embedding_layers: bool | str = "auto"
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(peft key -> tensor, keys that are optional on load) for one adapter of ``model``.

    ``model`` is the user's model (``PeftModel.base_model.model``), whose module paths peft prefixes
    with ``base_model.model.``.
    """
    keys: dict[str, torch.Tensor] = {}
    optional: set[str] = set()
    for name, host in adapted_layers(model):
        adapter = host.adapters[adapter_name] if adapter_name in host.adapters else None
        if adapter is None:
            continue
        for suffix, tensor in adapter.peft_state_dict().items():
            keys[f"{PREFIX}{name}.{suffix}"] = tensor
    for name, wrapper in save_wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            for pname, tensor in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                keys[f"{PREFIX}{name}.{pname}"] = tensor
    extra: dict[str, torch.Tensor] = {}
    bias = getattr(config, "bias", "none")
    if bias == "lora_only":
        for name, host in adapted_layers(model):
            if adapter_name in host.adapters and isinstance(getattr(host.base_layer, "bias", None), nn.Parameter):
                extra[f"{PREFIX}{name}.base_layer.bias"] = host.base_layer.bias
    elif bias == "all":
        extra.update({f"{PREFIX}{n}": p for n, p in _base_params(model) if n.rsplit(".", 1)[-1] == "bias"})
        # peft's name filter also catches the insides of modules_to_save wrappers; write them the same way.
        for name, wrapper in save_wrappers(model):
            for pname, p in wrapper.original_module.named_parameters():
                if pname.rsplit(".", 1)[-1] == "bias":
                    extra[f"{PREFIX}{name}.original_module.{pname}"] = p
            if adapter_name in wrapper.modules_to_save:
                for pname, p in wrapper.modules_to_save[adapter_name].named_parameters():
                    if pname.rsplit(".", 1)[-1] == "bias":
                        extra[f"{PREFIX}{name}.modules_to_save.{pname}"] = p
    if _wants_embedding_layers(config, save_embedding_layers):
        extra.update(_embedding_params(model, save_embedding_layers == "auto"))
    for k, v in extra.items():
        if k not in keys:
            keys[k] = v
            optional.add(k)
    return keys, optional


def _embedding_params(model: nn.Module, only_wrapped: bool) -> dict[str, torch.Tensor]:
    """peft's rule: the input and output embedding matrices; when an embedding is itself a target
    ("auto"), only the ones that carry an adapter."""
    layers = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layer = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            layer = None
        if layer is not None and (not only_wrapped or isinstance(layer, AdaptedLayer)):
            layers.append(layer)
    names = [n for n, m in model.named_modules() if any(m is layer for layer in layers)]
    return {f"{PREFIX}{n}": p for n, p in _base_params(model) if any(n.startswith(m + ".") for m in names)}


def _base_params(model: nn.Module):
    """Parameters of the base model under peft's names, skipping adapters and modules_to_save copies."""
    inside = [f"{n}.adapters." for n, _ in adapted_layers(model)]
    inside += [f"{n}.modules_to_save." for n, _ in save_wrappers(model)]
    for n, p in model.named_parameters(remove_duplicate=False):
        if not any(n.startswith(i) for i in inside):
            yield n, p


def get_peft_model_state_dict(model: nn.Module, adapter_name: str, config: Any, save_embedding_layers="auto") -> dict:
    keys, _ = adapter_key_map(model, adapter_name, config, save_embedding_layers)
    # Tied weights share storage, which safetensors refuses; every saved tensor gets its own.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in keys.items()}


def save_weights(state_dict: dict[str, torch.Tensor], folder: str | os.PathLike, safe_serialization: bool = True) -> Path:
    folder = Path(folder)
    if safe_serialization:
        from safetensors.torch import save_file

        path = folder / WEIGHTS_NAME
        atomic_write(path, lambda tmp: save_file(state_dict, tmp, metadata={"format": "pt"}))
    else:
        path = folder / LEGACY_WEIGHTS_NAME
        atomic_write(path, lambda tmp: torch.save(state_dict, tmp))
    return path


def load_weights(folder: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    folder = Path(folder)
    st, legacy = folder / WEIGHTS_NAME, folder / LEGACY_WEIGHTS_NAME
    if st.exists():
        from safetensors.torch import load_file

        return load_file(str(st), device=str(device))
    if legacy.exists():
        # weights_only: a pickled checkpoint must never be able to run code on load.
        return torch.load(legacy, map_location=device, weights_only=True)
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {LEGACY_WEIGHTS_NAME} in {folder}")


def set_peft_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str, config: Any) -> None:
    """Copy a peft-format state dict into adapter ``adapter_name`` of ``model``, all or nothing.

    Raises:
        ValueError: listing every missing key, unexpected key and shape mismatch, by module.
    """
    expected, optional = adapter_key_map(model, adapter_name, config, save_embedding_layers=True)
    optional |= {k for k in expected if k in optional}
    problems: list[str] = []
    missing = [k for k in expected if k not in state_dict and k not in optional]
    unexpected = [k for k in state_dict if k not in expected]
    for k in missing:
        problems.append(f"missing: {k} (expected shape {tuple(expected[k].shape)})")
    for k in unexpected:
        problems.append(f"unexpected: {k} (shape {tuple(state_dict[k].shape)}), no such adapter tensor in this model")
    for k, v in state_dict.items():
        if k in expected and tuple(v.shape) != tuple(expected[k].shape):
            problems.append(
                f"shape mismatch at {k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                " (a different rank, or an adapter made for another model size?)"
            )
    if problems:
        head = f"adapter {adapter_name!r} does not fit this {type(model).__name__}; nothing was loaded:\n  "
        raise ValueError(head + "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
    with torch.no_grad():
        for k, v in state_dict.items():
            expected[k].copy_(v.to(expected[k].dtype))


def check_base_model(config: Any, model: nn.Module) -> None:
    wanted = getattr(config, "base_model_name_or_path", None)
    have = getattr(getattr(model, "config", None), "_name_or_path", None)
    if wanted and have and os.path.basename(str(wanted).rstrip("/")) != os.path.basename(str(have).rstrip("/")):
        warnings.warn(f"adapter was trained on {wanted!r} but is being loaded on {have!r}", stacklevel=3)
