"""``model.base_model`` answers peft's tuner calls (issue 14, item 10): the same code on peft and deltatune.

peft users reach the tuner (``LoraModel``) for what ``PeftModel`` does not offer: several active adapters
at once, switching adapter layers off and on without a context manager, and the config dict.
"""
import pytest
import torch

import deltatune as dt
from tiny import input_ids, tiny_llama
from tolerances import assert_close

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two peft adapters with non-zero lora_B, so each changes the logits."""
    folders = {}
    for i, (name, targets) in enumerate((("default", ["q_proj", "v_proj"]), ("other", ["k_proj", "o_proj"]))):
        torch.manual_seed(10 + i)
        model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
        folders[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(folders[name])
    return folders


def _run(lib, adapters):
    """The user's code, with ``lib`` as the import; returns what it observes."""
    ids = input_ids()
    model = lib.PeftModel.from_pretrained(tiny_llama(), adapters["default"])
    model.load_adapter(adapters["other"], adapter_name="other")
    seen = {"base": model.get_base_model()}
    tuner = model.base_model
    seen["r"] = tuner.peft_config["other"].r
    tuner.set_adapter(["default", "other"])
    seen["active"] = (tuner.active_adapter, list(tuner.active_adapters))
    with torch.no_grad():
        seen["both"] = model(ids).logits
        tuner.disable_adapter_layers()
        seen["disabled"] = model(ids).logits
        tuner.enable_adapter_layers()
        seen["enabled"] = model(ids).logits
        tuner.set_adapter("other")
        seen["other"] = model(ids).logits
    return seen


def test_tuner_calls_behave_as_in_peft(adapters):
    ours, theirs = _run(dt, adapters), _run(peft, adapters)
    assert ours["r"] == theirs["r"] == 4
    assert ours["active"] == theirs["active"] == (["default", "other"], ["default", "other"])
    with torch.no_grad():
        plain = tiny_llama()(input_ids()).logits
    assert_close(ours["disabled"], plain)
    assert_close(ours["enabled"], ours["both"])
    assert (ours["both"] - plain).abs().max() > 1e-3 and (ours["other"] - ours["both"]).abs().max() > 1e-3
    for key in ("both", "disabled", "enabled", "other"):
        assert_close(ours[key], theirs[key])


def test_disable_adapter_layers_lasts_until_enabled_and_unmerges_first(adapters):
    ids = input_ids()
    model = dt.PeftModel.from_pretrained(tiny_llama(), adapters["default"])
    with torch.no_grad():
        adapted = model(ids).logits
        model.merge_adapter()
        model.base_model.disable_adapter_layers()
        plain = tiny_llama()(ids).logits
        assert_close(model(ids).logits, plain)
        assert_close(model(ids).logits, plain)  # still off on the next call, unlike the context manager
        with model.disable_adapter():
            assert_close(model(ids).logits, plain)
        model.base_model.enable_adapter_layers()
        assert_close(model(ids).logits, adapted)


def test_tuner_merge_and_unload_reaches_the_owner(adapters):
    ids = input_ids()
    model = dt.PeftModel.from_pretrained(tiny_llama(), adapters["default"])
    with torch.no_grad():
        adapted = model(ids).logits
        merged = model.base_model.merge_and_unload()
        assert_close(merged(ids).logits, adapted)
    assert not any("lora" in n for n, _ in merged.named_parameters())
