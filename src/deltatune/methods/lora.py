"""LoRA, rsLoRA and DoRA on Linear, transformers' Conv1D, Embedding and 4-bit/8-bit linear layers
(nn.Conv1d/2d/3d: :mod:`deltatune.methods.lora_conv`; MoE expert parameters: :mod:`deltatune.methods.lora_param`).

LoRA (Hu et al., 2021, arXiv:2106.09685): y = W x + s · B A x, with s = alpha / r.
rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732): s = alpha / sqrt(r).
DoRA (Liu et al., 2024, arXiv:2402.09353): y = m ⊙ (W + s B A) x / ‖W + s B A‖_row, the norm treated
as a constant in backward (section 4.3).

The variants are independent choices on one adapter class, not subclasses.

A :class:`LoraLinear` has two named paths. :meth:`LoraLinear.low_rank_forward` is the training path and
the default for inference: the same computation whatever the number of tokens. :meth:`LoraLinear.merged_forward`
runs the layer as one matrix W' = W + s·B·A; it is inference only, and only inside :func:`merged_inference`,
which eval code enters explicitly when it scores many tokens per call.
"""
from __future__ import annotations

import contextlib
import math
import types
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.config import LoraConfig, PeftType
from deltatune.surgery.partitioned import gathered, is_partitioned
from deltatune.methods.base import LLAMA_LINEAR, Adapter, Method, Variant, adapter_dtype, dense_weight, layer_dims, register_method, set_dense_weight
from deltatune.methods.default_targets import LORA_DEFAULT_TARGETS, present  # LORA_DEFAULT_TARGETS re-exported
from deltatune.methods.lora_conv import CONV_TYPES, make_lora_conv
from deltatune.methods.lora_init import init_factors
from deltatune.methods.lora_param import make_lora_param_adapter, peft_moe_config
from deltatune.methods.lora_bias import fold_lora_bias, lora_bias_for
from deltatune.methods.dora_kernels import dora_add, dora_dropped, dora_linear, dora_weight_norm
from deltatune.methods.lora_kernels import autocast_dtype as _autocast_dtype, lora_add, lora_linear, reused_cast
from deltatune.methods.lora_kernels import shared_dropout_mask as _shared_dropout_mask
from deltatune.quant import quantized_linear_types
from deltatune.surgery.targets import default_targets, pattern_value


# ---- functional core -------------------------------------------------------------------------------
def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """s · (x Aᵀ) Bᵀ for x (..., in), A (r, in), B (out, r)."""
    return (x @ A.T) @ B.T * scaling  # (..., out)


# ---- modules ---------------------------------------------------------------------------------------
class LoraLinear(Adapter):
    """LoRA/rsLoRA/DoRA for any layer with an (out, in) weight: nn.Linear, Conv1D, Linear4bit."""

    peft_keys = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude_vector": "lora_magnitude_vector",
                 "lora_B_bias": "lora_B.bias"}

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, use_rslora: bool, use_dora: bool,
                 lora_bias: nn.Parameter | None = None) -> None:
        super().__init__()
        out_f, in_f = layer_dims(base_layer)
        dtype = adapter_dtype(base_layer)
        self.r, self.lora_alpha, self.use_dora = r, alpha, use_dora
        self.scaling = lora_scaling(alpha, r, use_rslora)
        self.dropout_p = dropout
        self.lora_A = nn.Parameter(torch.zeros(r, in_f, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_f, r, dtype=dtype))  # (out, r)
        self.lora_magnitude_vector = nn.Parameter(torch.ones(out_f, dtype=dtype)) if use_dora else None
        self.lora_B_bias = lora_bias  # (out,) peft's lora_B.bias, or None (methods/lora_bias.py)
        # The fused kernels need a plain dense nn.Linear base and no lora bias; anything else takes the generic path.
        self.fuses_base = type(base_layer) is nn.Linear and lora_bias is None
        self._merge_norm: torch.Tensor | None = None
        # Set by merged_inference() only; forward then takes merged_forward where it can.
        self.run_merged = False

    def init_magnitude(self, base_layer: nn.Module) -> None:
        """DoRA starts with m = ‖W + s B A‖_row, so the wrapped layer initially equals the base."""
        if self.use_dora:
            with torch.no_grad():
                W = dense_weight(base_layer)  # on the base's device; the factors may still be on the CPU
                norm = dora_weight_norm(W, self.lora_A.to(W.device), self.lora_B.to(W.device), self.scaling)
                self.lora_magnitude_vector.copy_(norm.to(self.lora_magnitude_vector.dtype))

    def _norm(self, W: torch.Tensor) -> torch.Tensor:
        return dora_weight_norm(W.detach(), self.lora_A.detach(), self.lora_B.detach(), self.scaling)

    def _dropping(self) -> bool:
        return self.training and self.dropout_p > 0

    def _can_fuse(self, x: torch.Tensor, base: nn.Module) -> bool:
        return (
            self.fuses_base
            and not base.weight.requires_grad
            and not is_partitioned(base.weight)  # ZeRO-3: only base_layer's own forward gathers its weight
            and (_autocast_dtype(x) is not None or x.dtype == base.weight.dtype == self.lora_A.dtype)
            and not (self.use_dora and self._dropping())
        )

    def forward(self, x: torch.Tensor, base_layer: nn.Module, base_out: torch.Tensor | None) -> torch.Tensor:
        # Which path never depends on the input's size: merged only where the caller asked for it.
        if self.run_merged and base_out is None and self._can_fuse(x, base_layer):
            return self.merged_forward(x, base_layer)
        return self.low_rank_forward(x, base_layer, base_out)

    def low_rank_forward(self, x: torch.Tensor, base_layer: nn.Module, base_out: torch.Tensor | None) -> torch.Tensor:
        """y = W x + b + s · B A dropout(x) (DoRA: rescaled per row): the training path, and inference's default.

        The same computation for any number of tokens. It runs as one fused autograd function
        (:mod:`deltatune.methods.lora_kernels`) when the base is a frozen, plain ``nn.Linear`` in the
        adapter's dtype and its output is not computed yet; otherwise as autograd on the plain expression,
        on top of ``base_out`` (computed here when None).
        """
        if base_out is None and self._can_fuse(x, base_layer):
            return self._fused(x, base_layer)
        if base_out is None:
            base_out = base_layer(x)
        return self._generic(x, base_layer, base_out)

    def merged_forward(self, x: torch.Tensor, base_layer: nn.Linear) -> torch.Tensor:
        """Inference only: y = W' x + b with W' = :meth:`merged_weight`, formed for this call.

        The low-rank path re-reads x and re-writes y, N·(in + 2·out) floats, in two skinny matmuls that are
        memory-bound on CPUs (+8-15% of the base matmul at r=16, measured); forming W' moves 2·in·out floats
        whatever the token count N. So W' pays on many tokens per call (batched scoring) and loses on few
        (decode steps): a choice for the caller, made through :func:`merged_inference`. The stored weight is
        never modified. The result equals :meth:`low_rank_forward`'s up to W' being rounded to W's dtype.

        Raises:
            RuntimeError: autograd is on or dropout is active; W' has neither.
        """
        if torch.is_grad_enabled() or self._dropping():
            raise RuntimeError(
                "LoraLinear.merged_forward is for inference: autograd is on or dropout is active (training mode "
                "with lora_dropout > 0). Run it inside merged_inference(model) after model.eval(), or use low_rank_forward"
            )
        return F.linear(x, self.merged_weight(base_layer), base_layer.bias)

    def merged_weight(self, base_layer: nn.Linear) -> torch.Tensor:
        """W + s·B·A, times DoRA's per-row m / ‖W + s·B·A‖: the layer as one (out, in) matrix, a new tensor."""
        W = torch.addmm(base_layer.weight, self.lora_B, self.lora_A, alpha=self.scaling)  # (out, in)
        if self.use_dora:
            W.mul_((self.lora_magnitude_vector / self._norm(base_layer.weight).to(W.dtype))[:, None])
        return W

    def _fused(self, x: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        scale = mask = None
        if self.use_dora:
            scale = self.lora_magnitude_vector / self._norm(base.weight)  # (out,), norm detached
        elif self._dropping():
            mask = _shared_dropout_mask(x, self.dropout_p, self)  # drawn for x itself, shared by its readers
        dt = _autocast_dtype(x)
        if dt is None:
            return self._fused_in(x, base.weight, base.bias, self.lora_A, self.lora_B, scale, mask)
        # Under autocast (bf16 training on CPUs with native bf16, or on GPUs) the kernel runs in autocast's
        # dtype with every operand cast once here: what autocast would do to F.linear and the two thin
        # matmuls, minus its second cast of x for the LoRA branch, the float dropout mask and the separate
        # delta + sum. The casts of A and B are autograd ops, so their gradients arrive in fp32. W is cast
        # per call, as autocast does, unless this step's cast is still saved (reused_cast); x is cast
        # inside the kernel (to W's dtype), which returns x's gradient in x's own dtype.
        with torch.autocast(x.device.type, enabled=False):
            bias = None if base.bias is None else base.bias.to(dt)
            return self._fused_in(x, reused_cast(base.weight, dt), bias, self.lora_A.to(dt), self.lora_B.to(dt),
                                  scale, mask)

    def _fused_in(self, x, weight, bias, A, B, scale, mask) -> torch.Tensor:
        if self.use_dora:
            # the kernel returns the magnitude's gradient in the magnitude's own dtype (fp32)
            return dora_linear(x, weight, bias, A, B, self.scaling, scale.to(weight.dtype), self.lora_magnitude_vector)
        return lora_linear(x, weight, bias, A, B, self.scaling, mask, 1 / (1 - self.dropout_p))

    def _generic(self, x: torch.Tensor, base: nn.Module, base_out: torch.Tensor) -> torch.Tensor:
        dt = _autocast_dtype(x)
        if self.lora_B_bias is None and base_out.dtype == (dt or self.lora_A.dtype):
            # one autograd node adds the adapter's term (4-bit/8-bit and Conv1D bases, several adapters, DoRA
            # with dropout), with the fused path's dropout mask; operands cast once, as in _fused
            with torch.autocast(x.device.type, enabled=False) if dt else contextlib.nullcontext():
                A, B = self.lora_A.to(base_out.dtype), self.lora_B.to(base_out.dtype)
                keep, m = 1 / (1 - self.dropout_p), self.lora_magnitude_vector
                if not self.use_dora:
                    mask = _shared_dropout_mask(x, self.dropout_p, self) if self._dropping() else None
                    return lora_add(x, base_out, A, B, self.scaling, mask, keep)
                W = self._dense(base)
                scale = (m / self._norm(W)).to(base_out.dtype)
                if not self._dropping():
                    bias = getattr(base, "bias", None)
                    bias = None if bias is None else bias.to(base_out.dtype)
                    return dora_add(x, base_out, bias, A, B, self.scaling, scale, m)
                if not W.requires_grad:  # the kernel gives the base weight no gradient
                    mask = _shared_dropout_mask(x, self.dropout_p, self)
                    return dora_dropped(x, base_out, W.to(base_out.dtype), A, B, self.scaling, scale, m, mask, keep)
        xd = F.dropout(x, self.dropout_p, self.training).to(self.lora_A.dtype)
        delta = lora_delta(xd, self.lora_A, self.lora_B, self.scaling)  # (..., out)
        delta = delta if self.lora_B_bias is None else delta + self.scaling * self.lora_B_bias  # lora_bias (no DoRA)
        if not self.use_dora:
            return base_out + delta.to(base_out.dtype)
        W = self._dense(base)
        scale = self.lora_magnitude_vector / self._norm(W).to(W.dtype)  # (out,)
        bias = getattr(base, "bias", None)
        if self._dropping():
            base_part = F.linear(xd, W)  # the base term sees the same dropped input as the LoRA term
        else:
            # In the base's dtype, as peft does: the product with the fp32 scale promotes, and autograd
            # keeps this (half-precision) tensor for the magnitude's gradient, not an fp32 copy of it.
            base_part = base_out if bias is None else base_out - bias
        return base_out + ((scale - 1) * base_part + scale * delta).to(base_out.dtype)

    def _dense(self, base: nn.Module) -> torch.Tensor:
        """The base's weight as a dense (out, in) tensor in the adapter's dtype (4-bit: dequantized)."""
        with gathered((getattr(base, "weight", None),)):  # ZeRO-3 released it after base's forward: a copy
            W = dense_weight(base, self.lora_A.dtype)
            return W.clone() if is_partitioned(getattr(base, "weight", None)) else W

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)  # (out, in)

    @torch.no_grad()
    def merge(self, base_layer: nn.Module) -> None:
        if not self.use_dora:
            fold_lora_bias(self, base_layer, +1)
            return super().merge(base_layer)
        W = dense_weight(base_layer, torch.float32)
        norm = self._norm(W)
        self._merge_norm = norm  # kept so unmerge divides by exactly what merge multiplied by
        scale = (self.lora_magnitude_vector.float() / norm)[:, None]
        set_dense_weight(base_layer, scale * (W + self.delta_weight(base_layer).float()))

    @torch.no_grad()
    def unmerge(self, base_layer: nn.Module) -> None:
        if not self.use_dora:
            fold_lora_bias(self, base_layer, -1)
            return super().unmerge(base_layer)
        W = dense_weight(base_layer, torch.float32)
        scale = (self.lora_magnitude_vector.float() / self._merge_norm)[:, None]
        set_dense_weight(base_layer, W / scale - self.delta_weight(base_layer).float())
        self._merge_norm = None


class LoraEmbedding(Adapter):
    """LoRA on nn.Embedding: the id is looked up in Aᵀ (num_embeddings × r), then mapped by B."""

    peft_keys = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}

    def __init__(self, base_layer: nn.Embedding, r: int, alpha: float, use_rslora: bool) -> None:
        super().__init__()
        self.r, self.lora_alpha, self.use_dora = r, alpha, False
        self.scaling = lora_scaling(alpha, r, use_rslora)
        dtype = base_layer.weight.dtype
        self.lora_A = nn.Parameter(torch.zeros(r, base_layer.num_embeddings, dtype=dtype))  # (r, vocab)
        self.lora_B = nn.Parameter(torch.zeros(base_layer.embedding_dim, r, dtype=dtype))  # (dim, r)

    def forward(self, x: torch.Tensor, base_layer: nn.Embedding, base_out: torch.Tensor | None) -> torch.Tensor:
        if base_out is None:
            base_out = base_layer(x)
        after_a = F.embedding(x, self.lora_A.T, padding_idx=base_layer.padding_idx)  # (..., r)
        return base_out + (after_a @ self.lora_B.T * self.scaling).to(base_out.dtype)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)  # (dim, vocab): the (out, in) view


# ---- inference -------------------------------------------------------------------------------------
@contextlib.contextmanager
def merged_inference(model: nn.Module) -> Iterator[nn.Module]:
    """Run every LoRA/DoRA linear layer of ``model`` as one matrix, W + s·B·A, under ``torch.no_grad()``.

    For code that scores many tokens per forward (``deltatune eval``'s loss, first-token accuracy, the
    trainer's eval loss): there one matmul with the merged weight is cheaper than the low-rank path (see
    :meth:`LoraLinear.merged_forward`). Not for token-by-token decoding, where forming the weight on
    every call costs more than it saves. Outputs equal the default path's up to the merged weight's
    rounding to the base dtype, whatever the batch; nothing is merged into the stored weights, and on
    exit every layer is as it was (the context nests). Layers whose base is not a plain ``nn.Linear`` in
    the adapter's dtype (Conv1D, 4-bit, under autocast) or that run several adapters at once keep the
    low-rank path. The switch is on the layers, so it holds for every thread using ``model`` meanwhile.

    Args:
        model: a module holding LoRA layers: a PeftModel, its base model; without any, this is ``no_grad``.

    Yields:
        ``model``.

    Raises:
        ValueError: a LoRA layer would apply dropout (training mode with ``lora_dropout > 0``).
    """
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    if any(layer._dropping() for layer in layers):
        raise ValueError(
            "merged_inference runs LoRA layers without dropout, but the model is in training mode with "
            "lora_dropout > 0; call model.eval() before entering it"
        )
    before = [layer.run_merged for layer in layers]
    try:
        for layer in layers:
            layer.run_merged = True
        with torch.no_grad():
            yield model
    finally:
        for layer, was in zip(layers, before):
            layer.run_merged = was


# ---- construction ----------------------------------------------------------------------------------
def make_lora_adapter(config: LoraConfig, base_layer: nn.Module, module_name: str) -> Adapter:
    """Build and initialise one LoRA adapter for ``base_layer`` (may move the base weight for PiSSA/OLoRA)."""
    r = pattern_value(config.rank_pattern, module_name, config.r)
    alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
    bias = lora_bias_for(config, base_layer, module_name, r)  # None without lora_bias (methods/lora_bias.py)
    if isinstance(base_layer, CONV_TYPES):
        return make_lora_conv(config, base_layer, r, alpha)  # methods/lora_conv.py
    if isinstance(base_layer, nn.Embedding):
        if config.use_dora:
            raise ValueError(
                f"{module_name}: DoRA on an Embedding layer is not supported by deltatune; "
                "use plain LoRA for embeddings, or exclude it from target_modules"
            )
        adapter: Adapter = LoraEmbedding(base_layer, r, alpha, config.use_rslora)
    else:
        adapter = LoraLinear(base_layer, r, alpha, config.lora_dropout, config.use_rslora, config.use_dora, bias)
    init_factors(adapter, base_layer, config.init_lora_weights, config.loftq_config)
    if isinstance(adapter, LoraLinear):
        adapter.init_magnitude(base_layer)
    return adapter


def _supported_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D, nn.Embedding, *CONV_TYPES, *quantized_linear_types())


def prepare_lora_config(config: LoraConfig, model: nn.Module) -> LoraConfig:
    """peft's per-family default targets written into the config when ``target_modules`` is None, as peft
    does: the saved ``adapter_config.json`` then names the modules (serving tools read that list)."""
    if (prepared := peft_moe_config(config, model)) is not None:  # target_parameters, MoE experts: lora_param.py
        return prepared
    targets = present(model, default_targets(model, PeftType.LORA))
    return config.replace(target_modules=targets if isinstance(targets, str) else list(targets))


LORA_PRESET: Mapping[str, Any] = types.MappingProxyType(
    {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": list(LLAMA_LINEAR), "layers_to_transform": "upper_half"}
)
"""Default LoRA options of ``deltatune train``: rank 8 on every linear layer of the upper half of the blocks
(resolved per model, ``train.method_config.RELATIVE_LAYERS``: backward then stops halfway, docs/training.md);
the default model is LLaMA-shaped: for other families set ``method.target_modules``, or ``all-linear``."""

register_method(
    Method(
        PeftType.LORA, LoraConfig, make_lora_adapter, layer_types=_supported_types(), prepare_config=prepare_lora_config,
        name="lora",
        variants=(
            Variant("dora", types.MappingProxyType({"use_dora": True})),
            Variant("rslora", types.MappingProxyType({"use_rslora": True})),
            Variant("qlora", quantized=True),
        ),
        train_preset=LORA_PRESET, default_targets=types.MappingProxyType(LORA_DEFAULT_TARGETS),
        merges=True, servable=True, plannable=True, make_param_adapter=make_lora_param_adapter,
    )
)
