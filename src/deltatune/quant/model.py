"""Quantizing a model in memory: choose the Linear layers, then swap each for its quantized twin.

Choosing (:func:`plan_quantization`) and swapping (:func:`quantize_model`) are separate steps, so the
list of layers can be printed before anything changes.
"""
from __future__ import annotations

from torch import nn

from deltatune.quant.config import QuantConfig
from deltatune.quant.linear import Linear4bit, Linear8bit


def tied_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters shared with another name (e.g. ``lm_head.weight`` tied to the embeddings).

    Looks both at parameters that are the same object and, for transformers >= 5 models built on
    the meta device (where ties are made only after loading), at ``model.all_tied_weights_keys``.
    """
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    tied = {n for names in owners.values() if len(names) > 1 for n in names}
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        tied.update((target, source))
    return tied


def plan_quantization(model: nn.Module, config: QuantConfig) -> list[str]:
    """Fully qualified names of the ``nn.Linear`` modules that ``config`` would quantize.

    Args:
        model: any ``nn.Module``.
        config: the quantization settings (``skip_modules`` decides what stays dense).

    Returns:
        Names in module order.

    Raises:
        ValueError: if a chosen Linear shares its weight with another module (tied embeddings);
            the message says which entry to add to ``skip_modules``.
    """
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not config.skips(n)]
    tied = tied_parameter_names(model)
    clash = [n for n in names if f"{n}.weight" in tied]
    if clash:
        raise ValueError(
            f"cannot quantize {clash}: their weight is tied to another parameter (tied input/output "
            f"embeddings), and quantizing would silently untie it. Add {[n.rsplit('.', 1)[-1] for n in clash]} "
            "to QuantConfig.skip_modules to keep them dense."
        )
    return names


def make_quantized_linear(linear: nn.Linear, config: QuantConfig) -> Linear4bit | Linear8bit:
    """Quantize one ``nn.Linear`` as ``config`` says (4-bit or 8-bit)."""
    cls = Linear4bit if config.bits == 4 else Linear8bit
    return cls.from_linear(linear, config)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule called ``name`` (dotted path) of ``model`` to ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_model(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Replace the ``nn.Linear`` layers of ``model`` by Linear4bit / Linear8bit, in place.

    Layers are quantized one at a time, so the full-precision weight of each is freed as soon as
    it is replaced (if nothing else refers to it). Biases stay in full precision.

    Args:
        model: the model, on any device; quantized buffers go to each layer's device.
        config: quantization settings (default: ``QuantConfig()``, NF4 with double quantization).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: if there is no ``nn.Linear`` to quantize (e.g. GPT-2 uses ``Conv1D``, which is
            not supported), or a chosen layer has a tied weight (see :func:`plan_quantization`).
    """
    config = config or QuantConfig()
    names = plan_quantization(model, config)
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"found no nn.Linear to quantize in {type(model).__name__} (skip_modules={config.skip_modules}, "
            f"Linear layers present: {linears[:8]}). Only torch.nn.Linear is supported; transformers' Conv1D "
            "(GPT-2) is not."
        )
    for name in names:
        replace_module(model, name, make_quantized_linear(model.get_submodule(name), config))
    return model
