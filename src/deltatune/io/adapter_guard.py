"""The check every adapter save passes: each tensor whole, of its declared shape, on a real device.

Sharded engines hand a process only its piece of each tensor, and saving that piece as if it were the
adapter writes a file that loads as garbage or not at all (peft #453, #2892): DeepSpeed ZeRO-3 leaves
every parameter empty (``numel() == 0``) outside a gather, FSDP1 flattens parameters into 1-D shards
under ``_fsdp_wrapped_module`` paths, FSDP2 makes them ``DTensor`` shards, and a model built on the
``meta`` device has no values at all. :func:`check_adapter_state` refuses all of these before anything
is written, naming each tensor, its found and expected shapes, the likely cause and the fix.

Expected shapes come from what each adapter *declares*: its rank and its base layer's
``in_features``/``out_features`` (:func:`deltatune.surgery.adapter.layer_dims`), never from the tensors
themselves, so a flattened tensor is caught even when the live parameter is itself flat.
:func:`saved_adapter_problems` runs the checks that need no model on a folder's saved shapes
(``deltatune inspect --adapter``).
"""
from __future__ import annotations

import sys
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from deltatune.io.checkpoint import PREFIX
from deltatune.surgery.adapter import layer_dims
from deltatune.surgery.inject import adapted_layers

ANY = -1
"""A dimension the adapter does not fix (AdaLoRA's pruned rank, a bottleneck's width)."""
FSDP_KEY_PARTS = ("_fsdp_wrapped_module", "_flat_param", "flat_param")
"""Path parts that only FSDP1's wrapper adds: peft's loader would find none of these keys."""

SHARDED_CAUSE = (
    "Likely cause: the model is sharded (DeepSpeed ZeRO-3 or FSDP) and its state was saved without gathering it: "
    "each process holds only its shard, which is empty under ZeRO-3, flattened to 1-D under FSDP1 and a DTensor "
    "under FSDP2.\nFix: gather a full state dict first, e.g. torch.distributed.checkpoint.state_dict."
    "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)) on every rank, "
    "then save on rank 0 from an unsharded model; or save through transformers' Trainer (trainer.save_model(), "
    "deltatune train), which gathers the state before writing."
)
META_CAUSE = (
    "Likely cause: the adapter was never materialised: it lives on the meta device (built under "
    "torch.device('meta'), or loaded with low_cpu_mem_usage / FSDP's cpu_ram_efficient_loading on a rank that "
    "receives its weights later).\nFix: move the model to a real device with its weights (model.to_empty(device=...) "
    "then load them, or let FSDP/the Trainer broadcast rank 0's weights) before saving."
)


class AdapterNotWholeError(ValueError):
    """An adapter tensor is empty, flattened, mis-shaped, sharded or on the meta device; nothing was written."""


# ---- expected shapes, from each adapter's declared dimensions -------------------------------------------------
def _is_conv(layer: nn.Module) -> bool:
    return isinstance(layer, nn.modules.conv._ConvNd)


def declared_shapes(adapter: nn.Module, base_layer: nn.Module) -> dict[str, tuple[int, ...] | None]:
    """Our attribute name -> the shape the adapter declares for it on ``base_layer`` (None: not declared).

    LoRA/DoRA (``r``) on linear, embedding and convolution layers, AdaLoRA (``init_r``: its rank may be
    pruned, so ``ANY``), IA³ (``feedforward``), bottleneck and BitFit tensors; any other adapter gets the
    checks that need no shape.
    """
    markers = ("init_r", "r", "feedforward", "down_weight", "original_bias")
    if not any(isinstance(getattr(adapter, m, None), (int, bool, torch.Tensor)) for m in markers):
        return {}  # an adapter with no rule here (e.g. on raw parameters): the checks that need no shape
    try:
        out_f, in_f = layer_dims(base_layer)
    except (AttributeError, IndexError, TypeError):  # a host without (out, in) dims: nothing to derive
        return {}
    conv = _is_conv(base_layer)
    kernel = tuple(base_layer.kernel_size) if conv else ()
    ones = (1,) * len(kernel)
    r = getattr(adapter, "r", None)
    rules: dict[str, tuple[int, ...]] = {}
    if hasattr(adapter, "init_r"):  # AdaLoRA: P (out, r) Λ (r, 1) Q (r, in), at the rank kept after pruning
        rules = {"lora_A": (ANY, in_f), "lora_E": (ANY, 1), "lora_B": (out_f, ANY)}
    elif isinstance(r, int):
        groups = getattr(base_layer, "groups", 1) if conv else 1
        rules = {"lora_A": (r, in_f, *kernel), "lora_B": (out_f, r // groups, *ones),
                 "lora_magnitude_vector": (1, out_f, *ones) if conv else (out_f,)}
    elif hasattr(adapter, "feedforward"):  # IA³: peft's on-disk vector shapes
        n = in_f if adapter.feedforward else out_f
        rules = {"ia3_l": (1, n, *ones) if conv else ((1, in_f) if adapter.feedforward else (out_f, 1))}
    elif hasattr(adapter, "down_weight"):  # bottleneck on the layer's output width
        rules = {"down_weight": (ANY, out_f), "down_bias": (ANY,), "up_weight": (out_f, ANY), "up_bias": (out_f,)}
    elif hasattr(adapter, "original_bias"):  # BitFit: one bias per output
        rules = {"bias": (out_f,)}
    return {ours: rules.get(ours) for ours in getattr(adapter, "peft_keys", {})}


def expected_shapes(model: nn.Module, adapter_name: str) -> dict[str, tuple[int, ...] | None]:
    """peft key -> declared shape of every tensor adapter ``adapter_name`` has in ``model``'s wrapped layers."""
    shapes: dict[str, tuple[int, ...] | None] = {}
    for path, host in adapted_layers(model):
        adapter = host.adapters[adapter_name] if adapter_name in host.adapters else None
        if adapter is None:
            continue
        if hasattr(adapter, "declared_peft_shapes"):  # keyed by peft's suffixes itself (LoRA on nn.Parameters)
            shapes.update({f"{PREFIX}{path}.{k}": v for k, v in adapter.declared_peft_shapes().items()})
            continue
        declared = declared_shapes(adapter, host.base_layer)
        for ours, disk in adapter.peft_keys.items():
            if getattr(adapter, ours, None) is not None:
                shapes[f"{PREFIX}{path}.{disk}"] = declared.get(ours)
    return shapes


def live_adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """peft key -> the live (uncopied) tensor of adapter ``adapter_name``'s wrapped layers."""
    return {f"{PREFIX}{path}.{suffix}": t
            for path, host in adapted_layers(model) if adapter_name in host.adapters
            for suffix, t in host.adapters[adapter_name].peft_state_dict().items()}


# ---- the check ------------------------------------------------------------------------------------------------
def _sharded_kind(value: Any) -> str | None:
    # A DTensor or ShardedTensor can only exist once its module is loaded: no import of torch.distributed here.
    for module, cls, what in (("torch.distributed.tensor", "DTensor", "a DTensor (an FSDP2 / tensor-parallel shard)"),
                              ("torch.distributed._shard.sharded_tensor", "ShardedTensor",
                               "a ShardedTensor (FSDP1's SHARDED_STATE_DICT)")):
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(value, getattr(loaded, cls, ())):
            return what
    return None


def _fmt(shape: Sequence[int] | None) -> str:
    if shape is None:
        return "(no declared shape)"
    return "(" + ", ".join("?" if d == ANY else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _fits(found: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return len(found) == len(expected) and all(e == ANY or f == e for f, e in zip(found, expected))


def tensor_problem(key: str, value: Any, expected: tuple[int, ...] | None) -> tuple[str, str] | None:
    """``(what is wrong, cause kind)`` for one tensor (or a saved shape), None if it is whole.

    ``value`` is a tensor or, for a file read as headers only, its shape. Cause kinds: ``sharded``, ``meta``.
    """
    sharded = _sharded_kind(value)
    shape = tuple(int(d) for d in (value.shape if hasattr(value, "shape") else value))
    where = f"{key}: found {_fmt(shape)}, expected {_fmt(expected)}"
    if sharded is not None:
        return f"{where}: {sharded}, not a full tensor", "sharded"
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        return f"{where}: on the meta device (no values)", "meta"
    if any(part in key.split(".") for part in FSDP_KEY_PARTS):
        return f"{where}: an FSDP1 wrapper key, which peft's loader does not know", "sharded"
    numel = 1
    for d in shape:
        numel *= d
    rank_may_be_zero = expected is not None and ANY in expected and _fits(shape, expected)
    if numel == 0 and not rank_may_be_zero:  # AdaLoRA may prune a layer to rank 0: (0, in) is whole
        return f"{where}: empty (numel 0)", "sharded"
    if expected is not None and not _fits(shape, expected):
        flat = len(shape) == 1 and len(expected) > 1
        return f"{where}: {'flattened to 1-D' if flat else 'wrong shape for its base layer'}", "sharded"
    return None


def adapter_state_problems(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...] | None]) -> list[tuple[str, str]]:
    """Every ``(problem, cause kind)`` of ``state`` (key -> tensor or shape) against ``expected`` shapes;
    a key of ``expected`` missing from ``state`` is one too (keys of ``state`` not in ``expected``, such as
    ``modules_to_save`` copies, get the checks that need no shape)."""
    problems = [p for key, value in state.items() if (p := tensor_problem(key, value, expected.get(key))) is not None]
    missing = [k for k in expected if k not in state]
    problems += [(f"{k}: missing, expected {_fmt(expected[k])}", "sharded") for k in missing]
    return problems


def describe_problems(problems: Sequence[tuple[str, str]], limit: int = 8) -> str:
    """The problem lines (at most ``limit``, then a count) and, once each, the causes and fixes they point to."""
    lines = [f"  {text}" for text, _ in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    kinds = {kind for _, kind in problems}
    lines += [cause for kind, cause in (("sharded", SHARDED_CAUSE), ("meta", META_CAUSE)) if kind in kinds]
    return "\n".join(lines)


def check_adapter_state(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...] | None],
                        adapter_name: str = "default") -> None:
    """Refuse to save ``state`` (peft key -> tensor) unless every tensor is whole and of its ``expected`` shape.

    Args:
        state: what would be written (or the live tensors it would be copied from).
        expected: peft key -> declared shape (:func:`expected_shapes`); ``None`` or absent: shape not checked.
        adapter_name: named in the error.

    Raises:
        AdapterNotWholeError: naming each bad tensor, its found and expected shapes, the cause and the fix.
    """
    problems = adapter_state_problems(state, expected)
    if problems:
        raise AdapterNotWholeError(
            f"refusing to save adapter {adapter_name!r}: {len(problems)} of its tensors {'is' if len(problems) == 1 else 'are'} "
            "not whole, so the file "
            f"would not load (nothing was written):\n{describe_problems(problems)}"
        )


def checked_state_dict(model: nn.Module, adapter_name: str, get_state: Any) -> dict[str, torch.Tensor]:
    """``get_state()`` (the tensors to write), checked before and after copying.

    The live tensors are checked first: a meta or sharded tensor must be refused before the copy, which
    would fail on it with a message about storage rather than about saving.
    """
    expected = expected_shapes(model, adapter_name)
    check_adapter_state(live_adapter_tensors(model, adapter_name), expected, adapter_name)
    state = get_state()
    check_adapter_state(state, {k: v for k, v in expected.items() if k in state}, adapter_name)
    return state


# ---- a saved folder, without its base model -------------------------------------------------------------------
_FACTOR_PAIRS = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))


def saved_adapter_problems(raw_config: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> list[tuple[str, str]]:
    """What :func:`tensor_problem` can tell from a folder alone (config + saved shapes, no base model).

    Every tensor non-empty and under a peft key; LoRA factors 2-D or more (1-D is a flattened shard), A's
    rank equal to B's and to ``r`` or a ``rank_pattern`` value; AdaLoRA's factors 2-D.
    """
    peft_type = str(raw_config.get("peft_type", "")).upper()
    ranks = {raw_config.get("r")} | set((raw_config.get("rank_pattern") or {}).values())
    expected: dict[str, tuple[int, ...] | None] = {}
    extra: list[tuple[str, str]] = []
    for key, shape in shapes.items():
        shape = tuple(shape)
        if peft_type == "ADALORA" and key.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_E"):
            expected[key] = (ANY, ANY)
        for a_suffix, b_suffix in _FACTOR_PAIRS if peft_type == "LORA" else ():
            if not key.endswith(a_suffix) or len(shape) < 2:
                continue
            b_key = key[: -len(a_suffix)] + b_suffix
            b = tuple(shapes.get(b_key, ()))
            if len(b) == 2 and len(shape) == 2 and b[1] != shape[0]:  # (conv factors: B is (out, r/groups, 1..))
                extra.append((f"{key}: rank {shape[0]} but {b_key} has rank {b[1]} ({_fmt(shape)} and {_fmt(b)})",
                              "sharded"))
            elif shape[0] not in ranks and raw_config.get("r") is not None and len(shape) == 2:
                extra.append((f"{key}: rank {shape[0]} ({_fmt(shape)}), but adapter_config.json has r={raw_config['r']}"
                              + (f" and rank_pattern ranks {sorted(r for r in ranks if r != raw_config['r'])}"
                                 if len(ranks) > 1 else ""), "sharded"))
        if peft_type == "LORA" and key.endswith(("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")):
            expected[key] = None if len(shape) >= 2 else (ANY, ANY)  # a factor is at least a matrix
    return [p for key, shape in shapes.items() if (p := tensor_problem(key, tuple(shape), expected.get(key)))] + extra


__all__ = ["ANY", "AdapterNotWholeError", "adapter_state_problems", "check_adapter_state", "checked_state_dict",
           "declared_shapes", "describe_problems", "expected_shapes", "live_adapter_tensors", "saved_adapter_problems",
           "tensor_problem"]
