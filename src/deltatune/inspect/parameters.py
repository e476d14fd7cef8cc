"""The parameters only ``target_parameters`` can adapt: MoE expert stacks and other weights outside linear layers.

transformers 5 keeps the experts of Mixtral, Qwen3-MoE, gpt-oss and others as one 3-D parameter per
projection (``mlp.experts.gate_up_proj`` of shape (experts, out, in)), so they appear in no list of
wrappable layers; ``deltatune inspect`` lists them here, grouped over blocks like the layers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from deltatune.config import LoraConfig
from deltatune.surgery.adapter import linear_layer_types
from deltatune.surgery.params import resolve_param_targets
from deltatune.surgery.targets import iter_layers, pattern_value


@dataclass(frozen=True)
class ParameterGroup:
    """Parameters that differ only in their block index, e.g. every block's ``mlp.experts.down_proj``."""

    pattern: str
    """``<module path>.<parameter>`` with block indices replaced by ``*``."""
    experts: int
    """Leading dimension of a 3-D stack (one LoRA update each); 1 for a 2-D weight."""
    in_features: int
    """Input width of each expert."""
    out_features: int
    """Output width of each expert."""
    count: int
    """How many parameters share this pattern and shape."""

    @property
    def target(self) -> str:
        """The shortest ``target_parameters`` entry that selects this group: ``experts.down_proj``."""
        return ".".join(self.pattern.split(".")[-2:])

    def lora_parameters(self, r: int) -> int:
        """Trainable parameters a rank-``r`` LoRA adds on this group: (in + out) · r per expert."""
        return (self.in_features + self.out_features) * r * self.experts * self.count


def _expert_dims(module: nn.Module, p) -> tuple[int, int, int] | None:
    """(experts, in, out) of a 3-D stack (read through the module's ``is_transposed``) or a 2-D weight."""
    if p.dim() == 3:
        experts, d1, d2 = p.shape
        in_f, out_f = (d1, d2) if getattr(module, "is_transposed", False) else (d2, d1)
        return int(experts), int(in_f), int(out_f)
    if p.dim() == 2:
        return 1, int(p.shape[1]), int(p.shape[0])
    return None


def parameter_groups(model: nn.Module) -> list[ParameterGroup]:
    """2-D and 3-D parameters of ``model`` held by modules other than linear/embedding layers (which
    ``target_modules`` reaches), grouped over block indices, in model order."""
    linear = (*linear_layer_types(), nn.Embedding)
    groups: dict[tuple, int] = {}
    for path, module in iter_layers(model):
        if isinstance(module, linear):
            continue
        for name, p in module.named_parameters(recurse=False):
            dims = _expert_dims(module, p)
            if dims is None:
                continue
            pattern = re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", f"{path}.{name}")
            groups[(pattern, *dims)] = groups.get((pattern, *dims), 0) + 1
    return [ParameterGroup(p, e, i, o, n) for (p, e, i, o), n in groups.items()]


def parameter_lora_count(model: nn.Module, config: LoraConfig) -> int:
    """Exact number of LoRA parameters ``config.target_parameters`` adds to ``model``: r·(in + out) per
    expert, with per-parameter ranks from ``rank_pattern`` (0 without ``target_parameters``)."""
    if not getattr(config, "target_parameters", None):
        return 0
    modules = dict(iter_layers(model))
    total = 0
    for path, names in resolve_param_targets(model, config).items():
        for name in names:
            experts, in_f, out_f = _expert_dims(modules[path], getattr(modules[path], name))
            total += pattern_value(config.rank_pattern, f"{path}.{name}", config.r) * (in_f + out_f) * experts
    return total
