"""End-to-end parity of PeftModel.add_weighted_adapter with the real peft.

The same adapters (made by peft with random A and B, different alphas, ranks and target sets) are
loaded into peft and into deltatune; both combine them, activate the result and run the model.
Factor-wise types (linear, cat, ties, magnitude_prune) must give the same logits to fp32 tolerance.
``*_svd`` types are compared by each module's delta ΔW = scaling · B A (singular vectors are only
unique up to sign, so the factors themselves may differ) and by logits. DARE types are compared
draw for draw: peft's global RNG is seeded where it starts drawing, ours gets ``seed=`` the same.
"""
import warnings

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer, LoraModel

import deltatune as dt
from deltatune.surgery.inject import adapted_layers
from tiny import input_ids, tiny_gpt2, tiny_llama
from tolerances import assert_close

# name -> (r, lora_alpha, targets): different scalings and target sets, and one adapter of another rank.
LLAMA = {
    "a": (4, 8, ["q_proj", "v_proj", "embed_tokens"]),
    "b": (4, 16, ["q_proj", "k_proj", "down_proj"]),
    "c": (4, 3, ["q_proj", "v_proj", "up_proj"]),
    "d": (6, 6, ["q_proj", "o_proj", "embed_tokens"]),
}
GPT2 = {  # Conv1D (fan_in_fan_out) and an embedding
    "a": (4, 8, ["c_attn", "wte"]),
    "b": (4, 16, ["c_attn", "c_fc"]),
    "c": (4, 3, ["c_proj", "c_attn", "wte"]),
}
WEIGHTS = [0.7, -0.4, 1.3]
# SVD-based deltas: peft's full dense SVD and our thin-QR route round differently. Deltas are O(1)
# sums of a few hundred fp32 products, so 10x the fp32 tolerance; logits go through 2 layers of
# attention and an MLP on top, so 100x.
SVD_DELTA_SCALE = 10
SVD_LOGIT_SCALE = 100


def _pair(make, spec, tmp_path_factory):
    """(peft model, our model) holding the same adapters, ours loaded from peft's files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about Conv1D fan_in_fan_out and embedding targets
        theirs = None
        torch.manual_seed(0)
        for name, (r, alpha, targets) in spec.items():
            cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
            if theirs is None:
                theirs = peft.get_peft_model(make(), cfg, adapter_name=name)
            else:
                theirs.add_adapter(name, cfg)
        folder = tmp_path_factory.mktemp("adapters")
        theirs.save_pretrained(folder)
    names = list(spec)
    ours = dt.PeftModel.from_pretrained(make(), folder / names[0], adapter_name=names[0])
    for name in names[1:]:
        ours.load_adapter(folder / name, name)
    return theirs.eval(), ours.eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _pair(tiny_llama, LLAMA, tmp_path_factory)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return _pair(tiny_gpt2, GPT2, tmp_path_factory)


def _logits(model, name):
    model.set_adapter(name)
    with torch.no_grad():
        return model(input_ids()).logits


def _peft_deltas(model, name):
    out = {}
    for key, layer in model.base_model.model.named_modules():
        if isinstance(layer, LoraLayer) and (name in layer.lora_A or name in layer.lora_embedding_A):
            if name in layer.lora_A:
                A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
            else:
                A, B = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
            out[key] = (B @ A * layer.scaling[name]).detach()
    return out


def _our_deltas(model, name):
    return {
        key: host.adapters[name].delta_weight(host.base_layer).detach()
        for key, host in adapted_layers(model.base_model.model)
        if name in host.adapters
    }


def _combine_both(pair, adapters, ctype, new, **kw):
    theirs, ours = pair
    weights = WEIGHTS[: len(adapters)]
    seed = kw.pop("_seed", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.add_weighted_adapter(adapters, weights, new, combination_type=ctype, **kw)
    ours.add_weighted_adapter(adapters, weights, new, combination_type=ctype, seed=seed, **kw)
    assert ours.peft_config[new].r == theirs.peft_config[new].r
    assert ours.peft_config[new].lora_alpha == theirs.peft_config[new].lora_alpha


def _check_svd_like(pair, new):
    theirs, ours = pair
    mine, peft_d = _our_deltas(ours, new), _peft_deltas(theirs, new)
    assert sorted(mine) == sorted(peft_d)
    for key in mine:
        assert_close(mine[key], peft_d[key], scale=SVD_DELTA_SCALE)
    assert_close(_logits(ours, new), _logits(theirs, new), scale=SVD_LOGIT_SCALE)


@pytest.mark.parametrize("model", ["llama", "gpt2"])
@pytest.mark.parametrize("adapters", [["a", "b"], ["a", "b", "c"]], ids=["two", "three"])
@pytest.mark.parametrize(
    "ctype,kw",
    [
        ("linear", {}),
        ("cat", {}),
        ("ties", {"density": 0.5}),
        ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
        ("magnitude_prune", {"density": 0.4}),
    ],
)
def test_factorwise_types_give_peft_logits(request, model, adapters, ctype, kw):
    pair = request.getfixturevalue(model)
    new = f"{ctype}_{len(adapters)}_{len(kw)}"
    _combine_both(pair, adapters, ctype, new, **kw)
    assert_close(_logits(pair[1], new), _logits(pair[0], new))
    assert sorted(_our_deltas(pair[1], new)) == sorted(_peft_deltas(pair[0], new))  # same modules wrapped


@pytest.mark.parametrize("model", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "ctype,kw",
    [
        ("svd", {}),
        ("svd", {"svd_rank": 3}),
        ("ties_svd", {"density": 0.5, "svd_rank": 5}),
        ("magnitude_prune_svd", {"density": 0.6}),
    ],
)
def test_svd_types_give_peft_deltas_and_logits(request, model, ctype, kw):
    pair = request.getfixturevalue(model)
    new = f"{ctype}_{kw.get('svd_rank')}"
    _combine_both(pair, ["a", "b", "c"], ctype, new, **kw)
    _check_svd_like(pair, new)


@pytest.mark.parametrize("ctype", ["cat", "svd", "ties_svd"])
def test_mixed_ranks_give_peft_logits(llama, ctype):
    new = f"mixed_{ctype}"
    _combine_both(llama, ["a", "d"], ctype, new, **({"density": 0.7} if ctype == "ties_svd" else {}))
    if ctype == "cat":
        assert_close(_logits(llama[1], new), _logits(llama[0], new))
    else:
        _check_svd_like(llama, new)


def test_single_adapter_is_rescaled_like_peft(llama):
    with pytest.warns(UserWarning, match="single adapter"):
        _combine_both(llama, ["b"], "svd", "single", svd_rank=2)
    assert_close(_logits(llama[1], "single"), _logits(llama[0], "single"))


def _seed_peft_draws(monkeypatch, seed):
    """Seed peft's global RNG right before its first per-module combination (after it has
    initialised the new adapter's parameters, which also draws)."""
    state = {"seeded": False}
    for attr in ("_generalized_task_arithmetic_weighted_adapter", "_svd_generalized_task_arithmetic_weighted_adapter"):
        original = getattr(LoraModel, attr)

        def wrapper(self, *args, _original=original, **kwargs):
            if not state["seeded"]:
                torch.manual_seed(seed)
                state["seeded"] = True
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(LoraModel, attr, wrapper)


@pytest.mark.parametrize("model", ["llama", "gpt2"])
@pytest.mark.parametrize("ctype", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_seeded_dare_matches_peft_draw_for_draw(request, monkeypatch, model, ctype):
    pair = request.getfixturevalue(model)
    _seed_peft_draws(monkeypatch, seed=11)
    new = f"seeded_{ctype}"
    _combine_both(pair, ["a", "b", "c"], ctype, new, density=0.5, _seed=11)
    if ctype.endswith("svd"):
        _check_svd_like(pair, new)
    else:
        assert_close(_logits(pair[1], new), _logits(pair[0], new))


@pytest.mark.parametrize("ctype,kw", [("cat", {}), ("ties_svd", {"density": 0.5})])
def test_combined_adapter_saved_by_us_loads_in_peft(llama, tmp_path, ctype, kw):
    _, ours = llama
    new = f"saved_{ctype}"
    ours.add_weighted_adapter(["a", "d"], [0.6, 0.5], new, combination_type=ctype, **kw)
    ours.save_pretrained(tmp_path, selected_adapters=[new])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / new).eval()
    with torch.no_grad():
        assert_close(loaded(input_ids()).logits, _logits(ours, new))
