"""Fused autograd functions for DoRA (Liu et al., 2024, arXiv:2402.09353): y = m ⊙ (W + s B A) x / ‖W + s B A‖_row
with the norm detached (section 4.3), on a dense frozen nn.Linear (:func:`dora_linear`) or on the output another
base computed (:func:`dora_add`: 4-bit/8-bit layers, Conv1D), and the row norm they scale by.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from deltatune.methods.lora_kernels import _dropped, _low_rank_grads, _masked_scale, _operand


def dora_weight_norm(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Row norms ‖W_j + s (B A)_j‖ of an (out, in) weight without forming B·A.

    ‖W_j + s B_j A‖² = ‖W_j‖² + 2s · B_j·(A W_jᵀ) + s² · B_j (A Aᵀ) B_jᵀ: one reduction over W and
    (out × r), (r × r) products.
    """
    dt = torch.promote_types(W.dtype, torch.float32)  # at least fp32 for the sums; never lower than the input
    W32, A32, B32 = W.to(dt), A.to(dt), B.to(dt)
    # ‖W_j‖² is not cached, although W is frozen: a cache cannot see in-place writes to W (load_state_dict,
    # merge) without the private Tensor._version, and this one read of W (a reduction with no temporary)
    # measured ~1% of the W·Aᵀ product next to it.
    w_sq = torch.linalg.vector_norm(W32, dim=1).square()  # (out,)
    cross = (B32 * (W32 @ A32.T)).sum(dim=1)  # (out,)
    lora_sq = ((B32 @ (A32 @ A32.T)) * B32).sum(dim=1)  # (out,)
    # Cancellation can push a true zero slightly negative in floating point.
    return (w_sq + 2 * scaling * cross + scaling**2 * lora_sq).clamp_min(0).sqrt()


class _DoraLinearFn(torch.autograd.Function):
    """y = c ⊙ z + b with z = x Wᵀ + s · (x Aᵀ) Bᵀ and c = m / n, n = ‖W + s B A‖_row detached (DoRA §4.3).

    Backward, with g = ∂L/∂y:
      ∂L/∂m = Σ_N (g ⊙ z) / n          (out,), z recovered as (y − b) / c
      g' = g ⊙ c, then the LoRA backward above with g' in place of g (no dropout here).
    Saving the output y instead of z costs nothing extra when the next op keeps y alive anyway
    (attention and the MLP's activation do), which keeps DoRA's saved activations close to LoRA's.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling, scale, magnitude):
        ctx.x_dtype = x.dtype
        x = _operand(x, weight.dtype)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        xa = x2 @ A.T  # (N, r)
        y = x2 @ weight.T  # (N, out)
        y.addmm_(xa, B.T, alpha=scaling).mul_(scale)
        if bias is not None:
            y.add_(bias)
        ctx.save_for_backward(x, weight, bias, A, B, xa, scale.detach(), magnitude.detach(), y)
        ctx.scaling = scaling
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, A, B, xa, scale, magnitude, y = ctx.saved_tensors
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        x2 = x.reshape(-1, x.shape[-1])
        grad_m = grad_bias = grad_x = None
        if ctx.needs_input_grad[7]:
            z = y if bias is None else y - bias
            # ∂L/∂m = Σ g ⊙ z / n and z / n = (y − b) / (c n) = (y − b) / m.
            grad_m = (g * z).sum(0) / magnitude
        if ctx.needs_input_grad[2] and bias is not None:
            grad_bias = g.sum(0)
        gc = g * scale  # (N, out)
        u, grad_a, grad_b = _low_rank_grads(gc, x2, A, B, xa, s, *ctx.needs_input_grad[3:5])
        if ctx.needs_input_grad[0]:
            grad_x = (gc @ weight).addmm_(u, A).view(x.shape).to(ctx.x_dtype)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, grad_m


class _DoraAddFn(torch.autograd.Function):
    """y = c ⊙ (base_out − b + s · (x Aᵀ) Bᵀ) + b, with c = m / n: DoRA on a base whose output (with its bias b)
    the caller computed.

    Backward, with g = ∂L/∂y and gc = g ⊙ c:
      ∂L/∂m = Σ_N g ⊙ (y − b) / m      (as in :class:`_DoraLinearFn`)
      ∂L/∂base_out = gc                the base's own backward takes it from there (gc W for the input)
      ∂L/∂x = u A (the low-rank part), ∂L/∂A, ∂L/∂B from gc (:func:`_low_rank_grads`)
      ∂L/∂b = Σ_N g ⊙ (1 − c)          the bias's path through base_out brings the Σ_N gc
    As autograd on the plain expression this made five (N, out) tensors in the forward and as many in the
    backward: on a 4-bit base, DoRA's step took 1.25x LoRA's in bf16, against ~1.05x on dense layers.
    """

    @staticmethod
    def forward(ctx, x, base_out, bias, A, B, scaling, scale, magnitude):
        ctx.x_dtype, ctx.x_shape = x.dtype, x.shape
        x = _operand(x, A.dtype)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        xa = x2 @ A.T  # (N, r)
        y = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), xa, B.T, alpha=scaling)  # z + b
        if bias is not None:
            y.sub_(bias)
        y.mul_(scale)
        if bias is not None:
            y.add_(bias)
        ctx.save_for_backward(x, bias, A, B, xa, scale.detach(), magnitude.detach(), y)
        ctx.scaling = scaling
        return y.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x, bias, A, B, xa, scale, magnitude, y = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        grad_m = grad_bias = grad_base = grad_x = None
        if ctx.needs_input_grad[7]:
            grad_m = (g * (y if bias is None else y - bias)).sum(0) / magnitude
        gc = g * scale  # (N, out)
        if ctx.needs_input_grad[2] and bias is not None:
            grad_bias = g.sum(0) - gc.sum(0)
        u, grad_a, grad_b = _low_rank_grads(gc, x.reshape(-1, x.shape[-1]), A, B, xa, ctx.scaling,
                                            *ctx.needs_input_grad[3:5])
        if ctx.needs_input_grad[0]:
            grad_x = (u @ A).view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_base = gc.view(grad_out.shape)
        return grad_x, grad_base, grad_bias, grad_a, grad_b, None, None, grad_m


def dora_linear(x, weight, bias, A, B, scaling: float, scale: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Fused DoRA forward: ``scale ⊙ (x Wᵀ + s (x Aᵀ) Bᵀ) + b`` where ``scale = magnitude / norm``."""
    return _DoraLinearFn.apply(x, weight, bias, A, B, scaling, scale, magnitude)


class _DoraDroppedFn(torch.autograd.Function):
    """DoRA with dropout, as peft runs it: y = base_out + (c − 1) ⊙ x̃ Wᵀ + c ⊙ s · (x̃ Aᵀ) Bᵀ, x̃ = x ⊙ mask · k.
    The magnitude rescales the base term of the dropped input, so x̃ Wᵀ is a second GEMM whatever the layer.

    With z = x̃ Wᵀ + s · (x̃ Aᵀ) Bᵀ this is y = base_out − x̃ Wᵀ + c ⊙ z. Backward, with g = ∂L/∂y:
      ∂L/∂m = Σ_N g ⊙ z / n = Σ_N g ⊙ z · c / m     (n detached)
      ∂L/∂base_out = g
      ∂L/∂x = ((g ⊙ (c − 1)) W + u A) ⊙ mask · k, u = s (g ⊙ c) B; ∂L/∂A, ∂L/∂B from g ⊙ c
    Saved: x̃ (shared by the layers reading x with one mask), the bool mask, x̃ Aᵀ and z. As autograd on the
    expression it also made a float mask per layer and five (N, out) temporaries each way.
    """

    @staticmethod
    def forward(ctx, x, base_out, weight, A, B, scaling, scale, magnitude, mask, keep):
        ctx.x_dtype, ctx.x_shape, source = x.dtype, x.shape, x
        x = _operand(x, A.dtype)
        xd = _dropped(source, x, mask, keep)  # (N, in)
        xa = xd @ A.T  # (N, r)
        p = F.linear(xd, weight)  # (N, out): the base term of the dropped input
        z = torch.addmm(p, xa, B.T, alpha=scaling)
        y = (base_out.reshape(p.shape) - p).addcmul_(z, scale)
        ctx.save_for_backward(xd, weight, A, B, xa, scale.detach(), magnitude.detach(), z, mask)
        ctx.scaling, ctx.keep = scaling, keep
        return y.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad_out):
        xd, weight, A, B, xa, scale, magnitude, z, mask = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        grad_m = grad_x = None
        if ctx.needs_input_grad[7]:
            grad_m = (g * z).sum(0) * (scale / magnitude)
        gc = g * scale
        u, grad_a, grad_b = _low_rank_grads(gc, xd, A, B, xa, ctx.scaling, *ctx.needs_input_grad[3:5])
        if ctx.needs_input_grad[0]:
            grad_xd = torch.addmm(u @ A, gc - g, weight)  # (N, in) = (g ⊙ (c − 1)) W + u A
            grad_x = _masked_scale(grad_xd, mask.reshape(grad_xd.shape), ctx.keep).view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, grad_out, None, grad_a, grad_b, None, None, grad_m, None, None


def dora_dropped(x, base_out, weight, A, B, scaling: float, scale, magnitude, mask, keep: float) -> torch.Tensor:
    """DoRA with dropout on a computed base output (see :class:`_DoraDroppedFn`); weight frozen, in A's dtype."""
    return _DoraDroppedFn.apply(x, base_out, weight, A, B, scaling, scale, magnitude, mask, keep)


def dora_add(x, base_out, bias, A, B, scaling: float, scale: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA on a computed base output: ``scale ⊙ (base_out − b + s (x Aᵀ) Bᵀ) + b``; base_out in A's dtype."""
    return _DoraAddFn.apply(x, base_out, bias, A, B, scaling, scale, magnitude)
