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
``import deltatune``) widens those two decisions, and nothing else:

- ``_is_peft_model`` also answers True for a deltatune ``PeftModel``, in ``transformers.trainer_utils``
  and in the modules that imported it by name (``transformers.trainer``,
  ``transformers.integrations.neftune``);
- ``Trainer._save`` writes a deltatune model with its own ``save_pretrained`` (peft's adapter format,
  ``adapter_config.json`` + ``adapter_model.safetensors``), then the tokenizer and the training
  arguments, as transformers does for a peft model.

Modules not imported yet are patched the moment they are (a finder on ``sys.meta_path`` wraps their
loader), so ``import deltatune`` does not pay for importing ``transformers.trainer``. Both patches
leave every other model to transformers' own code.
"""
from __future__ import annotations

import importlib.abc
import os
import sys
from typing import Any, Callable

_TARGETS: dict[str, Callable[[Any], None]] = {}
_PATCHED = "__deltatune_patched__"


def _is_deltatune_model(model: Any) -> bool:
    from deltatune.model import PeftModel

    return isinstance(model, PeftModel)


def _widen_is_peft_model(module: Any) -> None:
    original = getattr(module, "_is_peft_model", None)
    if original is None or getattr(original, _PATCHED, False):
        return

    def _is_peft_model(model):
        return _is_deltatune_model(model) or original(model)

    setattr(_is_peft_model, _PATCHED, True)
    module._is_peft_model = _is_peft_model


def _patch_trainer(module: Any) -> None:
    _widen_is_peft_model(module)
    trainer = getattr(module, "Trainer", None)
    original = getattr(trainer, "_save", None)
    if original is None or getattr(original, _PATCHED, False):
        return

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not _is_deltatune_model(model):
            return original(self, output_dir, state_dict)
        # The adapter's own tensors are saved; a gathered full state_dict (DeepSpeed ZeRO-3, FSDP) is not
        # read here, so sharded runs must gather the adapter before saving (not supported yet).
        output_dir = output_dir if output_dir is not None else self.args.output_dir
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

    setattr(_save, _PATCHED, True)
    trainer._save = _save


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches a module of :data:`_TARGETS` right after it executes (for modules imported later)."""

    def find_spec(self, fullname, path, target=None):
        patch = _TARGETS.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return None

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        loader.exec_module = exec_and_patch  # this loader instance serves this one module
        return spec


def install() -> None:
    """Patch the transformers modules loaded now, and the others when they load. Idempotent."""
    _TARGETS.update({
        "transformers.trainer_utils": _widen_is_peft_model,
        "transformers.integrations.neftune": _widen_is_peft_model,
        "transformers.trainer": _patch_trainer,
    })
    for name, patch in _TARGETS.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
