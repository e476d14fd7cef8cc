"""peft's ``lora_bias=True`` (methods/lora_bias.py): parity with peft both ways, training, merge, serving, refusals."""
import warnings

import pytest
import torch

import deltatune as dt
from tiny import input_ids, tiny_gpt2, tiny_llama
from tolerances import assert_close

peft = pytest.importorskip("peft")

TARGETS = ["c_attn", "c_fc"]  # GPT-2's Conv1D layers have biases, so merging can fold lora_B's in


def _peft_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out set for Conv1D
        # init_lora_weights=False: peft leaves lora_B's bias at nn.Linear's random init, so it matters
        return peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_bias=True, init_lora_weights=False))


def _ours(**kw):
    return dt.get_peft_model(tiny_gpt2(), dt.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_bias=True, init_lora_weights=False, **kw))


def test_peft_adapter_loads_with_the_same_logits_and_back(tmp_path):
    x = input_ids()
    theirs = _peft_model().eval()
    theirs.save_pretrained(tmp_path / "theirs")
    mine = dt.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "theirs")
    biases = [m.adapters["default"].lora_B_bias for m in mine.modules() if type(m).__name__ == "AdaptedLayer"]
    assert len(biases) == 4 and all(b.abs().sum() > 0 for b in biases)  # loaded, not left at zero
    assert_close(mine(x).logits, theirs(x).logits)
    mine.save_pretrained(tmp_path / "mine")
    back = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "mine").eval()
    assert_close(back(x).logits, theirs(x).logits)
    assert dt.get_peft_model_state_dict(mine).keys() == peft.get_peft_model_state_dict(theirs).keys()


def test_training_step_moves_the_bias_and_merge_folds_it(tmp_path):
    model = _ours()
    bias = model.get_base_model().transformer.h[0].attn.c_attn.adapters["default"].lora_B_bias
    assert bias.requires_grad
    before = bias.detach().clone()
    x = input_ids()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(x, labels=x).loss.backward()
    opt.step()
    assert not torch.equal(bias.detach(), before)
    model.eval()
    expected = model(x).logits
    base_bias = model.get_base_model().transformer.h[0].attn.c_attn.base_layer.bias.detach().clone()
    model.merge_adapter()
    merged_bias = model.get_base_model().transformer.h[0].attn.c_attn.base_layer.bias
    assert_close(merged_bias, base_bias + 2.0 * bias.detach())  # s = alpha / r = 2
    assert_close(model(x).logits, expected, tier="reordered")
    model.unmerge_adapter()
    assert_close(model.get_base_model().transformer.h[0].attn.c_attn.base_layer.bias, base_bias, tier="reordered")
    # peft's merge of the same trained adapter gives the same merged model
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path).merge_and_unload()
    assert_close(theirs(x).logits, model.merge_and_unload()(x).logits, tier="reordered")


def test_mixed_adapter_batch_applies_each_rows_bias():
    model = _ours()
    model.add_adapter("plain", dt.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    model.eval()
    x = input_ids(batch=3)
    mixed = model(x, adapter_names=["default", "plain", "__base__"]).logits
    model.set_adapter("default")
    assert_close(mixed[0], model(x).logits[0], tier="reordered")
    model.set_adapter("plain")
    assert_close(mixed[1], model(x).logits[1], tier="reordered")


def test_refusals():
    with pytest.raises(ValueError, match="not supported with DoRA"):
        dt.LoraConfig(lora_bias=True, use_dora=True)
    with pytest.raises(ValueError, match="init_lora_weights=True or False"):
        dt.LoraConfig(lora_bias=True, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="Embedding"):
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(lora_bias=True, target_modules=["embed_tokens"]))
    with pytest.warns(UserWarning, match="merging it will not be possible"):
        model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(lora_bias=True, target_modules=["q_proj"], init_lora_weights=False))
    with pytest.raises(ValueError, match="has no bias"):
        model.merge_adapter()
    x = input_ids()
    assert torch.isfinite(model(x).logits).all()  # the refused merge changed nothing
    model.add_adapter("other", dt.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="lora_bias=True"):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "sum", combination_type="linear")
