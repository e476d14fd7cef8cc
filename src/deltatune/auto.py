"""peft's ``AutoPeftModel*`` classes, which load an adapter together with the base model its
``adapter_config.json`` names, and ``get_peft_config`` (a config from a dict).

``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` reads ``base_model_name_or_path`` and ``task_type``
from the adapter's config, loads the base with transformers' matching Auto class
(``AutoModelForCausalLM``; extra keyword arguments such as ``torch_dtype`` go to it) and then the adapter
with :meth:`PeftModel.from_pretrained`. :class:`AutoPeftModel` is for adapters saved without a task type:
it builds the base with the class named in the config's ``auto_mapping``, as peft does.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, ClassVar

import transformers
from torch import nn

from deltatune.config import PeftConfig, TaskType, config_from_dict, read_config_json
from deltatune.model import PeftModel
from deltatune.tasks import (
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

__all__ = [
    "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification", "AutoPeftModelForQuestionAnswering", "AutoPeftModelForFeatureExtraction",
    "get_peft_config",
]

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """peft's ``get_peft_config``: the config of the class its ``peft_type`` names, built from a dict
    (what ``config.to_dict()`` or ``adapter_config.json`` holds).

    Raises:
        ValueError: no ``peft_type``, one deltatune does not implement, or a value the config refuses.
    """
    # a dict made in Python (peft's ``to_dict()``) may hold sets where JSON has lists
    data = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config_dict.items()}
    return config_from_dict(data, source="get_peft_config")


def get_default_import_allowlist() -> list[str]:
    """The packages whose classes an ``auto_mapping`` may name (peft's list)."""
    return ["diffusers", "lerobot", "megatron-core", "transformers"]


def check_import_allowlist(allowlist: list[str], parent_name: str) -> bool:
    """Whether ``parent_name`` is in ``allowlist`` or a submodule of one of its packages (peft's check: the
    adapter's config decides what is imported, so only known packages are)."""
    return parent_name in allowlist or any(parent_name.startswith(f"{allowed}.") for allowed in allowlist)


class _TransformersClass:
    """A class attribute naming one of transformers' Auto classes, resolved on first read: ``import deltatune``
    does not load transformers' modeling code."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type) -> type:
        return getattr(transformers, self.name)


class _BaseAutoPeftModel:
    """What every ``AutoPeftModel*`` class does; each sets the transformers class and the PeftModel class."""

    _target_class: ClassVar[Any] = None
    _target_peft_class: ClassVar[type[PeftModel]] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise EnvironmentError(  # noqa: UP024 - transformers' and peft's error here
            f"{type(self).__name__} is designed to be instantiated using the "
            f"`{type(self).__name__}.from_pretrained(pretrained_model_name_or_path)` method."
        )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False,
        config: PeftConfig | None = None, revision: str | None = None, import_allowlist: list[str] | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load the base model the adapter at ``pretrained_model_name_or_path`` names, then the adapter on it.

        Args:
            pretrained_model_name_or_path: the folder ``save_pretrained`` wrote (peft's or deltatune's).
            adapter_name, is_trainable, config: as for :meth:`PeftModel.from_pretrained`.
            revision: the adapter's revision (a local folder has none); the base's comes from its config.
            import_allowlist: the packages an ``auto_mapping`` may import from
                (default: :func:`get_default_import_allowlist`).
            **kwargs: passed to the base model's ``from_pretrained`` (``torch_dtype``, ``device_map``, ...).
                ``subfolder`` also picks the adapter's subfolder, as in peft.

        Returns:
            The :class:`PeftModel` (the task class of its ``task_type``), in eval mode unless ``is_trainable``.

        Raises:
            ValueError: the config has no ``base_model_name_or_path``; its task type does not fit this class;
                ``AutoPeftModel`` got a config with a task type; no task type and no ``auto_mapping``; an
                ``auto_mapping`` outside ``import_allowlist``.
        """
        file, data = read_config_json(pretrained_model_name_or_path, kwargs.get("subfolder"))
        peft_config = config_from_dict(data, source=str(file))
        target_class = _target_class(cls, peft_config, data, import_allowlist, file)
        base_model_path = peft_config.base_model_name_or_path
        if not base_model_path:
            raise ValueError(
                f"{file} has no 'base_model_name_or_path', so {cls.__name__} cannot know which model to load; "
                "load the base model yourself and call PeftModel.from_pretrained(base_model, adapter_dir)"
            )
        base_kwargs = dict(kwargs)
        if peft_config.revision is not None:
            base_kwargs["revision"] = peft_config.revision
        base_model = target_class.from_pretrained(base_model_path, **base_kwargs)
        _resize_to_the_adapters_tokenizer(base_model, Path(pretrained_model_name_or_path), kwargs)
        return cls._target_peft_class.from_pretrained(
            base_model, pretrained_model_name_or_path, adapter_name=adapter_name, is_trainable=is_trainable,
            config=config, revision=revision, **kwargs,
        )


def _target_class(cls: type[_BaseAutoPeftModel], peft_config: PeftConfig, data: dict, import_allowlist, file) -> type:
    """The class the base model is built with: the Auto class's transformers class, or the ``auto_mapping``'s."""
    task_type = peft_config.task_type
    if cls._target_class is None and task_type is not None:
        raise ValueError(
            f"{file} has task_type={task_type.value!r}: AutoPeftModel is for adapters saved without one; use "
            f"{_AUTO_CLASS_NAMES.get(task_type, 'the AutoPeftModelFor* class of that task')} instead"
        )
    if task_type is not None:
        expected = _AUTO_CLASS_NAMES.get(task_type)
        if expected != cls.__name__:
            raise ValueError(
                f"{file} has task_type={task_type.value!r}, which {cls.__name__} does not load; "
                + (f"use {expected} instead" if expected else "deltatune has no AutoPeftModel class for it yet: "
                   "load the base model yourself and call PeftModel.from_pretrained(base_model, adapter_dir)")
            )
        return cls._target_class
    auto_mapping = data.get("auto_mapping")
    if auto_mapping is None:
        raise ValueError(
            f"Cannot infer the auto class from the config ({file} has neither a task_type nor an auto_mapping), please "
            "make sure that you are loading the correct model for your task type."
        )
    parent = auto_mapping["parent_library"]
    allowlist = get_default_import_allowlist() if import_allowlist is None else import_allowlist
    if not check_import_allowlist(allowlist, parent):
        raise ValueError(
            f"The auto mapping wants to import '{parent}' which is not in the import allowlist. If you are sure that "
            f"importing this library is safe, specify `import_allowlist=['{parent}']` in `from_pretrained()`."
        )
    return getattr(importlib.import_module(parent), auto_mapping["base_model_class"])


def _resize_to_the_adapters_tokenizer(base_model: nn.Module, adapter_dir: Path, kwargs: dict) -> None:
    """As peft: a tokenizer saved beside the adapter with more tokens than the base's embedding grows it."""
    if not (adapter_dir / TOKENIZER_CONFIG_NAME).exists() or not hasattr(base_model, "get_input_embeddings"):
        return
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        adapter_dir, trust_remote_code=kwargs.get("trust_remote_code", False)
    )
    if len(tokenizer) > base_model.get_input_embeddings().weight.shape[0]:
        base_model.resize_token_embeddings(len(tokenizer))


class AutoPeftModel(_BaseAutoPeftModel):
    """For adapters saved without a task type: the base is built with the class named in ``auto_mapping``."""

    _target_class = None
    _target_peft_class = PeftModel


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    """``task_type="CAUSAL_LM"``: the base through ``AutoModelForCausalLM``."""

    _target_class = _TransformersClass("AutoModelForCausalLM")
    _target_peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    """``task_type="SEQ_2_SEQ_LM"``: the base through ``AutoModelForSeq2SeqLM``."""

    _target_class = _TransformersClass("AutoModelForSeq2SeqLM")
    _target_peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    """``task_type="SEQ_CLS"``: the base through ``AutoModelForSequenceClassification``."""

    _target_class = _TransformersClass("AutoModelForSequenceClassification")
    _target_peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    """``task_type="TOKEN_CLS"``: the base through ``AutoModelForTokenClassification``."""

    _target_class = _TransformersClass("AutoModelForTokenClassification")
    _target_peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_BaseAutoPeftModel):
    """``task_type="QUESTION_ANS"``: the base through ``AutoModelForQuestionAnswering``."""

    _target_class = _TransformersClass("AutoModelForQuestionAnswering")
    _target_peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_BaseAutoPeftModel):
    """``task_type="FEATURE_EXTRACTION"``: the base through ``AutoModel``."""

    _target_class = _TransformersClass("AutoModel")
    _target_peft_class = PeftModelForFeatureExtraction


_AUTO_CLASS_NAMES: dict[TaskType, str] = {
    TaskType.CAUSAL_LM: AutoPeftModelForCausalLM.__name__,
    TaskType.SEQ_2_SEQ_LM: AutoPeftModelForSeq2SeqLM.__name__,
    TaskType.SEQ_CLS: AutoPeftModelForSequenceClassification.__name__,
    TaskType.TOKEN_CLS: AutoPeftModelForTokenClassification.__name__,
    TaskType.QUESTION_ANS: AutoPeftModelForQuestionAnswering.__name__,
    TaskType.FEATURE_EXTRACTION: AutoPeftModelForFeatureExtraction.__name__,
}
"""task_type -> the Auto class that loads it (every task type has one, as in peft)."""
