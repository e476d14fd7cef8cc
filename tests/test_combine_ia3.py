"""add_weighted_adapter on IA³ adapters: parity with peft 0.21's IA3Model.add_weighted_adapter."""
from __future__ import annotations

import peft
import pytest
import torch
from torch.testing import assert_close

import deltatune
from tiny import input_ids, tiny_llama, tiny_t5

LLAMA_ADAPTERS = {
    "a1": dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "a2": dict(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "a3": dict(target_modules=["k_proj", "up_proj"], feedforward_modules=["up_proj"]),
}


def _random_vectors(lib, model, name, seed):
    g = torch.Generator().manual_seed(seed)
    keys = lib.get_peft_model_state_dict(model, adapter_name=name)
    return {k: 1 + 0.3 * torch.randn(v.shape, generator=g) for k, v in sorted(keys.items())}


def _build(lib, make_model, adapters, task_type=None):
    model = None
    for i, (name, kwargs) in enumerate(adapters.items()):
        config = lib.IA3Config(task_type=task_type, **kwargs)
        if model is None:
            model = lib.get_peft_model(make_model(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    for i, name in enumerate(adapters):
        sd = _random_vectors(peft if lib is peft else deltatune, model, name, seed=10 + i)
        lib.set_peft_model_state_dict(model, sd, adapter_name=name)
    return model.eval()


@pytest.mark.parametrize("names,weights", [(["a1", "a2"], [0.7, -0.4]), (["a1", "a2", "a3"], [0.5, 0.3, 0.2]), (["a2"], [2.0])])
def test_llama_combined_vectors_and_logits_match_peft(names, weights):
    adapters = {k: LLAMA_ADAPTERS[k] for k in names}
    theirs = _build(peft, tiny_llama, adapters)
    mine = _build(deltatune, tiny_llama, adapters)
    for model in (theirs, mine):
        model.add_weighted_adapter(names, weights, "merge")
        model.set_adapter("merge")
    sd_t = peft.get_peft_model_state_dict(theirs, adapter_name="merge")
    sd_m = deltatune.get_peft_model_state_dict(mine, adapter_name="merge")
    assert sd_m.keys() == sd_t.keys()
    for k in sd_t:
        assert_close(sd_m[k], sd_t[k])
    x = input_ids()
    with torch.no_grad():
        assert_close(mine(input_ids=x).logits, theirs(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    assert set(mine.peft_config["merge"].target_modules) == set(theirs.peft_config["merge"].target_modules)
    assert set(mine.peft_config["merge"].feedforward_modules) == set(theirs.peft_config["merge"].feedforward_modules)


def test_t5_default_targets_match_peft():
    adapters = {"a1": {}, "a2": {}}
    theirs = _build(peft, tiny_t5, adapters, task_type="SEQ_2_SEQ_LM")
    mine = _build(deltatune, tiny_t5, adapters, task_type="SEQ_2_SEQ_LM")
    for model in (theirs, mine):
        model.add_weighted_adapter(["a1", "a2"], [0.6, 0.4], "merge")
        model.set_adapter("merge")
    sd_t = peft.get_peft_model_state_dict(theirs, adapter_name="merge")
    sd_m = deltatune.get_peft_model_state_dict(mine, adapter_name="merge")
    assert sd_m.keys() == sd_t.keys()
    for k in sd_t:
        assert_close(sd_m[k], sd_t[k])
    x = input_ids()
    with torch.no_grad():
        out_t = theirs(input_ids=x, decoder_input_ids=x[:, :4]).logits
        out_m = mine(input_ids=x, decoder_input_ids=x[:, :4]).logits
    assert_close(out_m, out_t, rtol=1e-5, atol=1e-5)


def test_regex_targets_are_joined_as_alternatives_like_peft():
    adapters = {
        "a1": dict(target_modules=r".*\.k_proj", feedforward_modules=r"$^"),
        "a2": dict(target_modules=r".*\.(v_proj|down_proj)", feedforward_modules=r".*\.down_proj"),
    }
    theirs = _build(peft, tiny_llama, adapters)
    mine = _build(deltatune, tiny_llama, adapters)
    for model in (theirs, mine):
        model.add_weighted_adapter(["a1", "a2"], [1.0, 0.5], "merge")
    assert mine.peft_config["merge"].target_modules == theirs.peft_config["merge"].target_modules
    sd_t = peft.get_peft_model_state_dict(theirs, adapter_name="merge")
    sd_m = deltatune.get_peft_model_state_dict(mine, adapter_name="merge")
    assert sd_m.keys() == sd_t.keys()
    for k in sd_t:
        assert_close(sd_m[k], sd_t[k])


def test_errors_leave_the_model_unchanged():
    mine = _build(deltatune, tiny_llama, {k: LLAMA_ADAPTERS[k] for k in ("a1", "a2")})
    before = {k: v.clone() for k, v in mine.state_dict().items()}
    with pytest.raises(ValueError, match="already exists"):
        mine.add_weighted_adapter(["a1"], [1.0], "a2")
    with pytest.raises(ValueError, match="no adapter named"):
        mine.add_weighted_adapter(["a1", "nope"], [1.0, 1.0], "merge")
    with pytest.raises(ValueError, match="one weight per adapter"):
        mine.add_weighted_adapter(["a1", "a2"], [1.0], "merge")
    with pytest.raises(TypeError, match="LoRA adapters only"):
        mine.add_weighted_adapter(["a1", "a2"], [1.0, 1.0], "merge", combination_type="ties", density=0.5)
    mine.add_adapter("lora", deltatune.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="IA³ adapters with IA³ adapters"):
        mine.add_weighted_adapter(["a1", "lora"], [1.0, 1.0], "merge")
    mine.delete_adapter("lora")
    mine.add_adapter("rx", deltatune.IA3Config(target_modules=r".*\.k_proj", feedforward_modules=r"$^"))
    with pytest.raises(ValueError, match="mix regexes and name lists"):
        mine.add_weighted_adapter(["a1", "rx"], [1.0, 1.0], "merge")
    mine.delete_adapter("rx")
    assert "merge" not in mine.peft_config
    after = mine.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_feedforward_disagreement_is_an_error():
    mine = _build(deltatune, tiny_llama, {
        "a1": dict(target_modules=["down_proj"], feedforward_modules=["down_proj"]),
        "a2": dict(target_modules=["down_proj"], feedforward_modules=[]),
    })
    with pytest.raises(ValueError, match="feedforward_modules differ"):
        mine.add_weighted_adapter(["a1", "a2"], [0.5, 0.5], "merge")
    assert "merge" not in mine.peft_config
