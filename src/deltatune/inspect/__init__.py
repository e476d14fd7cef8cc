"""Look at a model or an adapter without loading weights: architecture, wrappable layers, target
presets with exact LoRA sizes, and adapter checks (does it load on a model, can a server serve it).

Public API::

    meta_model(config, task_type=None) -> nn.Module on the meta device
    describe(config, model) -> Architecture
    layer_groups(model, layer_types) -> [LayerGroup]
    presets_for(model_type), preset_table(model, model_type, r), lora_parameter_count(model, config)
    read_adapter(folder) -> AdapterFiles; load_problems(files, config, model_config) -> [str]
    server_findings(raw_config, tensor_names) -> [Finding]
"""
from deltatune.inspect.adapter_check import AdapterFiles, base_model_verdict, load_problems, parse_config, read_adapter
from deltatune.inspect.architecture import Architecture, LayerGroup, describe, layer_groups, meta_model
from deltatune.inspect.presets import (
    FAMILY_PRESETS,
    PRESET_NAMES,
    PresetRow,
    expand_preset,
    lora_parameter_count,
    preset_table,
    presets_for,
)
from deltatune.inspect.servers import Finding, server_findings

__all__ = [
    "AdapterFiles", "Architecture", "FAMILY_PRESETS", "Finding", "LayerGroup", "PRESET_NAMES", "PresetRow",
    "base_model_verdict", "describe", "expand_preset", "layer_groups", "load_problems", "lora_parameter_count",
    "meta_model", "parse_config", "preset_table", "presets_for", "read_adapter", "server_findings",
]
