"""LoRA and DoRA on a base whose output is computed first (4-bit/8-bit layers, transformers' Conv1D, several
adapters on one layer) add their term in one autograd node (lora_kernels.lora_add, dora_kernels.dora_add): the
values and gradients of the plain expressions base(x) + s · (x̃ Aᵀ) Bᵀ, with the fused path's dropout mask,
and c ⊙ (base(x) − b + s · (x Aᵀ) Bᵀ) + b."""
import pytest
import torch
from tolerances import assert_close
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.methods import lora_kernels
from deltatune.methods.base import dense_weight
from deltatune.methods.dora_kernels import dora_weight_norm
from deltatune.quant import Linear4bit, Linear8bit

P = 0.3


def _base(kind: str) -> nn.Module:
    torch.manual_seed(0)
    first, second = nn.Linear(64, 48), nn.Linear(48, 40)
    if kind == "nf4":
        first, second = Linear4bit.from_linear(first), Linear4bit.from_linear(second)
    elif kind == "int8":
        first, second = Linear8bit.from_linear(first), Linear8bit.from_linear(second)
    elif kind == "conv1d":
        first, second = Conv1D(48, 64), Conv1D(40, 48)
    return nn.Sequential(first, nn.ReLU(), second)


def _plain(adapted, x: torch.Tensor, masks: dict) -> torch.Tensor:
    """The expression with autograd, on the adapted model's own base layers and factors."""
    h = x
    for i in (0, 2):
        layer = adapted.get_submodule(f"base_model.model.{i}")
        out = layer.base_layer(h)
        for name in layer.active:
            a = layer.adapters[name]
            hd = h if a.dropout_p == 0 else h * masks[h.shape] / (1 - a.dropout_p)
            delta = a.scaling * (hd @ a.lora_A.T) @ a.lora_B.T
            if not a.use_dora:
                out = out + delta
                continue
            # DoRA as peft runs it: W x + b + (c − 1) ⊙ W x̃ + c ⊙ s B A x̃, c = m / ‖W + s B A‖ with the norm
            # detached; without dropout (x̃ = x) that is c ⊙ (W x + s B A x) + b
            W = dense_weight(layer.base_layer)
            c = a.lora_magnitude_vector / dora_weight_norm(W, a.lora_A.detach(), a.lora_B.detach(), a.scaling)
            out = out + (c - 1) * (hd @ W.T) + c * delta
        h = torch.relu(out) if i == 0 else out
    return h


def _grads(model, x) -> dict:
    return {"x": x.grad, **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}


CASES = [(kind, variant) for kind in ("nf4", "int8", "conv1d")
         for variant in ("lora", "lora_dropout", "dora", "dora_trained_bias", "dora_dropout")]
CASES.append(("linear", "dora_dropout"))  # a dense base too: its fused kernel has no dropout for DoRA


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_one_node_adds_the_low_rank_term_with_the_plain_expressions_gradients(kind, variant, monkeypatch):
    masks = {}  # one fixed draw per input shape, so both sides drop the same elements
    monkeypatch.setattr(lora_kernels, "keep_mask", lambda x, p: masks.setdefault(x.shape, torch.rand(x.shape) > p))
    base = _base(kind)
    model = dt.get_peft_model(base, dt.LoraConfig(r=8, target_modules=["0", "2"], init_lora_weights=False,
                                                  lora_dropout=P if variant.endswith("dropout") else 0.0,
                                                  use_dora=variant.startswith("dora"))).train()
    if variant.startswith("dora"):  # magnitudes away from the norms they start at, so c is not 1
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "magnitude" in name:
                    p.mul_(torch.rand_like(p) + 0.5)
    if variant == "dora_trained_bias":  # as with bias="all": b's gradient runs through base_out and past it
        for i in (0, 2):
            model.get_submodule(f"base_model.model.{i}").base_layer.bias.requires_grad_(True)
    x = torch.randn(4, 9, 64, requires_grad=True)
    y = model(x)
    # the node ran, not autograd on the expression
    node = {"dora": "_DoraAddFn", "dora_trained_bias": "_DoraAddFn", "dora_dropout": "_DoraDroppedFn"}
    assert type(y.grad_fn).__name__ == node.get(variant, "_LoraAddFn") + "Backward"
    y.square().mean().backward()
    got = _grads(model, x)
    x.grad = None
    model.zero_grad(set_to_none=True)
    ref = _plain(model, x, masks)
    assert_close(y, ref, tier="reordered")
    ref.square().mean().backward()
    want = _grads(model, x)
    # x; A, B (, m, b) of both layers
    assert got.keys() == want.keys() and len(got) == {"dora_trained_bias": 9}.get(variant, 7 if "dora" in variant else 5)
    for name in got:
        assert_close(got[name], want[name], tier="reordered")


def test_several_adapters_on_one_layer_each_add_their_term_and_leave_the_base_output_alone():
    base = _base("linear")
    model = dt.get_peft_model(base, dt.LoraConfig(r=8, target_modules=["0", "2"], init_lora_weights=False))
    model.add_adapter("other", dt.LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    model.base_model.set_adapter(["default", "other"])
    x = torch.randn(3, 64, requires_grad=True)
    y = model(x)
    y.sum().backward()
    got = _grads(model, x)
    x.grad = None
    model.zero_grad(set_to_none=True)
    ref = _plain(model, x, {})
    assert_close(y, ref, tier="reordered")
    ref.sum().backward()
    want = _grads(model, x)
    assert got.keys() == want.keys() and len(got) == 9
    for name in got:
        assert_close(got[name], want[name], tier="reordered")


def test_under_bf16_autocast_the_node_runs_in_bf16_and_adapter_gradients_stay_fp32(monkeypatch):
    calls = []
    original = lora_kernels._LoraAddFn.forward
    monkeypatch.setattr(lora_kernels._LoraAddFn, "forward",
                        staticmethod(lambda ctx, x, base_out, A, *a: calls.append(A.dtype) or original(ctx, x, base_out, A, *a)))
    base = _base("nf4")
    model = dt.get_peft_model(base, dt.LoraConfig(r=8, target_modules=["0", "2"], init_lora_weights=False))
    x = torch.randn(4, 9, 64)
    with torch.autocast("cpu", torch.bfloat16):
        y = model(x)
        ref = _plain(model, x, {})
    assert calls == [torch.bfloat16, torch.bfloat16] and y.dtype == ref.dtype == torch.bfloat16
    # the same bf16 products; the low-rank term is rounded once into the sum here, twice in the expression
    assert_close(y.float(), ref.float(), dtype=torch.bfloat16, tier="reordered")
    y.float().square().mean().backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_dora_with_dropout_under_bf16_autocast_runs_its_node_in_bf16(monkeypatch):
    masks = {}
    monkeypatch.setattr(lora_kernels, "keep_mask", lambda x, p: masks.setdefault(x.shape, torch.rand(x.shape) > p))
    base = _base("linear")
    model = dt.get_peft_model(base, dt.LoraConfig(r=8, target_modules=["0", "2"], init_lora_weights=False,
                                                  use_dora=True, lora_dropout=P)).train()
    x = torch.randn(4, 9, 64)
    with torch.autocast("cpu", torch.bfloat16):
        y = model(x)
        ref = _plain(model, x, masks)
    assert type(y.grad_fn).__name__ == "_DoraDroppedFnBackward" and y.dtype == torch.bfloat16
    # bf16 products in both (the reference promotes its sums with c to fp32): a few bf16 ulps apart
    assert_close(y.float(), ref.float(), dtype=torch.bfloat16, tier="reordered", scale=2)
    y.float().square().mean().backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
