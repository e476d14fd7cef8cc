"""Loading a causal LM straight into quantized form, and saving/loading quantized models.

:func:`load_quantized` never holds the full-precision model: it builds the model with its
parameters on the meta device, swaps the target Linear layers for empty quantized ones, then reads
the safetensors shards one tensor at a time, quantizing each Linear weight as it arrives. Peak
memory is the quantized model plus one full-precision tensor (and a few MB of temporaries).

On-disk format written by :func:`save_quantized` (a folder):

* ``config.json``: the transformers model config (``model.config.save_pretrained``);
* ``model.safetensors``: the model's state dict; quantized layers contribute the keys documented
  in :mod:`deltatune.quant.linear` (``qweight``, ``absmax``, ``nested_absmax``, ``nested_offset``
  for 4-bit; ``qweight``, ``row_absmax`` for 8-bit); everything else is stored as is. Tied
  weights are stored once (the embeddings) and re-tied on load;
* ``deltatune_quant.json``: ``{"format_version": 1, "modules": {name: settings}}`` with, per
  quantized layer, ``bits``, ``quant_type``, ``blocksize``, ``double_quant``, ``compute_dtype``.
  It is written last, so its presence marks a complete save.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from deltatune.quant.config import QuantConfig
from deltatune.quant.linear import Linear4bit, Linear8bit, quantized_layers
from deltatune.quant.model import plan_quantization, replace_module

QUANT_FILE = "deltatune_quant.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FORMAT_VERSION = 1
_STORAGE_FIELDS = ("bits", "quant_type", "blocksize", "double_quant")


def layer_settings(layer: Linear4bit | Linear8bit) -> dict:
    """The settings recorded for a quantized layer in ``deltatune_quant.json``."""
    out = {"bits": 4 if isinstance(layer, Linear4bit) else 8,
           "compute_dtype": str(layer.compute_dtype).removeprefix("torch.")}
    if isinstance(layer, Linear4bit):
        out.update(quant_type=layer.quant_type, blocksize=layer.blocksize, double_quant=layer.double_quant)
    return out


def _empty_layer(linear: nn.Module, settings: dict, compile: bool, device) -> Linear4bit | Linear8bit:
    dtype = getattr(torch, settings.get("compute_dtype", "float32"))
    if settings["bits"] == 4:
        return Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                          quant_type=settings["quant_type"], blocksize=settings["blocksize"],
                          double_quant=settings["double_quant"], compute_dtype=dtype, use_compile=compile, device=device)
    return Linear8bit(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype=dtype,
                      device=device)


def shard_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (sharded or not)."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / f for f in sorted(set(weight_map.values()))]
    if (folder / WEIGHTS_FILE).is_file():
        return [folder / WEIGHTS_FILE]
    raise FileNotFoundError(
        f"no {WEIGHTS_FILE} or {INDEX_FILE} in {folder}; save the model with "
        "save_pretrained(folder, safe_serialization=True) (only safetensors checkpoints can be streamed)"
    )


def _empty_model(folder: Path, **kw) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(folder, **kw)
    # Parameters go to the meta device (no memory); buffers such as rotary tables stay real,
    # since checkpoints do not contain them.
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(hf_config)


def _resolve(key: str, slots: dict, prefix: str) -> str | None:
    # A checkpoint of the bare base model lacks the "model." prefix of the CausalLM; and vice versa.
    for cand in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")):
        if cand in slots:
            return cand
    return None


def _put(model: nn.Module, name: str, tensor: torch.Tensor, dtype, device) -> None:
    """Store a checkpoint tensor as parameter or buffer ``name`` of ``model``."""
    mod_name, _, attr = name.rpartition(".")
    module = model.get_submodule(mod_name)
    if isinstance(module, (Linear4bit, Linear8bit)) and attr in module._QUANT_BUFFERS:
        buf = getattr(module, attr)
        if buf.dtype != tensor.dtype or buf.shape != tensor.shape:
            raise ValueError(f"{name}: checkpoint has {tensor.dtype} {tuple(tensor.shape)}, the layer expects "
                             f"{buf.dtype} {tuple(buf.shape)}; the folder's {QUANT_FILE} does not match its weights")
        buf.copy_(tensor)
        return
    # copy=True: safetensors' tensors view its memory map of the file. Kept as they are, the norms and
    # embeddings held the whole map alive (SmolLM2: 538 MB of file pages in RSS after a 4-bit load) and the
    # model changed when the checkpoint was rewritten in place.
    cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    tensor = tensor.to(device=device, dtype=cast, copy=True)
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = tensor


@torch.no_grad()
def _stream(model: nn.Module, files: list[Path], fresh: dict[str, nn.Module], dtype, device) -> None:
    """Fill ``model`` from ``files``, one tensor at a time; ``fresh`` layers quantize their ``weight``."""
    from safetensors import safe_open

    slots = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    slots |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    slots |= {f"{n}.weight" for n in fresh}
    prefix = getattr(model, "base_model_prefix", "model")
    unexpected = []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        for key in keys:
            name = _resolve(key, slots, prefix)
            if name is None:
                unexpected.append(key)
                continue
            # One open per tensor: safetensors maps the whole file, and every page read through a map stays
            # in this process's RSS until the map closes. Reading all tensors through one map added the
            # file's size to the load's peak RSS (SmolLM2: ~540 MB for a 4-bit model of ~160 MB).
            with safe_open(str(path), framework="pt") as f:
                tensor = f.get_tensor(key)  # the only full-precision tensor alive at this point
            mod_name, _, attr = name.rpartition(".")
            if mod_name in fresh and attr == "weight":
                fresh[mod_name].requantize_(tensor)
            else:
                _put(model, name, tensor, dtype, device)
            del tensor
    if unexpected:
        warnings.warn(f"ignored {len(unexpected)} checkpoint tensors the model has no place for: {unexpected[:10]}",
                      stacklevel=3)


def _finish(model: nn.Module, folder: Path) -> nn.Module:
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if (folder / "generation_config.json").is_file() and getattr(model, "generation_config", None) is not None:
        # as from_pretrained does: the checkpoint's stop tokens and sampling defaults, not ones derived
        # from config.json (Llama 3 Instruct, say, stops on a second eos id that only this file names)
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise ValueError(f"checkpoint {folder} has no values for {missing[:10]} ({len(missing)} tensors); "
                         "is it the checkpoint of this architecture?")
    return model.eval()


def _read_quant_file(folder: Path) -> dict:
    meta = json.loads((folder / QUANT_FILE).read_text())
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{folder / QUANT_FILE} has format_version {version!r}; this deltatune reads "
                         f"{FORMAT_VERSION}. Upgrade deltatune to load it.")
    return meta["modules"]


def _check_against(saved: dict[str, dict], config: QuantConfig, folder: Path) -> None:
    want = {f: getattr(config, f) for f in _STORAGE_FIELDS}
    for name, s in saved.items():
        fields = _STORAGE_FIELDS if s["bits"] == 4 else ("bits",)
        diff = {f: (s.get(f), want[f]) for f in fields if s.get(f) != want[f]}
        if diff:
            raise ValueError(f"{folder} was saved quantized differently from the given config ({name}: "
                             f"saved vs given {diff}); pass config=None to load it as saved")


def load_quantized(model_name_or_path: str | os.PathLike, config: QuantConfig | None = None, *,
                   dtype: torch.dtype | None = None, device: str | torch.device = "cpu", **kw) -> nn.Module:
    """Load a transformers causal LM from a local folder with its Linear layers quantized.

    Works on a full-precision safetensors checkpoint (``save_pretrained(safe_serialization=True)``,
    sharded or not), quantizing layer by layer while streaming, and on a folder written by
    :func:`save_quantized` (recognised by its ``deltatune_quant.json``), whose codes are loaded as is.

    Args:
        model_name_or_path: local folder (nothing is downloaded).
        config: quantization settings; default ``QuantConfig()`` for a full-precision checkpoint and
            the saved settings for a quantized folder (if given for one, its storage fields must match).
        dtype: dtype for the parameters that stay dense (embeddings, norms, head, biases); default:
            as stored in the checkpoint.
        device: where parameters and quantized buffers are created.
        **kw (Any): passed to ``transformers.AutoConfig.from_pretrained`` (e.g. ``trust_remote_code``).

    Returns:
        The model in eval mode.

    Raises:
        FileNotFoundError: if the folder or its safetensors files do not exist.
        ValueError: on a config that contradicts a quantized folder, or missing tensors.
    """
    folder = Path(model_name_or_path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a local folder; download the model first (e.g. "
                                "huggingface_hub.snapshot_download) and pass its path")
    files = shard_files(folder)
    model = _empty_model(folder, **kw)
    fresh: dict[str, nn.Module] = {}
    if (folder / QUANT_FILE).is_file():
        saved = _read_quant_file(folder)
        if config is not None:
            _check_against(saved, config, folder)
        for name, settings in saved.items():
            if config is not None:
                settings = {**settings, "compute_dtype": config.compute_dtype}
            compile = config.compile if config is not None else False
            replace_module(model, name, _empty_layer(model.get_submodule(name), settings, compile, device))
    else:
        config = config or QuantConfig()
        settings = {f: getattr(config, f) for f in (*_STORAGE_FIELDS, "compute_dtype")}
        for name in plan_quantization(model, config):
            fresh[name] = _empty_layer(model.get_submodule(name), settings, config.compile, device)
            replace_module(model, name, fresh[name])
    _stream(model, files, fresh, dtype, device)
    return _finish(model, folder)


def _dedup(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory; keep the first name of each (the embeddings
    # come before the tied head in module order, and load re-ties the head).
    seen, out = set(), {}
    for k, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        out[k] = t.detach().contiguous()
    return out


def save_quantized(model: nn.Module, save_directory: str | os.PathLike) -> Path:
    """Save a quantized model (see the module docstring for the files and keys).

    Files are written to a temporary folder inside ``save_directory`` and moved into place,
    ``deltatune_quant.json`` last, so an interrupted save never looks complete.

    Args:
        model: a model with Linear4bit / Linear8bit layers (from :func:`~.model.quantize_model` or
            :func:`load_quantized`); a transformers model also gets its ``config.json`` saved.
        save_directory: folder to write (created if needed).

    Returns:
        The folder.

    Raises:
        ValueError: if the model has no quantized layer.
    """
    from safetensors.torch import save_file

    layers = dict(quantized_layers(model))
    if not layers:
        raise ValueError("model has no Linear4bit/Linear8bit layer; quantize it first (quantize_model) or "
                         "save it with save_pretrained")
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "modules": {n: layer_settings(m) for n, m in layers.items()}}
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-save-") as tmp:
        tmp = Path(tmp)
        save_file(_dedup(model.state_dict()), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        names = [WEIGHTS_FILE]
        if hasattr(model, "config") and hasattr(model.config, "save_pretrained"):
            model.config.save_pretrained(tmp)
            names.append("config.json")
        (tmp / QUANT_FILE).write_text(json.dumps(meta, indent=2))
        for name in [*names, QUANT_FILE]:
            os.replace(tmp / name, folder / name)
    return folder
