"""Which distributed engine a ``deltatune train`` run uses, and how FSDP2 is set up (``train.distributed``).

We write no engine of our own:

- **DDP** is accelerate's, applied by transformers' ``Trainer`` when it is launched with several
  processes (``torchrun``, ``accelerate launch``, mpirun, srun).
- **FSDP2** is transformers' native sharded loading: ``from_pretrained(..., distributed_config=
  DistributedConfig(fsdp_size=N))`` builds the model on the meta device, loads each rank's shard and
  applies ``fully_shard`` by the model's own FSDP plan (decoder layers, then the root; the final norm
  and the head kept gathered). The adapter is attached after sharding, so its parameters stay plain
  replicated tensors; the Trainer broadcasts them from rank 0 and averages their gradients
  (``Trainer._sync_replicated_trainable_parameters``). We use this rather than accelerate's FSDP
  plugin because accelerate only allows FSDP on accelerators: on CPU it silently runs DDP instead.
- **QLoRA + FSDP2** cannot be loaded that way (our 4-bit layers are built from the full-precision
  weights after loading), so the quantized model is sharded afterwards with the same ``fully_shard``
  calls (:func:`shard_quantized`), the one gap where deltatune calls FSDP itself.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import nn

from deltatune.quant import prepare_for_fsdp
from deltatune.train.config_check import ConfigError
from deltatune.train.method_config import method_spec
from deltatune.train.zero import check_deepspeed

DISTRIBUTED = ("auto", "ddp", "fsdp", "deepspeed")
"""``train.distributed`` values: ``auto`` (DDP when launched with several processes), ``ddp``, ``fsdp``,
``deepspeed`` (ZeRO, configured by ``train.deepspeed``: :mod:`deltatune.train.zero`)."""

FSDP_ONLY_ADAPTERS = frozenset({"partial"})
"""Methods whose trainable weights are copies of base modules, which FSDP2 has already sharded."""


@dataclass(frozen=True)
class FsdpSection:
    """The ``train.fsdp`` section (used when ``train.distributed`` is ``fsdp``).

    Mixed precision is not set here: it follows ``train.bf16`` (parameters gathered in bf16, gradients
    reduced in fp32; the adapter and its optimizer state stay fp32).
    """

    reshard_after_forward: bool = True
    """Free each decoder layer's gathered weights after its forward and gather them again for backward
    (ZeRO-3's memory); false keeps them until backward (ZeRO-2-like: less communication, more memory)."""
    cpu_offload: bool = False
    """Keep the sharded parameters in CPU memory between uses (FSDP2's ``CPUOffloadPolicy``; GPUs only)."""


def check_distributed(mode: str, method: str, env: Mapping[str, str] | None = None) -> None:
    """``train.distributed`` is a known mode that fits the method and the launcher.

    Raises:
        ConfigError: an unknown mode, ``fsdp`` with a method FSDP2 cannot shard, or a launch through
            accelerate's own FSDP or DeepSpeed plugin (``--use_fsdp``, ``distributed_type: FSDP``):
            on CPU accelerate runs those as DDP without saying so, and on GPUs they would shard the
            adapter too, which ``deltatune train`` does not gather.
    """
    env = os.environ if env is None else env
    if mode not in DISTRIBUTED:
        raise ConfigError(f"Config key 'train.distributed' is {mode!r}; expected one of {', '.join(DISTRIBUTED)}.")
    fsdp_plugin = env.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    deepspeed = env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    # accelerate's FSDP plugin would shard the adapter too (and on CPU accelerate runs DDP instead, silently);
    # accelerate's DeepSpeed plugin at ZeRO-3 partitions the adapter: deltatune train gathers it for saving when
    # it set DeepSpeed up itself (train.distributed=deepspeed). ZeRO-1/2 keep every parameter whole on each rank.
    if fsdp_plugin or (deepspeed and zero_stage(env) == 3 and mode != "deepspeed"):
        plugin = "FSDP" if fsdp_plugin else "DeepSpeed ZeRO-3"
        raise ConfigError(
            f"deltatune train was launched with accelerate's {plugin} plugin, which it does not support: it would "
            "shard the adapter, which deltatune train does not gather for saving (and on CPU accelerate runs DDP "
            "instead of FSDP, silently). To shard the model set train.distributed=fsdp (FSDP2) and launch with "
            "torchrun, or accelerate launch --config_file configs/accelerate/multi_gpu.yaml (GPUs) / cpu_2proc.yaml "
            "(CPU); for DeepSpeed ZeRO-3 set train.distributed=deepspeed train.deepspeed=zero3 (or your JSON) with "
            "the same launchers; see docs/distributed.md.")
    if mode == "deepspeed":
        check_deepspeed(method, quantized=method_spec(method).quantized)
    if mode == "fsdp" and not trainer_supports_sharded_loading():
        import transformers

        raise ConfigError(
            f"train.distributed=fsdp needs transformers >= 5.19, whose Trainer trains a model sharded at load time "
            f"(it broadcasts and averages the replicated adapter instead of wrapping DDP around the shards); this "
            f"environment has transformers {transformers.__version__}. Upgrade it (pip install -U 'transformers>=5.19') "
            "or use train.distributed=ddp.")
    if mode == "fsdp" and method in FSDP_ONLY_ADAPTERS:
        raise ConfigError(
            f"train.distributed=fsdp does not support method.name={method}: its trainable weights are copies of "
            "base modules, which FSDP2 has sharded. Use train.distributed=ddp, or a LoRA-family method.")


def zero_stage(env: Mapping[str, str]) -> int | None:
    """The DeepSpeed ZeRO stage an ``accelerate launch --use_deepspeed`` child runs, if it can be told."""
    if env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").isdigit():
        return int(env["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    try:
        with open(path) as f:  # a missing or unreadable file is DeepSpeed's to report
            return int(json.load(f)["zero_optimization"]["stage"])
    except (TypeError, OSError, ValueError, KeyError):
        return None


def trainer_supports_sharded_loading() -> bool:
    """Whether transformers' Trainer handles a model sharded by ``DistributedConfig`` (transformers >= 5.19)."""
    from transformers import Trainer

    return hasattr(Trainer, "_sync_replicated_trainable_parameters")


def engine(mode: str, world_size: int) -> str:
    """``"single"``, ``"ddp"``, ``"fsdp"`` or ``"deepspeed"``: what a run with ``mode`` does with ``world_size`` processes.

    One process needs no engine for DDP or FSDP: a checkpoint written by an FSDP run of N processes
    resumes as a single process (the adapter is saved whole, its optimizer state too). DeepSpeed runs
    whatever the count: its checkpoints hold its own optimizer format, and one process with ZeRO
    (offload on one GPU) is a use of its own.
    """
    if mode == "deepspeed":
        return "deepspeed"
    if world_size <= 1:
        return "single"
    return "fsdp" if mode == "fsdp" else "ddp"


def fsdp_load_kwargs(fsdp: FsdpSection, world_size: int, bf16: bool) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that load the model sharded over ``world_size`` ranks."""
    from transformers.distributed import DistributedConfig

    return {"distributed_config": DistributedConfig(
        fsdp_size=world_size, fsdp_cpu_offload=fsdp.cpu_offload, fsdp_mixed_precision=bf16)}


def apply_fsdp_section(model: nn.Module, fsdp: FsdpSection) -> None:
    """Settings transformers' ``DistributedConfig`` has no field for, applied to the sharded modules."""
    from torch.distributed.fsdp import FSDPModule

    if not fsdp.reshard_after_forward:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_reshard_after_forward(False, recurse=False)


def shard_quantized(model: nn.Module, fsdp: FsdpSection, bf16: bool) -> None:
    """``fully_shard`` a model already loaded and quantized (QLoRA): each decoder layer, then the root.

    The same layout transformers' sharded loading gives (decoder layers reshard after forward, the
    root does not), and the model is marked as sharded at load time so that the Trainer treats it the
    same way (no DDP wrapper; the replicated adapter broadcast and its gradients averaged).
    """
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    from transformers.distributed import DistributedConfig

    prepare_for_fsdp(model)  # the packed 4-bit weights become parameters FSDP can shard (uint8 storage)
    policy: dict[str, Any] = {}
    if fsdp.cpu_offload:
        policy["offload_policy"] = CPUOffloadPolicy()
    if bf16:
        policy["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = _decoder_layers(model)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=fsdp.reshard_after_forward, **policy)
    fully_shard(model, reshard_after_forward=False, **policy)
    world = torch.distributed.get_world_size()
    model.config.distributed_config = DistributedConfig(fsdp_size=world, fsdp_cpu_offload=fsdp.cpu_offload,
                                                        fsdp_mixed_precision=bf16)
    model._is_distributed_loading_by_transformers = True  # what the Trainer reads (a read-only property)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules), so FSDP does not "
                         "know what to shard; use train.distributed=ddp for this model.")
    return layers


def agree_on_plan(plan: Callable[[], Any], world_size: int, describe: Callable[[Any], str]) -> Any:
    """Run ``plan()`` (the output folder's checks, the checkpoint to resume) on every rank and agree on it.

    Each rank reads the output folder itself. Without a filesystem all nodes share, a node that finds no
    checkpoint would stop while the others wait for it in their first collective until its timeout
    (30 min). So with several processes every rank's outcome (its checkpoint, or its error) is gathered
    over a gloo group first, and any error or disagreement stops every rank with the same message.

    Raises:
        ValueError: on every rank, when any rank's ``plan()`` failed or two ranks found different checkpoints;
            when every rank failed alike (a bad config), each raises its own error, which says it all.
    """
    if world_size <= 1:
        return plan()
    import torch
    import torch.distributed as dist

    failure = None
    try:
        result, outcome = plan(), None
    except (OSError, ValueError) as err:
        result, outcome, failure = None, f"error: {err}", err
    outcome = outcome or describe(result)
    if not dist.is_initialized():  # the Trainer's accelerate state and transformers' loading reuse this group
        dist.init_process_group(backend="cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo")
    outcomes: list[Any] = [None] * dist.get_world_size()
    group = dist.new_group(backend="gloo")  # objects travel on the CPU, whatever the default backend
    try:
        dist.all_gather_object(outcomes, outcome, group=group)
    finally:
        dist.destroy_process_group(group)
    if failure is not None and len(set(outcomes)) == 1:  # every rank hit the same error (a bad config): that is the message
        raise failure
    if len(set(outcomes)) > 1 or outcome.startswith("error: "):
        seen = "; ".join(f"rank {rank}: {text}" for rank, text in enumerate(outcomes))
        raise ValueError(
            f"the processes do not agree on the output folder ({seen}). Every node must see the same output_dir: put "
            "it on a filesystem all nodes share (rank 0 writes it, every rank resumes from it), or fix the error shown.")
    return result


def end_process_group(wait: bool = False) -> None:
    """Destroy torch.distributed's default group, if one is up, before the process exits; with ``wait``,
    after every rank has got there (a rank that finished its job; one that failed does not wait).

    Left to the interpreter's exit, the group's threads are torn down by C++ destructors in no set order,
    while other ranks may still be at work (rank 0 writing the outputs). After a completed ZeRO-3 run this
    aborted one rank now and then ("terminate called without an active exception", SIGABRT), seen in CI on
    fresh clones, so torchrun reported the finished job as failed. A command's last step, not a library
    call's: code that goes on after ``run_training`` keeps its group.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
