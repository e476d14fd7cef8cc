"""deltatune: parameter-efficient fine-tuning with peft's API and on-disk format.

Code written for peft runs after changing ``from peft import ...`` to ``from deltatune import ...``.
"""
from deltatune._version import __version__
from deltatune.config import LoraConfig, PeftConfig, PeftType, TaskType
from deltatune.model import PeftModel, get_peft_model
from deltatune.tasks import (
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from deltatune.surgery.inject import inject_adapter_in_model
from deltatune.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from deltatune.auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
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

from deltatune import integrations as _integrations
from deltatune import methods as _methods  # noqa: F401 (registers the built-in methods)


# transformers, accelerate and TRL recognise adapter models by peft's classes; make them recognise ours too.
_integrations.install()

__all__ = [
    "LoraConfig", "PeftConfig", "PeftType", "TaskType", "PeftModel", "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
    "get_peft_model", "inject_adapter_in_model", "resolve_targets", "get_peft_model_state_dict",
    "set_peft_model_state_dict", "prepare_model_for_kbit_training",
    "IA3Config", "BottleneckConfig",
    "AdaLoraConfig",
    "BitFitConfig", "PartialConfig",
    "PromptTuningConfig", "PromptTuningInit", "PrefixTuningConfig",
    "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction", "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification", "get_peft_config",
    "get_layer_status", "get_model_status", "TunerLayerStatus", "TunerModelStatus",
]


def get_peft_model_state_dict(model, state_dict=None, adapter_name: str = "default", save_embedding_layers="auto"):
    """peft's function: the adapter's tensors under peft's on-disk keys."""
    return model.get_adapter_state_dict(adapter_name, save_embedding_layers)


def set_peft_model_state_dict(model, peft_model_state_dict, adapter_name: str = "default"):
    """peft's function: load peft-format tensors into an existing adapter (all or nothing)."""
    model.load_adapter_state_dict(peft_model_state_dict, adapter_name)


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
