"""``PeftModel.add_weighted_adapter`` for IA³ adapters: a weighted sum of the IA³ vectors.

peft 0.21's ``IA3Model.add_weighted_adapter`` semantics (parity-tested, on linear and conv layers): the
new adapter takes the first adapter's config with the union of the ``target_modules`` and of the
``feedforward_modules`` (the alternation of the patterns when they are regexes; lists and regexes cannot
be mixed), and on each layer its vector is ``sum(weight_i * vector_i)`` over the combined adapters present
on that layer (so a layer missing from an adapter contributes nothing there, and the new vector starts
from 0, not 1).

Deliberate differences from peft:

* an existing ``adapter_name`` is an error (peft silently returns), as for LoRA;
* an adapter that is not IA³, a layer where the adapters disagree on whether it is feed-forward
  (peft adds vectors of different meaning, or fails on their shapes), and a ``weights`` list of
  the wrong length are errors; the model is left unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from deltatune.combine.request import check_names_and_weights
from deltatune.config import PeftType
from deltatune.surgery.inject import adapted_layers, save_wrappers
from deltatune.methods.ia3 import IA3Scale
from deltatune.methods.ia3_conv import IA3Conv

IA3_VECTORS: tuple[type, ...] = (IA3Scale, IA3Conv)
"""The adapters holding one IA³ vector ``ia3_l`` (linear and conv layers); the weighted sum is elementwise, so it
fits either shape: (n,) on a linear layer, (1, n, 1, …) on a conv."""


def is_ia3_request(peft_model: Any, adapters: Sequence[str]) -> bool:
    """True when every named adapter that exists on ``peft_model`` is IA³ (and at least one does)."""
    known = peft_model.peft_config
    types = [known[a].peft_type for a in adapters if a in known]
    return bool(types) and all(t == PeftType.IA3 for t in types)


def add_weighted_ia3_adapter(peft_model: Any, adapters: Sequence[str], weights: Sequence[float], adapter_name: str) -> None:
    """Add ``adapter_name``: on every layer, the weighted sum of the IA³ vectors of ``adapters`` (not made active).

    Args:
        peft_model: The :class:`~deltatune.model.PeftModel` holding the adapters.
        adapters: Names of existing IA³ adapters.
        weights: One weight per adapter.
        adapter_name: Name of the new adapter; must not exist yet.

    Raises:
        ValueError: unknown or non-IA³ adapters, an existing ``adapter_name``, mismatched weights, lists
            and regexes mixed in ``target_modules``/``feedforward_modules``, two adapters training the
            same module in full, or a layer that is feed-forward for some adapters only.
    """
    config = _check(peft_model, adapters, weights, adapter_name)
    model = peft_model.base_model.model
    peft_model.add_adapter(adapter_name, config)
    try:
        with torch.no_grad():
            for name, host in adapted_layers(model):
                if adapter_name in host.adapters:
                    _fill(name, host, adapters, weights, adapter_name)
    except BaseException:
        peft_model.delete_adapter(adapter_name)  # never leave a half-filled adapter behind
        raise


def _check(peft_model: Any, adapters: Sequence[str], weights: Sequence[float], adapter_name: str):
    known = peft_model.peft_config
    check_names_and_weights(known, adapters, weights, adapter_name)
    for a in adapters:
        if known[a].peft_type != PeftType.IA3:
            raise ValueError(
                f"adapter {a!r} is {known[a].peft_type.value}; IA³ adapters combine only with IA³ adapters."
            )
    for name, wrapper in save_wrappers(peft_model.base_model.model):
        if sum(a in wrapper.modules_to_save for a in adapters) > 1:
            raise ValueError(
                f"two of {list(adapters)} train their own full copy of {name!r} (modules_to_save); full copies cannot "
                "be weighted and combined (peft refuses this too)."
            )
    configs = [known[a] for a in adapters]
    return configs[0].replace(
        target_modules=_union([c.target_modules for c in configs], "target_modules"),
        feedforward_modules=_union([c.feedforward_modules for c in configs], "feedforward_modules"),
    )


def _union(specs: list[Any], field: str) -> Any:
    """peft's rule: regexes joined as alternatives, name lists united (sorted, so the config is stable)."""
    if all(isinstance(s, str) for s in specs):
        return "|".join(f"({s})" for s in specs)
    if all(isinstance(s, (list, tuple, set, frozenset)) for s in specs):
        return tuple(sorted({k for s in specs for k in s}))
    raise ValueError(
        f"the adapters' {field} mix regexes and name lists ({specs}); all adapter configs must use the same kind "
        "(peft's rule). Recreate one adapter with the other kind."
    )


def _fill(name: str, host: Any, adapters: Sequence[str], weights: Sequence[float], new: str) -> None:
    target = host.adapters[new]
    total = torch.zeros_like(target.ia3_l, dtype=torch.float32)
    for a, w in zip(adapters, weights):
        if a not in host.adapters:
            continue
        source = host.adapters[a]
        if not isinstance(source, IA3_VECTORS):
            kinds = ", ".join(t.__name__ for t in IA3_VECTORS)
            raise ValueError(f"{name}: adapter {a!r} is a {type(source).__name__}, not an IA³ vector ({kinds}).")
        if source.feedforward != target.feedforward:
            raise ValueError(
                f"{name}: adapter {a!r} scales this layer's {'input' if source.feedforward else 'output'} but the "
                f"combined adapter scales its {'input' if target.feedforward else 'output'} (feedforward_modules "
                "differ); such vectors have no meaningful sum. Combine adapters with the same feedforward_modules."
            )
        if source.ia3_l.shape != target.ia3_l.shape:  # same layer, same feedforward: only a damaged adapter differs
            raise ValueError(
                f"{name}: adapter {a!r}'s IA³ vector has shape {tuple(source.ia3_l.shape)}, the combined adapter's "
                f"{tuple(target.ia3_l.shape)}; reload {a!r} from its checkpoint."
            )
        total += w * source.ia3_l.detach().to(device=total.device, dtype=torch.float32)
    target.ia3_l.copy_(total.to(target.ia3_l.dtype))


__all__ = ["add_weighted_ia3_adapter", "is_ia3_request"]
