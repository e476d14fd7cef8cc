"""Parity of combine_lora_factors with real peft's add_weighted_adapter, module by module.

Each test builds a tiny model with real peft adapters, lets peft combine them, and runs our
per-module function on the same factors. Linear-family and cat results are compared factor by
factor; svd types by the delta B @ A * scaling, since singular vectors are only unique up to sign.
DARE types are compared exactly by seeding torch's global RNG at the point peft starts drawing and
threading one generator with the same seed through our modules in the same order.
"""
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer, LoraModel

from deltatune.combine import LoraFactors, combine_lora_factors, pad_rank, plan_combination
from deltatune.combine.svd import quantile_clamp
from tiny import tiny_gpt2, tiny_llama
from tolerances import assert_close

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc", "wte"]  # Conv1D (fan_in_fan_out) and an embedding
# name -> (r, lora_alpha): different scalings, and one adapter of another rank.
ADAPTERS = {"a": (4, 8), "b": (4, 16), "c": (4, 3), "d": (6, 6)}
WEIGHTS = [0.7, -0.4, 1.3]
# Rounding differs between peft's dense full SVD and our QR route; deltas are O(1) sums of a few
# hundred fp32 products, so 10x the fp32 tolerance.
SVD_SCALE = 10


def _factors(layer: LoraLayer, name: str) -> LoraFactors | None:
    if name in layer.lora_A:
        A, B, fifo = layer.lora_A[name].weight, layer.lora_B[name].weight, getattr(layer, "fan_in_fan_out", False)
    elif name in layer.lora_embedding_A:
        A, B, fifo = layer.lora_embedding_A[name], layer.lora_embedding_B[name], True  # weight is (in, out)
    else:
        return None
    return LoraFactors(A.detach().clone(), B.detach().clone(), float(layer.scaling[name]), fifo)


def _lora_layers(peft_model) -> list[LoraLayer]:
    return [m for m in peft_model.base_model.model.modules() if isinstance(m, LoraLayer)]


def _build(model, targets):
    pm = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about Conv1D fan_in_fan_out and embedding targets
        for name, (r, alpha) in ADAPTERS.items():
            cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
            if pm is None:
                pm = get_peft_model(model, cfg, adapter_name=name)
            else:
                pm.add_adapter(name, cfg)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for layer in _lora_layers(pm):
            for name in ADAPTERS:  # non-zero A and B for every adapter, embeddings included
                for p in (layer.lora_A, layer.lora_B, layer.lora_embedding_A, layer.lora_embedding_B):
                    if name in p:
                        t = p[name].weight if hasattr(p[name], "weight") else p[name]
                        t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return pm


@pytest.fixture(scope="module")
def llama():
    return _build(tiny_llama(), LLAMA_TARGETS)


@pytest.fixture(scope="module")
def gpt2():
    return _build(tiny_gpt2(), GPT2_TARGETS)


def _seed_peft_draws(monkeypatch, seed):
    """Seed the global RNG right before peft's first per-module combination (after it has
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


def _check(pm, adapters, ctype, new, *, by_delta, seed=None, **kw):
    weights = WEIGHTS[: len(adapters)]
    pm.add_weighted_adapter(adapters, weights, new, combination_type=ctype, **kw)
    plan = plan_combination(ctype, [ADAPTERS[a][0] for a in adapters], svd_rank=kw.get("svd_rank"))
    assert (pm.peft_config[new].r, pm.peft_config[new].lora_alpha) == (plan.r, plan.lora_alpha)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    svd_kw = {"svd_rank": plan.r, "svd_clamp": kw.get("svd_clamp")} if plan.combination_type.endswith("svd") else {}
    layers = _lora_layers(pm)
    assert len(layers) > 0
    for layer in layers:
        present = [(f, w) for a, w in zip(adapters, weights) if (f := _factors(layer, a)) is not None]
        ours = combine_lora_factors(
            [f for f, _ in present], [w for _, w in present], plan.combination_type,
            density=kw.get("density"), majority_sign_method=kw.get("majority_sign_method", "total"),
            generator=generator, **svd_kw,
        )
        ours = pad_rank(ours, plan.r) if plan.combination_type == "cat" else ours
        theirs = _factors(layer, new)
        assert theirs.scaling == 1.0
        if by_delta:
            assert_close(ours.delta_weight(), theirs.delta_weight(), scale=SVD_SCALE)
        else:
            assert_close(ours.A, theirs.A)
            assert_close(ours.B, theirs.B)


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
def test_factorwise_types_match_peft(llama, adapters, ctype, kw):
    _check(llama, adapters, ctype, f"{ctype}_{len(adapters)}_{len(kw)}", by_delta=False, **kw)


@pytest.mark.parametrize("adapters", [["a", "b"], ["a", "b", "c"]], ids=["two", "three"])
@pytest.mark.parametrize(
    "ctype,kw",
    [
        ("svd", {}),
        ("svd", {"svd_rank": 3}),
        ("ties_svd", {"density": 0.5, "svd_rank": 5}),
        ("ties_svd", {"density": 0.5, "majority_sign_method": "frequency"}),
        ("magnitude_prune_svd", {"density": 0.6, "svd_rank": 4}),
    ],
)
def test_svd_types_match_peft(llama, adapters, ctype, kw):
    _check(llama, adapters, ctype, f"{ctype}_{len(adapters)}_{len(kw)}_{kw.get('svd_rank')}", by_delta=True, **kw)


@pytest.mark.parametrize("ctype", ["cat", "svd"])
def test_mixed_ranks_match_peft(llama, ctype):
    _check(llama, ["a", "d"], ctype, f"mixed_{ctype}", by_delta=ctype == "svd", svd_rank=None)


def test_single_adapter_becomes_linear_like_peft(llama):
    _check(llama, ["b"], "svd", "single_svd", by_delta=False, svd_rank=2)


@pytest.mark.parametrize(
    "ctype,kw",
    [
        ("dare_linear", {}),
        ("dare_ties", {"majority_sign_method": "frequency"}),
        ("dare_linear_svd", {"svd_rank": 4}),
        ("dare_ties_svd", {}),
    ],
)
def test_dare_types_match_peft_draw_for_draw(llama, gpt2, monkeypatch, ctype, kw):
    for name, pm in (("llama", llama), ("gpt2", gpt2)):  # gpt2: Conv1D + embedding layouts
        _seed_peft_draws(monkeypatch, seed=11)
        _check(pm, ["a", "b", "c"], ctype, f"{ctype}_{name}", by_delta=ctype.endswith("svd"), seed=11, density=0.5, **kw)


@pytest.mark.parametrize("ctype", ["ties_svd", "magnitude_prune_svd"])
def test_fan_in_fan_out_layers_match_peft(gpt2, ctype):
    _check(gpt2, ["a", "b"], ctype, f"{ctype}_gpt2", by_delta=True, density=0.5)


def test_svd_clamp_step_matches_peft(llama):
    # Clamping uses signed quantiles, so it depends on the sign of each singular-vector pair; we
    # check the step itself on peft's own unclamped factors (same solver, same signs).
    llama.add_weighted_adapter(["a", "b"], [0.7, -0.4], "unclamped", combination_type="svd", svd_rank=3)
    llama.add_weighted_adapter(["a", "b"], [0.7, -0.4], "clamped", combination_type="svd", svd_rank=3, svd_clamp=0.9)
    for layer in _lora_layers(llama):
        raw, clamped = _factors(layer, "unclamped"), _factors(layer, "clamped")
        B, A = quantile_clamp(raw.B, raw.A, 0.9)
        assert_close(B, clamped.B)
        assert_close(A, clamped.A)
