"""transformers' Trainer treats a deltatune model as it treats a peft model.

transformers recognises adapter models in one place, ``trainer_utils._is_peft_model``: an
``isinstance`` check against peft's classes, made only when peft is installed. Everything that
makes a peft model train correctly hangs on it: the dataset columns are read from the *base*
model's forward signature (so ``token_type_ids`` and the labels survive a wrapper without task
type), the label smoother shifts labels for causal LMs, a quantized base model is accepted,
checkpoints are resumed and the best model reloaded through ``load_adapter``. Saving is decided
separately, in ``Trainer._save``, by ``isinstance`` against ``PreTrainedModel`` and peft's class;
anything else gets its whole ``state_dict()`` written as ``model.safetensors``, which fails on tied
embeddings and is not an adapter anyway.

transformers offers no registration point for other adapter libraries, so :func:`install` (run on
``import deltatune``) widens those decisions, and nothing else:

- ``_is_peft_model`` also answers True for a deltatune ``PeftModel``, in ``transformers.trainer_utils``
  and in the modules that imported it by name (``transformers.trainer``,
  ``transformers.integrations.neftune``);
- ``Trainer._save`` writes a deltatune model with its own ``save_pretrained`` (peft's adapter format,
  ``adapter_config.json`` + ``adapter_model.safetensors``), then the tokenizer and the training
  arguments, as transformers does for a peft model;
- ``model.add_adapter(config)`` (transformers' own adapter API, built on peft's layer classes) given a
  deltatune config raises a ``TypeError`` that names the deltatune call to use instead.
"""
from __future__ import annotations

import os
from typing import Any

from deltatune.config import PeftConfig
from deltatune.surgery.partitioned import gathered
from deltatune.integrations.hooks import patch_module
from deltatune.integrations.recognition import PATCHED, is_deltatune_model, widen_peft_names


def _patch_trainer(module: Any) -> None:
    widen_peft_names(module)
    trainer = getattr(module, "Trainer", None)
    original = getattr(trainer, "_save", None)
    if original is None or getattr(original, PATCHED, False):
        return

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not is_deltatune_model(model):
            return original(self, output_dir, state_dict)
        # The adapter's own tensors are saved. Under DeepSpeed ZeRO-3 the Trainer calls this on every rank
        # and each holds a partition of them: all gather the adapter, rank 0 writes it.
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        with gathered(p for p in model.parameters() if p.requires_grad):
            if not self.args.should_save:
                return
            os.makedirs(output_dir, exist_ok=True)
            model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif getattr(self.data_collator, "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(output_dir)
        import torch
        from transformers.trainer import TRAINING_ARGS_NAME

        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    setattr(_save, PATCHED, True)
    trainer._save = _save


def _patch_add_adapter(module: Any) -> None:
    mixin = getattr(module, "PeftAdapterMixin", None)
    original = getattr(mixin, "add_adapter", None)
    if original is None or getattr(original, PATCHED, False):
        return

    def add_adapter(self, adapter_config, adapter_name: str | None = None) -> None:
        if isinstance(adapter_config, PeftConfig):
            # transformers' adapter API drives peft's own layer classes (set_adapter, enable_adapters, its
            # save_pretrained all look for them), so a deltatune adapter cannot live inside it.
            raise TypeError(
                f"transformers' model.add_adapter() takes a peft config, not deltatune's {type(adapter_config).__name__}. "
                "With deltatune, wrap the model instead: model = deltatune.get_peft_model(model, config) "
                "(or deltatune.inject_adapter_in_model(config, model) to inject without a wrapper)."
            )
        return original(self, adapter_config, adapter_name)

    setattr(add_adapter, PATCHED, True)
    mixin.add_adapter = add_adapter


def install() -> None:
    """Patch the transformers modules loaded now, and the others when they load. Idempotent."""
    patch_module("transformers.trainer_utils", widen_peft_names)
    patch_module("transformers.integrations.neftune", widen_peft_names)
    patch_module("transformers.trainer", _patch_trainer)
    patch_module("transformers.integrations.peft", _patch_add_adapter)
