"""``PeftMixedModel`` (deltatune/mixed_model.py) against peft 0.21.2's on a tiny Llama with three adapters of
different targets, ranks and types, saved by peft: a LoRA (q, v; r 4), an rsLoRA (q, o, up; r 8) and an
AdaLoRA (q, k). Logits with several active, one active and none; save/load both ways; merge_and_unload;
the summing invariant on one layer; and the refusals (LoHa: not implemented; IA³: not mixable)."""
from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch

import deltatune as dt
from tiny import input_ids, perturb, tiny_llama
from tolerances import assert_close

X = input_ids()
ADAPTERS = ("default", "b", "c")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Folders of the three adapters (plus a LoHa one), each saved by peft with non-zero weights."""
    root = tmp_path_factory.mktemp("mixed")
    configs = {
        "a": peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "b": peft.LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "o_proj", "up_proj"],
                             init_lora_weights=False),
        "c": peft.AdaLoraConfig(init_r=6, target_r=4, total_step=10, target_modules=["q_proj", "k_proj"]),
        "loha": peft.LoHaConfig(r=4, target_modules=["q_proj"], init_weights=False),
    }
    for seed, (name, config) in enumerate(configs.items()):
        torch.manual_seed(seed)
        model = peft.get_peft_model(tiny_llama(), config)
        perturb(model, seed=seed)  # AdaLoRA starts with E = 0: move it so that the adapter does something
        model.save_pretrained(root / name)
    return {name: str(root / name) for name in configs}


def load(lib, saved, trainable: bool = False):
    """The peft docs' pattern: the first adapter through from_pretrained, the others through load_adapter."""
    model = lib.PeftMixedModel.from_pretrained(tiny_llama(), saved["a"], is_trainable=trainable)
    model.load_adapter(saved["b"], adapter_name="b", is_trainable=trainable)
    model.load_adapter(saved["c"], adapter_name="c", is_trainable=trainable)
    return model


@pytest.fixture(scope="module")
def pair(saved):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load(dt, saved), load(peft, saved)


def logits(model, active=None):
    if active is not None:
        model.set_adapter(active)
    with torch.no_grad():
        return model(input_ids=X).logits


@pytest.mark.parametrize("active", [["default", "b"], ["default", "b", "c"], ["c", "default"], ["b"], ["c"]])
def test_logits_match_peft(pair, active):
    mine, theirs = pair
    assert type(mine) is dt.PeftMixedModel
    assert_close(logits(mine, active), logits(theirs, active))
    assert mine.active_adapters == theirs.active_adapters == active


def test_several_active_differ_from_each_alone(pair):
    mine, _ = pair
    both = logits(mine, ["default", "b", "c"])
    for name in ADAPTERS:
        assert not torch.allclose(both, logits(mine, name), atol=1e-4)


def test_effects_add_up_in_a_layer(pair):
    # q_proj carries all three: (W + ΔA + ΔB + ΔC)x - Wx is the sum of what each adds alone (reordered sums).
    mine, _ = pair
    q = mine.base_model.model.model.layers[0].self_attn.q_proj
    h = torch.randn(3, q.base_layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = q.base_layer(h)
        alone = []
        for name in ADAPTERS:
            mine.set_adapter(name)
            alone.append(q(h) - base)
        mine.set_adapter(list(ADAPTERS))
        assert_close(q(h) - base, sum(alone), tier="reordered")


def test_disable_adapter_gives_the_base_model(pair):
    mine, theirs = pair
    for model in pair:
        model.set_adapter(list(ADAPTERS))
    with torch.no_grad(), mine.disable_adapter(), theirs.disable_adapter():
        off, off_t = mine(input_ids=X).logits, theirs(input_ids=X).logits
    assert_close(off, off_t)
    assert_close(off, tiny_llama()(input_ids=X).logits)
    assert not torch.allclose(logits(mine), off, atol=1e-4)  # enabled again after the block


def test_merge_and_unload_matches_peft_and_the_unmerged_model(saved):
    mine, theirs = load(dt, saved), load(peft, saved)
    unmerged = logits(mine, ["default", "b", "c"])
    theirs.set_adapter(["default", "b", "c"])
    merged, merged_t = mine.merge_and_unload(), theirs.merge_and_unload()
    assert type(merged) is type(merged_t)
    assert not any("adapter" in n or "lora" in n for n, _ in merged.named_modules())
    with torch.no_grad():
        out = merged(input_ids=X).logits
        assert_close(out, merged_t(input_ids=X).logits, tier="reordered")
    assert_close(out, unmerged, tier="reordered")


def test_get_peft_model_mixed_builds_one_and_takes_adalora():
    adalora = dict(init_r=6, target_r=4, total_step=10, target_modules=["q_proj", "k_proj"])
    mine = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), mixed=True)
    assert type(mine) is dt.PeftMixedModel
    mine.add_adapter("c", dt.AdaLoraConfig(**adalora))
    mine.set_adapter(["default", "c"])
    perturb(mine)
    # The same weights in peft's, through peft's keys. Each is loaded right after it is added: in peft's mixed
    # model a later adapter wraps the earlier one's layer, which moves the earlier one's keys (base_layer.).
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), mixed=True)
    peft.set_peft_model_state_dict(theirs, dt.get_peft_model_state_dict(mine, adapter_name="default"), adapter_name="default")
    theirs.add_adapter("c", peft.AdaLoraConfig(**adalora))
    peft.set_peft_model_state_dict(theirs, dt.get_peft_model_state_dict(mine, adapter_name="c"), adapter_name="c")
    assert_close(logits(mine, ["default", "c"]), logits(theirs, ["default", "c"]))
    assert not torch.allclose(logits(mine, ["default", "c"]), logits(mine, "default"), atol=1e-4)


@pytest.mark.parametrize("reader", ["peft", "deltatune"])
def test_save_pretrained_writes_each_adapter_in_peft_format(tmp_path, pair, reader):
    mine, _ = pair
    mine.save_pretrained(tmp_path)
    types = {n: json.loads((tmp_path / sub / "adapter_config.json").read_text())["peft_type"]
             for n, sub in (("default", ""), ("b", "b"), ("c", "c"))}
    assert types == {"default": "LORA", "b": "LORA", "c": "ADALORA"}
    lib = peft if reader == "peft" else dt
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = lib.PeftMixedModel.from_pretrained(tiny_llama(), str(tmp_path))
        back.load_adapter(str(tmp_path / "b"), adapter_name="b")
        back.load_adapter(str(tmp_path), adapter_name="c", subfolder="c")
    assert_close(logits(back, list(ADAPTERS)), logits(mine, list(ADAPTERS)))


def test_forward_adds_no_adalora_penalty_as_in_peft(saved):
    # peft's mixed model runs the model as it is; the orthogonality term is AdaLoraModel's, not the mix's.
    mine, theirs = load(dt, saved, trainable=True), load(peft, saved, trainable=True)
    for model in (mine, theirs):
        model.set_adapter(["c", "default"])
        model.eval()  # no dropout
    loss = mine(input_ids=X, labels=X).loss
    assert_close(loss, theirs(input_ids=X, labels=X).loss)
    loss.backward()
    assert all(p.grad is not None for n, p in mine.named_parameters() if p.requires_grad)


def test_set_adapter_inference_mode_and_delete_several(saved):
    mine = load(dt, saved, trainable=True)
    mine.set_adapter(["default", "b"])
    trains = {name: any(p.requires_grad for n, p in mine.named_parameters() if f".adapters.{name}." in n) for name in ADAPTERS}
    assert trains == {"default": True, "b": True, "c": False}
    mine.set_adapter(["default", "b"], inference_mode=True)
    assert not any(p.requires_grad for p in mine.parameters())
    with pytest.raises(ValueError, match="nope"):
        mine.delete_adapter(["b", "nope"])
    assert set(mine.peft_config) == set(ADAPTERS)  # nothing removed when one name is wrong
    mine.delete_adapter(["b", "c"])
    assert list(mine.peft_config) == ["default"] and mine.active_adapters == ["default"]


def test_loha_is_refused_as_not_implemented(saved):
    mine = dt.PeftMixedModel.from_pretrained(tiny_llama(), saved["a"])
    with pytest.raises(NotImplementedError, match=r"LoHa adapter.*deltatune does not implement LoHa.*LoraConfig"):
        mine.load_adapter(saved["loha"], adapter_name="other")
    assert list(mine.peft_config) == ["default"]
    with pytest.raises(NotImplementedError, match="adapter_config.json is a LoHa adapter"):
        dt.PeftMixedModel.from_pretrained(tiny_llama(), saved["loha"])
    with pytest.raises(NotImplementedError, match="LoKr"):
        mine.add_adapter("lokr", peft.LoKrConfig(r=4, target_modules=["q_proj"]))


def test_types_peft_does_not_mix_are_refused():
    ia3 = dt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="'IA3'.*not compatible with PeftMixedModel.*Use a PeftModel"):
        dt.get_peft_model(tiny_llama(), ia3, mixed=True)
    mine = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"]), mixed=True)
    with pytest.raises(ValueError, match="PROMPT_TUNING"):
        mine.add_adapter("p", dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert list(mine.peft_config) == ["default"]


def test_weighted_combination_and_status_work_as_on_a_peft_model(saved):
    # Beyond peft's mixed model (it raises for both): the PeftModel calls work on the LoRA adapters.
    mine = load(dt, saved)
    mine.add_weighted_adapter(["default", "b"], [1.0, 1.0], "sum", combination_type="cat")
    both = logits(mine, ["default", "b"])
    assert_close(logits(mine, "sum"), both, tier="reordered")  # "cat" with weights 1: the two deltas summed
    status = dt.get_model_status(mine)
    assert sorted(status.available_adapters) == ["b", "c", "default", "sum"]
    assert status.active_adapters == ["sum"]
