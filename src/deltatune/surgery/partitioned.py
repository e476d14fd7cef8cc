"""DeepSpeed ZeRO-3's partitioned parameters, where deltatune reads tensors itself.

ZeRO-3 keeps only each rank's partition of every parameter; outside a gather a parameter's data is an
empty ``(0,)`` placeholder (its real shape is ``ds_shape``). DeepSpeed gathers a module's own
parameters in hooks around that module's forward. deltatune reads tensors outside those hooks in
these places, and gathers them there:

- saving: an adapter's parameters are read by ``save_pretrained``, outside any forward
  (:func:`gathered`; every rank must take part, as in any gather);
- the fused loss reads the output head's weight without calling the head (:func:`gathered` around it);
- LoRA's fused kernels and DoRA's weight norm read ``base_layer.weight`` without calling
  ``base_layer``. Under ZeRO-3 a LoRA layer takes the unfused path (``base_layer``'s forward, whose
  hooks gather its weight, then the low-rank term), as peft's layers do; DoRA gathers the weight for
  its norm. (Marking the adapted layer a ZeRO-3 "leaf module" instead does not work: DeepSpeed reduces
  a leaf's gradients in a full backward hook, which fires before the adapter's own gradients exist
  when the layer's input needs none, as in the first decoder layer.)

Nothing here imports DeepSpeed unless the process has loaded it already, so it costs nothing elsewhere.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

from torch import nn


def is_partitioned(param: object) -> bool:
    """True for a parameter that DeepSpeed ZeRO-3 partitioned (it carries DeepSpeed's ``ds_id``)."""
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: Iterable[nn.Parameter | None]) -> Iterator[None]:
    """Inside: the full tensors of ZeRO-3-partitioned ``params`` (read-only; others are left alone).

    A collective: under ZeRO-3 every rank must enter it with the same parameters. Without a
    partitioned parameter among ``params`` it does nothing.
    """
    import sys

    if "deepspeed" not in sys.modules:  # no parameter can be partitioned without it
        yield
        return
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # Only those partitioned now: one that a running module gathered (a tied head inside the model's forward)
    # is whole already, and DeepSpeed refuses to release it on exit while that module uses it.
    partitioned = [p for p in params if is_partitioned(p) and p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if not partitioned:
        yield
        return

    # modifier_rank=None: read-only, so the partitions are dropped again on exit with nothing to broadcast
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def trainable_partitioned(model: nn.Module) -> bool:
    """Whether ``model``'s trainable parameters are partitioned by ZeRO-3 (then every rank must gather them)."""
    return any(is_partitioned(p) for p in model.parameters() if p.requires_grad)


def zero3_plain_linear(module: nn.Module | None) -> bool:
    """True for an ``nn.Linear`` of its own class whose weight ZeRO-3 partitioned.

    Its forward hooks are DeepSpeed's, which only gather and release the weight; read under
    :func:`gathered`, it is a plain linear layer.
    """
    return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            and is_partitioned(module.weight))
