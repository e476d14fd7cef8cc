"""Merged single-adapter serving: swaps give the adapter's model, and 100 swaps leave no drift."""
import pytest
import torch

import deltatune as dt
from deltatune.serving import MergedAdapterSwitcher
from tiny import input_ids, tiny_gpt2, tiny_llama
from tolerances import assert_close

CONFIGS = {
    "lora": dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    "dora": dt.LoraConfig(r=8, use_dora=True, target_modules="all-linear", init_lora_weights=False),
    "ia3": dt.IA3Config(init_ia3_weights=False),
}
Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("switch")
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        model = dt.get_peft_model(tiny_llama(), cfg)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)
        model.save_pretrained(root / name)
    return root


def _switcher(root, exact=True):
    model = tiny_llama()
    switcher = MergedAdapterSwitcher(model, exact=exact)
    for name in CONFIGS:
        switcher.load(name, root / name)
    return model, switcher


@torch.no_grad()
def test_each_switch_gives_that_adapters_model(saved):
    model, switcher = _switcher(saved)
    x = input_ids(batch=2, seq=6)
    base = model(input_ids=x).logits
    for name in ["dora", "lora", "ia3", "lora"]:
        switcher.switch(name)
        ref = dt.PeftModel.from_pretrained(tiny_llama(), saved / name)(input_ids=x).logits
        assert_close(model(input_ids=x).logits, ref)
    switcher.switch(None)
    assert torch.equal(model(input_ids=x).logits, base)


@torch.no_grad()
def test_no_drift_after_100_swaps(saved):
    model, switcher = _switcher(saved)
    W0 = model.get_submodule(Q).weight.detach().clone()
    biases = {n: m.bias.clone() for n, m in model.named_modules() if getattr(m, "bias", None) is not None}
    switcher.switch("lora")
    first = {n: p.detach().clone() for n, p in model.named_parameters()}
    for k in range(100):
        switcher.switch(["dora", "ia3", "lora"][k % 3])
    switcher.switch("lora")
    for n, p in model.named_parameters():
        assert torch.equal(p, first[n]), n  # bit for bit what the first merge gave
    A, B = (switcher.adapters["lora"][Q].lora_A.double(), switcher.adapters["lora"][Q].lora_B.double())
    exact = W0.double() + switcher.adapters["lora"][Q].scaling * B @ A  # pristine base + delta, in float64
    ulp = torch.finfo(torch.float32).eps * exact.abs().max().item()
    assert (model.get_submodule(Q).weight.double() - exact).abs().max().item() <= ulp
    switcher.switch(None)
    assert torch.equal(model.get_submodule(Q).weight, W0)
    assert all(torch.equal(model.get_submodule(n).bias, b) for n, b in biases.items())


@torch.no_grad()
def test_literal_subtract_add_mode_stays_close(saved):
    # Without the pristine copy, swaps round twice each; the error stays within fp32 tolerance here
    # but is not zero (see the swap table in benchmarks/bench_serving.py).
    model, switcher = _switcher(saved, exact=False)
    ref_model, ref = _switcher(saved)
    ref.switch("dora")
    for k in range(100):
        switcher.switch(["dora", "ia3", "lora"][k % 3])
    switcher.switch("dora")
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert_close(p, q)


@torch.no_grad()
def test_conv1d_and_errors(tmp_path):
    cfg = dt.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    peft_model = dt.get_peft_model(tiny_gpt2(), cfg)
    peft_model.save_pretrained(tmp_path)
    model = tiny_gpt2()
    switcher = MergedAdapterSwitcher(model)
    switcher.load("g", tmp_path)
    x = input_ids(batch=1, seq=5)
    switcher.switch("g")
    assert_close(model(input_ids=x).logits, peft_model.eval()(input_ids=x).logits)
    with pytest.raises(ValueError, match="no adapter named 'h'"):
        switcher.switch("h")
    with pytest.raises(ValueError, match="already loaded"):
        switcher.load("g", tmp_path)
    switcher.remove("g")
    assert switcher.current is None
    assert_close(model(input_ids=x).logits, tiny_gpt2()(input_ids=x).logits)
