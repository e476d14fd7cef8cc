"""LoRA's default targets derived from the architecture (surgery/targets.py, ``derived_attention_targets``)
for a transformers model type with no row in the table: the query and value projections of the attention
modules, or their fused projection.

(a) on the families peft has a query/value row for, the derivation gives peft's row: the conventions are right;
(b) every existing row is still what a model of that type gets (the table wins where peft chose otherwise);
(c) model types peft has no row for get an adapter without ``target_modules``, which peft loads from disk;
(d) a model without a transformers config, or with no attention to read, still needs ``target_modules``.
"""
from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch

import deltatune as dt
from deltatune.config import PeftType
from deltatune.methods.default_targets import LORA_DEFAULT_TARGETS
from deltatune.registry import get_method
from deltatune.surgery.layer import AdaptedLayer
from deltatune.surgery.targets import default_targets, derived_attention_targets
from test_default_targets import PEFT_LORA, _build
from tolerances import assert_close

LAYER_TYPES = get_method(PeftType.LORA).layer_types
# peft's rows that are deliberately not "query and value": the table keeps them (checked in (b)).
PEFT_CHOSE_OTHERWISE = {"phi": "adds fc1, fc2", "nemotron_h": "all four projections", "rwkv": "not attention"}
# A spread of naming schemes: q/v (t5), query/value (bert), *_proj (llama, opt, deberta-v2), fused c_attn
# (gpt2), query_key_value (bloom, gpt_neox, falcon), Wqkv (mpt), qkv_proj (codegen), in_proj (deberta).
AGREE = ["t5", "bert", "llama", "opt", "deberta-v2", "gpt2", "bloom", "gpt_neox", "falcon", "mpt", "codegen", "deberta"]
# Model types peft has no LoRA row for, with what the derivation should find.
NEW = {"olmo": ("q_proj", "v_proj"), "distilbert": ("q_lin", "v_lin"), "albert": ("query", "value"),
       "persimmon": ("query_key_value",)}


def _model(kind):
    base = _build(kind)
    if base is None:
        pytest.skip(f"transformers builds no tiny {kind!r} quickly here")
    return copy.deepcopy(base)


# ---- (a) the conventions ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", AGREE)
def test_derivation_gives_peft_s_row(kind):
    assert kind in PEFT_LORA and kind not in PEFT_CHOSE_OTHERWISE
    assert set(derived_attention_targets(_model(kind), LAYER_TYPES)) == set(PEFT_LORA[kind])


# ---- (b) the rows win -------------------------------------------------------------------------------
def test_every_existing_row_is_what_its_model_type_gets():
    model = _model("bert")  # any architecture: only the model type is read when it has a row
    for kind, row in LORA_DEFAULT_TARGETS.items():
        model.config.model_type = kind
        assert default_targets(model, PeftType.LORA) == row, kind


def test_a_row_peft_chose_differently_is_kept():
    model = _model("phi")
    assert set(derived_attention_targets(model, LAYER_TYPES)) == {"q_proj", "v_proj"}
    config = dt.get_peft_model(model, dt.LoraConfig()).peft_config["default"]
    assert set(config.target_modules) == {"q_proj", "v_proj", "fc1", "fc2"}


# ---- (c) new model types ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", NEW)
def test_a_model_type_without_a_row_gets_its_attention_projections(kind, tmp_path):
    assert kind not in PEFT_LORA and kind not in LORA_DEFAULT_TARGETS
    base = _model(kind)
    with pytest.raises(ValueError, match="target_modules"):  # peft needs a row or target_modules
        peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig())
    mine = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(init_lora_weights=False))
    config = mine.peft_config["default"]
    assert tuple(config.target_modules) == NEW[kind]  # written into the config, so the saved file names them
    wrapped = [n for n, m in mine.named_modules() if isinstance(m, AdaptedLayer)]
    assert wrapped and all(n.rsplit(".", 1)[-1] in NEW[kind] for n in wrapped)
    expected = {n for n, _ in base.named_modules() if n.rsplit(".", 1)[-1] in NEW[kind]}
    assert {n.removeprefix("base_model.model.") for n in wrapped} == expected
    # peft loads what deltatune saved and computes the same outputs
    mine.eval().save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    x = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, out_t = mine(input_ids=x).last_hidden_state, theirs(input_ids=x).last_hidden_state
    assert_close(out, out_t)
    with torch.no_grad(), mine.disable_adapter():
        assert not torch.allclose(out, mine(input_ids=x).last_hidden_state, atol=1e-4)


# ---- (d) where nothing is derived -------------------------------------------------------------------
def test_a_custom_module_still_names_its_targets():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.attention = torch.nn.Linear(4, 4)  # attention-like names alone do not make a transformers model
    with pytest.raises(ValueError, match="no default for model type None; pass target_modules"):
        dt.get_peft_model(model, dt.LoraConfig())


def test_a_model_type_with_no_attention_to_read_still_needs_target_modules():
    model = _model("rwkv")  # recurrent: no attention module, no query/value projection
    model.config.model_type = "rwkv-like"
    with pytest.raises(ValueError, match="found no attention query/value projections.*Layers that can be targeted"):
        dt.get_peft_model(model, dt.LoraConfig())
