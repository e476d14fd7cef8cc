"""Tier (a): LoRA, rsLoRA and DoRA against closed forms on hand-sized tensors, and the fused kernels'
gradients against autograd on the plain expression."""
import math

import pytest
import torch
from torch import nn

from deltatune import LoraConfig, get_peft_model
from deltatune.methods.lora import dora_weight_norm, lora_scaling, merged_inference
from deltatune.methods.dora_kernels import dora_linear
from deltatune.methods.lora_kernels import lora_linear
from tolerances import assert_close


def _one_layer(use_dora=False, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2, bias=True))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]]))
        model[0].bias.copy_(torch.tensor([0.5, -0.5]))
    pm = get_peft_model(model, LoraConfig(r=1, lora_alpha=2, target_modules=["0"], use_dora=use_dora, **kw))
    adapter = pm.base_model.model[0].adapters["default"]
    with torch.no_grad():
        adapter.lora_A.copy_(torch.tensor([[1.0, 0.0, 1.0]]))  # (r=1, in=3)
        adapter.lora_B.copy_(torch.tensor([[2.0], [1.0]]))  # (out=2, r=1)
    return pm, adapter


def test_lora_output_by_hand():
    pm, _ = _one_layer()
    x = torch.tensor([[1.0, 1.0, 1.0]])
    # W x + b = [3.5, 1.5]; A x = 2; B (A x) = [4, 2]; scale alpha/r = 2 -> [8, 4]
    assert_close(pm(x), torch.tensor([[11.5, 5.5]]))


def test_rslora_scale():
    assert lora_scaling(16, 4, use_rslora=True) == pytest.approx(8.0)
    assert lora_scaling(16, 4, use_rslora=False) == pytest.approx(4.0)
    pm, adapter = _one_layer(use_rslora=True)
    assert adapter.scaling == pytest.approx(2 / math.sqrt(1))


def test_dora_magnitude_and_output_by_hand():
    pm, adapter = _one_layer(use_dora=True)
    W = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]])
    # Magnitude was initialised with B = 0 (default init): ‖W‖_row.
    assert_close(adapter.lora_magnitude_vector.detach(), W.norm(dim=1))
    V = W + 2 * torch.tensor([[2.0], [1.0]]) @ torch.tensor([[1.0, 0.0, 1.0]])  # W + s B A
    x = torch.tensor([[1.0, 1.0, 1.0]])
    expected = (W.norm(dim=1) / V.norm(dim=1)) * (x @ V.T) + torch.tensor([0.5, -0.5])
    assert_close(pm(x), expected)


def test_dora_weight_norm_matches_explicit():
    g = torch.Generator().manual_seed(0)
    W, A, B = torch.randn(7, 5, generator=g), torch.randn(3, 5, generator=g), torch.randn(7, 3, generator=g)
    assert_close(dora_weight_norm(W, A, B, 0.7), (W + 0.7 * B @ A).norm(dim=1))


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_lora_gradients_match_autograd(dropout, bias):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(5, 6, dtype=torch.float64, generator=g)
    b = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    A = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.rand(2, 4, 6, generator=g) > 0.3 if dropout else None
    keep = 1 / 0.7 if dropout else 1.0
    inputs = [t for t in (x, b, A, B) if t is not None]

    def reference():
        xd = x if mask is None else x * mask * keep
        out = x @ W.T + 1.5 * (xd @ A.T) @ B.T
        return out if b is None else out + b

    fused = lora_linear(x, W, b, A, B, 1.5, mask, keep)
    assert_close(fused, reference())
    grad = torch.randn_like(fused)
    got = torch.autograd.grad(fused, inputs, grad)
    want = torch.autograd.grad(reference(), inputs, grad)
    for a, e in zip(got, want):
        assert_close(a, e)


def test_fused_lora_dropout_in_fp32_matches_the_closed_form():
    # fp32 takes the compiled masked copy and gradient term (native/dropout.py) where they run; the closed form
    # is evaluated in float64 on the same values
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 40, 24, generator=g, requires_grad=True)
    W, b = torch.randn(20, 24, generator=g), torch.randn(20, generator=g, requires_grad=True)
    A = torch.randn(4, 24, generator=g, requires_grad=True)
    B = torch.randn(20, 4, generator=g, requires_grad=True)
    mask, keep = torch.rand(3, 40, 24, generator=g) > 0.3, 1 / 0.7
    fused = lora_linear(x, W, b, A, B, 1.5, mask, keep)
    grad = torch.randn(fused.shape, generator=g)
    got = torch.autograd.grad(fused, (x, b, A, B), grad)
    x64, b64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, b, A, B))
    want_y = x64 @ W.double().T + 1.5 * ((x64 * mask * keep) @ A64.T) @ B64.T + b64
    want = torch.autograd.grad(want_y, (x64, b64, A64, B64), grad.double())
    assert_close(fused, want_y.float(), tier="reordered")
    for a, e in zip(got, want):
        assert_close(a, e.float(), tier="reordered")


def test_fused_dora_gradients_match_autograd():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(5, 6, dtype=torch.float64, generator=g)
    A = torch.randn(2, 6, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(5, 2, dtype=torch.float64, generator=g, requires_grad=True)
    m = torch.rand(5, dtype=torch.float64, generator=g).add(0.5).requires_grad_(True)
    bias = torch.randn(5, dtype=torch.float64, generator=g)

    def reference():
        norm = (W + 0.5 * B @ A).norm(dim=1).detach()  # DoRA §4.3: the norm is a constant
        return (m / norm) * (x @ W.T + 0.5 * (x @ A.T) @ B.T) + bias

    norm = dora_weight_norm(W, A.detach(), B.detach(), 0.5).to(torch.float64)
    fused = dora_linear(x, W, bias, A, B, 0.5, m / norm, m)
    assert_close(fused, reference())
    grad = torch.randn_like(fused)
    got = torch.autograd.grad(fused, [x, A, B, m], grad)
    want = torch.autograd.grad(reference(), [x, A, B, m], grad)
    for a, e in zip(got, want):
        assert_close(a, e)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merged_inference_uses_the_merged_weight_with_the_same_result(use_dora):
    """Inside merged_inference the layer forms W + sBA (DoRA: times m/‖·‖) instead of two skinny matmuls,
    for few tokens and many alike. Same output as the low-rank path; the stored weight is untouched;
    outside the context no batch size takes the merged path."""
    torch.manual_seed(0)
    pm = get_peft_model(nn.Sequential(nn.Linear(16, 24)),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=use_dora, init_lora_weights=False))
    pm.eval()
    layer = pm.base_model.model[0]
    adapter, W0 = layer.adapters["default"], layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        adapter.lora_B.normal_()
    merged_calls = []
    real = adapter.merged_forward
    adapter.merged_forward = lambda *a: merged_calls.append(1) or real(*a)
    x = torch.randn(5, 40, 16)  # 200 tokens
    with merged_inference(pm):
        assert not torch.is_grad_enabled()
        fast, few = pm(x), pm(x[:1, :2])  # 200 tokens and 2 tokens
    assert len(merged_calls) == 2 and not adapter.run_merged
    with torch.no_grad():
        slow, few_slow = pm(x), pm(x[:1, :2])  # the default inference path: the low-rank kernels
    assert len(merged_calls) == 2
    W = W0 + adapter.scaling * adapter.lora_B.detach() @ adapter.lora_A.detach()
    if use_dora:
        W = (adapter.lora_magnitude_vector.detach() / W.norm(dim=1))[:, None] * W
    assert_close(fast, x @ W.T + layer.base_layer.bias.detach())
    assert_close(fast, slow)
    assert_close(few, few_slow)
    assert torch.equal(layer.base_layer.weight, W0)
