"""Every field of peft's LoraConfig is supported, refused with its reason, or metadata (deltatune/lora_options.py).

The walk is over peft's dataclass fields, so a field a newer peft adds fails here until it is placed.
"""
import dataclasses
import json
import re
from pathlib import Path

import pytest

import deltatune as dt
from deltatune.config import config_from_dict
from deltatune.lora_options import LORA_METADATA, REFUSED_LORA_OPTIONS

peft = pytest.importorskip("peft")

PEFT_FIELDS = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}
OURS = dt.LoraConfig.field_names() | {"peft_type"}

# A non-default value of each refused option, as a user or a published adapter_config.json would set it.
SWITCHED_ON = {
    "layer_replication": [[0, 1]], "megatron_config": {"tensor_model_parallel_size": 2},
    "eva_config": {"rho": 2.0}, "corda_config": {"corda_method": "kpm"}, "lora_ga_config": {"batch_size": 2},
    "velora_config": {"rank": 4}, "monteclora_config": {"n_samples": 2}, "arrow_config": {"top_k": 3},
    "kasa_config": {"alpha": 1.0}, "use_bdlora": {"blocks": 2}, "alora_invocation_tokens": [5, 6],
    "use_qalora": True, "ensure_weight_tying": True
}


def test_every_peft_field_is_placed():
    unplaced = sorted(set(PEFT_FIELDS) - OURS - set(REFUSED_LORA_OPTIONS) - set(LORA_METADATA))
    assert not unplaced, f"peft's LoraConfig has fields deltatune neither supports nor refuses: {unplaced}"
    # an option that became supported leaves the refusal table
    assert not (set(REFUSED_LORA_OPTIONS) & OURS), "remove supported fields from REFUSED_LORA_OPTIONS"


@pytest.mark.parametrize("name", sorted(REFUSED_LORA_OPTIONS))
def test_refused_on_construction_and_on_load(name):
    field = PEFT_FIELDS[name]
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    assert REFUSED_LORA_OPTIONS[name].accepts(default)  # peft's default is the inert value
    dt.LoraConfig(**{name: default})  # a ported config that spells the default out still builds
    value = SWITCHED_ON[name]
    with pytest.raises(ValueError, match=re.escape(f"{name}={value!r}")):
        dt.LoraConfig(**{name: value})
    with pytest.raises(ValueError, match=re.escape(REFUSED_LORA_OPTIONS[name].reason)):
        config_from_dict({"peft_type": "LORA", name: value}, source="adapter_config.json")


def test_metadata_fields_are_accepted_with_any_value():
    data = {"peft_type": "LORA", "auto_mapping": {"base_model_class": "X"}, "peft_version": "0.99",
            "megatron_core": "megatron.core", "qalora_group_size": 32, "runtime_config": {"ephemeral_gpu_offload": True}}
    assert isinstance(config_from_dict(data), dt.LoraConfig)


def test_docs_table_lists_every_peft_field():
    page = Path(__file__).resolve().parent.parent / "docs" / "methods" / "lora.md"
    rows = set(re.findall(r"^\| `(\w+)` \|", page.read_text(), flags=re.M))
    missing = sorted(set(PEFT_FIELDS) - {"peft_type"} - rows)
    assert not missing, f"docs/methods/lora.md's options table misses {missing}"


def test_a_peft_config_with_defaults_round_trips(tmp_path):
    peft.LoraConfig(r=4, target_modules=["q_proj"]).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert dt.PeftConfig.from_pretrained(tmp_path).to_dict()["r"] == data["r"] == 4
