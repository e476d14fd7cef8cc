"""peft's AutoPeftModel* classes, get_peft_config, targeted_module_names and the status helpers
(get_layer_status / get_model_status), each checked against peft 0.21.2 on tiny local models."""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import peft
import pytest
import torch

import deltatune
from deltatune import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
    IA3Config,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    get_layer_status,
    get_model_status,
    get_peft_config,
    get_peft_model,
    inject_adapter_in_model,
)
from tiny import input_ids, tiny_bert_cls, tiny_llama, tiny_t5

X = input_ids()


def _perturb(model) -> None:
    """Non-zero LoRA B, so that the adapter changes the logits."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.fixture
def llama_dir(tmp_path):
    folder = tmp_path / "llama"
    tiny_llama().save_pretrained(folder)
    return str(folder)


def _saved_adapter(tmp_path, base_dir, load, config, name="adapter"):
    base = load(base_dir)
    model = get_peft_model(base, config)
    _perturb(model)
    model.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def _config_json(folder):
    file = Path(folder) / "adapter_config.json"
    return json.loads(file.read_text()), file


# ---- AutoPeftModel* ----------------------------------------------------------------------------------
def test_auto_causal_lm_loads_base_and_adapter_like_peft_model_from_pretrained(tmp_path, llama_dir):
    from transformers import AutoModelForCausalLM

    adapter = _saved_adapter(tmp_path, llama_dir, AutoModelForCausalLM.from_pretrained, LoraConfig(task_type="CAUSAL_LM"))
    assert _config_json(adapter)[0]["base_model_name_or_path"] == llama_dir
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter)
    by_hand = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), adapter)
    assert type(auto).__name__ == "PeftModelForCausalLM" and not auto.training
    assert all(not p.requires_grad for p in auto.parameters())
    with torch.no_grad():
        torch.testing.assert_close(auto(input_ids=X).logits, by_hand(input_ids=X).logits)
        base = AutoModelForCausalLM.from_pretrained(llama_dir)(input_ids=X).logits
        assert not torch.allclose(auto(input_ids=X).logits, base)  # the adapter is loaded, not just the base


def test_auto_is_trainable_and_kwargs_reach_the_base(tmp_path, llama_dir):
    from transformers import AutoModelForCausalLM

    adapter = _saved_adapter(tmp_path, llama_dir, AutoModelForCausalLM.from_pretrained, LoraConfig(task_type="CAUSAL_LM"))
    model = AutoPeftModelForCausalLM.from_pretrained(adapter, is_trainable=True, adapter_name="mine", torch_dtype=torch.bfloat16)
    assert model.active_adapter == "mine" and model.training
    assert model.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16
    assert any(p.requires_grad for n, p in model.named_parameters() if "mine" in n)


def test_peft_saved_adapter_loads_through_our_auto_class(tmp_path, llama_dir):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            AutoModelForCausalLM.from_pretrained(llama_dir),
            peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, target_modules=["q_proj", "v_proj"]),
        )
        theirs.save_pretrained(tmp_path / "peft")
        reloaded = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "peft"))
    mine = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(mine(input_ids=X).logits, reloaded(input_ids=X).logits)
        torch.testing.assert_close(mine(input_ids=X).logits, theirs.eval()(input_ids=X).logits)


def test_auto_peft_model_uses_auto_mapping_when_there_is_no_task_type(tmp_path, llama_dir):
    from transformers import LlamaForCausalLM

    adapter = _saved_adapter(tmp_path, llama_dir, LlamaForCausalLM.from_pretrained, LoraConfig())
    data, _ = _config_json(adapter)
    assert data["task_type"] is None and data["auto_mapping"]["base_model_class"] == "LlamaForCausalLM"
    mine = AutoPeftModel.from_pretrained(adapter)
    assert type(mine) is PeftModel and type(mine.get_base_model()).__name__ == "LlamaForCausalLM"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.AutoPeftModel.from_pretrained(adapter)  # peft reads our auto_mapping the same way
    with torch.no_grad():
        torch.testing.assert_close(mine(input_ids=X).logits, theirs(input_ids=X).logits)


def test_auto_mapping_outside_the_allowlist_is_refused(tmp_path, llama_dir):
    from transformers import LlamaForCausalLM

    adapter = _saved_adapter(tmp_path, llama_dir, LlamaForCausalLM.from_pretrained, LoraConfig())
    data, file = _config_json(adapter)
    data["auto_mapping"]["parent_library"] = "os"
    file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="import allowlist"):
        AutoPeftModel.from_pretrained(adapter)
    with pytest.raises(ValueError, match="import allowlist"):
        AutoPeftModel.from_pretrained(adapter, import_allowlist=["transformers"])


def test_wrong_task_class_missing_base_and_no_mapping_are_clear_errors(tmp_path, llama_dir):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    adapter = _saved_adapter(tmp_path, llama_dir, AutoModelForCausalLM.from_pretrained, LoraConfig(task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="AutoPeftModelForCausalLM"):
        AutoPeftModelForSequenceClassification.from_pretrained(adapter)
    with pytest.raises(ValueError, match="AutoPeftModelForCausalLM instead"):
        AutoPeftModel.from_pretrained(adapter)
    data, file = _config_json(adapter)
    file.write_text(json.dumps({**data, "base_model_name_or_path": None}))
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        AutoPeftModelForCausalLM.from_pretrained(adapter)

    plain = _saved_adapter(tmp_path, llama_dir, LlamaForCausalLM.from_pretrained, LoraConfig(), name="plain")
    data, file = _config_json(plain)
    del data["auto_mapping"]
    file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="Cannot infer the auto class"):
        AutoPeftModel.from_pretrained(plain)
    with pytest.raises(EnvironmentError):
        AutoPeftModelForCausalLM()


def test_auto_seq2seq_seq_cls_token_cls_and_feature_extraction(tmp_path):
    from transformers import (AutoModel, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                              AutoModelForTokenClassification, BertForTokenClassification)

    t5_dir, bert_dir = str(tmp_path / "t5"), str(tmp_path / "bert")
    tiny_t5().save_pretrained(t5_dir)
    tiny_bert_cls().save_pretrained(bert_dir)
    cases = [
        (AutoPeftModelForSeq2SeqLM, AutoModelForSeq2SeqLM, t5_dir, "SEQ_2_SEQ_LM", ["q", "v"]),
        (AutoPeftModelForSequenceClassification, AutoModelForSequenceClassification, bert_dir, "SEQ_CLS", ["query"]),
        (AutoPeftModelForTokenClassification, AutoModelForTokenClassification, bert_dir, "TOKEN_CLS", ["query"]),
        (AutoPeftModelForFeatureExtraction, AutoModel, bert_dir, "FEATURE_EXTRACTION", ["query"]),
    ]
    for auto_class, hf_class, base_dir, task, targets in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a freshly initialised token-classification head
            adapter = _saved_adapter(tmp_path, base_dir, hf_class.from_pretrained,
                                     LoraConfig(task_type=task, target_modules=targets), name=task)
            torch.manual_seed(0)
            by_hand = PeftModel.from_pretrained(hf_class.from_pretrained(base_dir), adapter)
            torch.manual_seed(0)
            auto = auto_class.from_pretrained(adapter)
        assert type(auto) is type(by_hand), task
        kwargs = {"decoder_input_ids": X} if task == "SEQ_2_SEQ_LM" else {}
        with torch.no_grad():
            out_a, out_h = auto(input_ids=X, **kwargs), by_hand(input_ids=X, **kwargs)
        key = "last_hidden_state" if task == "FEATURE_EXTRACTION" else "logits"
        torch.testing.assert_close(out_a[key], out_h[key])
    assert BertForTokenClassification  # the class AutoModelForTokenClassification picks for bert


def test_auto_class_grows_the_embedding_to_a_saved_tokenizer(tmp_path, llama_dir):
    from transformers import AutoModelForCausalLM

    from support_data import tiny_tokenizer

    adapter = _saved_adapter(tmp_path, llama_dir, AutoModelForCausalLM.from_pretrained, LoraConfig(task_type="CAUSAL_LM"))
    tok = tiny_tokenizer()
    tok.save_pretrained(adapter)
    model = AutoPeftModelForCausalLM.from_pretrained(adapter)
    rows = model.get_base_model().get_input_embeddings().weight.shape[0]
    assert rows == len(tok) > 96  # grown from the base's 96 rows, as peft does


# ---- get_peft_config --------------------------------------------------------------------------------
def test_get_peft_config_builds_the_class_of_peft_type():
    lora = get_peft_config({"peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "inference_mode": False, "r": 8,
                            "lora_alpha": 32, "lora_dropout": 0.1})
    assert isinstance(lora, LoraConfig) and lora.r == 8 and lora.lora_alpha == 32 and lora.task_type == "SEQ_2_SEQ_LM"
    assert isinstance(get_peft_config({"peft_type": "IA3", "target_modules": ["q"]}), IA3Config)
    prefix = get_peft_config({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 5})
    assert isinstance(prefix, PrefixTuningConfig) and prefix.num_virtual_tokens == 5
    # a peft config's own dict round-trips (peft's to_dict holds keys deltatune keeps inert)
    theirs = peft.LoraConfig(r=4, target_modules=["q_proj"]).to_dict()
    assert get_peft_config(theirs).r == 4
    with pytest.raises(ValueError, match="peft_type"):
        get_peft_config({"r": 8})
    with pytest.raises(ValueError, match="r"):
        get_peft_config({"peft_type": "LORA", "r": "eight"})


# ---- targeted_module_names ----------------------------------------------------------------------------
def test_targeted_module_names_match_peft():
    config = dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    mine = get_peft_model(tiny_llama(), LoraConfig(**config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    assert mine.targeted_module_names == theirs.targeted_module_names == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert mine.base_model.targeted_module_names == theirs.base_model.targeted_module_names
    mine.add_adapter("mlp", LoraConfig(target_modules=["down_proj"], layers_to_transform=[0]))
    assert set(mine.targeted_module_names) == {"model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj",
                                               "model.layers.1.self_attn.v_proj"}
    prefix = get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert prefix.targeted_module_names == []


# ---- get_layer_status / get_model_status --------------------------------------------------------------
SEMANTIC_LAYER = ("name", "enabled", "active_adapters", "merged_adapters", "requires_grad", "available_adapters",
                  "devices", "quantization_backend")
SEMANTIC_MODEL = ("base_model_type", "peft_types", "trainable_params", "total_params", "num_adapter_layers", "enabled",
                  "active_adapters", "merged_adapters", "requires_grad", "available_adapters", "devices",
                  "quantization_backend")


def _both(build):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build(deltatune), build(peft)


def _semantic(row, skip=()) -> dict:
    out = {k: v for k, v in asdict(row).items() if k in SEMANTIC_LAYER and k not in skip}
    # peft lists the model's active adapters on every layer; ours, those that run there (the ones it holds)
    out["active_adapters"] = [a for a in row.active_adapters if a in row.available_adapters]
    return out


def _assert_same_status(mine, theirs, skip=()):
    layers_m, layers_t = mine.get_layer_status(), theirs.get_layer_status()
    assert [_semantic(s, skip) for s in layers_m] == [_semantic(s, skip) for s in layers_t]
    status_m, status_t = asdict(mine.get_model_status()), asdict(theirs.get_model_status())
    assert {k: status_m[k] for k in SEMANTIC_MODEL if k not in skip} == {k: status_t[k] for k in SEMANTIC_MODEL if k not in skip}


def test_status_field_names_are_peft_s():
    assert [f.name for f in fields(deltatune.TunerLayerStatus)] == [f.name for f in fields(peft.peft_model.TunerLayerStatus)]
    assert [f.name for f in fields(deltatune.TunerModelStatus)] == [f.name for f in fields(peft.peft_model.TunerModelStatus)]


def test_status_of_one_lora_adapter_through_its_lifecycle_matches_peft():
    mine, theirs = _both(lambda lib: lib.get_peft_model(tiny_llama(), lib.LoraConfig(target_modules=["q_proj", "v_proj"])))
    _assert_same_status(mine, theirs)
    status = mine.get_model_status()
    assert status.active_adapters == ["default"] and status.merged_adapters == [] and status.enabled is True
    assert status.requires_grad == {"default": True} and status.num_adapter_layers == 4
    assert status.peft_types == {"default": "LORA"} and status.adapter_model_type == "AdapterModel"
    assert mine.get_layer_status()[0].module_type == "AdaptedLayer(Linear)"

    for model in (mine, theirs):
        model.merge_adapter()
    _assert_same_status(mine, theirs)
    assert mine.get_model_status().merged_adapters == ["default"]
    for model in (mine, theirs):
        model.unmerge_adapter()
        model.base_model.disable_adapter_layers()
    # peft also freezes the adapters while they are disabled; deltatune keeps them trainable (docs/api.md)
    _assert_same_status(mine, theirs, skip=("requires_grad", "trainable_params"))
    assert mine.get_model_status().enabled is False
    for model in (mine, theirs):
        model.base_model.enable_adapter_layers()
    assert get_model_status(mine).enabled is True and len(get_layer_status(mine)) == 4


def test_status_of_several_adapters_and_a_classifier_matches_peft():
    def build(lib):
        model = lib.get_peft_model(tiny_bert_cls(), lib.LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"]))
        model.add_adapter("other", lib.LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
        return model

    mine, theirs = _both(build)
    _assert_same_status(mine, theirs)
    status = mine.get_model_status()
    assert status.available_adapters == ["default", "other"] and status.requires_grad == {"default": True, "other": False}
    assert mine.get_layer_status()[-1].name == "model.classifier"
    for model in (mine, theirs):
        model.set_adapter("other")
    _assert_same_status(mine, theirs)
    assert mine.get_model_status().active_adapters == ["other"]


def test_partial_merge_and_a_hand_edited_layer_are_irregular():
    mine = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    layers = [m for m in mine.modules() if type(m).__name__ == "AdaptedLayer"]
    layers[0].merge()
    status = mine.get_model_status()
    assert status.merged_adapters == "irregular"
    layers[0].unmerge()
    layers[1].disabled = True
    layers[1].active = ()
    status = mine.get_model_status()
    assert status.enabled == "irregular" and status.active_adapters == "irregular"
    next(layers[0].adapters["default"].parameters()).requires_grad_(False)
    assert mine.get_layer_status()[0].requires_grad == {"default": "irregular"}
    assert mine.get_model_status().requires_grad == {"default": "irregular"}


def test_status_of_an_injected_model_and_of_models_without_adapter_layers():
    model = inject_adapter_in_model(LoraConfig(target_modules=["q_proj"]), tiny_llama())
    layers = get_layer_status(model)
    assert [s.name for s in layers] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    status = get_model_status(model)
    assert status.adapter_model_type == "None" and status.base_model_type == "LlamaForCausalLM"
    assert status.active_adapters == ["default"] and status.peft_types == {}
    assert status.total_params == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="No adapter layers"):
        get_layer_status(tiny_llama())
    prefix = get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(TypeError, match="prompt"):
        prefix.get_layer_status()
    with pytest.raises(TypeError, match="prompt"):
        get_model_status(prefix)


def test_ia3_status_and_t5_layer_names_match_peft():
    mine, theirs = _both(lambda lib: lib.get_peft_model(tiny_t5(), lib.IA3Config(task_type="SEQ_2_SEQ_LM")))
    _assert_same_status(mine, theirs)
    assert mine.get_layer_status()[0].name == "model.encoder.block.0.layer.0.SelfAttention.k"
