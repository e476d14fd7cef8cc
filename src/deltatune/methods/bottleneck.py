"""Bottleneck adapters: a small residual MLP on the output of a transformer sub-layer.

Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP" (arXiv:1902.00751): an adapter
after the attention block and after the feed-forward block of every layer. Pfeiffer et al., 2020,
"AdapterFusion" (arXiv:2005.00247): one adapter, after the feed-forward block only.

Each adapter maps the sub-layer's output h (…, d) to ``h + s · up(act(down(h)))`` with down: d → m,
up: m → d and m = d // reduction_factor (or ``bottleneck_size``). Both papers insert it where the
sub-layer's output projection has produced h and before the residual sum, which is the output of
that projection (``o_proj`` / ``down_proj`` in LLaMA, ``attn.c_proj`` / ``mlp.c_proj`` in GPT-2,
``attention.output.dense`` / ``output.dense`` in BERT). So the adapter is an :class:`Adapter` on that
projection: no forward hooks, no model-specific code, and it saves, loads and deletes like LoRA.
The up-projection starts at zero, so a new adapter leaves the model unchanged.

The nonlinearity means the adapter cannot be folded into a weight: it is never mergeable.

Not in peft. On disk (``peft_type`` "BOTTLENECK") each adapted module ``<m>`` stores
``base_model.model.<m>.adapter_down.weight`` (m, d), ``.adapter_down.bias`` (m,),
``.adapter_up.weight`` (d, m) and ``.adapter_up.bias`` (d,).
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.config import PeftConfig, PeftType
from deltatune.methods.base import Adapter, Method, adapter_dtype, dense_weight, linear_layer_types, register_method
from deltatune.surgery.targets import linear_layer_names

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh,
}

_LLAMA_LIKE = {"houlsby": ("self_attn.o_proj", "mlp.down_proj"), "pfeiffer": ("mlp.down_proj",)}
_BERT_LIKE = {
    # "output.dense" alone would also match attention.output.dense, so Pfeiffer needs the layer index.
    "houlsby": ("attention.output.dense", "output.dense"),
    "pfeiffer": r".*\.layer\.\d+\.output\.dense",
}
# Which modules' outputs the adapters transform, per model family and placement.
PLACEMENTS: dict[str, dict[str, tuple[str, ...] | str]] = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE, "gemma2": _LLAMA_LIKE,
    "gpt2": {"houlsby": ("attn.c_proj", "mlp.c_proj"), "pfeiffer": ("mlp.c_proj",)},
    "bert": _BERT_LIKE, "roberta": _BERT_LIKE,
    "opt": {"houlsby": ("self_attn.out_proj", "fc2"), "pfeiffer": ("fc2",)},
    "gpt_neox": {"houlsby": ("attention.dense", "mlp.dense_4h_to_h"), "pfeiffer": ("mlp.dense_4h_to_h",)},
}


# ---- config ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BottleneckConfig(PeftConfig):
    """Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2020). Not a peft method."""

    peft_type: ClassVar[PeftType] = PeftType.BOTTLENECK

    reduction_factor: int = 16
    """Bottleneck width m = d // reduction_factor (at least 1), d the adapted module's output size."""
    bottleneck_size: int | None = None
    """Fixed bottleneck width m; when set, ``reduction_factor`` is ignored."""
    non_linearity: str = "relu"
    """Activation between the projections: "relu", "gelu", "silu" or "tanh"."""
    placement: str = "houlsby"
    """"houlsby": after the attention block and after the feed-forward block of every layer.
    "pfeiffer": after the feed-forward block only. Ignored when ``target_modules`` is set."""
    scaling: float = 1.0
    """Multiplier s on the adapter's branch: h + s · up(act(down(h)))."""
    init_weights: bool = True
    """True: up-projection zero (the model starts unchanged). False: random up-projection (tests only)."""
    target_modules: Sequence[str] | str | None = None
    """Override the placement: modules (suffix match, or a regex on the full path) whose OUTPUT gets an
    adapter. None: the placement table for the model family."""
    exclude_modules: Sequence[str] | str | None = None
    """Names (suffix match) or a regex of modules never to adapt."""
    layers_to_transform: Sequence[int] | int | None = None
    """Only adapt modules inside these layer indices."""
    layers_pattern: Sequence[str] | str | None = None
    """Name of the layer list (e.g. "layers", "h") used to read a module's layer index."""
    modules_to_save: Sequence[str] | None = None
    """Modules (suffix match) trained in full and saved with the adapter, e.g. a classifier head."""

    def validate(self) -> None:
        rf, size = self.reduction_factor, self.bottleneck_size
        if not (isinstance(rf, int) and not isinstance(rf, bool) and rf > 0):
            raise ValueError(f"reduction_factor must be a positive integer, got {rf!r}")
        if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
            raise ValueError(f"bottleneck_size must be a positive integer or None, got {size!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity={self.non_linearity!r} is not supported; use one of {sorted(ACTIVATIONS)}")
        if self.placement not in ("houlsby", "pfeiffer"):
            raise ValueError(f"placement must be 'houlsby' or 'pfeiffer', got {self.placement!r}")
        if not (isinstance(self.scaling, (int, float)) and math.isfinite(self.scaling)):
            raise ValueError(f"scaling must be a finite number, got {self.scaling!r}")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("layers_pattern only makes sense together with layers_to_transform; set both or neither")

    def width(self, d: int) -> int:
        """Bottleneck width m for a module with output size d."""
        return self.bottleneck_size if self.bottleneck_size is not None else max(1, d // self.reduction_factor)


def prepare_bottleneck_config(config: BottleneckConfig, model: nn.Module) -> BottleneckConfig:
    """Turn ``placement`` into explicit ``target_modules`` for the model's family (saved that way).

    Raises:
        ValueError: ``target_modules`` is None and the family is not in :data:`PLACEMENTS`.
    """
    if config.target_modules is not None:
        return config
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PLACEMENTS:
        raise ValueError(
            f"BottleneckConfig has no placement table for model type {model_type!r} (known: "
            f"{', '.join(sorted(PLACEMENTS))}); pass target_modules=[...] naming the attention output and "
            f"feed-forward output projections. Layers that can be targeted: "
            f"{', '.join(linear_layer_names(model, _supported_types()))}"
        )
    return config.replace(target_modules=PLACEMENTS[model_type][config.placement])


# ---- functional core -------------------------------------------------------------------------------
def bottleneck_delta(
    h: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor, up_w: torch.Tensor, up_b: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor], scaling: float,
) -> torch.Tensor:
    """s · (up_w · act(down_w · h + down_b) + up_b) for h (..., d), down_w (m, d), up_w (d, m)."""
    z = act(F.linear(h, down_w, down_b))  # (..., m)
    return F.linear(z, up_w, up_b) * scaling  # (..., d)


# ---- module ----------------------------------------------------------------------------------------
class BottleneckAdapter(Adapter):
    """h + s · up(act(down(h))) on the output h of one layer."""

    mergeable = False
    not_mergeable_reason = (
        ": a bottleneck adapter computes h + s·up(act(down(h))), and its nonlinearity cannot be folded "
        "into a weight matrix"
    )
    peft_keys = {
        "down_weight": "adapter_down.weight", "down_bias": "adapter_down.bias",
        "up_weight": "adapter_up.weight", "up_bias": "adapter_up.bias",
    }

    def __init__(self, d: int, m: int, non_linearity: str, scaling: float, dtype: torch.dtype, init_weights: bool = True) -> None:
        super().__init__()
        self.non_linearity, self.scaling = non_linearity, scaling
        self.down_weight = nn.Parameter(torch.empty(m, d, dtype=dtype))  # (m, d)
        self.down_bias = nn.Parameter(torch.zeros(m, dtype=dtype))  # (m,)
        self.up_weight = nn.Parameter(torch.zeros(d, m, dtype=dtype))  # (d, m)
        self.up_bias = nn.Parameter(torch.zeros(d, dtype=dtype))  # (d,)
        # nn.Linear's default init for the down-projection; the zero up-projection makes the adapter
        # an exact identity at the start (Houlsby et al., section 2.1: "near-identity initialization").
        nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
        if not init_weights:
            nn.init.kaiming_uniform_(self.up_weight, a=math.sqrt(5))
            nn.init.uniform_(self.up_bias, -0.1, 0.1)

    def forward(self, x: torch.Tensor, base_layer: nn.Module, base_out: torch.Tensor | None) -> torch.Tensor:
        h = base_layer(x) if base_out is None else base_out  # (..., d)
        act = ACTIVATIONS[self.non_linearity]
        delta = bottleneck_delta(
            h.to(self.down_weight.dtype), self.down_weight, self.down_bias, self.up_weight, self.up_bias, act, self.scaling
        )
        return h + delta.to(h.dtype)


# ---- construction ----------------------------------------------------------------------------------
def _out_features(layer: nn.Module) -> int:
    if hasattr(layer, "out_features"):
        return layer.out_features
    return dense_weight(layer).shape[0]


def make_bottleneck_adapter(config: BottleneckConfig, base_layer: nn.Module, module_name: str) -> BottleneckAdapter:
    """Build one adapter on ``base_layer``'s output (width from ``reduction_factor``/``bottleneck_size``)."""
    d = _out_features(base_layer)
    return BottleneckAdapter(
        d, config.width(d), config.non_linearity, config.scaling, adapter_dtype(base_layer), config.init_weights
    )


def _supported_types() -> tuple[type, ...]:
    return linear_layer_types()


register_method(
    Method(
        PeftType.BOTTLENECK, BottleneckConfig, make_bottleneck_adapter,
        layer_types=_supported_types(), prepare_config=prepare_bottleneck_config,
        name="bottleneck", default_targets=types.MappingProxyType(PLACEMENTS), plannable=True,
    )
)
