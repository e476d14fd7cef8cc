"""PeftModel.add_weighted_adapter: invariants, rsLoRA, target sets, reproducible DARE and errors.

Parity with the real peft lives in test_combine_adapters_peft_parity.py; here the checks are
closed-form or invariants: ``cat`` with weights [1, 1] is exactly both adapters active at once,
an ``svd`` of full rank is exactly ``cat``, a failed call leaves the model as it was.
"""
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.surgery.inject import adapted_layers, save_wrappers
from tiny import input_ids, tiny_gpt2, tiny_llama
from tolerances import assert_close


def _model(specs, make=tiny_llama):
    """A model with one LoRA adapter per (name, config kwargs), random A and B."""
    torch.manual_seed(0)
    model = None
    for name, kw in specs.items():
        cfg = dt.LoraConfig(init_lora_weights=False, **kw)
        if model is None:
            model = dt.get_peft_model(make(), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    return model.eval()


def _logits(model, active):
    model.set_adapter(active)
    with torch.no_grad():
        return model(input_ids()).logits


def _hosts(model, name):
    return [n for n, h in adapted_layers(model.base_model.model) if name in h.adapters]


TWO = {"a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
       "b": dict(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])}


def test_cat_of_unit_weights_is_both_adapters_at_once():
    model = _model(TWO)
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "cat", combination_type="cat")
    cfg = model.peft_config["cat"]
    assert (cfg.r, cfg.lora_alpha) == (6, 6)  # sum of ranks, scaling 1
    assert set(cfg.target_modules) == {"q_proj", "v_proj", "down_proj"}  # peft's union
    assert_close(_logits(model, "cat"), _logits(model, ["a", "b"]))


def test_full_rank_svd_equals_cat():
    model = _model(TWO)
    model.add_weighted_adapter(["a", "b"], [0.5, -2.0], "cat", combination_type="cat")
    model.add_weighted_adapter(["a", "b"], [0.5, -2.0], "svd", combination_type="svd", svd_rank=6)
    assert_close(_logits(model, "svd"), _logits(model, "cat"), tier="reordered")  # SVD rounding


def test_rslora_combination_keeps_scaling_one():
    # peft 0.21 keeps lora_alpha = r with use_rslora, so its result is sqrt(r) times too large.
    specs = {k: dict(v, use_rslora=True) for k, v in TWO.items()}
    model = _model(specs)
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "cat", combination_type="cat")
    cfg = model.peft_config["cat"]
    assert cfg.use_rslora and cfg.lora_alpha == pytest.approx(6**0.5)
    assert_close(_logits(model, "cat"), _logits(model, ["a", "b"]))


def test_new_adapter_is_inactive_and_frozen():
    model = _model(TWO)
    model.set_adapter("a")
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "new", combination_type="cat")
    assert model.active_adapters == ["a"]
    host = dict(adapted_layers(model.base_model.model))["model.layers.0.self_attn.q_proj"]
    assert not any(p.requires_grad for p in host.adapters["new"].parameters())


def test_layers_to_transform_gives_exact_module_list_that_round_trips(tmp_path):
    specs = {"a": dict(r=4, target_modules=["q_proj"], layers_to_transform=[0]),
             "b": dict(r=4, target_modules=["v_proj"])}
    model = _model(specs)
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "new", combination_type="cat")
    wanted = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    assert _hosts(model, "new") == wanted
    assert list(model.peft_config["new"].target_modules) == wanted  # the union would add layer 1's q_proj
    assert_close(_logits(model, "new"), _logits(model, ["a", "b"]))
    model.save_pretrained(tmp_path, selected_adapters=["new"])
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "new")
    assert _hosts(loaded, "default") == wanted
    assert_close(_logits(loaded, "default"), _logits(model, "new"))


def test_cat_pads_modules_missing_an_adapter():
    model = _model(TWO)
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "new", combination_type="cat")
    host = dict(adapted_layers(model.base_model.model))["model.layers.0.self_attn.v_proj"]  # only 'a' here
    assert host.adapters["new"].lora_A.shape[0] == 6
    assert torch.count_nonzero(host.adapters["new"].lora_A[4:]) == 0


def test_embedding_and_conv1d_layers_combine():
    specs = {"a": dict(r=4, target_modules=["c_attn", "wte"]), "b": dict(r=4, target_modules=["c_attn", "c_fc"])}
    model = _model(specs, tiny_gpt2)
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "cat", combination_type="cat")
    assert_close(_logits(model, "cat"), _logits(model, ["a", "b"]))


def test_dare_is_reproducible_with_a_seed_and_leaves_global_rng_alone():
    model = _model({"a": TWO["a"], "b": dict(TWO["a"], lora_alpha=2)})
    state = torch.get_rng_state()
    for name, seed in (("s1", 3), ("s2", 3), ("s3", 4)):
        model.add_weighted_adapter(["a", "b"], [0.6, 0.4], name, combination_type="dare_ties", density=0.5, seed=seed)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(_logits(model, "s1"), _logits(model, "s2"))
    assert not torch.equal(_logits(model, "s1"), _logits(model, "s3"))
    g = torch.Generator().manual_seed(3)
    model.add_weighted_adapter(["a", "b"], [0.6, 0.4], "g", combination_type="dare_ties", density=0.5, generator=g)
    assert torch.equal(_logits(model, "g"), _logits(model, "s1"))


def test_one_adapter_training_a_module_in_full_passes_its_trained_copy():
    model = _model({"a": dict(TWO["a"], modules_to_save=["lm_head"]), "b": TWO["b"]})
    (_, wrapper), = save_wrappers(model.base_model.model)
    with torch.no_grad():
        wrapper.modules_to_save["a"].weight.add_(1.0)
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "new", combination_type="cat")
    assert torch.equal(wrapper.modules_to_save["new"].weight, wrapper.modules_to_save["a"].weight)
    assert_close(_logits(model, "new"), _logits(model, ["a", "b"]))


def _assert_unchanged(model, names):
    assert sorted(model.peft_config) == sorted(names)
    assert all(set(h.adapters) <= set(names) for _, h in adapted_layers(model.base_model.model))


@pytest.mark.parametrize(
    "call,match",
    [
        (dict(adapters=["a", "x"], weights=[1, 1]), "no adapter named 'x'"),
        (dict(adapters=["a", "b"], weights=[1]), "one weight per adapter"),
        (dict(adapters=["a", "b"], weights=[1, float("nan")]), "finite"),
        (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="a"), "already exists"),
        (dict(adapters=["a", "b"], weights=[1, 1], combination_type="linear"), "equal rank.*'cat'"),
        (dict(adapters=["a", "b"], weights=[1, 1], combination_type="ties_svd"), "needs `density`"),
        (dict(adapters=["a", "b"], weights=[1, 1], combination_type="mean"), "unknown combination_type"),
        (dict(adapters=["a", "b"], weights=[1, 1], combination_type="dare_ties_svd", density=0.5, seed=1,
              generator=torch.Generator()), "either seed or generator"),
    ],
)
def test_bad_requests_say_what_is_wrong_and_change_nothing(call, match):
    model = _model(TWO)
    call = {"adapter_name": "new", **call}
    with pytest.raises(ValueError, match=match):
        model.add_weighted_adapter(**call)
    _assert_unchanged(model, ["a", "b"])


def test_mixed_ranks_inside_one_module_fail_naming_it_and_roll_back():
    # Config-level ranks agree (8 and 8), but q_proj has rank 4 in 'a' via rank_pattern.
    model = _model({"a": dict(r=8, rank_pattern={"q_proj": 4}, target_modules=["q_proj", "v_proj"]),
                    "b": dict(r=8, target_modules=["q_proj", "v_proj"])})
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: .*equal rank"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "new", combination_type="linear")
    _assert_unchanged(model, ["a", "b"])


def test_rank_pattern_adapters_combine_with_cat():
    model = _model({"a": dict(r=8, rank_pattern={"q_proj": 4}, target_modules=["q_proj", "v_proj"]),
                    "b": dict(r=8, target_modules=["q_proj", "v_proj"])})
    model.add_weighted_adapter(["a", "b"], [1, 1], "new", combination_type="cat")
    assert model.peft_config["new"].rank_pattern == {} and model.peft_config["new"].r == 16
    assert_close(_logits(model, "new"), _logits(model, ["a", "b"]))


def test_dora_is_refused():
    model = _model({"a": TWO["a"], "d": dict(TWO["a"], use_dora=True)})
    with pytest.raises(ValueError, match="'d' is DoRA"):
        model.add_weighted_adapter(["a", "d"], [1, 1], "new", combination_type="svd")
    _assert_unchanged(model, ["a", "d"])


def test_non_lora_adapters_are_refused():
    model = _model({"a": TWO["a"]})
    model.add_adapter("ia3", dt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    with pytest.raises(ValueError, match="'ia3' is IA3.*LoRA-family adapters only"):
        model.add_weighted_adapter(["a", "ia3"], [1, 1], "new")
    prompt = dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="LoRA-family adapters only"):
        prompt.add_weighted_adapter(["default"], [1], "new")


def test_two_full_copies_of_one_module_are_refused():
    model = _model({"a": dict(TWO["a"], modules_to_save=["lm_head"]), "b": dict(TWO["a"], modules_to_save=["lm_head"])})
    with pytest.raises(ValueError, match="full copy of 'lm_head'"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "new", combination_type="cat")
    _assert_unchanged(model, ["a", "b"])


def test_unused_options_warn_once():
    model = _model(TWO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.add_weighted_adapter(["a", "b"], [1, 1], "new", combination_type="cat", density=0.5, svd_rank=3)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert messages == ["['density', 'svd_rank'] have no effect with combination_type='cat'; they are ignored."]
