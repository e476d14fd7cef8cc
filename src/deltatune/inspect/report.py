"""Text reports for ``deltatune inspect``: pure functions from inspection results to printable lines."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from deltatune.config import PeftConfig
from deltatune.inspect.adapter_check import AdapterFiles
from deltatune.inspect.architecture import Architecture, LayerGroup
from deltatune.inspect.parameters import ParameterGroup
from deltatune.inspect.presets import PresetRow
from deltatune.inspect.servers import Finding
from deltatune.model import get_peft_model
from deltatune.surgery.inject import adapted_layers


def _table(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))] if rows else []
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "-"


def format_architecture(name: str, arch: Architecture) -> list[str]:
    """Headline: class, model type, sizes, parameter count."""
    heads = f"heads {arch.attention_heads}" + (f" (kv {arch.kv_heads})" if arch.kv_heads not in (None, arch.attention_heads) else "")
    sizes = [
        f"layers {arch.layers}", f"hidden {arch.hidden_size}", f"intermediate {arch.intermediate_size}", heads,
        f"vocab {arch.vocab_size}", f"positions {arch.max_positions}",
    ]
    tied = ", input/output embeddings tied (counted once)" if arch.tied_embeddings else ""
    return [
        f"{name}: {arch.architecture} (model_type {arch.model_type})",
        "  " + ", ".join(s for s in sizes if "None" not in s),
        f"  parameters {arch.parameters:,}{tied}" + (f", saved as {arch.dtype}" if arch.dtype else ""),
    ]


def format_layer_groups(groups: Sequence[LayerGroup]) -> list[str]:
    """One line per group: ``model.layers.*.self_attn.q_proj  Linear  576->576  x30``."""
    rows = [
        [g.pattern, g.kind, f"{g.in_features}->{g.out_features}", f"x{g.count}",
         "output head, left out of all-linear" if g.is_output_head else ""]
        for g in groups
    ]
    return ["Layers an adapter can wrap (* = block index):", *_table(rows)]


def format_parameter_groups(groups: Sequence[ParameterGroup], r: int) -> list[str]:
    """One line per group of parameters only ``target_parameters`` reaches (MoE experts), with its LoRA size."""
    rows = [[g.pattern, f"{g.experts} x {g.in_features}->{g.out_features}" if g.experts > 1 else f"{g.in_features}->{g.out_features}",
             f"x{g.count}", f"target_parameters: {g.target!r}", f"r={r}: {g.lora_parameters(r):,} params"] for g in groups]
    return ["Parameters only target_parameters can adapt (experts x in->out; one LoRA per expert):", *_table(rows)]


def format_presets(rows: Sequence[PresetRow], r: int, base_parameters: int) -> list[str]:
    """The preset table at rank ``r``, with the share of the base model's parameters."""
    table = []
    for row in rows:
        targets = row.target_modules if isinstance(row.target_modules, str) else ", ".join(row.target_modules)
        if row.error:
            table.append([row.name, targets, "does not apply:", row.error.split(". ")[0]])
        else:
            table.append([row.name, targets, f"{row.modules} modules", f"{row.trainable:,}", _pct(row.trainable, base_parameters)])
    width = max(len(r) for r in table) if table else 0
    table = [r + [""] * (width - len(r)) for r in table]
    return [f"LoRA target presets at r={r} (trainable parameters, share of the base model):", *_table(table)]


@dataclass(frozen=True)
class DryRun:
    """What a config would do to a model, computed on the meta device."""

    targets: list[str]
    """Fully qualified names of the wrapped modules, in model order."""
    trainable: int
    """Exact trainable parameter count (adapters plus modules_to_save copies)."""
    total: int
    """All parameters of the wrapped model."""


def dry_run(model: nn.Module, config: PeftConfig) -> DryRun:
    """Attach ``config`` to a meta-device ``model`` (nothing is computed) and report what it wrapped.

    Raises:
        ValueError: the config's targets do not resolve on this model (the message lists what exists).
    """
    with torch.device("meta"):
        peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    return DryRun([n for n, _ in adapted_layers(peft_model.base_model.model)], trainable, total)


def format_dry_run(config: PeftConfig, result: DryRun) -> list[str]:
    """The resolved module list and the trainable count."""
    targets = config.to_dict().get("target_modules")
    head = (
        f"Dry run: {config.peft_type.value} target_modules={targets!r} wraps {len(result.targets)} modules; "
        f"trainable parameters {result.trainable:,} ({_pct(result.trainable, result.total - result.trainable)} of the base model)"
    )
    return [head, *(f"  {name}" for name in result.targets)]


_QUIET_KEYS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "target_modules", "modules_to_save",
}


def _group_modules(keys: Sequence[str]) -> dict[str, int]:
    """Saved tensor keys -> module patterns (block index as *) -> count of distinct modules."""
    modules: dict[str, set[str]] = {}
    for key in keys:
        path = key.removeprefix("base_model.model.")
        module = re.sub(r"\.(lora_[A-Za-z_]+|ia3_l|weight|bias)(\.weight)?$", "", path)
        pattern = re.sub(r"(?<=\.)\d+(?=\.|$)", "*", module)
        modules.setdefault(pattern, set()).add(module)
    return {p: len(m) for p, m in modules.items()}


def saved_ranks(files: AdapterFiles) -> dict[int, int]:
    """rank -> number of modules, read from the saved ``lora_A`` factors (the truth, whatever the config says)."""
    ranks: dict[int, int] = {}
    for key, (shape, _) in files.tensors.items():
        if key.endswith(("lora_A.weight", "lora_A", "lora_embedding_A")) and shape:
            ranks[shape[0]] = ranks.get(shape[0], 0) + 1
    return dict(sorted(ranks.items()))


def format_adapter(files: AdapterFiles) -> list[str]:
    """Config, ranks, targets and saved tensors of an adapter folder."""
    raw = files.raw_config
    settings = {k: v for k, v in sorted(raw.items()) if k not in _QUIET_KEYS and v not in (None, False, {}, [], "")}
    dtypes = sorted({str(dt).replace("torch.", "") for _, dt in files.tensors.values()})
    size = files.weights_file.stat().st_size
    lines = [
        f"Adapter {files.folder}",
        f"  type {raw.get('peft_type')}, task {raw.get('task_type')}, base model {raw.get('base_model_name_or_path')}",
        "  settings: " + (", ".join(f"{k}={v}" for k, v in settings.items()) or "(all defaults)"),
        f"  target_modules: {raw.get('target_modules')}; modules_to_save: {raw.get('modules_to_save')}",
    ]
    ranks = saved_ranks(files)
    if ranks:
        lines.append("  ranks (from the saved factors): " + ", ".join(f"r={r} on {n} modules" for r, n in ranks.items()))
    lines.append(
        f"  saved: {len(files.tensors)} tensors, {files.parameters:,} values ({', '.join(dtypes)}), "
        f"{files.weights_file.name} {size / 1e6:.2f} MB"
    )
    rows = [[p, f"x{n}"] for p, n in _group_modules(list(files.tensors)).items()]
    return lines + ["  modules with saved tensors:", *_table(rows, indent="    ")]


def format_findings(findings: Sequence[Finding]) -> list[str]:
    """Server compatibility, one line per finding, with its source."""
    rows = [[f.server, f.level, f"{f.reason} [{f.source}]"] for f in findings]
    return ["Serving (rules read from each server's source; re-check for the version you deploy):", *_table(rows)]


def verdict(findings: Sequence[Finding], server: str) -> str:
    """``yes``, ``with flags`` or ``no`` for one server."""
    levels = {f.level for f in findings if f.server == server}
    return "no" if "error" in levels else "with flags/caveats" if "warning" in levels else "yes"

