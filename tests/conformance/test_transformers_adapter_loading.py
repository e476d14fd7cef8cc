"""transformers loads an adapter folder itself: ``AutoModelForCausalLM.from_pretrained(adapter_dir)``.

Source: transformers' "PEFT" guide (``docs/source/en/peft.md``): "Load a PEFT adapter":
``model = AutoModelForCausalLM.from_pretrained(peft_model_id)`` reads ``adapter_config.json``, loads the
base model named by ``base_model_name_or_path`` and adds the adapter through its ``PeftAdapterMixin``
(which needs peft installed); and ``model.load_adapter(peft_model_id)`` on a loaded base. Hub ids are
tiny local folders (``tiny_hub``), so ``base_model_name_or_path`` is a folder, as for anyone who
fine-tunes a local checkpoint.

The adapter is saved by deltatune or by peft (the oracle), from the same weights, and the model
transformers builds must give the logits of the model that saved it.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import tiny_hub
from port_harness import SameStart, imports
from tolerances import assert_close

LLAMA = "meta-llama/Llama-2-7b-hf"
IDS = torch.tensor([[5, 40, 41, 42, 43, 44, 45]])


def _logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def save_adapter(lib: str, folder: str, same_start: SameStart):
    LoraConfig, get_peft_model = imports(lib, "LoraConfig, get_peft_model")
    base = AutoModelForCausalLM.from_pretrained(tiny_hub.path(LLAMA))
    # init_lora_weights=False: B is random too, so the adapter changes the logits from the first step
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, task_type="CAUSAL_LM"))
    same_start(lib, model)
    model.save_pretrained(folder)
    return _logits(model)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """{saved_by: (folder, logits of the model that saved it)}, both from the same adapter weights."""
    tmp = tmp_path_factory.mktemp("adapters")
    start = SameStart()
    return {lib: (str(tmp / lib), save_adapter(lib, str(tmp / lib), start)) for lib in ("deltatune", "peft")}


@pytest.mark.parametrize("saved_by", ["deltatune", "peft"])
def test_auto_model_from_an_adapter_folder_gives_the_saving_models_logits(adapters, saved_by):
    folder, expected = adapters[saved_by]
    saved = json.load(open(os.path.join(folder, "adapter_config.json")))
    assert saved["base_model_name_or_path"] == tiny_hub.path(LLAMA)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model._hf_peft_config_loaded and list(model.peft_config) == ["default"]
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_hub.path(LLAMA)))
    assert (expected - base).abs().max() > 1e-3, "the adapter must change the logits for this check to mean anything"
    assert_close(_logits(model), expected)
    assert_close(adapters["deltatune"][1], adapters["peft"][1])


@pytest.mark.parametrize("saved_by", ["deltatune", "peft"])
def test_load_adapter_on_a_transformers_model_gives_the_saving_models_logits(adapters, saved_by):
    folder, expected = adapters[saved_by]
    model = AutoModelForCausalLM.from_pretrained(tiny_hub.path(LLAMA))
    model.load_adapter(folder)
    assert_close(_logits(model), expected)
