"""A ``PeftModel``'s ``forward`` shows the wrapped model's signature to code that inspects it.

Tools decide what to pass by reading ``inspect.signature(model.forward)``: transformers' Trainer
drops dataset columns the signature does not name (``token_type_ids``, ``decoder_input_ids``),
TRL and accelerate do the same, and so do users' own collators. A wrapper whose forward takes
``*args, **kwargs`` would lose those columns silently. peft offers ``update_forward_signature`` as an
opt-in helper; here every ``PeftModel`` shows the base model's signature from the start.

The signature is computed on access from the instance's current base model, so nothing is stored
on the instance and models still pickle and deep-copy as plain modules.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable


class _SignedForward:
    """``forward`` bound to one model, with the base model's signature and docstring."""

    __slots__ = ("_bound", "_model")

    def __init__(self, bound: Callable[..., Any], model: Any) -> None:
        self._bound = bound
        self._model = model

    def __call__(self, *args, **kwargs):
        return self._bound(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        base = self._model.get_base_model()
        try:
            return inspect.signature(base.forward)
        except (TypeError, ValueError):  # a forward inspect cannot read: show our own
            return inspect.signature(self._bound)

    @property
    def __doc__(self) -> str | None:
        return inspect.getdoc(self._model.get_base_model().forward)

    @property
    def __func__(self):
        return self._bound.__func__

    @property
    def __self__(self):
        return self._model

    def __getattr__(self, name: str):
        if name.startswith("_") and name not in ("__name__", "__qualname__"):
            # private and dunder names are never delegated: copy and pickle probe ``__setstate__`` & co. on
            # an instance whose slots are not filled yet, where delegating would recurse
            raise AttributeError(name)
        return getattr(self._bound, name)

    def __reduce__(self):
        return (_SignedForward, (self._bound, self._model))


class presents_base_signature:
    """Descriptor for ``PeftModel.forward``: class access gives the function, instance access a
    :class:`_SignedForward`."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __get__(self, obj: Any, objtype: type | None = None):
        if obj is None:
            return self.fn
        return _SignedForward(self.fn.__get__(obj, objtype), obj)
