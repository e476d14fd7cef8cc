"""Running our own code inside a distributed engine's forward: DDP, FSDP1/FSDP2, DeepSpeed.

The fused loss (:mod:`deltatune.train.loss`) calls the model's trunk and reads the output head's
weight itself instead of calling the model. Under a distributed engine that bypasses what the
engine does around the model's forward:

- DDP (``DistributedDataParallel``) prepares its gradient all-reduce in its own ``forward``;
- FSDP1 (``FullyShardedDataParallel``) and DeepSpeed ZeRO-3 gather the sharded parameters there;
- FSDP2 (``fully_shard``, what transformers' ``DistributedConfig`` applies at load time) wraps
  nothing: it gathers in forward hooks on the sharded modules, the root's included.

So the fused computation is run *as* the model's forward: :func:`run_as_forward` puts it in place of
the innermost model's ``forward`` for one call and calls the engine, so every hook and wrapper runs
exactly as for ``model(**inputs)``. Gradients then flow through the engine's own machinery.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

# The engines that wrap a model in a module of their own and keep it as ``.module``. DataParallel is
# left out: it replicates the module per device per call, so a patched forward would not be the one run.
_WRAPPERS = frozenset({"DistributedDataParallel", "FullyShardedDataParallel", "DeepSpeedEngine"})
_MISSING = object()


def unwrap_engine(model: nn.Module) -> nn.Module:
    """The model inside DDP/FSDP1/DeepSpeed wrappers (``model`` itself when it is not wrapped)."""
    while type(model).__name__ in _WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def is_fsdp2_managed(module: nn.Module) -> bool:
    """True for a module that FSDP2's ``fully_shard`` was applied to (it gathers in forward hooks)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(module, FSDPModule)


def gathered_plain_linear(module: nn.Module) -> bool:
    """True for an ``nn.Linear`` managed by FSDP2 whose weight is gathered now (a full tensor, not a shard).

    FSDP2 adds forward hooks to the modules it shards, so such a head does not look plain; but its hooks
    only gather and free the weight, and inside the root's forward (after the final norm, which shares
    the head's FSDP group in transformers' plan) the weight is whole and can be used directly.
    """
    if not is_fsdp2_managed(module) or not isinstance(module, nn.Linear):
        return False
    from torch.distributed.tensor import DTensor

    return type(module).forward is nn.Linear.forward and not isinstance(module.weight, DTensor)


def engine_entry(outer: nn.Module, inner: nn.Module, lm: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(entry, target)``: the module to call and the one whose forward to replace, or None if neither is needed.

    ``outer`` is what the Trainer holds (maybe wrapped), ``inner`` the unwrapped model, ``lm`` the
    transformers model inside it (its FSDP2 root when sharded with ``fully_shard``).
    """
    if outer is not inner:
        return outer, inner
    if is_fsdp2_managed(inner):
        return inner, inner
    if is_fsdp2_managed(lm):
        return lm, lm
    return None


def run_as_forward(entry: nn.Module, target: nn.Module, compute: Callable[[], Any]) -> Any:
    """Call ``entry()`` with ``target.forward`` replaced by ``compute`` for this one call.

    ``target`` is ``entry`` or a module ``entry`` calls (the model inside a DDP wrapper). An instance
    attribute ``forward`` already there (accelerate's autocast wrapper) is put back afterwards.
    """
    saved = target.__dict__.get("forward", _MISSING)
    target.forward = lambda *args, **kwargs: compute()
    try:
        return entry()
    finally:
        if saved is _MISSING:
            del target.forward
        else:
            target.forward = saved
