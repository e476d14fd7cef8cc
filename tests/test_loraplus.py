"""LoRA+ (``deltatune.optimizers.create_loraplus_optimizer``) against peft's: the same parameter groups (count,
order, lr, weight decay, which parameters with which shapes), the same weights after one optimizer step, and a
clear error on a model without LoRA parameters."""
from __future__ import annotations

import re
import warnings

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as peft_loraplus

import deltatune as dt
from deltatune.optimizers import create_loraplus_optimizer
from tiny import input_ids, perturb, tiny_gpt2, tiny_llama
from tolerances import assert_close

# name -> (base model builder, LoraConfig fields): linear LoRA, LoRA on the embedding too, DoRA (its 1-D
# magnitude goes to the B group), and GPT-2 with a LayerNorm in modules_to_save (the B group without decay).
CASES = {
    "llama_qv": (tiny_llama, dict(target_modules=["q_proj", "v_proj"])),
    "llama_embedding": (tiny_llama, dict(target_modules=["embed_tokens", "q_proj", "v_proj"])),
    "llama_dora": (tiny_llama, dict(target_modules=["q_proj", "v_proj"], use_dora=True)),
    "gpt2_layernorm": (tiny_gpt2, dict(target_modules=["c_attn", "wte"], modules_to_save=["ln_f"])),
}


def _pair(case):
    """The same LoRA model built by peft and by deltatune, with equal (perturbed, so B is not zero) weights."""
    build, fields = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = perturb(peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, **fields)), seed=3)
    mine = dt.get_peft_model(build(), dt.LoraConfig(r=4, lora_alpha=8, **fields))
    dt.set_peft_model_state_dict(mine, peft.get_peft_model_state_dict(theirs))
    return theirs, mine


def _peft_key(name: str) -> str:
    name = re.sub(r"\.(lora_A|lora_B|lora_magnitude_vector)\.default\.weight$", r".\1", name)
    return re.sub(r"\.lora_embedding_(A|B)\.default$", r".lora_\1", name)


def _our_key(name: str) -> str:
    return name.replace(".adapters.default.", ".")


def _groups(model, optimizer, key):
    """Per group: lr, weight decay, and {canonical parameter name: shape}."""
    names = {id(p): key(n) for n, p in model.named_parameters()}
    return [
        (g["lr"], g["weight_decay"], {names[id(p)]: tuple(p.shape) for p in g["params"]}, len(g["params"]))
        for g in optimizer.param_groups
    ]


@pytest.mark.parametrize("case", sorted(CASES))
def test_parameter_groups_match_peft(case):
    theirs, mine = _pair(case)
    kw = dict(lr=2e-4, loraplus_lr_ratio=16, loraplus_lr_embedding=3e-5, loraplus_weight_decay=0.1, betas=(0.8, 0.9))
    expected = _groups(theirs, peft_loraplus(theirs, torch.optim.AdamW, **kw), _peft_key)
    opt = create_loraplus_optimizer(mine, torch.optim.AdamW, **kw)
    assert _groups(mine, opt, _our_key) == expected
    assert len(opt.param_groups) == 4 and opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["lr"] == 2e-4
    # every trainable parameter is in exactly one group
    trainable = {id(p) for p in mine.parameters() if p.requires_grad}
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(trainable)


def test_groups_hold_what_the_case_is_about():
    """The cases above do reach each group: embedding LoRA, DoRA magnitude with B, LayerNorm without decay."""
    _, mine = _pair("llama_embedding")
    opt = create_loraplus_optimizer(mine, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=4)
    a, emb, b, b_nd = opt.param_groups
    assert [len(g["params"]) for g in opt.param_groups] == [4, 2, 4, 0]
    assert (a["lr"], emb["lr"], b["lr"], b_nd["lr"]) == (0.1, 1e-6, 0.4, 0.4)
    _, mine = _pair("llama_dora")
    b = create_loraplus_optimizer(mine, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=4).param_groups[2]
    assert sorted(p.ndim for p in b["params"]) == [1] * 4 + [2] * 4
    _, mine = _pair("gpt2_layernorm")
    b_nd = create_loraplus_optimizer(mine, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=4).param_groups[3]
    assert sorted(tuple(p.shape) for p in b_nd["params"]) == [(32,), (32,)] and b_nd["weight_decay"] == 0.0


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_step_matches_peft(case):
    """One SGD step (weight decay on) on the same batch: the same updated weights. SGD, not Adam: Adam's first
    step is about lr * sign(grad), which a last-ulp gradient difference on a near-zero entry can flip. The models
    stay in eval mode (GPT-2's dropout off); gradients flow all the same."""
    theirs, mine = _pair(case)
    kw = dict(lr=0.05, loraplus_lr_ratio=8, loraplus_lr_embedding=0.02, loraplus_weight_decay=0.1)
    x = input_ids(batch=2, seq=8, seed=5)
    before = {k: v.clone() for k, v in peft.get_peft_model_state_dict(theirs).items()}
    for model, make in ((theirs, peft_loraplus), (mine, create_loraplus_optimizer)):
        opt = make(model, torch.optim.SGD, **kw)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
    after_theirs = peft.get_peft_model_state_dict(theirs)
    after_mine = dt.get_peft_model_state_dict(mine)
    assert after_mine.keys() == after_theirs.keys()
    trained = [k for k in after_theirs if ".base_layer." not in k]  # not peft's saved (frozen) base embedding
    assert len(trained) >= 4
    for k in trained:
        assert_close(after_mine[k], after_theirs[k], tier="reordered")  # same math, gradients summed apart
        # the step moved every trained tensor, so the comparison means something
        assert not torch.equal(after_theirs[k], before[k]), k


def test_b_moves_ratio_times_faster_than_a():
    """With plain SGD and no decay, B's step is exactly ratio x lr x grad, A's lr x grad."""
    _, mine = _pair("llama_qv")
    opt = create_loraplus_optimizer(mine, torch.optim.SGD, lr=0.01, loraplus_lr_ratio=16)
    layer = mine.base_model.model.model.layers[0].self_attn.q_proj.adapters["default"]
    a0, b0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    x = input_ids(seed=7)
    mine(input_ids=x, labels=x).loss.backward()
    ga, gb = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    opt.step()
    assert_close(layer.lora_A.detach(), a0 - 0.01 * ga)
    assert_close(layer.lora_B.detach(), b0 - 0.16 * gb)


def test_the_peft_call_from_the_docs_works_with_keywords():
    _, mine = _pair("llama_qv")
    opt = create_loraplus_optimizer(model=mine, optimizer_cls=torch.optim.Adam, lr=5e-5, loraplus_lr_ratio=16)
    assert sorted({g["lr"] for g in opt.param_groups if g["params"]}) == [5e-5, 5e-5 * 16]


def test_no_lora_parameters_is_a_clear_error():
    ia3 = dt.get_peft_model(tiny_llama(), dt.IA3Config(target_modules=["k_proj", "down_proj"],
                                                      feedforward_modules=["down_proj"]))
    with pytest.raises(ValueError, match="no trainable LoRA parameter.*LoraConfig"):
        create_loraplus_optimizer(ia3, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16)
    with pytest.raises(ValueError, match="no trainable LoRA parameter"):
        create_loraplus_optimizer(tiny_llama(), torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16)
    _, frozen = _pair("llama_qv")
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable LoRA parameter"):
        create_loraplus_optimizer(frozen, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16)
