"""Saving and loading a PeftModel's adapters in peft's format: ``save_pretrained``, ``from_pretrained``,
``load_adapter`` (a mixin of :class:`deltatune.model.PeftModel`; the file formats are :mod:`deltatune.io`'s)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from deltatune._version import __version__
from deltatune.config import PeftConfig, load_config
from deltatune.io import checkpoint as ckpt
from deltatune.io.adapter_guard import checked_state_dict
from deltatune.io.model_card import write_model_card
from deltatune.methods.lora_init import mutated_to_lora_on_save
from deltatune.surgery import inject

if TYPE_CHECKING:
    from deltatune.model import PeftModel


def _is_transformers_model(model: nn.Module) -> bool:
    # Without importing transformers' modeling code (seconds, and `import deltatune` must stay light): a
    # transformers model means that module is loaded already.
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(model, modeling.PreTrainedModel)


class AdapterFiles:
    """What :class:`~deltatune.model.PeftModel` reads and writes: each adapter as peft saves it."""

    pipeline_tag: ClassVar[str | None] = None
    """The model card's ``pipeline_tag`` (``text-generation`` for causal LMs)."""

    # ---- saving / loading --------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        safe_serialization: bool = True,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
        **_: Any,
    ) -> None:
        """Write each adapter as peft does: ``default`` at the root, others in a subfolder named after them.

        ``path_initial_model_for_weight_conversion``: the folder where a PiSSA/OLoRA adapter was saved
        before training; the adapter is then written as a LoRA of twice the rank on the original weights.
        """
        names = selected_adapters or list(self.peft_config)
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"no adapter named {n!r} to save; this model has {sorted(self.peft_config)}")
            ckpt.check_adapter_name(n)  # before anything is written
        if not is_main_process:
            return
        ready = []  # every adapter is checked whole (deltatune.io.adapter_guard) before any is written
        for n in names:
            config = self.peft_config[n].replace(inference_mode=True)
            sd = checked_state_dict(self.base_model.model, n, lambda n=n: self.get_adapter_state_dict(n, save_embedding_layers))
            if path_initial_model_for_weight_conversion is not None:
                sd, config = mutated_to_lora_on_save(sd, config, Path(path_initial_model_for_weight_conversion))
            ready.append((ckpt.adapter_folder(save_directory, n), sd, config))
        for folder, sd, config in ready:
            ckpt.save_adapter(sd, config, folder, safe_serialization, self._auto_mapping(config))  # one step; see deltatune.atomic
        self._write_model_card(save_directory)

    def _auto_mapping(self, config: PeftConfig) -> dict[str, str] | None:
        """peft's ``auto_mapping``: without a task type, the class to build the base model with, so that
        ``AutoPeftModel.from_pretrained`` can load the adapter alone."""
        if config.task_type is not None:
            return None
        cls = type(self.get_base_model())
        return {"base_model_class": cls.__name__, "parent_library": cls.__module__}

    def _write_model_card(self, save_directory: str | os.PathLike) -> None:
        base = self.get_base_model()
        name = getattr(getattr(base, "config", None), "_name_or_path", None) or None
        tags = ["transformers"] if _is_transformers_model(base) else []
        peft_type = self.peft_config[self._active[0]].peft_type if self._active else None
        if peft_type is not None and peft_type.value == "LORA":
            tags.append("lora")
        if getattr(base, "name_or_path", None):
            tags.append(f"base_model:adapter:{base.name_or_path}")
        pipeline = self.pipeline_tag
        write_model_card(save_directory, name, tags, pipeline, __version__)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
        is_trainable: bool = False, config: PeftConfig | None = None, subfolder: str | None = None,
        autocast_adapter_dtype: bool = True, **_: Any,
    ) -> "PeftModel":
        """Wrap ``model`` and load the adapter saved at ``model_id`` (a folder written by peft or deltatune)."""
        folder = Path(model_id) / subfolder if subfolder else Path(model_id)
        config = config or load_config(folder)
        config = config.replace(inference_mode=not is_trainable)
        ckpt.check_base_model(config, model)
        sd = ckpt.load_weights(folder)  # read first: a bad file must fail before the caller's model is touched
        peft_model = cls.class_for(config)(model, config, adapter_name, autocast_adapter_dtype)
        try:
            peft_model._load_weights(folder, adapter_name, sd)
        except Exception:
            # All or nothing for the model too: the caller's model gets its own layers back, so it runs
            # as before and a retry can wrap it again. (PiSSA/OLoRA initialisations, which move the base
            # weights on injection, are not undone.)
            inject.unwrap(model, keep_trained_copies=False)
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
        autocast_adapter_dtype: bool = True, **_: Any,
    ) -> None:
        """Add the adapter saved at ``model_id`` under ``adapter_name`` (not made active). If that adapter
        exists, its weights are replaced, all or nothing, as peft does (Trainer resumes checkpoints so)."""
        if adapter_name in self.peft_config:
            self._load_weights(Path(model_id), adapter_name)
            return
        config = load_config(model_id).replace(inference_mode=not is_trainable)
        self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            self._load_weights(Path(model_id), adapter_name)
        except Exception:
            self.delete_adapter(adapter_name)  # never leave a half-loaded adapter behind
            raise

    def _load_weights(self, folder: Path, adapter_name: str, sd: dict | None = None) -> None:
        sd = ckpt.load_weights(folder) if sd is None else sd
        try:
            self.load_adapter_state_dict(sd, adapter_name)
        except ValueError as err:
            raise ValueError(f"{ckpt.weights_file(folder)}: {err}") from None  # name the file that does not fit
