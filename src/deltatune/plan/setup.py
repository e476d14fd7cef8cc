"""TrainSetup: what a planned training run looks like (method, rank, shapes, precision, optimizer).

One frozen, validated dataclass drives everything in :mod:`deltatune.plan`: parameter counting,
the memory model, the measuring probe and the recommender. :func:`peft_config_for` turns it into
the adapter config that ``get_peft_model`` takes, so what is counted is what would be trained.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Iterator

from deltatune.config import PeftType
from deltatune.methods.base import method_names
from deltatune.surgery.presets import GENERIC_PRESETS, family_preset
from deltatune.surgery.targets import linear_layer_names


class _PlanMethods(Sequence):
    """The names of the registered methods marked ``plannable`` (with their variants), then ``full``;
    read from the registry on every access, so a method registered later is plannable too."""

    def _names(self) -> tuple[str, ...]:
        return (*(n for n, (m, _) in method_names().items() if m.plannable), "full")

    def __getitem__(self, i):  # type: ignore[override]
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __repr__(self) -> str:
        return repr(self._names())


METHODS: Sequence[str] = _PlanMethods()
"""Method names ``plan`` understands (lora, dora, rslora, qlora, ia3, prompt, prefix, bottleneck, full);
``qlora`` is LoRA on an NF4 base, ``full`` trains everything."""

OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
"""``adamw``: two fp32 moments per trainable parameter; ``adamw8bit``: blockwise 8-bit moments;
``sgd``: no state."""

LOSSES = ("auto", "fused", "standard")
"""``fused``: deltatune's chunked linear+cross-entropy (logits never materialised); ``standard``:
transformers' loss on full logits; ``auto``: fused where the trainer uses it (causal LMs of the
families in ``deltatune.train.loss.SUPPORTED_MODEL_TYPES``)."""

DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Compute dtypes and their bytes per element."""

TARGET_PRESETS: dict[str, tuple[str, ...] | str] = GENERIC_PRESETS
"""Named target sets (``qv``, ``attention``, ``mlp``, ``attention+mlp``, ``all-linear``): a known family's
come from :data:`deltatune.surgery.presets.FAMILY_PRESETS`, the table ``deltatune inspect`` shows; for
other families these name lists are filtered to the layer names a given model has."""


@dataclass(frozen=True)
class TrainSetup:
    """A training configuration to count, estimate, probe or recommend. Validated when constructed."""

    method: str = "lora"
    """One of :data:`METHODS`."""

    r: int = 16
    """LoRA/DoRA/QLoRA rank (bottleneck: the adapter's hidden size)."""

    lora_alpha: float | None = None
    """LoRA alpha; None means ``2 * r`` (the seeds' rule of thumb)."""

    targets: str = "all-linear"
    """A preset of :data:`TARGET_PRESETS` or comma-separated layer names (``q_proj,v_proj``)."""

    num_virtual_tokens: int = 20
    """Soft-prompt length for ``prompt`` and ``prefix``."""

    batch_size: int = 4
    """Sequences per micro-batch (what is in memory at once; accumulation does not add memory)."""

    seq_len: int = 1024
    """Tokens per sequence."""

    grad_checkpointing: bool = False
    """Recompute each decoder layer in backward instead of keeping its activations."""

    dtype: str = "bfloat16"
    """Compute dtype: frozen weights are stored in it and activations are computed in it (full
    fine-tuning keeps fp32 master weights and runs the forward in this dtype, mixed precision)."""

    optimizer: str = "adamw"
    """One of :data:`OPTIMIZERS`."""

    loss: str = "auto"
    """One of :data:`LOSSES`."""

    device: str = "cuda"
    """``cuda`` or ``cpu``: picks the framework-overhead term (CUDA context vs. process heap)."""

    quant_blocksize: int = 64
    """QLoRA: values per absmax scale."""

    double_quant: bool = True
    """QLoRA: quantize the absmax constants too (4.127 instead of 4.5 bits per weight)."""

    lora_dropout: float = 0.05
    """LoRA dropout (a dropout > 0 keeps a 1-byte mask per adapted input for backward)."""

    target_parameters: str = ""
    """LoRA family: comma-separated ``nn.Parameter`` names to adapt too (``mlp.experts.gate_up_proj``: MoE
    experts, one update per expert); needs ``lora_dropout=0``. With it, ``targets="none"`` adapts no module."""

    def __post_init__(self) -> None:
        def fail(field: str, expected: str) -> None:
            raise ValueError(f"TrainSetup.{field} is {getattr(self, field)!r}; expected {expected}.")

        if self.method not in METHODS:
            fail("method", f"one of {', '.join(METHODS)}")
        for name in ("r", "batch_size", "seq_len", "num_virtual_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, "a positive integer")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            fail("lora_alpha", "a positive number or None (2 * r)")
        if self.dtype not in DTYPES:
            fail("dtype", f"one of {', '.join(DTYPES)}")
        if self.optimizer not in OPTIMIZERS:
            fail("optimizer", f"one of {', '.join(OPTIMIZERS)}")
        if self.loss not in LOSSES:
            fail("loss", f"one of {', '.join(LOSSES)}")
        if self.device not in ("cuda", "cpu"):
            fail("device", "'cuda' or 'cpu'")
        if not 0.0 <= self.lora_dropout < 1.0:
            fail("lora_dropout", "a number in [0, 1)")
        if not isinstance(self.targets, str) or not self.targets.strip():
            fail("targets", f"a preset ({', '.join(TARGET_PRESETS)}) or comma-separated layer names")
        if self.target_parameters and self.lora_dropout:
            fail("lora_dropout", "0 with target_parameters (LoRA on a parameter has no dropout; --lora-dropout 0)")
        if self.targets.strip() == "none" and not self.target_parameters:
            fail("targets", "a preset or layer names ('none' only together with target_parameters)")

    def replace(self, **changes: Any) -> "TrainSetup":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def alpha(self) -> float:
        """The effective LoRA alpha (``2 * r`` when not set)."""
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.r

    @property
    def is_lora_family(self) -> bool:
        """True for the methods that train LoRA factors: ``lora``, ``dora``, ``rslora``, ``qlora``."""
        return self.method != "full" and method_names()[self.method][0].peft_type == PeftType.LORA

    @property
    def is_prompt_learning(self) -> bool:
        """True for the methods that add virtual tokens or prefixes to the inputs: ``prompt``, ``prefix``."""
        return self.method != "full" and method_names()[self.method][0].wraps_forward

    @property
    def dtype_bytes(self) -> int:
        """Bytes per element of the compute dtype (``dtype``)."""
        return DTYPES[self.dtype]


def resolve_target_names(model: Any, targets: str) -> tuple[str, ...] | str:
    """Turn a preset or a comma-separated list into ``target_modules`` for ``model``.

    A preset is the model family's entry of the preset table (what ``deltatune inspect`` shows); for a
    family not in it, the usual layer names filtered to those the model has.

    Raises:
        ValueError: the preset matches no layer of this model.
    """
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    spec = TARGET_PRESETS.get(targets.strip())
    if spec == "all-linear":
        return "all-linear"
    if spec is None:
        return tuple(t.strip() for t in re.split(r"[,\s]+", targets) if t.strip())
    family = family_preset(getattr(getattr(model, "config", None), "model_type", None), targets.strip())
    if family is not None:
        return family
    present = linear_layer_names(model, (nn.Linear, Conv1D))
    chosen = tuple(name for name in present if name in spec)
    if not chosen:
        raise ValueError(
            f"target preset {targets!r} matches no layer of {type(model).__name__}; its layers are "
            f"{', '.join(present)}. Pass layer names instead, e.g. --targets {','.join(present[:2])}."
        )
    return chosen


def peft_config_for(setup: TrainSetup, model: Any) -> Any:
    """The deltatune adapter config ``setup`` describes for ``model`` (None for full fine-tuning).

    Args:
        setup: the planned run.
        model: the (meta-device or real) transformers model; used to resolve target presets.

    Returns:
        A ``LoraConfig``, ``IA3Config``, ``PromptTuningConfig``, ``PrefixTuningConfig`` or
        ``BottleneckConfig``; None when ``setup.method == "full"``.
    """
    if setup.method == "full":
        return None
    method, variant = method_names()[setup.method]
    cls = method.config_cls
    if method.wraps_forward:
        return cls(num_virtual_tokens=setup.num_virtual_tokens, task_type="CAUSAL_LM")
    if method.peft_type == PeftType.IA3:
        # "all-linear" (the default) means IA3's own per-family defaults (k, v and down_proj on LLaMA);
        # named targets scale the inputs of the MLP layers among them, the outputs of the others.
        if setup.targets.strip() == "all-linear":
            return cls(task_type="CAUSAL_LM")
        targets = resolve_target_names(model, setup.targets)
        mlp = family_preset(getattr(getattr(model, "config", None), "model_type", None), "mlp") or ()
        feedforward = tuple(t for t in targets if t in mlp or t in TARGET_PRESETS["mlp"])
        return cls(target_modules=targets, feedforward_modules=feedforward, task_type="CAUSAL_LM")
    if method.peft_type == PeftType.BOTTLENECK:
        return cls(bottleneck_size=setup.r, task_type="CAUSAL_LM")
    if method.peft_type == PeftType.LORA:
        params = [t for t in re.split(r"[,\s]+", setup.target_parameters) if t]
        modules = [] if setup.targets.strip() == "none" else resolve_target_names(model, setup.targets)
        return cls(
            r=setup.r, lora_alpha=setup.alpha, lora_dropout=setup.lora_dropout, target_modules=modules,
            target_parameters=params or None, task_type="CAUSAL_LM", **variant.fixed,
        )
    # Any other registered method: its train preset, with the rank and targets of the setup where it has them.
    values: dict[str, Any] = {**method.train_preset, **variant.fixed, "task_type": "CAUSAL_LM"}
    if "r" in cls.field_names():
        values["r"] = setup.r
    if "target_modules" in cls.field_names():
        values["target_modules"] = resolve_target_names(model, setup.targets)
    return cls(**values)
