"""AdaLoRA (Zhang et al., 2023, arXiv:2303.10512): LoRA in SVD form with an adaptive rank budget.

Each wrapped layer learns ΔW = P·Λ·Q (eq. 3) as triplets (P_i, λ_i, Q_i); peft's names are
``lora_B`` = P (out, r), ``lora_E`` = Λ (r, 1) and ``lora_A`` = Q (r, in). During training a global
budget of triplets shrinks on a cubic schedule (eq. 12) and the triplets with the lowest smoothed
sensitivity (eqs. 8-11) are masked by zeroing their λ_i. What only runs in training (the orthogonality
regulariser, the allocator, the Trainer callback) lives in :mod:`deltatune.methods.adalora_alloc`; this
module holds the layer adapter and the peft-format save/load at the pruned ranks; the config is in
:mod:`deltatune.methods.adalora_config` (re-exported here).

Call ``model.update_and_allocate(global_step)`` after ``backward()`` and before ``zero_grad()``,
or add :class:`AdaLoraCallback` to a transformers ``Trainer``.
"""
from __future__ import annotations

import types
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.config import PeftConfig, PeftType
from deltatune.io import checkpoint as ckpt
from deltatune.methods.adalora_alloc import (  # masks_by_module and E_KEY re-exported
    E_KEY, RankAllocator, budget_schedule, mask_using_rank_pattern, masks_by_module, orth_regularizer,
)
from deltatune.methods.adalora_config import AdaLoraConfig  # re-exported: the public import path
from deltatune.methods.base import (
    LLAMA_LINEAR, Adapter, Method, Site, adapter_dtype, layer_dims, linear_layer_types, register_method,
)
from deltatune.methods.default_targets import ADALORA_DEFAULT_TARGETS, for_config, model_type, present  # re-exported
from deltatune.surgery.inject import adapted_layers

RANKNUM_EPS = 1e-5  # peft divides by (ranknum + 1e-5); kept so merged weights match peft's bit for bit


# ---- functional core -------------------------------------------------------------------------------
def svd_scaling(lora_alpha: float, init_r: int) -> float:
    """peft's numerator: alpha, or init_r when alpha is 0. The update is divided by ranknum (= init_r)."""
    return lora_alpha if lora_alpha > 0 else float(init_r)


def svd_delta(x: torch.Tensor, A: torch.Tensor, E: torch.Tensor, B: torch.Tensor, scaling: float, ranknum: torch.Tensor) -> torch.Tensor:
    """(x (Q⊙λ)ᵀ) Pᵀ · alpha / ranknum for x (..., in), A = Q (r, in), E = Λ (r, 1), B = P (out, r)."""
    return (x @ (A * E).T @ B.T) * scaling / (ranknum + RANKNUM_EPS)  # (..., out)


def svd_delta_weight(A: torch.Tensor, E: torch.Tensor, B: torch.Tensor, scaling: float, ranknum: torch.Tensor) -> torch.Tensor:
    """ΔW = P Λ Q · alpha / ranknum as an (out, in) matrix (eq. 3)."""
    return B @ (A * E) * scaling / (ranknum + RANKNUM_EPS)  # (out, in)


# ---- module ----------------------------------------------------------------------------------------
class SVDAdapter(Adapter):
    """ΔW = P Λ Q on a layer with an (out, in) weight: nn.Linear, Conv1D, 4-bit/8-bit linear.

    ``ranknum`` is a frozen one-element parameter, as in peft (so parameter counts match); it stays
    init_r when the layer is pruned, so pruning never rescales the kept triplets. ``positions`` maps
    each current row to its index among the init_r original triplets.
    """

    peft_keys = {"lora_A": "lora_A", "lora_E": "lora_E", "lora_B": "lora_B"}

    def __init__(self, base_layer: nn.Module, init_r: int, lora_alpha: float, dropout: float, init_weights: bool) -> None:
        super().__init__()
        out_f, in_f = layer_dims(base_layer)
        dtype = adapter_dtype(base_layer)
        self.init_r, self.dropout_p = init_r, dropout
        self.scaling = svd_scaling(lora_alpha, init_r)
        self.positions: tuple[int, ...] = tuple(range(init_r))
        self.lora_A = nn.Parameter(torch.randn(init_r, in_f, dtype=dtype))  # (r, in)   Q
        self.lora_E = nn.Parameter(torch.randn(init_r, 1, dtype=dtype))  # (r, 1)    Λ
        self.lora_B = nn.Parameter(torch.randn(out_f, init_r, dtype=dtype))  # (out, r)  P
        self.ranknum = nn.Parameter(torch.full((1,), float(init_r), dtype=dtype), requires_grad=False)
        if init_weights:
            with torch.no_grad():
                self.lora_E.zero_()
                self.lora_A.normal_(0.0, 0.02)
                self.lora_B.normal_(0.0, 0.02)

    @property
    def r(self) -> int:
        return self.lora_E.shape[0]

    def requires_grad_(self, requires_grad: bool = True) -> "SVDAdapter":
        super().requires_grad_(requires_grad)
        self.ranknum.requires_grad_(False)  # a constant, never trained (peft keeps it frozen too)
        return self

    def forward(self, x: torch.Tensor, base_layer: nn.Module, base_out: torch.Tensor | None) -> torch.Tensor:
        if base_out is None:
            base_out = base_layer(x)
        xd = F.dropout(x.to(self.lora_A.dtype), self.dropout_p, self.training)
        return base_out + svd_delta(xd, self.lora_A, self.lora_E, self.lora_B, self.scaling, self.ranknum).to(base_out.dtype)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        return svd_delta_weight(self.lora_A, self.lora_E, self.lora_B, self.scaling, self.ranknum)

    def rows_kept_by(self, mask: Sequence[bool]) -> torch.Tensor:
        """Which current rows an init_r-long mask keeps, as a bool tensor of length r."""
        return torch.tensor([bool(mask[p]) for p in self.positions], dtype=torch.bool, device=self.lora_E.device)

    @torch.no_grad()
    def keep_rows(self, keep: torch.Tensor) -> None:
        """Shrink to the triplets where ``keep`` (length r) is True; ranknum, hence the scale, is unchanged.

        Makes new parameters: call it before building an optimizer (it is used when loading), never mid-run.
        """
        grad = self.lora_A.requires_grad
        self.positions = tuple(p for p, k in zip(self.positions, keep.tolist()) if k)
        self.lora_A = nn.Parameter(self.lora_A[keep].clone(), requires_grad=grad)  # (r', in)
        self.lora_E = nn.Parameter(self.lora_E[keep].clone(), requires_grad=grad)  # (r', 1)
        self.lora_B = nn.Parameter(self.lora_B[:, keep].clone(), requires_grad=grad)  # (out, r')


def make_svd_adapter(config: AdaLoraConfig, base_layer: nn.Module, module_name: str) -> SVDAdapter:
    """One AdaLoRA adapter at rank ``init_r`` for ``base_layer``."""
    return SVDAdapter(base_layer, config.init_r, config.lora_alpha, config.lora_dropout, config.init_lora_weights)


def svd_adapters(model: nn.Module, adapter_name: str) -> list[tuple[str, SVDAdapter]]:
    """(module path, adapter) for every AdaLoRA adapter named ``adapter_name``, in model order (by type)."""
    return [(n, h.adapters[adapter_name]) for n, h in adapted_layers(model)
            if adapter_name in h.adapters and isinstance(h.adapters[adapter_name], SVDAdapter)]


# ---- rank patterns on disk (peft's format) ---------------------------------------------------------
def _matched(model: nn.Module, adapter_name: str, masks: Mapping[str, Sequence[bool]]) -> list[tuple[str, SVDAdapter, Sequence[bool]]]:
    adapters = dict(svd_adapters(model, adapter_name))
    unknown = [m for m in masks if m not in adapters]
    if unknown:
        raise ValueError(
            f"rank_pattern names modules with no AdaLoRA adapter {adapter_name!r}: {unknown[:5]}; "
            f"adapted modules are {list(adapters)[:5]}... (was the checkpoint made for another model?)"
        )
    return [(m, adapters[m], mask) for m, mask in masks.items()]


def resize_to_rank_pattern(model: nn.Module, adapter_name: str, rank_pattern: Mapping[str, Sequence[bool]] | None) -> Callable[[], None]:
    """Shrink each adapter to the triplets its mask keeps (peft's ``resize_modules_by_rank_pattern``).

    Returns a function that restores the previous tensors, so a failed load leaves nothing changed.
    """
    saved = []
    for _, adapter, mask in _matched(model, adapter_name, masks_by_module(rank_pattern, adapter_name)):
        saved.append((adapter, adapter.positions, adapter.lora_A, adapter.lora_E, adapter.lora_B))
        adapter.keep_rows(adapter.rows_kept_by(mask))

    def undo() -> None:
        for adapter, positions, A, E, B in saved:
            adapter.positions, adapter.lora_A, adapter.lora_E, adapter.lora_B = positions, A, E, B

    return undo


# ---- model-level hooks -------------------------------------------------------------------------------


def prepare_adalora_config(config: AdaLoraConfig, model: nn.Module) -> AdaLoraConfig:
    """Fill in peft's AdaLoRA default targets for the model family; the filled-in config is what is saved."""
    if config.target_modules is not None:
        return config
    kind = model_type(model)
    if kind not in ADALORA_DEFAULT_TARGETS:
        raise ValueError(
            f"target_modules is not set and there is no AdaLoRA default for model type {kind!r} (nor in peft); "
            "pass target_modules=[...] naming the linear layers to adapt"
        )
    return config.replace(target_modules=present(model, for_config(ADALORA_DEFAULT_TARGETS[kind])))


def _supported_types() -> tuple[type, ...]:
    return linear_layer_types()


# ---- the method ---------------------------------------------------------------------------------------
def _callback():
    # transformers' trainer modules take seconds to import; only training needs the callback.
    from deltatune.methods.adalora_callback import AdaLoraCallback

    return AdaLoraCallback()


class AdaLoraMethod(Method):
    """AdaLoRA: the layer method plus one trainable adapter at a time, saving and loading at the pruned
    ranks, the orthogonality penalty on the loss, and the rank allocation after each optimizer step."""

    def check_addable(self, config: PeftConfig, name: str, others: Mapping[str, PeftConfig]) -> None:
        """peft's rule: AdaLoRA trains one adapter at a time."""
        trainable = [n for n, c in others.items() if n != name and isinstance(c, AdaLoraConfig) and not c.inference_mode]
        if trainable and not config.inference_mode:
            raise ValueError(
                f"AdaLoRA trains one adapter at a time and {trainable[0]!r} is already trainable; add "
                f"{name!r} with inference_mode=True, or delete_adapter({trainable[0]!r}) first"
            )

    def state_dict(self, site: Site, save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
        """peft's tensors (no ``ranknum``), keeping only the triplets that ``rank_pattern`` marks as kept."""
        model, name, config = site.model, site.name, site.config
        sd = ckpt.get_peft_model_state_dict(model, name, config)
        for path, adapter, mask in _matched(model, name, masks_by_module(config.rank_pattern, name)):
            keep = adapter.rows_kept_by(mask).cpu()
            prefix = f"{ckpt.PREFIX}{path}."
            sd[prefix + "lora_A"], sd[prefix + "lora_E"] = sd[prefix + "lora_A"][keep], sd[prefix + "lora_E"][keep]
            sd[prefix + "lora_B"] = sd[prefix + "lora_B"][:, keep]
        return sd

    def load_state_dict(self, site: Site, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Shrink the layers to the saved ``rank_pattern``, then load (all or nothing)."""
        undo = resize_to_rank_pattern(site.model, site.name, site.config.rank_pattern)
        try:
            ckpt.set_peft_model_state_dict(site.model, dict(state_dict), site.name, site.config)
        except Exception:
            undo()
            raise

    def loss_penalty(self, site: Site) -> torch.Tensor | None:
        """orth_reg_weight · R (eq. 4, as peft computes it) while this adapter trains, else None."""
        config = site.config
        if config.inference_mode or config.orth_reg_weight <= 0:
            return None
        factors = [(a.lora_A, a.lora_B) for _, a in svd_adapters(site.model, site.name)]
        return config.orth_reg_weight * orth_regularizer(factors) if factors else None

    def forward(self, site: Site, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward, plus :meth:`loss_penalty` on ``outputs.loss`` when a loss was computed
        (labels given), as peft's ``AdaLoraModel.forward`` does."""
        outputs = site.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        penalty = self.loss_penalty(site) if isinstance(loss, torch.Tensor) else None
        if penalty is not None:
            outputs.loss = loss + penalty
        return outputs

    def on_optimizer_step(self, site: Site, global_step: int) -> AdaLoraConfig | None:
        """Update importance and mask to the budget of ``global_step`` (peft's ``update_and_allocate``).

        Runs after ``loss.backward()`` (and ``optimizer.step()``) and before ``optimizer.zero_grad()``, with
        the 0-based index of the step just taken. Until ``total_step - tfinal`` it updates the EMA scores
        and masks on schedule, recording the masks in the config's ``rank_pattern`` (the config returned);
        at that step it fixes the final pattern; afterwards it only re-applies it. The allocator (peft's
        ``RankAllocator``) lives in ``site.state``.

        Raises:
            ValueError: no gradients (called at the wrong point).
        """
        config: AdaLoraConfig = site.config
        adapters = svd_adapters(site.model, site.name)
        allocator = site.state.get("rankallocator")
        if allocator is None:
            allocator = site.state["rankallocator"] = RankAllocator(site.name, config, len(adapters))
        end = config.total_step - config.tfinal
        if global_step > end and config.rank_pattern is not None:
            mask_using_rank_pattern(adapters, config.rank_pattern, site.name)
            return None
        if global_step < end or not allocator.exp_avg_ipt:
            allocator.update_ipt(adapters)
        budget, mask_now = budget_schedule(global_step, allocator.init_bgt, allocator.target_bgt, config)
        if global_step < end and not mask_now:
            return None
        pattern = allocator.mask_to_budget(adapters, budget)
        if global_step >= end:
            allocator.reset_ipt()
        return config.replace(rank_pattern=pattern)


register_method(AdaLoraMethod(
    PeftType.ADALORA, AdaLoraConfig, make_svd_adapter, layer_types=_supported_types(),
    prepare_config=prepare_adalora_config, callbacks=(_callback,),
    name="adalora", train_preset=types.MappingProxyType(
        {"init_r": 12, "target_r": 8, "lora_alpha": 16, "target_modules": list(LLAMA_LINEAR)}),
    default_targets=types.MappingProxyType(ADALORA_DEFAULT_TARGETS), merges=True,
))


def __getattr__(name: str):
    # The callback subclasses transformers' TrainerCallback, whose import is slow; load it on first use.
    if name == "AdaLoraCallback":
        from deltatune.methods.adalora_callback import AdaLoraCallback

        return AdaLoraCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
