"""AdaLoRA (Zhang et al., 2023, arXiv:2303.10512): LoRA in SVD form with an adaptive rank budget.

Each wrapped layer learns ΔW = P·Λ·Q (eq. 3) as triplets (P_i, λ_i, Q_i); peft's names are
``lora_B`` = P (out, r), ``lora_E`` = Λ (r, 1) and ``lora_A`` = Q (r, in). During training a global
budget of triplets shrinks on a cubic schedule (eq. 12) and the triplets with the lowest smoothed
sensitivity (eqs. 8-11) are masked by zeroing their λ_i. What only runs in training (the orthogonality
regulariser, the allocator, the Trainer callback) lives in :mod:`deltatune.methods.adalora_alloc`; this
module holds the config, the layer adapter and the peft-format save/load at the pruned ranks.

Call ``model.update_and_allocate(global_step)`` after ``backward()`` and before ``zero_grad()``,
or add :class:`AdaLoraCallback` to a transformers ``Trainer``.
"""
from __future__ import annotations

import re
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.config import PeftConfig, PeftType, _check
from deltatune.methods.base import linear_layer_types, Adapter, Method, dense_weight, register_method, adapter_dtype

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


# ---- config ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdaLoraConfig(PeftConfig):
    """AdaLoRA (Zhang et al., 2023): peft's ``AdaLoraConfig`` field for field.

    Not a subclass of :class:`deltatune.LoraConfig` (unlike in peft): its ``rank_pattern`` holds boolean
    masks, not ranks, so code written for LoRA configs must not accept it by accident. Training has three
    phases: ``tinit`` warm-up steps at the full budget, budget reduction until ``total_step - tfinal``,
    then ``tfinal`` steps of fine-tuning at the final ranks.
    """

    peft_type: ClassVar[PeftType] = PeftType.ADALORA

    r: int = 8
    """Unused by AdaLoRA (kept for peft's file format); the starting rank is ``init_r``."""
    target_modules: Sequence[str] | str | None = None
    """Module names (suffix match), a regex on the full path, or "all-linear"; None uses peft's
    AdaLoRA defaults for the model type."""
    exclude_modules: Sequence[str] | str | None = None
    """Names (suffix match) or a regex of modules never to wrap."""
    lora_alpha: float = 8
    """Scale numerator: ΔW is multiplied by lora_alpha / init_r (0 means a scale of 1, as in peft)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    fan_in_fan_out: bool = False
    """Recorded for peft; deltatune reads Conv1D's layout from the layer type."""
    bias: str = "none"
    """Which biases train: "none", "all" or "lora_only"."""
    use_rslora: bool = False
    """Ignored by AdaLoRA (as in peft), which always scales by alpha / init_r."""
    modules_to_save: Sequence[str] | None = None
    """Modules (suffix match) trained in full and saved with the adapter, e.g. a classifier head."""
    init_lora_weights: bool = True
    """True: Λ = 0, P and Q ~ N(0, 0.02²), so the model starts unchanged. False: all N(0, 1) (tests)."""
    layers_to_transform: Sequence[int] | int | None = None
    """Only wrap modules inside these layer indices."""
    layers_pattern: Sequence[str] | str | None = None
    """Name of the layer list (e.g. "layers", "h") used to read a module's layer index."""
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    """Ignored by AdaLoRA (as in peft)."""
    use_dora: bool = False
    """Not supported by AdaLoRA; must be False."""
    target_r: int = 8
    """Target average rank per layer at the end of the budget schedule (budget = target_r × layers)."""
    init_r: int = 12
    """Starting rank of every layer (the initial budget is init_r × layers)."""
    tinit: int = 0
    """Warm-up steps at the full budget before any masking."""
    tfinal: int = 0
    """Final steps that fine-tune at the ranks fixed at step total_step - tfinal."""
    deltaT: int = 1
    """Mask every deltaT steps during the budget-reduction phase."""
    beta1: float = 0.85
    """EMA coefficient of the sensitivity (eq. 9)."""
    beta2: float = 0.85
    """EMA coefficient of the uncertainty (eq. 10)."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality regulariser added to the loss (eq. 4's gamma)."""
    total_step: int | None = None
    """Total number of optimizer steps of the run. Required: the budget schedule is a function of it."""
    rank_pattern: Mapping[str, Sequence[bool]] | None = None
    """Set by training: {"<module path>.lora_E": [kept?] * init_r}. Saved checkpoints hold only the kept
    triplets, and loading shrinks the layers to match."""

    def __post_init__(self) -> None:
        if self.rank_pattern is not None:  # freeze the masks: lists inside a frozen config could be mutated
            object.__setattr__(self, "rank_pattern", {k: tuple(bool(b) for b in v) for k, v in dict(self.rank_pattern).items()})
        super().__post_init__()

    def validate(self) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        _check(self.total_step is not None, "AdaLoRA needs total_step (the number of optimizer steps of the run); pass total_step=N")
        _check(is_int(self.total_step) and self.total_step > 0, f"total_step must be a positive integer, got {self.total_step!r}")
        _check(is_int(self.init_r) and self.init_r > 0, f"init_r must be a positive integer, got {self.init_r!r}")
        _check(
            is_int(self.target_r) and 0 < self.target_r <= self.init_r,
            f"target_r must be an integer in [1, init_r={self.init_r}], got {self.target_r!r}; the budget only shrinks",
        )
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            _check(is_int(value) and value >= 0, f"{name} must be a non-negative integer, got {value!r}")
        _check(
            self.tinit + self.tfinal < self.total_step,
            f"tinit ({self.tinit}) + tfinal ({self.tfinal}) must be less than total_step ({self.total_step}) to leave a "
            "budget-reduction phase; decrease tinit/tfinal or increase total_step",
        )
        _check(is_int(self.deltaT) and self.deltaT >= 1, f"deltaT must be a positive integer, got {self.deltaT!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _check(0 < value < 1, f"{name} must be in (0, 1), got {value!r}")
        _check(self.orth_reg_weight >= 0, f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        _check(self.lora_alpha >= 0, f"lora_alpha must be >= 0, got {self.lora_alpha!r}")
        _check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        _check(self.bias in ("none", "all", "lora_only"), f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        _check(not self.use_dora, "AdaLoRA does not support DoRA; set use_dora=False or use LoraConfig(use_dora=True)")
        _check(
            isinstance(self.init_lora_weights, bool),
            f"AdaLoRA's init_lora_weights must be True or False, got {self.init_lora_weights!r}",
        )
        _check(
            not (isinstance(self.target_modules, str) and self.layers_to_transform is not None),
            "layers_to_transform cannot be combined with a regex target_modules; use a list of names",
        )
        _check(
            self.layers_pattern is None or self.layers_to_transform is not None,
            "layers_pattern only makes sense together with layers_to_transform; set both or neither",
        )
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ValueError(f"target_modules regex {self.target_modules!r} does not compile: {e}") from None
        for key, mask in dict(self.rank_pattern or {}).items():
            _check(
                len(mask) == self.init_r,
                f"rank_pattern[{key!r}] has {len(mask)} entries but init_r={self.init_r}; it must mark each of the "
                "init_r triplets as kept (True) or pruned (False)",
            )
        for name, ignored in (("r", self.r != 8), ("use_rslora", self.use_rslora), ("alpha_pattern", bool(self.alpha_pattern))):
            if ignored:
                warnings.warn(f"AdaLoRA ignores {name} (as peft does); use init_r / lora_alpha instead", stacklevel=4)


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
        out_f, in_f = _shape(base_layer)
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


def _shape(layer: nn.Module) -> tuple[int, int]:
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return layer.out_features, layer.in_features
    w = dense_weight(layer)
    return w.shape[0], w.shape[1]


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


def _forward(peft_model, adapter_name: str, *args: Any, **kwargs: Any):
    """The base model's forward, plus orth_reg_weight · R on ``outputs.loss`` when a loss was computed
    (labels given) and this adapter trains, as peft's ``AdaLoraModel.forward`` does."""
    outputs = peft_model.base_model.model(*args, **kwargs)
    config = peft_model.peft_config[adapter_name]
    loss = getattr(outputs, "loss", None)
    if isinstance(loss, torch.Tensor) and not config.inference_mode and config.orth_reg_weight > 0:
        from deltatune.methods.adalora_alloc import orth_regularizer

        factors = [(a.lora_A, a.lora_B) for _, a in svd_adapters(peft_model.base_model.model, adapter_name)]
        outputs.loss = loss + config.orth_reg_weight * orth_regularizer(factors)
    return outputs


def _supported_types() -> tuple[type, ...]:
    return linear_layer_types()


register_method(Method(
    PeftType.ADALORA, AdaLoraConfig, make_svd_adapter, layer_types=_supported_types(), attach=_attach,
    detach=_detach, state_dict=_state_dict, load_state_dict=_load_state_dict, forward=_forward,
    prepare_config=prepare_adalora_config,
))


def __getattr__(name: str):
    # The callback subclasses transformers' TrainerCallback, whose import is slow; load it on first use.
    if name == "AdaLoraCallback":
        from deltatune.methods.adalora_alloc import AdaLoraCallback

        return AdaLoraCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
