"""LoRA and DoRA under bf16 autocast take the fused kernels in bf16 (issue 17, item 2): the same values and
gradients as autocast on the plain expression, fp32 gradients for the adapter, and the kernel really runs."""
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods import lora as lora_module
from deltatune.methods import dora_kernels, lora_kernels
from deltatune.native import dropout as native_dropout


def _layer(use_dora: bool, dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 40))
    model = dt.get_peft_model(base, dt.LoraConfig(r=8, target_modules=["0", "1"], use_dora=use_dora,
                                                  lora_dropout=dropout, init_lora_weights=False))
    return model


def _run(model, x, fused: bool, monkeypatch):
    if not fused:  # the plain expression under autocast, as before this path existed
        monkeypatch.setattr(lora_module.LoraLinear, "_can_fuse", lambda self, x, base: False)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16):
        y = model(x)
    y.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    monkeypatch.undo()
    return y, grads


@pytest.mark.parametrize("use_dora", [False, True])
def test_the_fused_autocast_path_matches_autocast_on_the_plain_expression(use_dora, monkeypatch):
    model = _layer(use_dora)
    x = torch.randn(4, 7, 64)
    calls = []
    fn = dora_kernels._DoraLinearFn if use_dora else lora_kernels._LoraLinearFn
    original = fn.forward
    monkeypatch.setattr(fn, "forward", staticmethod(lambda ctx, x, w, *a: calls.append(w.dtype) or original(ctx, x, w, *a)))
    fused_y, fused_g = _run(model, x, True, monkeypatch)
    assert calls == [torch.bfloat16, torch.bfloat16]  # both layers, in bf16: the kernel ran, not the plain path
    plain_y, plain_g = _run(model, x, False, monkeypatch)
    assert fused_y.dtype == plain_y.dtype == torch.bfloat16
    # Both compute the same bf16 products; they differ in where the low-rank term is rounded (the
    # kernel adds it into the bf16 output in place, autocast rounds delta and sum separately): a few
    # bf16 ulps (2^-8 relative) of the output.
    torch.testing.assert_close(fused_y.float(), plain_y.float(), rtol=2e-2, atol=2e-2)
    assert fused_g.keys() == plain_g.keys()
    for name, g in fused_g.items():
        assert g.dtype == torch.float32, name  # adapters, and so Adam's state, stay fp32
        torch.testing.assert_close(g, plain_g[name], rtol=5e-2, atol=5e-3 * plain_g[name].abs().max().item())


def test_dropout_under_autocast_keeps_the_byte_mask_and_trains():
    model = _layer(False, dropout=0.3).train()
    x = torch.randn(4, 7, 64)
    with torch.autocast("cpu", torch.bfloat16):
        y1 = model(x)
        y2 = model(x)
    assert not torch.equal(y1, y2)  # a fresh mask per forward
    y1.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(model(x), model(x))  # no dropout in eval


@pytest.mark.parametrize("compiled", [True, False])  # the compiled hash (native/dropout.py) and torch's random_
@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_dropout_masks_keep_1_minus_p_in_every_quarter_of_each_draw(p, compiled):
    # one 64-bit word feeds four elements (lora_kernels.keep_mask): each quarter must drop with probability p, and no
    # two may be tied to each other, nor to the next word's
    torch.manual_seed(0)
    with native_dropout.switched(compiled):
        mask = lora_kernels.keep_mask(torch.empty(999, 1001), p)  # not a multiple of 4: the last draw is cut
    assert mask.shape == (999, 1001) and mask.dtype == torch.bool
    quads = mask.view(-1)[: mask.numel() // 8 * 8].view(-1, 8).float()  # two words per row
    sigma = (p * (1 - p) / quads.shape[0]) ** 0.5
    for quarter in range(8):
        assert abs((1 - quads[:, quarter].mean().item()) - p) < 5 * sigma + 2**-15
    for a, b in ((0, 1), (1, 2), (2, 3), (0, 3), (0, 4), (3, 4), (2, 7)):
        both_kept = (quads[:, a] * quads[:, b]).mean().item()
        assert abs(both_kept - (1 - p) ** 2) < 5 * sigma