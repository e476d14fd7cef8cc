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

from deltatune.config import PeftType
from deltatune.methods.adalora_config import AdaLoraConfig  # re-exported: the public import path
from deltatune.methods.base import LLAMA_LINEAR, linear_layer_types, Adapter, Method, register_method, adapter_dtype, layer_dims

RANKNUM_EPS = 1e-5  # peft divides by (ranknum + 1e-5); kept so merged weights match peft's bit for bit
E_KEY = ".lora_E"  # rank_pattern keys are "<module path>.lora_E", as peft writes them


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
    from deltatune.surgery.inject import adapted_layers

    return [(n, h.adapters[adapter_name]) for n, h in adapted_layers(model)
            if adapter_name in h.adapters and isinstance(h.adapters[adapter_name], SVDAdapter)]


# ---- rank patterns on disk (peft's format) ---------------------------------------------------------
def masks_by_module(rank_pattern: Mapping[str, Sequence[bool]] | None, adapter_name: str) -> dict[str, Sequence[bool]]:
    """{module path: init_r-long mask} from peft's keys "<path>.lora_E" (or "<path>.lora_E.<adapter>")."""
    out: dict[str, Sequence[bool]] = {}
    for key, mask in dict(rank_pattern or {}).items():
        key = key[: -len(adapter_name) - 1] if key.endswith(f"{E_KEY}.{adapter_name}") else key
        if not key.endswith(E_KEY):
            raise ValueError(f"rank_pattern key {key!r} does not end in '{E_KEY}'; keys are '<module path>{E_KEY}' as peft writes them")
        out[key[: -len(E_KEY)]] = mask
    return out


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


def _state_dict(peft_model, adapter_name: str) -> dict[str, torch.Tensor]:
    """peft's tensors (no ``ranknum``), keeping only the triplets that ``rank_pattern`` marks as kept."""
    from deltatune.io import checkpoint as ckpt

    config, model = peft_model.peft_config[adapter_name], peft_model.base_model.model
    sd = ckpt.get_peft_model_state_dict(model, adapter_name, config)
    for path, adapter, mask in _matched(model, adapter_name, masks_by_module(config.rank_pattern, adapter_name)):
        keep = adapter.rows_kept_by(mask).cpu()
        prefix = f"{ckpt.PREFIX}{path}."
        sd[prefix + "lora_A"], sd[prefix + "lora_E"] = sd[prefix + "lora_A"][keep], sd[prefix + "lora_E"][keep]
        sd[prefix + "lora_B"] = sd[prefix + "lora_B"][:, keep]
    return sd


def _load_state_dict(peft_model, state_dict: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Shrink the layers to the saved ``rank_pattern``, then load (all or nothing)."""
    from deltatune.io import checkpoint as ckpt

    config, model = peft_model.peft_config[adapter_name], peft_model.base_model.model
    undo = resize_to_rank_pattern(model, adapter_name, config.rank_pattern)
    try:
        ckpt.set_peft_model_state_dict(model, state_dict, adapter_name, config)
    except Exception:
        undo()
        raise


# ---- model-level hooks -------------------------------------------------------------------------------
# peft's TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING for the model families deltatune knows; it differs
# from LoRA's defaults for t5, roberta and opt. Other families (peft has none for mistral, phi, falcon) must
# name target_modules.
ADALORA_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"), "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"), "gptj": ("q_proj", "v_proj"), "gpt2": ("c_attn",), "bert": ("query", "value"),
    "bloom": ("query_key_value",), "gpt_neox": ("query_key_value",), "roberta": ("query", "key", "value", "dense"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), "t5": ("q", "k", "v", "o", "wi", "wo"),
}


def prepare_adalora_config(config: AdaLoraConfig, model: nn.Module) -> AdaLoraConfig:
    """Fill in peft's AdaLoRA default targets for the model family; the filled-in config is what is saved."""
    if config.target_modules is not None:
        return config
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in ADALORA_DEFAULT_TARGETS:
        raise ValueError(
            f"target_modules is not set and there is no AdaLoRA default for model type {kind!r} (nor in peft); "
            "pass target_modules=[...] naming the linear layers to adapt"
        )
    return config.replace(target_modules=ADALORA_DEFAULT_TARGETS[kind])


def trainable_adalora(peft_model, exclude: str | None = None) -> list[str]:
    return [n for n, c in peft_model.peft_config.items()
            if n != exclude and isinstance(c, AdaLoraConfig) and not c.inference_mode]


def _attach(peft_model, config: AdaLoraConfig, adapter_name: str) -> None:
    """Inject as the default step does (PeftModel has checked modules_to_save and run
    :func:`prepare_adalora_config`), after peft's one-trainable-adapter check."""
    from deltatune.surgery import inject

    others = trainable_adalora(peft_model, exclude=adapter_name)
    if others and not config.inference_mode:
        raise ValueError(
            f"AdaLoRA trains one adapter at a time and {others[0]!r} is already trainable; add "
            f"{adapter_name!r} with inference_mode=True, or delete_adapter({others[0]!r}) first"
        )
    inject.inject_adapter_in_model(config, peft_model.base_model.model, adapter_name)
    # peft's AdaLoraModel API: model.base_model.update_and_allocate(step), also reachable as
    # model.update_and_allocate(step) through PeftModel's attribute passthrough.
    peft_model.base_model.update_and_allocate = types.MethodType(update_and_allocate, peft_model)


def _detach(peft_model, adapter_name: str) -> None:
    allocator = peft_model.base_model.__dict__.get("rankallocator")
    if allocator is not None and allocator.adapter_name == adapter_name:
        del peft_model.base_model.__dict__["rankallocator"]
    if not any(isinstance(c, AdaLoraConfig) for n, c in peft_model.peft_config.items() if n != adapter_name):
        peft_model.base_model.__dict__.pop("update_and_allocate", None)


def update_and_allocate(peft_model, global_step: int) -> None:
    """Update the importance scores and mask to the budget of ``global_step`` (0-based).

    Call after ``loss.backward()`` / ``optimizer.step()`` and before ``optimizer.zero_grad()``, as in peft;
    see :func:`deltatune.methods.adalora_alloc.update_and_allocate`.
    """
    from deltatune.methods import adalora_alloc

    adalora_alloc.update_and_allocate(peft_model, global_step)


def _penalty(peft_model, adapter_name: str) -> torch.Tensor | None:
    """orth_reg_weight · R (eq. 4, as peft computes it) while this adapter trains, else None (the
    ``Method.loss_penalty`` hook)."""
    config = peft_model.peft_config[adapter_name]
    if config.inference_mode or config.orth_reg_weight <= 0:
        return None
    from deltatune.methods.adalora_alloc import orth_regularizer

    factors = [(a.lora_A, a.lora_B) for _, a in svd_adapters(peft_model.base_model.model, adapter_name)]
    return config.orth_reg_weight * orth_regularizer(factors) if factors else None


def _forward(peft_model, adapter_name: str, *args: Any, **kwargs: Any):
    """The base model's forward, plus :func:`_penalty` on ``outputs.loss`` when a loss was computed
    (labels given), as peft's ``AdaLoraModel.forward`` does."""
    outputs = peft_model.base_model.model(*args, **kwargs)
    loss = getattr(outputs, "loss", None)
    penalty = _penalty(peft_model, adapter_name) if isinstance(loss, torch.Tensor) else None
    if penalty is not None:
        outputs.loss = loss + penalty
    return outputs


def _supported_types() -> tuple[type, ...]:
    return linear_layer_types()


register_method(Method(
    PeftType.ADALORA, AdaLoraConfig, make_svd_adapter, layer_types=_supported_types(), attach=_attach,
    detach=_detach, state_dict=_state_dict, load_state_dict=_load_state_dict, forward=_forward, loss_penalty=_penalty,
    prepare_config=prepare_adalora_config,
    name="adalora", train_preset=types.MappingProxyType(
        {"init_r": 12, "target_r": 8, "lora_alpha": 16, "target_modules": list(LLAMA_LINEAR)}),
    default_targets=types.MappingProxyType(ADALORA_DEFAULT_TARGETS), merges=True,
))


def __getattr__(name: str):
    # The callback subclasses transformers' TrainerCallback, whose import is slow; load it on first use.
    if name == "AdaLoraCallback":
        from deltatune.methods.adalora_alloc import AdaLoraCallback

        return AdaLoraCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
