"""Target resolution (the dry run), its errors, and injection into arbitrary modules."""
import pytest
import torch
from torch import nn

from deltatune import LoraConfig, get_peft_model, inject_adapter_in_model, resolve_targets
from deltatune.surgery.layer import AdaptedLayer
from tiny import tiny_bert_cls, tiny_gpt2, tiny_llama


def test_suffix_list():
    names = resolve_targets(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def test_regex_and_all_linear():
    m = tiny_llama()
    assert resolve_targets(m, LoraConfig(target_modules=r".*layers\.1\.mlp\.(up|down)_proj")) == [
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    all_linear = resolve_targets(m, LoraConfig(target_modules="all-linear"))
    assert len(all_linear) == 14 and "lm_head" not in all_linear
    gpt2 = resolve_targets(tiny_gpt2(), LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in gpt2 and any(n.endswith("c_attn") for n in gpt2)


def test_exclude_and_layers_to_transform():
    m = tiny_llama(layers=3)
    cfg = LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"], layers_to_transform=[0, 2])
    assert resolve_targets(m, cfg) == ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]
    cfg = LoraConfig(target_modules=["q_proj"], layers_to_transform=1, layers_pattern="layers")
    assert resolve_targets(m, cfg) == ["model.layers.1.self_attn.q_proj"]


def test_rank_and_alpha_pattern():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                 rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 16}))
    attn0 = pm.get_base_model().model.layers[0].self_attn
    assert attn0.v_proj.adapters["default"].r == 2
    assert attn0.q_proj.adapters["default"].r == 4
    assert attn0.q_proj.adapters["default"].scaling == 4.0
    assert pm.get_base_model().model.layers[1].self_attn.q_proj.adapters["default"].scaling == 2.0


def test_misspelt_entry_is_an_error_even_if_another_matches():
    with pytest.raises(ValueError) as e:
        resolve_targets(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_prj"]))
    msg = str(e.value)
    assert "'v_prj'" in msg and "Did you mean 'v_proj'" in msg and "gate_proj" in msg


def test_nothing_matches_and_wrong_type():
    with pytest.raises(ValueError, match="after exclude_modules"):
        resolve_targets(tiny_llama(), LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))
    with pytest.raises(ValueError, match="cannot wrap"):
        resolve_targets(tiny_llama(), LoraConfig(target_modules=["self_attn"]))


def test_default_targets_by_model_type():
    assert resolve_targets(tiny_bert_cls(), LoraConfig())[0].endswith("attention.self.query")
    with pytest.raises(ValueError, match="no default for model type"):
        resolve_targets(nn.Sequential(nn.Linear(2, 2)), LoraConfig())


def test_inject_without_wrapper_and_dry_run_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    cfg = LoraConfig(r=2, target_modules=["0"])
    assert resolve_targets(model, cfg) == ["0"]
    assert isinstance(model[0], nn.Linear)  # the dry run did not touch the model
    inject_adapter_in_model(cfg, model)
    assert isinstance(model[0], AdaptedLayer)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.adapters.default.lora_A", "0.adapters.default.lora_B"]


def test_modules_to_save_misspelt():
    with pytest.raises(ValueError, match="modules_to_save entry 'lm_haed'"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_haed"]))


def test_config_validation():
    with pytest.raises(ValueError, match="r must be a positive"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match="bias must be"):
        LoraConfig(bias="some")
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoraConfig(init_lora_weights="xavier")
    with pytest.raises(Exception):
        LoraConfig().r = 3  # frozen
