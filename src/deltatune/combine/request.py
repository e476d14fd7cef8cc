"""What every ``add_weighted_adapter`` request must satisfy before any method's combination runs."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def check_names_and_weights(known: Mapping[str, Any], adapters: Sequence[str], weights: Sequence[float],
                            adapter_name: str) -> None:
    """A new ``adapter_name``, at least one adapter, one finite weight per adapter, every adapter known.

    Raises:
        ValueError: naming what is wrong and what to pass instead.
    """
    if adapter_name in known:
        raise ValueError(
            f"an adapter named {adapter_name!r} already exists; delete_adapter({adapter_name!r}) first or pick "
            "another name (peft silently does nothing in this case)."
        )
    if len(adapters) == 0:
        raise ValueError("no adapters to combine; pass at least one adapter name.")
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(adapters)} adapters but {len(weights)} weights; pass one weight per adapter.")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {list(weights)}.")
    missing = [a for a in adapters if a not in known]
    if missing:
        raise ValueError(f"no adapter named {missing[0]!r}; this model has {sorted(known)}.")
    rows = [a for a in adapters if getattr(known[a], "trainable_token_indices", None) is not None]
    if rows:
        raise ValueError(f"adapter {rows[0]!r} trains embedding rows (trainable_token_indices), which "
                         "add_weighted_adapter cannot combine; combine adapters without them")
    params = [a for a in adapters if getattr(known[a], "target_parameters", None)]
    if params:
        raise ValueError(f"adapter {params[0]!r} adapts nn.Parameters (target_parameters: MoE experts), which "
                         "add_weighted_adapter cannot combine (peft refuses it too); combine adapters without them")
