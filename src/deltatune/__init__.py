"""deltatune: parameter-efficient fine-tuning with peft's API and on-disk format.

Code written for peft runs after changing ``from peft import ...`` to ``from deltatune import ...``.
"""
from deltatune._version import __version__
from deltatune.config import LoraConfig, PeftConfig, PeftType, TaskType
from deltatune.lora_options import LoftQConfig
from deltatune.model import PeftModel, get_peft_model
from deltatune.mixed_model import PeftMixedModel
from deltatune.tasks import (
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from deltatune.surgery.inject import inject_adapter_in_model
from deltatune.helpers import cast_mixed_precision_params
from deltatune.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from deltatune.auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
    get_peft_config,
)
from deltatune.surgery.targets import resolve_targets
from deltatune.methods.ia3 import IA3Config
from deltatune.methods.bottleneck import BottleneckConfig
from deltatune.methods.adalora import AdaLoraConfig
from deltatune.methods.bitfit import BitFitConfig
from deltatune.methods.partial import PartialConfig
from deltatune.methods.prompt import PromptTuningConfig, PromptTuningInit
from deltatune.methods.prefix import PrefixTuningConfig
from deltatune.methods.lora_loftq import replace_lora_weights_loftq
from deltatune.methods.trainable_tokens import TrainableTokensConfig

from deltatune import integrations as _integrations
from deltatune.io import checkpoint as _ckpt
from deltatune.methods.base import Site as _Site
from deltatune.registry import get_method as _get_method
from deltatune.surgery import inject as _inject
from deltatune import methods as _methods  # noqa: F401 (registers the built-in methods)


# transformers, accelerate and TRL recognise adapter models by peft's classes; make them recognise ours too.
_integrations.install()

__all__ = [
    "LoraConfig", "LoftQConfig", "replace_lora_weights_loftq", "PeftConfig", "PeftType", "TaskType", "PeftModel", "PeftMixedModel", "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
    "get_peft_model", "inject_adapter_in_model", "resolve_targets", "get_peft_model_state_dict",
    "set_peft_model_state_dict", "prepare_model_for_kbit_training",
    "IA3Config", "BottleneckConfig",
    "AdaLoraConfig",
    "BitFitConfig", "PartialConfig",
    "PromptTuningConfig", "PromptTuningInit", "PrefixTuningConfig", "TrainableTokensConfig",
    "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction", "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification",
    "get_peft_config",
    "get_layer_status", "get_model_status", "TunerLayerStatus", "TunerModelStatus",
    "cast_mixed_precision_params",
]


def get_peft_model_state_dict(
    model, state_dict=None, adapter_name: str = "default", unwrap_compiled: bool = False, save_embedding_layers="auto"
):
    """peft's function: the adapter's tensors under peft's on-disk keys (adapter name removed).

    ``model`` is a :class:`PeftModel` (keys ``base_model.model.<module>...``) or, as in peft's low-level
    API, a model changed by :func:`inject_adapter_in_model` (keys ``<module>...``, read with the config
    that the injection kept in ``model.peft_config``). ``state_dict`` is accepted for peft compatibility
    and not used: the tensors are read from the model.
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    if isinstance(model, PeftModel):
        return model.get_adapter_state_dict(adapter_name, save_embedding_layers)
    site = _injected_site(model, adapter_name)
    sd = _get_method(site.config.peft_type).state_dict(site, save_embedding_layers)
    return {k.removeprefix(_ckpt.PREFIX): v for k, v in sd.items()}


def set_peft_model_state_dict(
    model, peft_model_state_dict, adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
):
    """peft's function: load peft-format tensors into an existing adapter (all or nothing).

    Works on a :class:`PeftModel` and, as in peft's low-level API, on a model changed by
    :func:`inject_adapter_in_model` (keys without the ``base_model.model.`` prefix). Adapter weights on
    the meta device (``inject_adapter_in_model(..., low_cpu_mem_usage=True)``) are created on the base
    layer's device and filled; ``low_cpu_mem_usage`` is accepted for peft compatibility (loading always
    does this).

    Raises:
        ValueError: the tensors do not fit the adapter (the message says which); nothing is loaded.
        NotImplementedError: ``ignore_mismatched_sizes=True`` (deltatune never loads a tensor of another shape).
    """
    del low_cpu_mem_usage
    if ignore_mismatched_sizes:
        raise NotImplementedError(
            "ignore_mismatched_sizes=True is not supported: deltatune loads all of an adapter or none of it; "
            "fix the shapes (rank, target modules) of the checkpoint or the config instead."
        )
    if isinstance(model, PeftModel):
        model.load_adapter_state_dict(peft_model_state_dict, adapter_name)
        return
    site = _injected_site(model, adapter_name)
    on_meta = []
    for _, host in _inject.adapted_layers(model):
        adapter = host.adapters[adapter_name] if adapter_name in host.adapters else None
        if adapter is not None and any(p.is_meta for p in adapter.parameters()):
            adapter.to_empty(device=_base_device(host.base_layer))
            on_meta.append(adapter)
    try:
        _get_method(site.config.peft_type).load_state_dict(
            site, {f"{_ckpt.PREFIX}{k}": v for k, v in peft_model_state_dict.items()}
        )
    except BaseException:
        for adapter in on_meta:
            adapter.to_empty(device="meta")  # as before: nothing loaded
        raise


def _injected_site(model, adapter_name: str) -> _Site:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or adapter_name not in configs:
        have = sorted(configs) if isinstance(configs, dict) else []
        raise ValueError(
            f"no adapter named {adapter_name!r} on this {type(model).__name__} (adapters: {have}); pass a PeftModel, "
            "or a model changed by inject_adapter_in_model, which keeps each adapter's config in model.peft_config."
        )
    return _Site(model, adapter_name, configs[adapter_name])


def _base_device(layer):
    for t in list(layer.parameters()) + list(layer.buffers()):
        if not t.is_meta:
            return t.device
    return "cpu"


def __getattr__(name):
    # Optional parts load on first use so `import deltatune` stays light.
    lazy = {
        "prepare_model_for_kbit_training": ("deltatune.quant.prepare", "prepare_model_for_kbit_training"),
    }
    if name in lazy:
        import importlib

        module, attr = lazy[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'deltatune' has no attribute {name!r}")
