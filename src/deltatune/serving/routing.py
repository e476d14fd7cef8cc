"""Running a model with per-row adapters: forward hooks that apply a bank's plans, for one request.

Hooks are registered on the served layers for the duration of one call (a forward, or a whole
``generate``) and removed afterwards, so the model itself is never rewritten and, outside a request,
is exactly the base model. Each hooked layer applies its :class:`LayerPlan` (built once per request).
A plain ``nn.Linear`` with only LoRA rows, where the compiled CPU kernel runs, gets a forward of its
own for the request instead (low-rank update first, base GEMM accumulating into it), removed the same way.
"""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.serving import cpu_kernel
from deltatune.serving.bank import AdapterBank, LayerBank, LayerPlan
from deltatune.serving.kernels import affine_rows, mixed_embedding_lora, mixed_lora_, scale_rows, single_lora_


def _rows_error(path: str, got: int, plan: LayerPlan) -> ValueError:
    return ValueError(
        f"{path} received {got} rows but the request gave adapter_names for {plan.rows}; pass one adapter name per "
        "row of the batch (generate: per input row, before num_beams / num_return_sequences expansion)"
    )


def _pre_hook(path: str, plan: LayerPlan, module: nn.Module, args: tuple) -> tuple:
    x = args[0]  # (b, ..., in)
    if x.shape[0] != plan.rows:
        raise _rows_error(path, x.shape[0], plan)
    x3 = x.reshape(plan.rows, -1, x.shape[-1])
    return (scale_rows(x3, plan.in_scale).view(x.shape), *args[1:])


def _post_hook(path: str, layer: LayerBank, plan: LayerPlan, module: nn.Module, args: tuple, y: torch.Tensor):
    x = args[0]
    b = plan.rows
    if y.shape[0] != b:
        raise _rows_error(path, y.shape[0], plan)
    y3 = y.reshape(b, -1, y.shape[-1])  # (b, L, out)
    if plan.A is not None:
        if layer.embedding and plan.single:
            y3 = y3 + (F.embedding(x.reshape(b, -1), plan.A.T) @ plan.Bt).to(y3.dtype)  # (b, L, out)
        elif layer.embedding:
            y3 = mixed_embedding_lora(y3, x, plan.ids, plan.A, plan.Bt)
        elif plan.single:
            y3 = single_lora_(y3, x, plan.A, plan.Bt)
        else:
            y3 = mixed_lora_(y3, x.reshape(b, -1, x.shape[-1]), plan.A, plan.Bt)
    y3 = affine_rows(y3, plan.out_scale, plan.out_shift)
    return y3.view(y.shape)


def _fused_linear(path: str, layer: LayerBank, plan: LayerPlan, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """An ``nn.Linear`` with LoRA rows, low-rank update first: y = b + x·Aᵀ·B̃ (compiled kernel, y
    written once, never read), then the base GEMM accumulates into it (``addmm_``, beta = 1). Saves
    y's two extra trips through memory of "y = W x + b, then y += ..." (see csrc/mixed_lora.c).
    Anything the kernel cannot take runs the plain layer and the post hook."""
    if x.shape[0] != plan.rows:
        raise _rows_error(path, x.shape[0], plan)
    W, bias = module.weight, module.bias
    n_in, n_out = W.shape[1], W.shape[0]
    if plan.single:  # one adapter: all tokens as one long row
        x3, A, Bt = x.reshape(1, -1, n_in), plan.A[None], plan.Bt[None]
    else:
        x3, A, Bt = x.reshape(plan.rows, -1, n_in), plan.A, plan.Bt
    y3 = x3.new_empty(x3.shape[0], x3.shape[1], n_out)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (W, bias, x))
    init = bias if bias is not None else y3.new_zeros(n_out)
    if grad or not (init.is_contiguous() and W.dtype == init.dtype == torch.float32) or not cpu_kernel.usable(y3, x3, A, Bt):
        return _post_hook(path, layer, plan, module, (x,), F.linear(x, W, bias))
    cpu_kernel.mixed_lora_cpu_(y3, x3, A, Bt, init=init)
    y3.view(-1, n_out).addmm_(x3.reshape(-1, n_in), W.T)
    return y3.view(*x.shape[:-1], n_out)


def _fusable(layer: LayerBank, plan: LayerPlan, module: nn.Module) -> bool:
    # LoRA rows only (DoRA / IA³ scales keep the hooks), a plain Linear whose forward nobody else
    # has replaced (accelerate's hooks, for one, live in an instance attribute ``forward``).
    # fp32 only: in bf16, addmm_ accumulating into y (beta = 1) costs more than F.linear plus the kernel's
    # read of y (oneDNN, 32 x 128 tokens: 512 -> 512 5.40 vs 5.03 ms, 512 -> 1408 14.70 vs 13.93 ms), so bf16
    # layers run the plain layer and then the kernel in its add mode (the post hook).
    lora_only = plan.A is not None and plan.in_scale is None and plan.out_scale is None and plan.out_shift is None
    return (lora_only and not layer.embedding and type(module) is nn.Linear and "forward" not in vars(module)
            and plan.Bt.dtype == torch.float32 and cpu_kernel.wants(plan.Bt))


@contextlib.contextmanager
def routed(
    bank: AdapterBank, ids: torch.Tensor, unique: frozenset[int], module_for: Callable[[str], nn.Module]
) -> Iterator[None]:
    """Within the block, every served layer (``module_for(path)``) applies each row's adapter."""
    handles, fused = [], []
    slots = ids.tolist()  # once per request: each layer then plans on the host
    try:
        for path, layer in bank.layers.items():
            plan = layer.plan(ids, unique, slots)
            if plan is None:
                continue
            module = module_for(path)
            if _fusable(layer, plan, module):
                module.forward = partial(_fused_linear, path, layer, plan, module)  # until the request ends
                fused.append(module)
                continue
            if plan.in_scale is not None:
                handles.append(module.register_forward_pre_hook(partial(_pre_hook, path, plan)))
            handles.append(module.register_forward_hook(partial(_post_hook, path, layer, plan)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in fused:
            del module.forward  # the class's forward again


def batch_size(args: Sequence[Any], kwargs: dict[str, Any]) -> int | None:
    """Rows of the batch: from input_ids / inputs_embeds / the first tensor argument."""
    for key in ("input_ids", "inputs_embeds"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key].shape[0]
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.shape[0]
    return None


def check_names(adapter_names: Sequence[str], rows: int | None) -> list[str]:
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names must be a list of str, one per row of the batch; got {adapter_names!r}")
    names = list(adapter_names)
    if rows is not None and len(names) != rows:
        raise ValueError(f"adapter_names has {len(names)} entries but the batch has {rows} rows; give one name per row")
    return names


def expand_for_generate(names: list[str], model: nn.Module, kwargs: dict[str, Any]) -> list[str]:
    """Repeat each row's name as generate repeats the row (transformers' ``repeat_interleave`` by
    max(num_beams, num_return_sequences)); beams of one input never leave its block of rows."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    returns = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1)) or 1
    if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens") is not None:
        raise ValueError("adapter_names does not support assisted generation; generate without an assistant")
    expand = max(int(beams), int(returns))
    return [n for n in names for _ in range(expand)]
