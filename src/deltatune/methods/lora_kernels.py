"""Fused autograd functions for LoRA on a dense, frozen nn.Linear, or on any base's output (DoRA's: :mod:`.dora_kernels`).

Autograd on the plain expression ``F.linear(x, W) + s * B(A(dropout(x)))`` allocates the (N, out)
delta, a scaled copy and a sum, and with dropout keeps a full float copy of the dropped input for
backward. One Function per layer writes the low-rank term into the base output in place, keeps the
dropout mask as bytes, and computes every gradient with one matmul each.
"""
from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.native import dropout as native_dropout


def _thin(left_t: torch.Tensor, right_t: torch.Tensor) -> torch.Tensor:
    """(left_t @ right_t)ᵀ: a product whose result has only r columns, computed as the r-row product.

    BLAS kernels handle an (M × K) @ (K × r) product with tiny r and a transposed operand badly: on
    this project's Zen 5 CPU in fp32 (1 thread), g B for g (992 × 1536), B (1536 × 8) took 1.76 ms as
    written and 0.42 ms as (Bᵀ gᵀ)ᵀ; gᵀ xa 2.59 ms against 0.45 ms; bf16 gains less (0.37 -> 0.22 ms).
    That is ~8% of a fp32 layer's forward + backward. The result is a transposed view; every consumer
    here takes either layout.
    """
    return torch.mm(left_t, right_t).T


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on x's device, None where autocast is off."""
    device = x.device.type
    if device in ("cpu", "cuda", "xpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


class _LiveCopies:
    """Copies made from a tensor (an autocast cast, a dropout-masked copy), found again while alive.

    Keyed by the source's id and checked by identity (tensors compare elementwise, so they cannot be dict
    keys themselves), by its version counter (an in-place change makes a new copy) and by a tag saying
    how the copy was made. Only weak references are kept: this never holds a copy alive by itself, and an
    entry goes when its source does.
    """

    def __init__(self) -> None:
        self.entries: dict[int, tuple] = {}  # id(source) -> (weak source, its version, tag, weak copy)

    def get(self, source: torch.Tensor, tag: tuple) -> torch.Tensor | None:
        entry = self.entries.get(id(source))
        if entry is None:
            return None
        owner, version, made_as, ref = entry
        copy = ref()
        live = copy is not None and owner() is source and version == source._version and made_as == tag
        return copy if live else None

    def put(self, source: torch.Tensor, tag: tuple, copy: torch.Tensor) -> torch.Tensor:
        key = id(source)
        owner = weakref.ref(source, lambda _, k=key: self.entries.pop(k, None))
        self.entries[key] = (owner, source._version, tag, weakref.ref(copy))
        return copy


_CASTS = _LiveCopies()


def reused_cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)``, reusing a cast of the same tensor that is still alive.

    Under autocast every fused layer casts its operands, and the kernels below save those casts for
    backward. Two cases repeat a cast that is still saved:

    - a frozen weight, when a layer is called twice in one step (a shared prefix, then the rows'
      remainders: train/shared_prefix.py);
    - an input that several layers read: q/k/v_proj read the same normed hidden states, gate/up_proj too.
      Each used to cast and save its own bf16 copy of it (SmolLM2's default job: ~30 MB of 433 MB saved).

    The live cast is reused instead (:class:`_LiveCopies`): with no graph holding one (no_grad, or after
    backward), the tensor is cast again. A cast that autograd does not track (made under no_grad) is never
    handed to a call that needs the gradient, nor the reverse.
    """
    if tensor.dtype == dtype:
        return tensor
    if tensor.is_inference():  # made under inference_mode: no version counter to trust a cached cast by
        return tensor.to(dtype)
    tag = (dtype, tensor.requires_grad and torch.is_grad_enabled())
    cast = _CASTS.get(tensor, tag)
    return cast if cast is not None else _CASTS.put(tensor, tag, tensor.to(dtype))


def _operand(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the kernel's dtype (W's): under autocast, a bf16 cast of the fp32 hidden states.

    Layers that read the same input (q/k/v_proj, gate/up_proj) share one saved cast of it (:func:`reused_cast`)
    instead of saving one each: on SmolLM2's default job ~30 MB of the 433 MB a step saves. The cast is made
    here, inside the Function, so each layer still returns x's gradient in x's dtype and autograd sums the
    siblings' gradients in fp32, exactly as when each layer cast x itself.
    """
    return reused_cast(x, dtype)


_DROPPED = _LiveCopies()


def _dropped(source: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, keep: float) -> torch.Tensor:
    """x̃ = x ⊙ mask · k as (N, in), made once for the layers that read the same input with the same mask.

    ``source`` is the input the caller passed, ``x`` the kernel's operand (``source``, or its autocast cast):
    the copy is found by ``source``, which the caller keeps alive across the sibling layers, while the
    cast may be dropped once x̃ is made.

    q/k/v_proj (and gate/up_proj) read one input and share one dropout mask (methods/lora.py), so their x̃
    is the same tensor. The first layer's copy is saved for its backward; while it is alive the siblings
    reuse it (:class:`_LiveCopies`): per LLaMA block 4 masked copies instead of 7 in the forward, and none
    in the backward, which reads the saved x̃ instead of masking x again. The mask is told apart by its id:
    whatever keeps x̃ alive (a layer's saved tensors) keeps that mask alive too, so the id is not reused.
    """
    def make() -> torch.Tensor:
        return _masked_scale(x.reshape(-1, x.shape[-1]), mask.reshape(-1, x.shape[-1]), keep)

    if source.is_inference():  # no version counter to trust a cached copy by
        return make()
    tag = (id(mask), keep, x.dtype)
    xd = _DROPPED.get(source, tag)
    return xd if xd is not None else _DROPPED.put(source, tag, make())


def _masked_scale(t: torch.Tensor, mask: torch.Tensor, keep: float) -> torch.Tensor:
    """t ⊙ mask · keep, a new tensor: one compiled pass where it can run (torch's where is far slower)."""
    compiled = native_dropout.masked_scale(t, mask, keep)
    return compiled if compiled is not None else torch.where(mask, t, 0.0).mul_(keep)


def _masked_add_(acc: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, keep: float) -> None:
    """acc += keep · mask ⊙ t: compiled where it can run, else torch's where and add."""
    if not native_dropout.masked_add_(acc, t, mask, keep):
        acc.add_(torch.where(mask, t, 0.0), alpha=keep)


def _low_rank_grads(g, xd, A, B, xa, s: float, need_a: bool, need_b: bool):
    """u = s · g B (N × r), and ∂L/∂A = uᵀ x̃, ∂L/∂B = s · gᵀ (x̃ Aᵀ) where asked (else None)."""
    u = _thin(B.T, g.T).mul_(s)  # (N, r)
    grad_b = _thin(xa.T, g).mul_(s) if need_b else None  # (out, r)
    grad_a = u.T @ xd if need_a else None  # (r, in)
    return u, grad_a, grad_b


class _LoraLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b + s · (x̃ Aᵀ) Bᵀ, where x̃ = x ⊙ mask · k (dropout; k = 1/(1-p)) or x̃ = x.

    Backward, with g = ∂L/∂y (N × out) and u = s · g B (N × r):
      ∂L/∂B = s · gᵀ (x̃ Aᵀ)           (out × r)
      ∂L/∂A = uᵀ x̃                     (r × in)
      ∂L/∂x = g W + (u A) ⊙ mask · k   (N × in)
      ∂L/∂b = Σ_N g
    W is frozen: no gradient, and it is saved by reference, never copied.
    x is multiplied in W's dtype (:func:`_operand`) and its gradient returned in its own.
    Saved: x̃ (x itself without dropout; with it, x̃ made once for the layers that read the same x with the
    same mask, :func:`_dropped`: backward needs x̃, never x), the bool mask, and x̃ Aᵀ (N × r).
    The two products with r columns, g B and gᵀ (x̃ Aᵀ), are formed transposed (:func:`_thin`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling, mask, keep):
        ctx.x_dtype, ctx.x_shape, source = x.dtype, x.shape, x
        x = _operand(x, weight.dtype)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        xd = x2 if mask is None else _dropped(source, x, mask, keep)
        xa = xd @ A.T  # (N, r)
        y = F.linear(x2, weight, bias)  # (N, out)
        y.addmm_(xa, B.T, alpha=scaling)
        ctx.save_for_backward(x if mask is None else xd, weight, A, B, xa, mask)
        ctx.scaling, ctx.keep, ctx.has_bias = scaling, keep, bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        xd, weight, A, B, xa, mask = ctx.saved_tensors
        s, keep = ctx.scaling, ctx.keep
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        xd = xd.reshape(-1, xd.shape[-1])  # (N, in): x itself without dropout
        u, grad_a, grad_b = _low_rank_grads(g, xd, A, B, xa, s, *ctx.needs_input_grad[3:5])
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight  # (N, in)
            if mask is None:
                grad_x.addmm_(u, A)
            else:
                _masked_add_(grad_x, u @ A, mask.reshape(grad_x.shape), keep)
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None


class _LoraAddFn(torch.autograd.Function):
    """y = base_out + s · (x̃ Aᵀ) Bᵀ: LoRA on a base layer whose output the caller computed (a 4-bit or 8-bit
    layer, transformers' Conv1D, a layer that other adapters also read), its gradient passed through as is.

    As autograd on the plain expression, this made three (N, out) tensors in the forward (the delta, its
    scaled copy, the sum) and a scaled copy of g in the backward, and dropout a float copy of x. Here: the
    sum only, one matmul per gradient (:func:`_low_rank_grads`), and dropout's bool mask with the masked
    copy shared by sibling layers (:func:`_dropped`), as in :class:`_LoraLinearFn`.
    """

    @staticmethod
    def forward(ctx, x, base_out, A, B, scaling, mask, keep):
        ctx.x_dtype, ctx.x_shape, source = x.dtype, x.shape, x
        x = _operand(x, A.dtype)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        xd = x2 if mask is None else _dropped(source, x, mask, keep)
        xa = xd @ A.T  # (N, r)
        y = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), xa, B.T, alpha=scaling)  # (N, out)
        ctx.save_for_backward(x if mask is None else xd, A, B, xa, mask)
        ctx.scaling, ctx.keep = scaling, keep
        return y.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad_out):
        xd, A, B, xa, mask = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        xd = xd.reshape(-1, xd.shape[-1])
        u, grad_a, grad_b = _low_rank_grads(g, xd, A, B, xa, ctx.scaling, *ctx.needs_input_grad[2:4])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = u @ A  # (N, in)
            grad_x = grad_x if mask is None else _masked_scale(grad_x, mask.reshape(grad_x.shape), ctx.keep)
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, grad_out, grad_a, grad_b, None, None, None


def lora_add(x, base_out, A, B, scaling: float, mask=None, keep: float = 1.0) -> torch.Tensor:
    """``base_out + scaling · (dropout(x) Aᵀ) Bᵀ`` as one autograd node; base_out in A's dtype."""
    return _LoraAddFn.apply(x, base_out, A, B, scaling, mask, keep)


def lora_linear(x, weight, bias, A, B, scaling: float, mask=None, keep: float = 1.0) -> torch.Tensor:
    """Fused ``F.linear(x, weight, bias) + scaling · (dropout(x) Aᵀ) Bᵀ`` for a frozen weight."""
    return _LoraLinearFn.apply(x, weight, bias, A, B, scaling, mask, keep)


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Bool mask like x, True (keep) with probability 1 - p (p rounded to 2^-16).

    Four elements per 64-bit random word, its four int16 quarters each uniform on [-2^15, 2^15), so one
    scalar threshold serves them all. On the CPU the words come from the compiled counter-based hash
    (:func:`deltatune.native.dropout.keep_mask`): torch's CPU generator is serial and does not scale with
    threads. Elsewhere, or where that cannot run, from torch's ``random_`` over the whole int64 range.
    2 threads, 4x256x512: one torch draw per element 2.9 ms per mask; two per 31-bit draw 1.75 ms; four per
    64-bit draw 0.65-0.70 ms (draws 0.44 ms, comparison 0.21 ms); the compiled hash 0.05 ms."""
    threshold = min(round(p * 2**16), 2**16 - 1) - 2**15
    compiled = native_dropout.keep_mask(x, threshold)
    if compiled is not None:
        return compiled
    n = x.numel()
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
    return (draws.view(torch.int16)[:n] >= threshold).view(x.shape)


class _LastMask(threading.local):
    """The last dropout keep-mask drawn in this thread: the input it was drawn for (held weakly, so it
    never keeps an activation alive) and the adapters that have used it."""

    x: weakref.ref | None = None
    p: float = -1.0
    mask: torch.Tensor | None = None
    users: weakref.WeakSet | None = None


_LAST_MASK = _LastMask()


def shared_dropout_mask(x: torch.Tensor, p: float, user: nn.Module) -> torch.Tensor:
    """A keep-mask (bool, 1 byte per element) for dropout on ``x``, shared by the adapters that read the
    very same input tensor in one forward (q/k/v read one hidden state, gate/up another).

    Drawing random numbers dominates dropout's cost on CPU, so sharing cuts 7 draws per LLaMA block to 4.
    Each module still drops with probability p; the masks of q, k and v are the same draw (peft draws
    them independently), which changes no expectation.

    Where one forward ends is not visible from a layer, so the cache records who used a mask: an adapter
    that asks again for the same tensor (the next step on an input that is still alive, a layer called
    twice) gets a fresh draw, which the adapters after it share. No adapter is ever handed the same draw
    twice, so dropout never repeats across steps; and a recomputation under gradient checkpointing (random
    state restored) draws where the forward it repeats drew, hence the same masks. Only identity is
    compared, never the private ``Tensor._version``: a mask does not depend on x's values, so an in-place
    change to x between two readers changes nothing about dropout.
    """
    last = _LAST_MASK
    same_input = last.x is not None and last.x() is x and last.p == p and last.mask.shape == x.shape
    if same_input and user not in last.users:
        last.users.add(user)
        return last.mask
    mask = keep_mask(x, p)
    last.x, last.p, last.mask, last.users = weakref.ref(x), p, mask, weakref.WeakSet([user])
    return mask
