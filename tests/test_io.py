"""Checkpoint I/O: errors for mismatches (never a partial load), tolerated config keys, atomic saves."""
import shutil
import json

import pytest
import torch

import deltatune as dt
from deltatune.io import checkpoint
from tiny import input_ids, tiny_gpt2, tiny_llama
from tolerances import assert_close


def _saved(tmp_path, **kw):
    pm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **kw))
    pm.save_pretrained(tmp_path)
    return pm


def test_round_trip_and_config_keys(tmp_path):
    pm = _saved(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["target_modules"] == ["q_proj", "v_proj"]
    assert cfg["inference_mode"] is True
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    x = input_ids()
    assert_close(loaded(x).logits, pm.eval()(x).logits)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # loaded for inference
    trainable = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == pm.get_nb_trainable_parameters()[0]
    assert isinstance(dt.PeftConfig.from_pretrained(tmp_path), dt.LoraConfig)


def test_rank_mismatch_names_module_and_shapes(tmp_path):
    _saved(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["r"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"shape mismatch at .*layers\.0\.self_attn\.q_proj\.lora_A\.weight: checkpoint \(4, 32\) vs model \(8, 32\)"):
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_other_architecture_is_refused(tmp_path):
    _saved(tmp_path)
    with pytest.raises(ValueError, match="target_modules entry 'q_proj' matches no module in GPT2LMHeadModel"):
        dt.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    bigger = tiny_llama(hidden=64)
    with pytest.raises(ValueError, match="nothing was loaded"):
        dt.PeftModel.from_pretrained(bigger, tmp_path)


def test_missing_and_unexpected_keys_load_nothing(tmp_path):
    pm = _saved(tmp_path)
    sd = checkpoint.load_weights(tmp_path)
    key = next(k for k in sd if "layers.1.self_attn.v_proj.lora_B" in k)
    del sd[key]
    sd["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
    target = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = {n: p.clone() for n, p in target.named_parameters()}
    with pytest.raises(ValueError) as e:
        dt.set_peft_model_state_dict(target, sd)
    assert "missing: " + key in str(e.value) and "unexpected: base_model.model.model.layers.0.mlp.up_proj" in str(e.value)
    for n, p in target.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed although the load failed"


def test_unknown_config_keys_warn_and_active_features_fail(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "brand_new_option": 3, "eva_config": None}))
    with pytest.warns(UserWarning, match="brand_new_option"):
        dt.PeftConfig.from_pretrained(tmp_path)
    path.write_text(json.dumps({**cfg, "layer_replication": [[0, 1]]}))  # lora_bias is supported now (test_lora_bias.py)
    with pytest.raises(ValueError, match=r"(?s)layer_replication=\[\[0, 1\]\].*duplicating decoder layers"):
        dt.PeftConfig.from_pretrained(tmp_path)


def test_legacy_bin_is_read_with_weights_only(tmp_path, monkeypatch):
    pm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()
    seen = {}
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert seen.get("weights_only") is True
    x = input_ids()
    assert_close(loaded(x).logits, pm.eval()(x).logits)


def test_crash_mid_save_keeps_the_old_adapter(tmp_path, monkeypatch):
    pm = _saved(tmp_path)
    good = (tmp_path / "adapter_model.safetensors").read_bytes()
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        pm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_failed_load_adapter_leaves_model_unchanged(tmp_path):
    _saved(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["r"] = 2
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    pm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError):
        pm.load_adapter(tmp_path, adapter_name="bad")
    assert list(pm.peft_config) == ["default"]
    assert not any(".bad." in n for n, _ in pm.named_parameters())


@pytest.mark.parametrize("damage", ["truncate", "wrong_shape"])
def test_failed_from_pretrained_leaves_the_callers_model_as_it_was(damage, tmp_path):
    """All or nothing for the model too: no adapter left injected, same logits, and a retry works."""
    from safetensors.torch import load_file, save_file

    from deltatune import LoraConfig, PeftModel, get_peft_model
    from tiny import input_ids, tiny_llama

    good = tmp_path / "good"
    get_peft_model(tiny_llama(), LoraConfig(r=4, init_lora_weights=False)).save_pretrained(good)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    weights = bad / "adapter_model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        sd = load_file(str(weights))
        key = sorted(sd)[0]
        sd[key] = torch.zeros(sd[key].shape[0] + 1, *sd[key].shape[1:])
        save_file(sd, str(weights), metadata={"format": "pt"})
    base = tiny_llama()
    x = input_ids()
    with torch.no_grad():
        before = base(input_ids=x).logits
    with pytest.raises(Exception):
        PeftModel.from_pretrained(base, bad)
    assert not [n for n, m in base.named_modules() if "lora" in n or hasattr(m, "base_layer")]
    with torch.no_grad():
        assert torch.equal(base(input_ids=x).logits, before)
    PeftModel.from_pretrained(base, good)  # the retry is not refused with "adapter 'default' already exists"
