"""Adapter weights in peft's exact on-disk format.

Every key goes through one mapping, :func:`adapter_key_map`: for adapter ``name`` it pairs each
peft key (``base_model.model.<module path>.<peft suffix>``, adapter name stripped) with the tensor it
stands for in our model. Saving reads through the map; loading checks the file against it (missing,
unexpected, wrong shape, integer or non-finite values) before copying anything, so a load is all or nothing.

Saving writes the weights and ``adapter_config.json`` as one journaled step (:mod:`deltatune.atomic`), so a kill
never leaves the weights of one save next to the config of another, and removes the other format's
weights file, which would otherwise shadow (or be shadowed by) the new one.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from deltatune.atomic import atomic_write_files, finish_interrupted_save
from deltatune.io.config_io import CONFIG_NAME, config_json
from deltatune.surgery.inject import adapted_layers, save_wrappers
from deltatune.surgery.layer import AdaptedLayer

PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # peft's names for the "auto" rule


def _embedding_targeted(config: Any) -> bool:
    targets = getattr(config, "target_modules", None)
    return isinstance(targets, (list, tuple)) and any(k in targets for k in EMBEDDING_LAYER_NAMES)


def vocab_resized(model: nn.Module, config: Any) -> bool:
    """Whether ``model``'s vocabulary differs from the base model's ``config.json`` (tokens were added and
    the embeddings resized), read from the local folder in ``base_model_name_or_path``. As peft does
    offline, a base that is not a local folder counts as not resized."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    base = getattr(config, "base_model_name_or_path", None)
    file = Path(base) / "config.json" if base else None
    if not vocab or file is None or not file.is_file():
        return False
    try:
        saved = json.loads(file.read_text())
    except (OSError, ValueError):
        return False
    saved = saved.get("text_config", saved) if "vocab_size" not in saved else saved
    return isinstance(saved.get("vocab_size"), int) and saved["vocab_size"] != vocab


def _embedding_layers_to_save(model: nn.Module, config: Any, save_embedding_layers: bool | str) -> str | None:
    """None, "wrapped" (the embedding layers that carry an adapter) or "all" (both embedding matrices)."""
    if save_embedding_layers != "auto":
        return "all" if save_embedding_layers else None
    # peft's "auto": the embedding matrices too when an embedding layer is itself a target, or when the
    # vocabulary was resized (the new rows exist only in this model)
    if _embedding_targeted(config):
        return "wrapped"
    return "all" if vocab_resized(model, config) else None


def adapter_key_map(
    model: nn.Module, adapter_name: str, config: Any, save_embedding_layers: bool | str = "auto"
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(peft key -> tensor, keys that are optional on load) for one adapter of ``model``.

    ``model`` is the user's model (``PeftModel.base_model.model``), whose module paths peft prefixes
    with ``base_model.model.``.
    """
    keys: dict[str, torch.Tensor] = {}
    optional: set[str] = set()
    with_embeddings: dict[str, torch.Tensor] = {}
    for name, host in adapted_layers(model):
        adapter = host.adapters[adapter_name] if adapter_name in host.adapters else None
        if adapter is None:
            continue
        for suffix, tensor in adapter.peft_state_dict().items():
            keys[f"{PREFIX}{name}.{suffix}"] = tensor
        # peft writes some tensors only inside the embedding matrices it saves (a tied token adapter's rows)
        for suffix, tensor in getattr(adapter, "peft_embedding_state_dict", dict)().items():
            with_embeddings[f"{PREFIX}{name}.{suffix}"] = tensor
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
    embeddings = _embedding_layers_to_save(model, config, save_embedding_layers)
    if embeddings is not None:
        extra.update(_embedding_params(model, embeddings == "wrapped"))
        extra.update(with_embeddings)
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


def check_adapter_name(name: Any) -> str:
    """``name`` if it can name an adapter's subfolder: one plain path component, never a path.

    Raises:
        ValueError: an absolute name, one with a path separator, ``.``/``..``, an empty one or a NUL byte,
            which would make ``save_pretrained`` write outside its folder.
    """
    bad = not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in ("/", "\\", "\0"))
    if bad or os.path.isabs(name) or os.path.basename(name) != name:
        raise ValueError(
            f"adapter name {name!r} is not a single folder name: save_pretrained writes a non-default adapter to "
            "<save_directory>/<name>, so a name with '/' or '\\', an absolute path, '.' or '..' would write outside "
            "that folder. Use a plain name such as 'my_task'."
        )
    return name


def adapter_folder(save_directory: str | os.PathLike, name: str) -> Path:
    """Where ``save_pretrained`` writes adapter ``name``: the folder itself for ``default``, else a subfolder (peft's rule)."""
    return Path(save_directory) if name == "default" else Path(save_directory) / check_adapter_name(name)


def _weights_writer(state_dict: dict[str, torch.Tensor], safe_serialization: bool) -> tuple[str, Any, str]:
    """(file name, ``write(tmp_path)``, the other format's file name)."""
    if safe_serialization:
        from safetensors.torch import save_file

        return WEIGHTS_NAME, lambda tmp: save_file(state_dict, tmp, metadata={"format": "pt"}), LEGACY_WEIGHTS_NAME
    return LEGACY_WEIGHTS_NAME, lambda tmp: torch.save(state_dict, tmp), WEIGHTS_NAME


def save_weights(state_dict: dict[str, torch.Tensor], folder: str | os.PathLike, safe_serialization: bool = True) -> Path:
    """Write the weights file alone (with its config: :func:`save_adapter`); the other format's file goes."""
    name, write, other = _weights_writer(state_dict, safe_serialization)
    atomic_write_files(folder, {name: write}, remove=[other])
    return Path(folder) / name


def save_adapter(state_dict: dict[str, torch.Tensor], config: Any, folder: str | os.PathLike, safe_serialization: bool = True,
                 auto_mapping: dict[str, str] | None = None) -> Path:
    """Write an adapter's weights and ``adapter_config.json`` as one step (see the module docstring).
    ``auto_mapping`` goes into the config file as peft writes it (the base model's class, for ``AutoPeftModel``)."""
    name, write, other = _weights_writer(state_dict, safe_serialization)
    text = config_json(config, auto_mapping)

    def write_config(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write_files(folder, {name: write, CONFIG_NAME: write_config}, remove=[other])
    return Path(folder)


def weights_file(folder: str | os.PathLike) -> Path:
    """The weights file a load reads: safetensors first, else the legacy ``.bin``."""
    folder = Path(folder)
    st = folder / WEIGHTS_NAME
    return st if st.exists() or not (folder / LEGACY_WEIGHTS_NAME).exists() else folder / LEGACY_WEIGHTS_NAME


@contextlib.contextmanager
def reading_weights(file: Path) -> Iterator[None]:
    """Turn the errors of reading a weights file (safetensors' ``SafetensorError``, ``torch.load``'s
    unpickling and zip errors) into ValueErrors that name the file and say what to do."""
    import pickle

    try:
        yield
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{file} was refused: it is a pickle that holds objects other than tensors, and unpickling those can run "
            "arbitrary code, so deltatune reads .bin files with torch.load(weights_only=True) only and never "
            "otherwise. If you trust where it came from, convert it to adapter_model.safetensors with peft or "
            f"torch in a separate process; otherwise delete it. (torch said: {str(err).splitlines()[0]})"
        ) from None
    except (ValueError, FileNotFoundError, PermissionError, MemoryError):
        raise
    except Exception as err:  # SafetensorError, RuntimeError from a damaged zip, EOFError, OSError
        kind = "safetensors" if file.suffix == ".safetensors" else "PyTorch checkpoint"
        raise ValueError(
            f"{file} cannot be read as a {kind} file ({type(err).__name__}: {err}); it is truncated or damaged. "
            "Save or copy the adapter again."
        ) from None


def load_weights(folder: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read an adapter folder's weights, refusing non-finite values.

    Raises:
        FileNotFoundError: no weights file.
        ValueError: a tensor holds NaN or inf (naming the file and the tensors).
    """
    folder = Path(folder)
    finish_interrupted_save(folder)
    file = weights_file(folder)
    if not file.exists():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} or {LEGACY_WEIGHTS_NAME} in {folder}")
    with reading_weights(file):
        if file.name == WEIGHTS_NAME:
            from safetensors.torch import load_file

            sd = load_file(str(file), device=str(device))
        else:
            # weights_only: a pickled checkpoint must never be able to run code on load.
            sd = torch.load(file, map_location=device, weights_only=True)
    bad = _non_finite(sd)
    if bad:
        raise ValueError(f"{file}: " + "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more tensors" if len(bad) > 5 else "") + _NON_FINITE_FIX)
    return sd


_NON_FINITE_FIX = (
    ". An adapter with NaN or inf gives NaN outputs: training diverged, or the file is damaged. "
    "Use an earlier checkpoint, or retrain with a lower learning rate."
)


def _non_finite(sd: dict[str, torch.Tensor]) -> list[str]:
    """``"non-finite values at KEY: N of M"`` for each floating-point tensor holding NaN or inf."""
    out = []
    for k, v in sd.items():
        if v.is_floating_point() and not v.is_meta:  # meta: shapes only (inspect's dry-run load)
            n = int((~torch.isfinite(v)).sum())
            if n:
                out.append(f"non-finite values (NaN or inf) at {k}: {n} of {v.numel()}")
    return out


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
        if k in expected and expected[k].is_floating_point() and not v.is_floating_point():
            # Casting would load e.g. int8 codes as weights 100x too large; there are no scales to dequantise with.
            problems.append(
                f"dtype at {k}: checkpoint {v.dtype} vs model {expected[k].dtype}; adapter weights must be floating "
                "point (an integer tensor is a quantized or damaged export): save the adapter again in float32/bf16/fp16"
            )
    problems += _non_finite({k: v for k, v in state_dict.items() if k in expected})
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
