"""``PeftMixedModel``: peft's class for adapters of different types active at once (peft's ``mixed_model.py``).

deltatune's :class:`~deltatune.model.PeftModel` already keeps any number of adapters on one layer and sums
the active ones' effects there (:class:`~deltatune.surgery.layer.AdaptedLayer`), whatever their method, so this
class is a :class:`PeftModel` with peft's rules for mixed models on top:

- it takes only the adapter types peft mixes that deltatune implements: LoRA (with rsLoRA and DoRA) and AdaLoRA.
  peft also mixes LoHa, LoKr, OFT and SHiRA; deltatune does not implement those, and says so (:func:`check_mixable`).
- ``forward``/``generate`` run the user's model with the active adapters inside its layers and nothing around
  it, as peft's does: an AdaLoRA adapter adds no orthogonality penalty to the loss here (train it in a PeftModel).
- ``from_pretrained`` builds a ``PeftMixedModel`` whatever the adapter's ``task_type``.
- ``set_adapter(names, inference_mode=...)`` and ``delete_adapter(name or names)`` take peft's arguments.

Beyond peft 0.21.2 (which raises ``NotImplementedError``/``TypeError`` for these): ``save_pretrained`` writes
each adapter in peft's format (``default`` at the root, others in a subfolder named after them), loadable one
by one with peft's ``PeftMixedModel.from_pretrained``/``load_adapter``; ``get_layer_status``/``get_model_status``
and ``add_weighted_adapter`` work as on a :class:`PeftModel`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from deltatune.config import PeftConfig, read_config_json
from deltatune.model import PeftModel, register_mixed_model

__all__ = ["PeftMixedModel", "check_mixable", "MIXABLE_TYPES", "NOT_IMPLEMENTED_TYPES"]

MIXABLE_TYPES: tuple[str, ...] = ("LORA", "ADALORA")
"""The ``peft_type`` values a PeftMixedModel takes: those of peft's ``COMPATIBLE_TUNER_TYPES`` that deltatune
implements (LoRA covers rsLoRA and DoRA: they are options of ``LoraConfig``)."""

NOT_IMPLEMENTED_TYPES: dict[str, str] = {"LOHA": "LoHa", "LOKR": "LoKr", "OFT": "OFT", "SHIRA": "SHiRA"}
"""The rest of peft's ``COMPATIBLE_TUNER_TYPES``: ``peft_type`` -> the method's name. deltatune has no
implementation of these, so their adapters cannot be loaded at all."""


def check_mixable(peft_type: Any, what: str) -> None:
    """Raise unless an adapter of ``peft_type`` (a ``PeftType``, peft's, or its string) can join a PeftMixedModel.

    Args:
        peft_type: the adapter's type.
        what: how the message names the adapter (its config file, or "adapter 'x'").

    Raises:
        NotImplementedError: a type peft mixes but deltatune does not implement (LoHa, LoKr, OFT, SHiRA).
        ValueError: a type peft does not mix either (IA³, prompt learning, deltatune's own methods).
    """
    value = str(getattr(peft_type, "value", peft_type))
    if value in MIXABLE_TYPES:
        return
    if value in NOT_IMPLEMENTED_TYPES:
        method = NOT_IMPLEMENTED_TYPES[value]
        raise NotImplementedError(
            f"{what} is a {method} adapter (peft_type {value!r}): deltatune does not implement {method}, so "
            f"PeftMixedModel cannot load it. deltatune mixes LoRA (also rsLoRA and DoRA) and AdaLoRA adapters: "
            f"train a LoRA adapter (LoraConfig) in its place, or run this mix with peft."
        )
    raise ValueError(
        f"{what} has peft_type {value!r}, which is not compatible with PeftMixedModel (peft's rule: adapters that "
        f"change the layers' weights additively mix; deltatune supports {list(MIXABLE_TYPES)} of them). Use a "
        f"PeftModel for a {value} adapter."
    )


class PeftMixedModel(PeftModel):
    """A model with adapters of different types, several active at once, their effects summed in each layer.

    Build with ``get_peft_model(model, config, mixed=True)`` or :meth:`from_pretrained`; add adapters with
    :meth:`add_adapter`/:meth:`load_adapter` and activate several with ``set_adapter([...])``. See the module
    docstring for what differs from :class:`PeftModel`.

    Example::

        peft_model = PeftMixedModel.from_pretrained(base_model, path_to_lora, "adapter1").eval()
        peft_model.load_adapter(path_to_adalora, "adapter2")
        peft_model.set_adapter(["adapter1", "adapter2"])  # both apply, in every layer either one targets
        peft_model(input_ids)
    """

    # __init__ is PeftModel's: it adds the first adapter through add_adapter below, which checks its type.

    @classmethod
    def class_for(cls, config: PeftConfig) -> type[PeftModel]:
        """Always this class (peft's ``from_pretrained`` returns a PeftMixedModel whatever the ``task_type``)."""
        return cls

    def _running(self) -> str | None:
        # No adapter's method wraps the forward: the layers apply every active adapter, as in peft's mixed model.
        return None

    def add_adapter(
        self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False, autocast_adapter_dtype: bool = True
    ) -> None:
        """Attach a new adapter of a mixable type (not made active: call :meth:`set_adapter`).

        Raises:
            NotImplementedError: a LoHa, LoKr, OFT or SHiRA config (see :func:`check_mixable`).
            ValueError: any other type that does not mix, or what :meth:`PeftModel.add_adapter` refuses.
        """
        check_mixable(peft_config.peft_type, f"adapter {adapter_name!r}")
        super().add_adapter(adapter_name, peft_config, low_cpu_mem_usage, autocast_adapter_dtype)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make the named adapters active together (peft's call); their effects add up in each layer.

        Args:
            adapter_name: one name or a list of names.
            inference_mode: freeze every parameter instead of making the active adapters trainable.

        Raises:
            ValueError: a name that is not one of this model's adapters.
        """
        super().set_adapter(adapter_name)
        if inference_mode:
            for p in self.parameters():
                p.requires_grad_(False)

    def delete_adapter(self, adapter_name: str | list[str]) -> None:
        """Remove one adapter or several (peft's mixed model takes a list); see :meth:`PeftModel.delete_adapter`.

        Raises:
            ValueError: a name that is not one of this model's adapters (checked for all before any is removed).
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = sorted(set(names) - set(self.peft_config))
        if missing:
            raise ValueError(f"no adapters named {missing}; this model has {sorted(self.peft_config)}")
        for name in names:
            super().delete_adapter(name)

    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
        autocast_adapter_dtype: bool = True, **kwargs: Any,
    ) -> None:
        """Add the adapter saved at ``model_id`` (``subfolder`` as in peft) under ``adapter_name``, not made active.

        Raises:
            NotImplementedError: the folder holds a LoHa, LoKr, OFT or SHiRA adapter.
            ValueError: another type that does not mix, or what :meth:`PeftModel.load_adapter` refuses.
        """
        folder = _checked_folder(model_id, kwargs.get("subfolder"))
        super().load_adapter(folder, adapter_name, is_trainable, autocast_adapter_dtype)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
        is_trainable: bool = False, config: PeftConfig | None = None, subfolder: str | None = None,
        autocast_adapter_dtype: bool = True, **kwargs: Any,
    ) -> "PeftMixedModel":
        """Wrap ``model`` and load the adapter saved at ``model_id`` as its first adapter (see
        :meth:`PeftModel.from_pretrained`); more follow with :meth:`load_adapter`.

        Raises:
            NotImplementedError: the folder holds a LoHa, LoKr, OFT or SHiRA adapter.
            ValueError: another type that does not mix, or what :meth:`PeftModel.from_pretrained` refuses.
        """
        if config is not None:
            check_mixable(config.peft_type, "the config passed to from_pretrained")
        else:
            _checked_folder(model_id, subfolder)  # before load_config, which only knows deltatune's own types
        return super().from_pretrained(
            model, model_id, adapter_name, is_trainable, config, subfolder, autocast_adapter_dtype, **kwargs
        )


def _checked_folder(model_id: str | os.PathLike, subfolder: str | None) -> Path:
    """The adapter folder, after checking that the ``peft_type`` in its config file mixes."""
    file, data = read_config_json(model_id, subfolder)
    if "peft_type" in data:  # without one, loading the config says what is wrong with the file
        check_mixable(data["peft_type"], str(file))
    return file.parent


register_mixed_model(PeftMixedModel)
