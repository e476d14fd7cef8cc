"""Recommend a method and its hyperparameters for a model, a device and a dataset, with reasons.

The rules are the ones in the project's guidance (seeds), applied in this order:

1. **Memory first** (the decision tree's "is GPU memory < 2x the model in 4-bit? -> QLoRA"): the
   method must fit the device *by the memory model*, not by a rule of thumb. LoRA on bf16 weights
   is tried first; when even micro-batch 1 with gradient checkpointing does not fit, QLoRA.
2. **Data size**: under 100 examples, prompt tuning on models of 10B+ ("prompt tuning is most
   data-efficient"; "large models (>10B): prompt tuning is also effective"), LoRA with a small rank
   below that ("small models: LoRA recommended"). Under 500 examples with a low quality need, IA3
   ("IA3 works well with limited data").
3. **Rank** (``recommend_lora_rank``): 8 for classification, 16 for QA and instruction following,
   32 for open generation and domain adaptation; halved under 1,000 examples (overfitting), doubled
   over 50,000 (capacity), halved again for models over 30B. Alpha = 2 x rank.
4. **Targets**: the tuned configurations per use case: q,v for classification (minimal),
   attention projections for QA and instructions, every linear layer for generation ("target all
   projections") and domain adaptation; a high quality need widens to every linear layer.
5. **Learning rate**: the use case's tuned rate at its rank, scaled by sqrt(r_tuned / r) ("higher
   rank may benefit from a lower learning rate"); fixed common rates for IA3 and prompts.
6. **Batch**: an effective batch of 16 (4 x 4 in the guidance's training arguments), the largest
   micro-batch that fits without gradient checkpointing, else with it; the rest is accumulation.

Full fine-tuning (the tree's first branch) is reported when it would fit and suits the request,
but not chosen: ``deltatune train`` trains adapters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from deltatune.plan.config_writer import train_tree, write_train_config
from deltatune.plan.memory import MemoryEstimate, estimate_memory
from deltatune.plan.meta import build_meta_model, count_model, load_model_config
from deltatune.plan.trace import trace_activations
from deltatune.plan.report import fmt_bytes, table
from deltatune.plan.setup import TrainSetup, resolve_target_names

TASKS = ("classification", "qa", "generation", "instruction", "domain")
"""Task kinds: label classification, question answering, open generation, instruction following,
domain adaptation (continued training on a new domain's text)."""

QUALITIES = ("low", "medium", "high")
"""How much quality matters relative to cost."""

_COMPLEXITY = {"classification": "simple", "qa": "moderate", "instruction": "moderate", "generation": "complex",
               "domain": "complex"}
_BASE_RANK = {"simple": 8, "moderate": 16, "complex": 32}
_TARGETS = {"classification": "qv", "qa": "attention", "instruction": "attention", "generation": "all-linear",
            "domain": "all-linear"}
# (learning rate, rank it was tuned at, dropout) per use case, from the tuned configurations.
_TUNED = {"instruction": (2e-4, 16, 0.05), "domain": (1e-4, 32, 0.1), "generation": (2e-4, 16, 0.05),
          "qa": (2e-4, 16, 0.05), "classification": (3e-4, 8, 0.05)}
_FIXED_LR = {"ia3": (3e-3, "IA3 trains scaling vectors, which take ~10x LoRA's rate (T-Few used 3e-3)"),
             "prompt": (3e-2, "soft prompts need a high rate (peft's examples use 3e-2)")}
EFFECTIVE_BATCH = 16
"""Target examples per optimizer step."""
HEADROOM = 0.9
"""A recommendation must fit in this share of the device memory."""


@dataclass(frozen=True)
class Recommendation:
    """A recommended training configuration, each choice with its reason."""

    model: str
    """The model as given (name or path), written into the config."""
    setup: TrainSetup
    """Method, rank, targets, micro-batch, sequence length, checkpointing."""
    target_modules: Any
    """``setup.targets`` resolved for this model (a tuple of names or ``"all-linear"``)."""
    lr: float
    """Learning rate."""
    grad_accum: int
    """Micro-batches per optimizer step."""
    estimate: MemoryEstimate
    """The memory model's estimate of the recommended setup."""
    device_memory: int
    """The device memory it was fitted to, in bytes."""
    reasons: dict[str, str] = field(default_factory=dict)
    """Why, per choice: method, r, alpha, targets, lr, batch_size, grad_accum, grad_checkpointing."""
    notes: tuple[str, ...] = ()
    """Other observations (e.g. full fine-tuning would fit)."""

    def table(self) -> str:
        """The choices and reasons as a text table."""
        s = self.setup
        rows = [("method", s.method, self.reasons["method"])]
        if s.is_lora_family:
            targets = self.target_modules if isinstance(self.target_modules, str) else ",".join(self.target_modules)
            rows += [("rank", s.r, self.reasons["r"]), ("alpha", f"{s.alpha:g}", self.reasons["alpha"]),
                     ("targets", targets, self.reasons["targets"])]
        elif s.is_prompt_learning:
            rows.append(("virtual tokens", s.num_virtual_tokens, self.reasons["r"]))
        rows += [("learning rate", f"{self.lr:.0e}", self.reasons["lr"]),
                 ("batch size", s.batch_size, self.reasons["batch_size"]),
                 ("grad accumulation", self.grad_accum, self.reasons["grad_accum"]),
                 ("grad checkpointing", "on" if s.grad_checkpointing else "off", self.reasons["grad_checkpointing"])]
        out = table(("choice", "value", "why"), rows, "lrl")
        out += (f"\n\nestimated peak: {fmt_bytes(self.estimate.peak_bytes)} of {fmt_bytes(self.device_memory)} "
                f"({s.device}, {s.dtype}, {s.seq_len} tokens per sequence)")
        return out + "".join(f"\nnote: {n}" for n in self.notes)

    def train_config(self) -> dict[str, Any]:
        """The recommendation as a ``deltatune train`` config tree (see :mod:`deltatune.train.config`)."""
        return train_tree(self)

    def write_config(self, path: Any) -> Any:
        """Write a ready ``deltatune train`` YAML config, each choice commented with its reason.

        The file is checked with ``load_train_config`` before it replaces anything at ``path``.
        """
        return write_train_config(self, path)


def recommend_lora_rank(task: str, dataset_size: int, model_size_b: float) -> tuple[int, str]:
    """The guidance's rank rule: by task complexity, adjusted for data and model size; with a reason."""
    complexity = _COMPLEXITY[task]
    rank = _BASE_RANK[complexity]
    why = [f"{rank} for {complexity} tasks ({task})"]
    if dataset_size < 1000:
        rank = max(4, rank // 2)
        why.append(f"halved for < 1,000 examples (overfitting) -> {rank}")
    elif dataset_size > 50000:
        rank = min(64, rank * 2)
        why.append(f"doubled for > 50,000 examples (capacity) -> {rank}")
    if model_size_b > 30:
        rank = max(4, rank // 2)
        why.append(f"halved for a model over 30B -> {rank}")
    return rank, "; ".join(why)


def _check(value: Any, allowed: tuple[str, ...], name: str) -> None:
    if value not in allowed:
        raise ValueError(f"{name} is {value!r}; expected one of {', '.join(allowed)}.")


class _Fitter:
    """Estimates setups of one model, tracing each method once (activations scale with the batch)."""

    def __init__(self, config: Any) -> None:
        self.config, self._cache = config, {}

    def estimate(self, setup: TrainSetup) -> MemoryEstimate:
        key = setup.replace(batch_size=1, grad_checkpointing=False)
        if key not in self._cache:
            meta = build_meta_model(self.config, key)
            self._cache[key] = (meta, trace_activations(meta, key))
        meta, trace = self._cache[key]
        return estimate_memory(self.config, setup, meta_model=meta, trace=trace.scaled(setup.batch_size))

    def fit(self, setup: TrainSetup, budget: int) -> tuple[TrainSetup, MemoryEstimate, str] | None:
        """The largest micro-batch (<= the effective batch) that fits, without checkpointing if it
        reaches 4, else with it; None if not even batch 1 with checkpointing fits.

        Returns:
            ``(setup, estimate, why checkpointing is on or off)`` or None.
        """
        sizes = [b for b in (16, 8, 4, 2, 1) if b <= EFFECTIVE_BATCH]
        plain = next((e for b in sizes
                      if (e := self.estimate(setup.replace(batch_size=b, grad_checkpointing=False))).peak_bytes <= budget),
                     None)
        if plain is not None and plain.setup.batch_size >= 4:
            return plain.setup, plain, f"micro-batch {plain.setup.batch_size} fits without it"
        ckpt = next((e for b in sizes
                     if (e := self.estimate(setup.replace(batch_size=b, grad_checkpointing=True))).peak_bytes <= budget),
                    None)
        if ckpt is not None and (plain is None or ckpt.setup.batch_size > plain.setup.batch_size):
            without = f"only micro-batch {plain.setup.batch_size}" if plain else "not even micro-batch 1"
            return ckpt.setup, ckpt, (f"without it {without} fits, with it {ckpt.setup.batch_size} "
                                      "(each layer is recomputed in backward, ~30% slower)")
        if plain is not None:
            return plain.setup, plain, f"micro-batch {plain.setup.batch_size} is the most that fits either way"
        return None


def recommend(model: Any, device_memory: int, dataset_size: int, task: str = "instruction",
              quality: str = "medium", *, seq_len: int = 512, device: str = "cuda",
              dtype: str = "bfloat16") -> Recommendation:
    """Recommend method, rank, alpha, targets, learning rate, batch and accumulation, with reasons.

    Args:
        model: a registered name, a model folder, a config dict or a ``PretrainedConfig``.
        device_memory: bytes of accelerator (or CPU) memory to fit in.
        dataset_size: training examples.
        task: one of :data:`TASKS`.
        quality: one of :data:`QUALITIES`.
        seq_len: tokens per training sequence.
        device: ``cuda`` or ``cpu`` (the memory model's overhead term).
        dtype: compute dtype.

    Returns:
        The :class:`Recommendation`; its setup fits ``HEADROOM`` of ``device_memory`` by the memory model.

    Raises:
        ValueError: an unknown task/quality, or nothing fits (the message says what would be needed).
    """
    _check(task, TASKS, "task")
    _check(quality, QUALITIES, "quality")
    if dataset_size < 1:
        raise ValueError(f"dataset_size is {dataset_size!r}; expected the number of training examples (>= 1).")
    config = load_model_config(model)
    fitter = _Fitter(config)
    size_b = count_model(build_meta_model(config)).total / 1e9
    budget = int(device_memory * HEADROOM)
    reasons: dict[str, str] = {}
    notes: list[str] = []
    base = TrainSetup(method="lora", seq_len=seq_len, device=device, dtype=dtype, batch_size=1)

    method, method_reason = _pick_method(task, quality, dataset_size, size_b)
    rank, rank_reason = recommend_lora_rank(task, dataset_size, size_b)
    if method == "lora" and dataset_size < 100:
        rank, rank_reason = 4, "4: fewer than 100 examples support only a minimal update"
    preset = "all-linear" if quality == "high" and method == "lora" else _TARGETS[task]
    setup = base.replace(method=method, r=rank, targets=preset if method == "lora" else "all-linear",
                         lora_dropout=_TUNED[task][2] if dataset_size >= 1000 else 0.0)
    fitted = fitter.fit(setup, budget)
    if fitted is None and method != "qlora":
        lora_at_1 = fitter.estimate(setup.replace(method="lora", batch_size=1, grad_checkpointing=True))
        weights = lora_at_1.component("frozen weights").bytes
        method_reason = (f"QLoRA because {size_b:.1f}B {dtype} weights ({fmt_bytes(weights)}) + "
                         f"{'LoRA' if method == 'lora' else method} training state exceed {fmt_bytes(budget)} "
                         f"({HEADROOM:.0%} of {fmt_bytes(device_memory)}) even at micro-batch 1 with checkpointing")
        method, setup = "qlora", setup.replace(method="qlora", targets=preset)
        fitted = fitter.fit(setup, budget)
    if fitted is None:
        need = fitter.estimate(setup.replace(batch_size=1, grad_checkpointing=True)).peak_bytes
        raise ValueError(f"nothing fits in {fmt_bytes(device_memory)}: even {setup.method} with micro-batch 1, "
                         f"gradient checkpointing and {seq_len}-token sequences needs ~{fmt_bytes(need)} "
                         f"(+{1 - HEADROOM:.0%} headroom). Use a smaller model, shorter sequences (--seq-len) or "
                         "a larger device.")
    setup, est, ckpt_reason = fitted
    reasons["method"] = method_reason
    reasons["r"] = (rank_reason if setup.is_lora_family else
                    f"{setup.num_virtual_tokens} virtual tokens (the common default)" if setup.is_prompt_learning
                    else "IA3 has no rank: one scaling vector per adapted layer")
    reasons["alpha"] = "2 x rank (the guidance's rule of thumb)"
    reasons["targets"] = _targets_reason(task, quality, preset)
    lr, reasons["lr"] = _learning_rate(setup, task)
    accum = max(1, math.ceil(EFFECTIVE_BATCH / setup.batch_size))
    reasons["batch_size"] = (f"the largest of 16/8/4/2/1 that fits: peak {fmt_bytes(est.peak_bytes)} of "
                             f"{fmt_bytes(budget)} usable")
    reasons["grad_accum"] = f"effective batch {setup.batch_size * accum} (target {EFFECTIVE_BATCH}, as 4 x 4)"
    reasons["grad_checkpointing"] = ckpt_reason
    notes.extend(_full_ft_note(fitter, base, quality, task, budget, size_b))
    targets = resolve_target_names(build_meta_model(config), setup.targets) if setup.is_lora_family else None
    return Recommendation(model=model if isinstance(model, str) else getattr(config, "_name_or_path", "") or "",
                          setup=setup, target_modules=targets, lr=lr, grad_accum=accum, estimate=est,
                          device_memory=int(device_memory), reasons=reasons, notes=tuple(notes))


def _pick_method(task: str, quality: str, n: int, size_b: float) -> tuple[str, str]:
    if n < 100 and size_b >= 10:
        return "prompt", f"prompt tuning: {n} examples on a {size_b:.0f}B model (most data-efficient at >10B)"
    if n < 100:
        return "lora", (f"LoRA with a small rank: {n} examples, but prompt tuning needs a model over 10B "
                        f"(this one has {size_b:.2f}B)")
    if n < 500 and quality == "low":
        return "ia3", f"IA3: {n} examples and a low quality need (IA3 works well with limited data)"
    return "lora", "LoRA: the general-purpose default (good quality/efficiency trade-off; weights can be merged)"


def _targets_reason(task: str, quality: str, preset: str) -> str:
    if quality == "high" and preset == "all-linear":
        return "every linear layer: a high quality need (more modules = more capacity)"
    return {"qv": "q and v projections: the minimal set, enough for classification",
            "attention": f"attention projections: the recommended start for {task} (the tuned configuration)",
            "all-linear": f"every linear layer: {task} needs capacity (target all projections)"}[preset]


def _learning_rate(setup: TrainSetup, task: str) -> tuple[float, str]:
    if setup.method in _FIXED_LR:
        return _FIXED_LR[setup.method]
    lr, tuned_r, _ = _TUNED[task]
    if setup.r == tuned_r:
        return lr, f"the tuned rate for {task} at r={tuned_r}"
    scaled = float(f"{lr * math.sqrt(tuned_r / setup.r):.1e}")
    return scaled, f"{lr:.0e} tuned at r={tuned_r}, scaled by sqrt({tuned_r}/{setup.r}) for rank {setup.r}"


def _full_ft_note(fitter: _Fitter, base: TrainSetup, quality: str, task: str, budget: int, size_b: float) -> list[str]:
    if quality != "high" or task != "domain":
        return []
    est = fitter.estimate(base.replace(method="full", batch_size=1, grad_checkpointing=True))
    if est.peak_bytes > budget:
        return [f"full fine-tuning (best for a large domain shift) would need ~{fmt_bytes(est.peak_bytes)}; "
                "it does not fit."]
    return [f"full fine-tuning would fit ({fmt_bytes(est.peak_bytes)} at micro-batch 1 with checkpointing) and "
            "suits a high-quality domain shift, but deltatune train runs adapters: LoRA on every linear layer "
            "at a high rank is the closest."]
