"""Stand-ins for peft's names that also accept deltatune's objects.

transformers, accelerate and TRL recognise adapter models, configs and layers by ``isinstance`` on
peft's classes, through names each module imported from peft or accelerate. :func:`widen_peft_names`
rebinds those names inside one such module, and only there:

- ``is_peft_model`` / ``_is_peft_model``: also True for a deltatune ``PeftModel``;
- ``PeftConfig``: ``isinstance`` also accepts a deltatune config (attribute access still reaches peft's
  class, so ``PeftConfig.from_pretrained`` keeps working);
- ``BaseTunerLayer``: ``isinstance`` also accepts a deltatune adapted layer;
- ``get_peft_model``: a deltatune config is built by deltatune, a peft config by peft.

peft's own classes and functions are never modified; every other object takes the library's own path.
"""
from __future__ import annotations

from typing import Any, Callable
from deltatune.config import PeftConfig
from deltatune.model import PeftModel
from deltatune.model import get_peft_model as deltatune_get_peft_model
from deltatune.surgery.layer import AdaptedLayer

PATCHED = "__deltatune_patched__"


def is_deltatune_model(model: Any) -> bool:
    return isinstance(model, PeftModel)


def _is_deltatune_config(config: Any) -> bool:
    return isinstance(config, PeftConfig)


def _is_deltatune_layer(layer: Any) -> bool:
    return isinstance(layer, AdaptedLayer)


def _widened_predicate(original: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def is_peft_model(model):
        return is_deltatune_model(model) or original(model)

    is_peft_model.__wrapped__ = original
    setattr(is_peft_model, PATCHED, True)
    return is_peft_model


class _EitherMeta(type):
    """``isinstance(x, Stand-in)`` is True for peft's class or for deltatune's; other attributes are peft's."""

    def __instancecheck__(cls, obj):
        return cls._deltatune_check(obj) or isinstance(obj, cls._peft_class)

    def __subclasscheck__(cls, sub):
        return issubclass(sub, cls._peft_class)

    def __getattr__(cls, name):
        return getattr(cls._peft_class, name)


def _either(peft_class: type, deltatune_check: Callable[[Any], bool]) -> type:
    stand_in = _EitherMeta(peft_class.__name__, (), {
        "_peft_class": peft_class, "_deltatune_check": staticmethod(deltatune_check), PATCHED: True,
        "__doc__": f"peft's {peft_class.__name__}, or deltatune's equivalent (see deltatune.integrations.recognition)",
    })
    return stand_in


def _dispatching_get_peft_model(original: Callable[..., Any]) -> Callable[..., Any]:
    def get_peft_model(model, peft_config, *args, **kwargs):
        if _is_deltatune_config(peft_config):
            # peft-only keywords (autocast_adapter_dtype, revision, low_cpu_mem_usage) mean the same or nothing here
            return deltatune_get_peft_model(model, peft_config, *args, **kwargs)
        return original(model, peft_config, *args, **kwargs)

    setattr(get_peft_model, PATCHED, True)
    return get_peft_model


def widen_peft_names(module: Any) -> None:
    """Rebind, in ``module`` only, each of peft's recognition names it holds (idempotent)."""
    names = vars(module)
    for name in ("is_peft_model", "_is_peft_model"):
        fn = names.get(name)
        if callable(fn) and not getattr(fn, PATCHED, False):
            setattr(module, name, _widened_predicate(fn))
    for name, check in (("PeftConfig", _is_deltatune_config), ("BaseTunerLayer", _is_deltatune_layer)):
        cls = names.get(name)
        if isinstance(cls, type) and not getattr(cls, PATCHED, False) and cls.__module__.startswith("peft"):
            setattr(module, name, _either(cls, check))
    fn = names.get("get_peft_model")
    if callable(fn) and not getattr(fn, PATCHED, False) and getattr(fn, "__module__", "").startswith("peft"):
        setattr(module, "get_peft_model", _dispatching_get_peft_model(fn))
