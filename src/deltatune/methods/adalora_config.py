"""AdaLoRA's config: peft's ``AdaLoraConfig``, field for field, frozen and validated.

Kept apart from :mod:`deltatune.methods.adalora` (the adapter and its peft-format I/O), which
re-exports it; the config needs nothing from the method.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

from deltatune.config import PeftConfig, PeftType, _check


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
        for key, mask in dict(self.rank_pattern or {}).items():
            _check(
                len(mask) == self.init_r,
                f"rank_pattern[{key!r}] has {len(mask)} entries but init_r={self.init_r}; it must mark each of the "
                "init_r triplets as kept (True) or pruned (False)",
            )
        for name, ignored in (("r", self.r != 8), ("use_rslora", self.use_rslora), ("alpha_pattern", bool(self.alpha_pattern))):
            if ignored:
                warnings.warn(f"AdaLoRA ignores {name} (as peft does); use init_r / lora_alpha instead", stacklevel=4)
