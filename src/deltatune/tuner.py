"""AdapterModel: what ``PeftModel.base_model`` is, peft's tuner (``LoraModel`` & co.) under our names."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from deltatune.config import PeftConfig
from deltatune.surgery import inject
from deltatune.surgery.params import targeted_parameter_names
from deltatune import status

if TYPE_CHECKING:
    from deltatune.model import PeftModel


class AdapterModel(nn.Module):
    """peft's tuner (``LoraModel`` & co.): holds the user's model as ``.model``, so saved keys start with
    ``base_model.model.``, and answers the adapter calls peft users make on ``model.base_model``.

    The adapter state lives in the owning :class:`PeftModel`; these methods are its calls under peft's
    tuner names (``set_adapter``, ``enable_adapter_layers``/``disable_adapter_layers``, ``peft_config``,
    merging, deletion). Anything else reaches the user's model.
    """

    def __init__(self, model: nn.Module, owner: "PeftModel") -> None:
        super().__init__()
        self.model = model
        # a plain attribute, not a submodule: the owner contains this module, not the other way round
        object.__setattr__(self, "_owner", owner)

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self._owner.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        active = self._owner.active_adapters
        return active[0] if len(active) == 1 else active  # peft's tuner gives a list when several are active

    @property
    def active_adapters(self) -> list[str]:
        return self._owner.active_adapters

    @property
    def targeted_module_names(self) -> list[str]:
        """peft's tuner attribute: the paths (in ``.model``) of the modules that got an adapter layer."""
        return status.targeted_module_names(self.model)

    @property
    def targeted_parameter_names(self) -> list[str]:
        """peft's tuner attribute: the paths (in ``.model``) of the parameters ``target_parameters`` adapted."""
        return targeted_parameter_names(self.model)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        self._owner.set_adapter(adapter_name)

    def enable_adapter_layers(self) -> None:
        """Undo :meth:`disable_adapter_layers`."""
        inject.set_disabled(self.model, False)
        self._owner._disabled = False

    def disable_adapter_layers(self) -> None:
        """Bypass every adapter until :meth:`enable_adapter_layers` (merged ones are unmerged first, as in peft)."""
        for _, host in inject.adapted_layers(self.model):
            host.unmerge()
        inject.set_disabled(self.model, True)
        self._owner._disabled = True

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._owner.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self._owner.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        return self._owner.merge_and_unload(progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        return self._owner.unload()

    def delete_adapter(self, adapter_name: str) -> None:
        self._owner.delete_adapter(adapter_name)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, **kwargs: Any) -> None:
        self._owner.add_weighted_adapter(adapters, weights, adapter_name, **kwargs)

    def update_and_allocate(self, global_step: int) -> None:
        """peft's ``AdaLoraModel.update_and_allocate``: see :meth:`PeftModel.update_and_allocate`."""
        self._owner.update_and_allocate(global_step)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)
