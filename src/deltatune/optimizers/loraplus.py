"""LoRA+ (Hayou et al., https://huggingface.co/papers/2402.12354): a larger learning rate for LoRA's B factors.

``create_loraplus_optimizer`` builds the optimizer with peft's four parameter groups, in peft's order:

1. ``A``: every other trainable parameter (LoRA's A factors, 2-D ``modules_to_save`` copies, ...) at ``lr``,
   weight decay ``loraplus_weight_decay``;
2. ``embedding``: the parameters of LoRA adapters on embedding layers (A and B) at ``loraplus_lr_embedding``,
   weight decay ``loraplus_weight_decay``;
3. ``B``: LoRA's B factors and every 1-D parameter (DoRA's magnitude vector, ...) that decays, at
   ``lr * loraplus_lr_ratio``, weight decay ``loraplus_weight_decay``;
4. ``B, no decay``: those of group 3 that do not decay (biases, parameters inside an ``nn.LayerNorm``), at
   ``lr * loraplus_lr_ratio``, weight decay 0.

peft finds these by parameter name (``lora_B`` in the name, the module two levels up being its ``Embedding``
layer); deltatune's adapters are named ``...q_proj.adapters.<name>.lora_B``, so the parameters are classified
by the module that holds them (an :class:`~deltatune.surgery.adapter.Adapter`, a
:class:`~deltatune.methods.lora.LoraEmbedding`) and the attribute they are held under instead. The decay rule
is transformers' (``get_parameter_names(model, ALL_LAYERNORM_LAYERS)`` without biases), which peft uses.
"""
from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS

from deltatune.methods.lora import LoraEmbedding
from deltatune.surgery.adapter import Adapter

__all__ = ["create_loraplus_optimizer"]

# peft's list: with these bitsandbytes optimizers, embedding weights keep 32-bit optimizer state.
_EIGHT_BIT_OPTIMIZERS = ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit")


def _owners(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    """id(parameter) -> (the module that holds it directly, the attribute it is held under)."""
    owners: dict[int, tuple[nn.Module, str]] = {}
    for module in model.modules():
        for attr, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), (module, attr))
    return owners


def _in_layer_norm(model: nn.Module) -> set[int]:
    """ids of the parameters inside an ``nn.LayerNorm`` (transformers' ``ALL_LAYERNORM_LAYERS``) below ``model``."""
    norm_types = tuple(ALL_LAYERNORM_LAYERS)
    found: set[int] = set()
    for name, module in model.named_modules():
        if name and isinstance(module, norm_types):  # the model itself is not a "layer" (as in transformers)
            found.update(id(p) for p in module.parameters())
    return found


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_lr_embedding: float = 1e-6,
    loraplus_weight_decay: float = 0.0,
    **kwargs: Any,
) -> Optimizer:
    """Create a LoRA+ optimizer: LoRA's B factors train at ``lr * loraplus_lr_ratio``, the rest at ``lr``.

    Same call and parameter groups as ``peft.optimizers.create_loraplus_optimizer`` (see this module's
    docstring for the four groups).

    Args:
        model: the model to optimize: a :class:`~deltatune.PeftModel` (or a model with LoRA adapters injected)
            holding at least one trainable LoRA parameter.
        optimizer_cls: the optimizer class, e.g. ``torch.optim.AdamW`` or ``bitsandbytes.optim.Adam8bit``.
        lr: the learning rate ηA of LoRA's A factors and of the other trainable parameters.
        loraplus_lr_ratio: ηB / ηA, the ratio of B's learning rate to ``lr``; should be ≥ 1 (the paper uses
            2 to 16 and more; a harder task wants a larger ratio and a somewhat smaller ``lr``).
        loraplus_lr_embedding: the learning rate of LoRA adapters on embedding layers (A and B), 1e-6 by default.
        loraplus_weight_decay: the weight decay of every group except the non-decaying B group (biases and
            parameters inside ``nn.LayerNorm`` layers, which get 0), 0.0 by default.
        **kwargs: further keyword arguments for ``optimizer_cls`` (``betas``, ``eps``, ...).

    Returns:
        An instance of ``optimizer_cls`` with peft's four parameter groups (A, embedding, B, B without decay),
        in that order; a group may be empty. With a bitsandbytes 8-bit optimizer, embedding weights keep 32-bit
        optimizer state, as in peft.

    Raises:
        ValueError: the model has no trainable LoRA parameter (``lora_A``/``lora_B`` of a LoRA or AdaLoRA
            adapter): no LoRA adapter, or all of them frozen.
    """
    owners = _owners(model)
    no_decay = _in_layer_norm(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    lora_params = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        module, attr = owners[id(param)]
        lora_params += isinstance(module, Adapter) and attr in ("lora_A", "lora_B")
        if isinstance(module, LoraEmbedding):
            groups["embedding"].append(param)
        elif (isinstance(module, Adapter) and attr == "lora_B") or param.ndim == 1:
            decays = id(param) not in no_decay and "bias" not in name  # transformers' rule, on the full name
            groups["B" if decays else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    if not lora_params:
        raise ValueError(
            f"create_loraplus_optimizer: {type(model).__name__} has no trainable LoRA parameter, so there is no "
            "B factor for LoRA+ to give a larger learning rate. Add a LoRA adapter first "
            "(get_peft_model(model, LoraConfig(...))), make it trainable (is_trainable=True when loading one), "
            "or use a plain optimizer for other adapter types."
        )

    kwargs["lr"] = lr
    param_groups = [
        {"params": groups["A"], "weight_decay": loraplus_weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": loraplus_weight_decay, "lr": loraplus_lr_embedding},
        {"params": groups["B"], "weight_decay": loraplus_weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]
    optimizer = optimizer_cls(param_groups, **kwargs)
    if optimizer_cls.__name__ in _EIGHT_BIT_OPTIMIZERS:
        import bitsandbytes  # only with a bitsandbytes optimizer, which needs it anyway

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
