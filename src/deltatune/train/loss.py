"""Causal-LM cross-entropy that never materialises the full (tokens, vocab) logits.

With SmolLM2's 49,152-token vocabulary the logits are the largest activation in training: 1,024
tokens give a 192 MiB fp32 logits tensor, and the standard path keeps two more of that size (the
log-softmax saved for backward and its gradient). :func:`fused_linear_cross_entropy` runs the
output projection and the loss chunk by chunk and computes the gradients in the same pass, so the
extra memory is one chunk of logits. :func:`causal_lm_loss` applies it to a transformers model,
projecting only the positions that carry a label.

The idea is the chunked "fused linear cross-entropy" of Liger-Kernel (Hsu et al., 2024,
arXiv:2410.10989) and Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models" (2024).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.surgery.partitioned import gathered, is_partitioned, zero3_plain_linear
from deltatune.model import PeftModel
from deltatune.train.engines import engine_entry, gathered_plain_linear, run_as_forward, unwrap_engine
from deltatune.train.shared_prefix import trunk_hidden

DEFAULT_MEMORY_BUDGET = 64 * 2**20
"""Bytes one chunk's logits (and its gradient, computed in place) may take; picks the chunk size."""

# Families whose CausalLM forward is exactly ``lm_head(base_model(...).last_hidden_state)`` followed
# by ForCausalLMLoss (checked against transformers 5.23). Others (MoE with router aux losses,
# Gemma-2/3 softcapping, Cohere/Granite logit scales, multimodal) take the model's own loss.
SUPPORTED_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gpt2", "phi", "phi3", "gemma", "olmo", "olmo2",
    "smollm3", "starcoder2", "gpt_neox", "stablelm",
})
# Config fields that change logits after the output projection; any of them set disables fusion.
_LOGIT_MODIFIERS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
_warned_reasons: set[str] = set()


def chunk_size_for_budget(vocab_size: int, dtype: torch.dtype, budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Tokens per chunk so that one chunk's logits fit in ``budget_bytes``.

    Per token the working set is a logits row in the accumulation dtype (fp32, or fp64 for fp64
    inputs), which the softmax gradient reuses in place, plus a copy in the matmul dtype when that
    is narrower (bf16/fp16 logits before the upcast, and the gradient cast back for the matmuls).
    """
    acc = _acc_dtype(dtype)
    per_token = vocab_size * acc.itemsize + (vocab_size * dtype.itemsize if dtype != acc else 0)
    return max(1, budget_bytes // per_token)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # log-sum-exp over ~50k terms needs fp32; fp64 inputs stay fp64 so tests can be tight.
    return torch.promote_types(dtype, torch.float32)


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    # Gradients are finished in forward, before the GradScaler's factor arrives in backward: fp16
    # would underflow small entries that the scaled reference keeps, so fp16 grads wait in fp32.
    # bf16 has fp32's exponent range and is stored as is.
    return torch.float32 if dtype == torch.float16 else dtype


def _sweep(hidden, weight, bias, labels, ignore_index, chunk_size, grad_scale, want):
    """One chunked pass: the summed loss and, if ``grad_scale`` is given, the scaled gradients.

    ``want`` = (hidden, weight, bias) flags. Returns ``(loss_sum, (grad_h, grad_w, grad_b))`` with
    ``None`` for gradients not wanted. ``grad_scale`` multiplies every gradient (1/n for a mean,
    and grad_output too when recomputing in backward).
    """
    n, h_dim = hidden.shape
    compute, acc = hidden.dtype, _acc_dtype(hidden.dtype)
    valid = labels != ignore_index  # (N,)
    safe = torch.where(valid, labels, 0)  # (N,) any in-range index; ignored rows are zeroed below
    loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
    grad_h = torch.empty(n, h_dim, dtype=_store_dtype(compute), device=hidden.device) if want[0] else None  # (N, H)
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want[1] else None  # (V, H)
    grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if want[2] else None  # (V,)
    for s in range(0, n, chunk_size):
        h_c, y_c, m_c = hidden[s:s + chunk_size], safe[s:s + chunk_size], valid[s:s + chunk_size]
        z = h_c @ weight.T if bias is None else torch.addmm(bias, h_c, weight.T)  # (C, V) compute dtype
        z = z.to(acc)  # (C, V) fp32 for the log-sum-exp
        z_y = z.gather(1, y_c[:, None]).squeeze(1)  # (C,)
        # log-sum-exp by hand, in place: torch.logsumexp would allocate a second (C, V) buffer, and
        # exp(z - max) is the softmax numerator the gradient needs anyway.
        z_max = z.amax(dim=-1, keepdim=True)  # (C, 1)
        e = z.sub_(z_max).exp_()  # (C, V)
        total = e.sum(dim=-1)  # (C,)
        lse = total.log() + z_max.squeeze(1)  # (C,)
        loss_sum += torch.where(m_c, lse - z_y, 0.0).sum()
        if grad_scale is None:
            del z, e
            continue
        # dL/dz = s * m * (softmax(z) - onehot(y)), built in place in the logits buffer.
        row = m_c.to(acc) * grad_scale  # (C,) 0 on ignored rows, 1/n for a mean
        g = e.mul_((row / total)[:, None])  # (C, V) s * m * softmax
        g.scatter_add_(1, y_c[:, None], -row[:, None])  # (C, V) minus s * m * onehot
        g_lo = g.to(compute)  # (C, V) the matmuls run in the inputs' dtype, like the reference
        if grad_h is not None:
            grad_h[s:s + chunk_size] = g_lo @ weight  # (C, H)
        if grad_w is not None:
            if compute == acc:
                grad_w.addmm_(g_lo.T, h_c)  # (V, H) in place: no (V, H) temporary per chunk
            else:
                grad_w += g_lo.T @ h_c  # (V, H) low-precision product, accumulated in fp32
        if grad_b is not None:
            grad_b += g.sum(0)  # (V,)
        # Release this chunk's logits now, or they live on while the next chunk's are allocated.
        del z, e, g, g_lo
    return loss_sum, (grad_h, grad_w, grad_b)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Loss ``L = s * sum_i m_i * CE(W h_i + b, y_i)``, with gradients computed in forward.

    Derivation. For one token with logits ``z = W h + b`` (length V) and label ``y``::

        l = logsumexp(z) - z_y
        dl/dz_j = exp(z_j) / sum_k exp(z_k) - [j == y] = p_j - onehot(y)_j

    With ``g_i = s * m_i * (p_i - onehot(y_i))`` stacked into G (N, V), where ``m_i`` is 0 for
    ``ignore_index`` tokens and ``s`` is 1/sum(m) for a mean (1 for a sum), the chain rule through
    ``z = W h + b`` gives::

        dL/dH = G @ W        (N, H)
        dL/dW = G^T @ H      (V, H)
        dL/db = sum_i g_i    (V,)

    Each chunk of G is turned into its rows of dL/dH and added into dL/dW, then dropped. L is a
    scalar, so backward only multiplies the stored gradients by ``grad_output``.

    With ``recompute=True`` forward computes the loss only and saves (H, W, b, labels); backward
    runs the same sweep again with ``s * grad_output`` as the scale. That costs one extra matmul
    of logits but leaves nothing but the inputs alive between forward and backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, chunk_size, reduction, recompute):
        n_valid = (labels != ignore_index).sum()
        # An all-ignored batch gives 0 with zero gradients, where F.cross_entropy's mean gives NaN.
        scale = 1.0 / n_valid.clamp(min=1).to(_acc_dtype(hidden.dtype)) if reduction == "mean" else 1.0
        want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        ctx.recompute, ctx.want, ctx.dtypes = recompute, want, (hidden.dtype, weight.dtype)
        if recompute:
            loss_sum, _ = _sweep(hidden, weight, bias, labels, ignore_index, chunk_size, None, (False,) * 3)
            ctx.save_for_backward(hidden, weight, bias, labels)
            ctx.scale, ctx.ignore_index, ctx.chunk_size = scale, ignore_index, chunk_size
        else:
            loss_sum, (grad_h, grad_w, grad_b) = _sweep(hidden, weight, bias, labels, ignore_index, chunk_size,
                                                        scale, want)
            w_store = _store_dtype(weight.dtype)  # bf16 weights keep a bf16 gradient, not the fp32 accumulator
            ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(w_store),
                                  None if grad_b is None else grad_b.to(w_store))
        return loss_sum * scale

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.recompute:
            hidden, weight, bias, labels = ctx.saved_tensors
            _, grads = _sweep(hidden, weight, bias, labels, ctx.ignore_index, ctx.chunk_size,
                              ctx.scale * grad_output, ctx.want)
        else:
            # Scaled in place: a copy would double the (V, H) peak. A second backward through the same
            # graph (retain_graph=True) then fails autograd's saved-tensor version check instead of
            # returning wrong gradients; recompute=True supports it.
            grads = tuple(None if g is None else g.mul_(grad_output) for g in ctx.saved_tensors)
        grad_h, grad_w, grad_b = grads
        h_dt, w_dt = ctx.dtypes
        return (None if grad_h is None else grad_h.to(h_dt), None if grad_w is None else grad_w.to(w_dt),
                None if grad_b is None else grad_b.to(w_dt), None, None, None, None, None)


def fused_linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None, ignore_index: int = -100,
    chunk_size: int | None = None, reduction: str = "mean", recompute: bool = False,
) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, chunked over tokens.

    Equals ``F.cross_entropy((hidden @ weight.T + bias).float(), labels, ignore_index=ignore_index,
    reduction=reduction)`` in value and gradients, except that an all-ignored batch gives 0 (not
    NaN). The logits are computed in the inputs' dtype and upcast to fp32 for the log-sum-exp; the
    returned loss is fp32 (fp64 for fp64 inputs) and gradients come back in the inputs' dtypes.
    Under autocast the inputs are cast to the autocast dtype, as ``nn.Linear`` would be.

    Args:
        hidden: (N, H) final hidden states of the supervised tokens.
        weight: (V, H) output projection. Its gradient is computed only if it requires grad
            (a frozen or tied ``lm_head`` under LoRA costs nothing extra).
        labels: (N,) target ids in [0, V) or ``ignore_index``.
        bias: optional (V,) output bias (Phi has one).
        ignore_index: label value that contributes neither loss nor gradient.
        chunk_size: tokens per chunk; default from :func:`chunk_size_for_budget`.
        reduction: ``"mean"`` over non-ignored tokens or ``"sum"``.
        recompute: compute gradients in backward by recomputing the logits instead of in forward.
            Measured slower at equal memory (benchmarks/bench_loss.py), so off by default.

    Returns:
        A scalar loss tensor.

    Raises:
        ValueError: on mismatched shapes, an unknown reduction, a chunk size below 1, or labels
            outside [0, V) that are not ``ignore_index``.
    """
    labels = labels.to(device=hidden.device, dtype=torch.long)  # gather and scatter index with int64
    _check_args(hidden, weight, labels, bias, ignore_index, chunk_size, reduction)
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        # Mirror what autocast does to lm_head; the casts are differentiable, so fp32 master weights
        # still receive fp32 gradients.
        dt = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    elif hidden.dtype != weight.dtype:
        dt = torch.promote_types(hidden.dtype, weight.dtype)
        hidden, weight = hidden.to(dt), weight.to(dt)
    if bias is not None and bias.dtype != weight.dtype:
        bias = bias.to(weight.dtype)
    chunk = chunk_size or chunk_size_for_budget(weight.shape[0], hidden.dtype)
    with torch.autocast(dev, enabled=False):
        if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))):
            # Evaluation: no gradient wanted, so skip the softmax-gradient work entirely.
            loss_sum, _ = _sweep(hidden, weight, bias, labels, ignore_index, chunk, None, (False,) * 3)
            n = (labels != ignore_index).sum().clamp(min=1)
            return loss_sum / n if reduction == "mean" else loss_sum
        return _FusedLinearCrossEntropy.apply(hidden, weight, bias, labels, ignore_index, chunk, reduction, recompute)


def _check_args(hidden, weight, labels, bias, ignore_index, chunk_size, reduction) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden (N, H) and weight (V, H); got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}. Flatten batch and sequence dims first: hidden.reshape(-1, H).")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"expected labels of shape ({hidden.shape[0]},) to match hidden; got {tuple(labels.shape)}.")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"expected bias of shape ({weight.shape[0]},); got {tuple(bias.shape)}.")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None for the memory-budget default); got {chunk_size}.")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
    if bad.any():
        raise ValueError(f"labels must be in [0, {weight.shape[0]}) or ignore_index={ignore_index}; got "
                         f"{labels[bad][:5].tolist()}. Check the tokenizer matches the model's vocabulary.")


def causal_lm_loss(
    model: nn.Module, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
    labels: Tensor | None = None, position_ids: Tensor | None = None, *, num_items_in_batch: Tensor | int | None = None,
    shift_labels: Tensor | None = None, ignore_index: int = -100, chunk_size: int | None = None,
    recompute: bool = False, regularize: bool = True, **kw,
) -> tuple[Tensor, int]:
    """Next-token loss of a transformers CausalLM without materialising (tokens, vocab) logits.

    Runs the decoder trunk, keeps the positions whose shifted label is not ``ignore_index``, and
    applies :func:`fused_linear_cross_entropy` with the output embedding's weight. Families in
    :data:`SUPPORTED_MODEL_TYPES` (llama, mistral, qwen2/3, gpt2, phi, phi3, gemma, olmo, smollm3,
    ...) take this path; a model whose config scales or softcaps logits, an unlisted family, or a
    prompt-learning or AdaLoRA wrapper from HF peft falls back to the model's own loss, with a warning
    once per reason. Under DDP, FSDP1/FSDP2 or DeepSpeed the fused loss runs as the wrapped model's
    forward, so the engine's parameter gathering and gradient hooks run around it.

    A deltatune :class:`~deltatune.model.PeftModel` gives the value of its own ``forward(...).loss``:
    the trunk runs on :meth:`~deltatune.model.PeftModel.model_inputs` (prompt tuning's virtual tokens
    with ``-100`` labels in front, prefix tuning's pre-filled cache), and
    :meth:`~deltatune.model.PeftModel.loss_penalty` (AdaLoRA's orthogonality term) is added.

    Args:
        model: a transformers CausalLM, or a PEFT wrapper whose ``get_base_model()`` returns one.
        input_ids: (B, T) token ids.
        attention_mask: (B, T) 1 for real tokens; with no labels, its zeros are not supervised.
        labels: (B, T) unshifted targets, ``ignore_index`` where unsupervised. Defaults to
            ``input_ids`` with padding ignored.
        position_ids: (B, T) positions, passed to the trunk.
        num_items_in_batch: if given, the summed loss is divided by it instead of by this batch's
            token count (the Trainer's gradient-accumulation normalisation).
        shift_labels: (B, T) already-shifted targets (padding-free collators); replaces ``labels``.
        ignore_index: label value excluded from the loss.
        chunk_size: tokens per chunk for the fused loss; default from the memory budget.
        recompute: see :func:`fused_linear_cross_entropy`.
        regularize: add the adapter's training penalty (AdaLoRA's orthogonality term), as the
            model's own forward does. False gives the plain language-model loss, for evaluation.
        **kw: passed to the trunk (e.g. ``token_type_ids``, ``inputs_embeds``).

    Returns:
        ``(loss, num_tokens)``: the mean (or ``num_items_in_batch``-normalised) loss, and the number
        of supervised tokens in this batch (virtual tokens' positions included, if they predict one).

    Raises:
        ValueError: with no targets to learn, or with ``shift_labels`` under prompt tuning (its virtual
            tokens need targets in front, which only ``labels`` get).
    """
    if shift_labels is None and labels is None:
        if input_ids is None:
            raise ValueError("causal_lm_loss needs labels, shift_labels or input_ids to know the targets.")
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    inputs = dict(kw, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels)
    outer, model = model, unwrap_engine(model)  # DDP/FSDP1/DeepSpeed: the model they wrap
    ours = isinstance(model, PeftModel)
    if ours:
        # PeftModel.forward is its user model's forward on these inputs, plus loss_penalty() on the loss.
        inputs = model.model_inputs(**inputs)
    labels = inputs.pop("labels")
    # Standard causal shift: position t predicts token t+1; the last position has no target.
    shifted = shift_labels if shift_labels is not None else F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # (B, T)
    supervised = shifted != ignore_index  # (B, T)
    lm = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    blocker = _fusion_blocker(model, lm, regularize)
    if blocker is not None:
        _warn_once(blocker)
        if outer is not model and not ours:  # the engine's forward is the model's: call it
            loss = _model_loss(outer, inputs, labels, shift_labels, num_items_in_batch)
        elif outer is not model:  # inputs are model_inputs' already: run the user model inside the engine
            loss = run_as_forward(outer, model, lambda: _model_loss(lm, inputs, labels, shift_labels, num_items_in_batch))
        else:  # an FSDP2 root gathers in hooks that this call runs
            loss = _model_loss(lm if ours else model, inputs, labels, shift_labels, num_items_in_batch)
    else:
        def fused() -> Tensor:
            return _fused_loss(lm, inputs, shifted, supervised, num_items_in_batch, ignore_index, chunk_size, recompute)
        # Under DDP/FSDP/DeepSpeed the fused loss runs as the model's forward, so the engine's gathering and
        # gradient hooks run around it (deltatune.train.engines).
        entry = engine_entry(outer, model, lm)
        loss = fused() if entry is None else run_as_forward(*entry, fused)
    penalty = model.loss_penalty() if ours and regularize else None
    return (loss if penalty is None else loss + penalty), int(supervised.sum())


def _fused_loss(lm, inputs, shifted, supervised, num_items_in_batch, ignore_index, chunk_size, recompute) -> Tensor:
    """The trunk on ``inputs``, then the fused head and cross-entropy on the supervised positions."""
    inputs.setdefault("use_cache", False)  # a KV cache is dead weight in a training forward
    # lm.base_model (named by base_model_prefix) is the module the head's own forward calls; unlike
    # get_decoder() it is defined the same way in transformers 4.x and 5.x.
    hidden = trunk_hidden(lm, inputs)  # (B, T, H); a prefix shared by every row runs once
    if hidden.shape[:2] != shifted.shape:
        raise ValueError(
            f"the model's trunk returned {hidden.shape[1]} positions for targets of length {shifted.shape[1]}: an "
            "adapter that inserts virtual tokens (prompt tuning) puts -100 in front of labels, which shift_labels "
            "cannot get; pass labels (unshifted) instead of shift_labels")
    hidden, targets = hidden[supervised], shifted[supervised]  # (n, H), (n,): only these reach the projection
    head = lm.get_output_embeddings()
    if _is_plain_linear(head):
        # ZeRO-3: the head is read here, never called. It is released after this block, so its gradients
        # (for the hidden states; the head is frozen) are all computed inside: no recompute in backward.
        with gathered((head.weight, head.bias)):
            loss_sum = fused_linear_cross_entropy(hidden, head.weight, targets, bias=head.bias, ignore_index=ignore_index,
                                                  chunk_size=chunk_size, reduction="sum",
                                                  recompute=recompute and not is_partitioned(head.weight))
    else:
        # An adapter wraps the head (LoRA on lm_head, modules_to_save): only its own forward gives
        # the right logits, so run it on the supervised rows, (n, V), not all (B*T, V).
        loss_sum = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    return loss_sum / (num_items_in_batch if num_items_in_batch is not None else max(targets.numel(), 1))


def _is_plain_linear(module: nn.Module | None) -> bool:
    # Exact forward and no hooks: 4-bit layers subclass nn.Linear with their own forward, and
    # adapter wrappers forward attribute lookups, so a ``.weight`` alone proves nothing.
    return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            and not module._forward_hooks and not module._forward_pre_hooks) or gathered_plain_linear(module) \
        or zero3_plain_linear(module)


def _fusion_blocker(model: nn.Module, lm: nn.Module, regularize: bool) -> str | None:
    """Why the fused path would not reproduce this model's loss, or None if it does."""
    cfg = getattr(lm, "config", None)
    if cfg is None or getattr(lm, "base_model", lm) is lm:
        return f"{type(model).__name__} is not a transformers model with a head on a trunk"
    # HF peft's own PeftModel (ours answers model_inputs and loss_penalty instead): what its forward adds
    # is out of reach, so its loss is the one to use.
    peft_config = None if isinstance(model, PeftModel) else getattr(model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        return "peft's prompt-learning adapters add virtual tokens in the wrapper's forward"
    if regularize and getattr(getattr(peft_config, "peft_type", None), "value", None) == "ADALORA":
        return "peft's AdaLoRA adds its orthogonality penalty to the loss in the wrapper's forward"
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not in deltatune.train.loss.SUPPORTED_MODEL_TYPES"
    modifiers = [name for name in _LOGIT_MODIFIERS if getattr(cfg, name, None) is not None]
    if modifiers:
        return f"config sets {modifiers}, which change logits after the output projection"
    if lm.get_output_embeddings() is None:
        return f"{type(lm).__name__} has no output embeddings"
    return None


def _warn_once(reason: str) -> None:
    if reason not in _warned_reasons:
        _warned_reasons.add(reason)
        warnings.warn(f"deltatune causal_lm_loss: using the model's own loss (full logits) because {reason}.",
                      stacklevel=3)


def _model_loss(model, inputs, labels, shift_labels, num_items_in_batch):
    """The standard path: the model's forward with labels (logit processing, aux losses and all)."""
    inputs = dict(inputs, labels=labels)
    if shift_labels is not None:  # ForCausalLMLoss reads them from kwargs; labels only switch the loss on
        inputs["labels"] = inputs["shift_labels"] = shift_labels
    if num_items_in_batch is not None:
        inputs["num_items_in_batch"] = num_items_in_batch
    return model(**inputs).loss
