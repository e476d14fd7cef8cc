"""AdaLoRA numerics on hand-sized tensors: the SVD-form update, the orthogonality regulariser, the
importance EMA, the cubic budget schedule and masking to the budget (Zhang et al., 2023)."""
import dataclasses
import re
import warnings

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods.adalora import AdaLoraConfig, SVDAdapter, svd_adapters
from deltatune.methods.adalora_alloc import (
    RankAllocator,
    budget_schedule,
    keep_mask,
    orth_penalty,
    orth_regularizer,
    smoothed_importance,
    triplet_scores,
)
from tiny import input_ids, tiny_gpt2, tiny_llama
from tolerances import assert_close


def _cfg(**kw):
    kw.setdefault("total_step", 10)
    kw.setdefault("target_modules", ["q_proj", "v_proj"])
    return AdaLoraConfig(**kw)


# ---- config ----------------------------------------------------------------------------------------
def test_defaults_match_peft():
    import peft

    theirs = peft.AdaLoraConfig(total_step=10)
    for f in dataclasses.fields(AdaLoraConfig):
        if f.name not in ("target_modules", "exclude_modules", "alpha_pattern"):  # peft turns lists into sets
            assert getattr(_cfg(target_modules=None), f.name) == getattr(theirs, f.name), f.name


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(total_step=None), "total_step"),
        (dict(total_step=0), "total_step"),
        (dict(tinit=5, tfinal=5), "tinit (5) + tfinal (5)"),
        (dict(init_r=4, target_r=6), "target_r"),
        (dict(beta1=1.0), "beta1"),
        (dict(deltaT=0), "deltaT"),
        (dict(orth_reg_weight=-1.0), "orth_reg_weight"),
        (dict(use_dora=True), "DoRA"),
        (dict(init_lora_weights="gaussian"), "init_lora_weights"),
        (dict(rank_pattern={"m.lora_E": [True, False]}), "init_r=12"),
        (dict(target_modules=".*q_proj", layers_to_transform=[0]), "layers_to_transform"),
    ],
)
def test_config_errors_name_the_field(kw, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        _cfg(**kw)


def test_ignored_lora_fields_warn():
    with pytest.warns(UserWarning, match="ignores r"):
        _cfg(r=4)


def test_rank_pattern_is_frozen_and_serialises_as_lists():
    cfg = _cfg(init_r=2, target_r=1, rank_pattern={"a.lora_E": [1, 0]})
    assert cfg.rank_pattern == {"a.lora_E": (True, False)}
    assert dt.AdaLoraConfig is AdaLoraConfig and cfg.to_dict()["rank_pattern"]["a.lora_E"] == (True, False)


# ---- closed forms ----------------------------------------------------------------------------------
def _hand_adapter(base: nn.Module, alpha=6.0):
    ad = SVDAdapter(base, init_r=3, lora_alpha=alpha, dropout=0.0, init_weights=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (ad.lora_A, ad.lora_E, ad.lora_B):
            p.copy_(torch.randn(p.shape, generator=g))
    return ad


def test_svd_delta_is_sum_of_scaled_triplets():
    base = nn.Linear(5, 4, bias=True)
    ad = _hand_adapter(base, alpha=6.0)
    P, lam, Q = ad.lora_B, ad.lora_E.view(-1), ad.lora_A
    # eq. 3: ΔW = Σ_i λ_i P_i Q_iᵀ, scaled by alpha / ranknum (peft adds 1e-5 to ranknum)
    expected = sum(lam[i] * torch.outer(P[:, i], Q[i]) for i in range(3)) * 6.0 / (3 + 1e-5)
    assert_close(ad.delta_weight(base), expected)
    x = torch.randn(2, 7, 5)
    assert_close(ad(x, base, base(x)), base(x) + x @ expected.T)


def test_merge_matches_forward_and_unmerge_restores_on_conv1d():
    base = tiny_gpt2().transformer.h[0].attn.c_attn  # Conv1D stores (in, out)
    ad = _hand_adapter(base)
    x = torch.randn(2, 3, base.weight.shape[0])
    w0 = base.weight.detach().clone()
    out = ad(x, base, base(x))
    ad.merge(base)
    assert_close(base(x), out, tier="reordered")  # merged: one matmul instead of three, fp32 reassociation
    ad.unmerge(base)
    assert_close(base.weight, w0)


def test_default_init_leaves_the_model_unchanged():
    base = nn.Linear(6, 4)
    ad = SVDAdapter(base, init_r=3, lora_alpha=8, dropout=0.0, init_weights=True)
    assert torch.count_nonzero(ad.lora_E) == 0 and ad.lora_A.std() > 0
    x = torch.randn(3, 6)
    assert torch.equal(ad(x, base, base(x)), base(x))


def test_ranknum_stays_frozen_when_the_adapter_trains():
    ad = SVDAdapter(nn.Linear(4, 4), 2, 8, 0.0, True).requires_grad_(True)
    assert not ad.ranknum.requires_grad and ad.lora_A.requires_grad


# ---- orthogonality regulariser ---------------------------------------------------------------------
def test_orth_penalty_on_hand_tensors():
    A = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # Q Qᵀ − I = diag(0, 3)
    B = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])  # Pᵀ P − I = [[1, 0], [0, 0]]
    assert orth_penalty(A, B).item() == pytest.approx(3.0 + 1.0)
    # peft's R: unsquared norms, averaged over the 2 matrices of each layer
    assert orth_regularizer([(A, B), (A[:1], B[:, :1])]).item() == pytest.approx((3 + 1 + 0 + 1) / 4)
    assert orth_penalty(A[:0], B[:, :0]).item() == 0.0  # a layer pruned to rank 0


def test_forward_adds_weighted_regulariser_to_the_loss():
    x = input_ids()
    model = dt.get_peft_model(tiny_llama(), _cfg(init_r=3, target_r=2, orth_reg_weight=0.3, init_lora_weights=False))
    out = model(input_ids=x, labels=x)
    base_loss = model.base_model.model(input_ids=x, labels=x).loss
    factors = [(a.lora_A, a.lora_B) for _, a in svd_adapters(model.base_model.model, "default")]
    assert_close(out.loss, base_loss + 0.3 * orth_regularizer(factors))
    assert model(input_ids=x).loss is None


# ---- importance and budget -------------------------------------------------------------------------
def test_smoothed_importance_by_hand():
    p, g = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 3.0])
    avg, unc = smoothed_importance(p, g, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.8, 0.5)
    # I = |p g| = [1, 3]; Ī = 0.8 Ī + 0.2 I = [1.0, 0.6]; Ū = 0.5 Ū + 0.5 |I − Ī| = [0.0, 1.7]
    assert_close(avg, torch.tensor([1.0, 0.6]))
    assert_close(unc, torch.tensor([0.0, 1.7]))


def test_triplet_scores_by_hand():
    s_A = torch.tensor([[1.0, 3.0], [0.0, 0.0]])  # means (2, 0)
    s_E = torch.tensor([[10.0], [20.0]])
    s_B = torch.tensor([[2.0, 4.0], [4.0, 0.0], [0.0, 2.0]])  # column means (2, 2)
    assert_close(triplet_scores(s_A, s_E, s_B), torch.tensor([14.0, 22.0]))


@pytest.mark.parametrize(
    "step, expected",
    [(0, (24, False)), (2, (24, False)), (3, (int(16 * 0.9**3 + 8), False)), (4, (int(16 * 0.8**3 + 8), True)),
     (7, (int(16 * 0.5**3 + 8), False)), (12, (8, True)), (13, (8, True)), (15, (8, True))],
)
def test_budget_schedule_follows_the_cubic_formula(step, expected):
    # b0 = 24, bT = 8, tinit = 2, reduction until 15 - 3 = 12, masking every 2 steps
    cfg = _cfg(total_step=15, tinit=2, tfinal=3, deltaT=2)
    assert budget_schedule(step, 24, 8, cfg) == expected


def test_masking_keeps_exactly_the_budget_and_the_best_triplets():
    model = dt.get_peft_model(tiny_llama(), _cfg(init_r=4, target_r=2, init_lora_weights=False))
    adapters = svd_adapters(model.base_model.model, "default")
    alloc = RankAllocator("default", model.peft_config["default"], len(adapters))
    g = torch.Generator().manual_seed(0)
    for path, ad in adapters:
        for name in ("lora_A", "lora_E", "lora_B"):
            shape = getattr(ad, name).shape
            alloc.exp_avg_ipt[(path, name)] = torch.rand(shape, generator=g)
            alloc.exp_avg_unc[(path, name)] = torch.rand(shape, generator=g)
    scores = torch.cat([alloc.scores(p) for p, _ in adapters])
    for budget in (13, 9, 5):
        pattern = alloc.mask_to_budget(adapters, budget)
        kept = torch.tensor([b for mask in pattern.values() for b in mask])
        assert int(kept.sum()) == budget
        assert scores[kept].min() > scores[~kept].max()
        E = torch.cat([ad.lora_E.view(-1) for _, ad in adapters])
        assert torch.all(E[~kept] == 0) and torch.all(E[kept] != 0)  # fixed scores: budgets nest


def test_keep_mask_edges():
    s = torch.tensor([3.0, 1.0, 2.0])
    assert keep_mask(s, 0).all() and not keep_mask(s, 3).any()
    assert keep_mask(s, 1).tolist() == [True, False, True]


# ---- errors ------------------------------------------------------------------------------------------
def test_update_and_allocate_without_gradients_says_when_to_call_it():
    model = dt.get_peft_model(tiny_llama(), _cfg(init_r=2, target_r=1))
    with pytest.raises(ValueError, match="after loss.backward"):
        model.update_and_allocate(1)


def test_only_one_trainable_adalora_adapter():
    model = dt.get_peft_model(tiny_llama(), _cfg(init_r=2, target_r=1))
    with pytest.raises(ValueError, match="one adapter at a time"):
        model.add_adapter("second", _cfg(init_r=2, target_r=1))
    model.add_adapter("frozen", _cfg(init_r=2, target_r=1, inference_mode=True))
    assert "frozen" in model.peft_config


def test_adalora_rejects_embedding_targets():
    with pytest.raises(ValueError, match="cannot wrap"):
        dt.get_peft_model(tiny_llama(), _cfg(target_modules=["embed_tokens"]))


def test_inference_only_model_cannot_allocate(tmp_path):
    model = dt.get_peft_model(tiny_llama(), _cfg(init_r=2, target_r=1))
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(ValueError, match="is_trainable=True"):
        loaded.update_and_allocate(0)


# ---- pruned checkpoints --------------------------------------------------------------------------
def _pruned(tmp_path):
    """A tiny LLaMA adapter at init_r=3 whose rank_pattern keeps triplets {0, 2} of every layer, saved."""
    model = dt.get_peft_model(tiny_llama(), _cfg(init_r=3, target_r=1, init_lora_weights=False))
    pattern = {p + ".lora_E": [True, False, True] for p, _ in svd_adapters(model.base_model.model, "default")}
    model.peft_config["default"] = model.peft_config["default"].replace(rank_pattern=pattern)
    with torch.no_grad():  # as the allocator leaves it: pruned triplets have λ = 0
        for _, a in svd_adapters(model.base_model.model, "default"):
            a.lora_E[1] = 0.0
    model.save_pretrained(tmp_path)
    return model.eval()


def test_failed_load_leaves_the_layers_unchanged(tmp_path):
    from deltatune.io.checkpoint import load_weights
    from deltatune.methods.base import get_method

    _pruned(tmp_path)
    bad = dict(load_weights(tmp_path))
    bad.pop(next(iter(bad)))
    fresh = dt.get_peft_model(tiny_llama(), _cfg(init_r=3, target_r=1))
    pattern = {p + ".lora_E": [True, False, True] for p, _ in svd_adapters(fresh.base_model.model, "default")}
    fresh.peft_config["default"] = fresh.peft_config["default"].replace(rank_pattern=pattern)
    with pytest.raises(ValueError, match="missing"):
        fresh.load_adapter_state_dict(bad, "default")
    assert {a.r for _, a in svd_adapters(fresh.base_model.model, "default")} == {3}


def test_training_resumes_from_a_pruned_checkpoint(tmp_path):
    _pruned(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    adapters = svd_adapters(model.base_model.model, "default")
    assert all(a.r == 2 and a.positions == (0, 2) and a.lora_A.requires_grad for _, a in adapters)
    x = input_ids()
    model(input_ids=x, labels=x).loss.backward()
    model.update_and_allocate(9)  # the last reduction step: budget 4 of the 8 triplets left
    pattern = model.peft_config["default"].rank_pattern
    assert all(len(m) == 3 and not m[1] for m in pattern.values())  # init_r-long; pruned stays pruned
    assert sum(map(sum, pattern.values())) == 4


def test_default_targets_are_peft_adalora_ones_and_are_saved(tmp_path):
    model = dt.get_peft_model(tiny_llama(), _cfg(target_modules=None, init_r=2, target_r=1))
    assert model.peft_config["default"].target_modules == ("q_proj", "v_proj")
    model.save_pretrained(tmp_path)
    assert '"q_proj"' in (tmp_path / "adapter_config.json").read_text()
    from transformers import MistralConfig, MistralForCausalLM

    mistral = MistralForCausalLM(MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="no AdaLoRA default for model type 'mistral'"):
        dt.get_peft_model(mistral, _cfg(target_modules=None))


def test_peft_state_dict_functions_use_the_pruned_ranks(tmp_path):
    model = _pruned(tmp_path)
    sd = dt.get_peft_model_state_dict(model)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A"
    assert sd[key].shape == (2, 32) and not any(k.endswith("ranknum") for k in sd)
    fresh = dt.get_peft_model(tiny_llama(), model.peft_config["default"].replace(inference_mode=False))
    dt.set_peft_model_state_dict(fresh, sd)
    x = input_ids()
    assert_close(fresh(input_ids=x).logits, model(input_ids=x).logits)
