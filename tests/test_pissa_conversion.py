"""save_pretrained(path_initial_model_for_weight_conversion=...): PiSSA/OLoRA written as LoRA on the original W."""
import json

import pytest
import torch

from deltatune import LoraConfig, PeftModel, get_peft_model
from test_prompt_common import perturb_trainable
from tiny import input_ids, tiny_llama
from tolerances import assert_close


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("init,rslora", [("pissa", False), ("olora", False), ("pissa", True)])
def test_converted_adapter_on_the_original_model_gives_the_trained_model(init, rslora, tmp_path):
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, use_rslora=rslora,
                                                 target_modules=["q_proj", "v_proj", "down_proj"]))
    pm.save_pretrained(tmp_path / "initial")  # before training, as peft's PiSSA guide does
    perturb_trainable(pm, scale=0.1)  # "training"
    pm.eval()
    pm.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "initial")

    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["init_lora_weights"]) == (8, True)
    assert cfg["lora_alpha"] == pytest.approx(8 * (2 ** 0.5 if rslora else 2))
    assert json.loads((tmp_path / "initial" / "adapter_config.json").read_text())["init_lora_weights"] is True
    x = input_ids()
    ours = PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora")  # the original, unmoved weights
    assert_close(_logits(ours, x), _logits(pm, x), tier="reordered")  # W + s(BA - B0A0) vs W_res + sBA: rounding differs

    import peft

    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "lora"))
    assert_close(_logits(theirs, x), _logits(ours, x))


def test_conversion_refuses_other_methods_and_a_mismatched_initial_adapter(tmp_path):
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, init_lora_weights="pissa"))
    other = get_peft_model(tiny_llama(), LoraConfig(r=2, init_lora_weights="pissa"))
    other.save_pretrained(tmp_path / "initial")
    with pytest.raises(ValueError, match="initial"):
        pm.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "initial")
    from deltatune import IA3Config

    ia3 = get_peft_model(tiny_llama(), IA3Config())
    with pytest.raises(ValueError, match="converts LoRA adapters"):
        ia3.save_pretrained(tmp_path / "ia3", path_initial_model_for_weight_conversion=tmp_path / "initial")
