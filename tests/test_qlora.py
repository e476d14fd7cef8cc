"""QLoRA: LoRA and DoRA on 4-bit (NF4, double-quantized) and 8-bit bases, through the same configs."""
import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.quant import Linear4bit, QuantConfig, quantize_model
from tiny import input_ids, tiny_llama
from tolerances import assert_close


def _pair(use_dora: bool, bits: int = 4):
    """The same LoRA on a quantized Linear and on a plain Linear holding the dequantized weight."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(128, 64, bias=True))
    quant = quantize_model(copy.deepcopy(dense), QuantConfig(bits=bits, skip_modules=()))
    assert not isinstance(quant[0], nn.Linear)
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        ref[0].weight.copy_(quant[0].dequantize_weight().float())
    cfg = dt.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False, use_dora=use_dora)
    pq, pr = dt.get_peft_model(quant, cfg), dt.get_peft_model(ref, cfg)
    with torch.no_grad():
        a, b = pq.base_model.model[0].adapters["default"], pr.base_model.model[0].adapters["default"]
        for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
            if getattr(a, name) is not None:
                getattr(b, name).copy_(getattr(a, name))
    return pq, pr


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_lora_on_quantized_equals_lora_on_dequantized_weight(use_dora, bits):
    pq, pr = _pair(use_dora, bits)
    x = torch.randn(3, 5, 128)
    assert_close(pq(x), pr(x), tier="reordered")  # same math, the tiled 4-bit matmul sums in another order
    gq = torch.autograd.grad(pq(x).square().sum(), [p for p in pq.parameters() if p.requires_grad])
    gr = torch.autograd.grad(pr(x).square().sum(), [p for p in pr.parameters() if p.requires_grad])
    for a, b in zip(gq, gr):
        assert_close(a, b, scale=100)  # gradients of a sum of squares over 15 rows: larger magnitudes


def test_qlora_training_step_decreases_loss_and_only_adapters_change(tmp_path):
    model = quantize_model(tiny_llama(hidden=64), QuantConfig())
    model = dt.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    pm = dt.get_peft_model(model, dt.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    frozen = {n: t.clone() for n, t in pm.state_dict().items() if "adapters" not in n}
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    x = input_ids(batch=4, seq=16)
    pm.train()
    losses = []
    for _ in range(5):
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, t in pm.state_dict().items():
        if n in frozen:
            assert torch.equal(t, frozen[n]), f"{n} changed: only adapters may train on a 4-bit base"
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.default.lora_" in n for n in trainable)


def test_qlora_adapter_round_trip(tmp_path):
    base = tiny_llama(hidden=64)
    q1 = quantize_model(copy.deepcopy(base), QuantConfig())
    pm = dt.get_peft_model(q1, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    x = input_ids()
    expected = pm(x).logits
    pm.save_pretrained(tmp_path)
    # Quantization is deterministic, so the same base quantized again is the same 4-bit model.
    q2 = quantize_model(copy.deepcopy(base), QuantConfig())
    loaded = dt.PeftModel.from_pretrained(q2, tmp_path)
    assert_close(loaded(x).logits, expected)


def test_qlora_adapter_is_a_plain_lora_adapter(tmp_path):
    """An adapter trained on a 4-bit base loads on the full-precision base (peft's format is the same)."""
    base = tiny_llama(hidden=64)
    pm = dt.get_peft_model(quantize_model(copy.deepcopy(base), QuantConfig()),
                           dt.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert isinstance(loaded.get_base_model().model.layers[0].self_attn.q_proj.base_layer, nn.Linear)


def test_merge_into_4bit_requantizes():
    pm = dt.get_peft_model(quantize_model(tiny_llama(hidden=64), QuantConfig()),
                           dt.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).eval()
    layer = pm.get_base_model().model.layers[0].self_attn.q_proj
    before = layer.base_layer.dequantize_weight().clone()
    delta = layer.adapters["default"].delta_weight(layer.base_layer)
    pm.merge_adapter()
    assert isinstance(layer.base_layer, Linear4bit)
    after = layer.base_layer.dequantize_weight()
    # The merged weight is the 4-bit rounding of W + ΔW: closer to it than to W, within one NF4 step.
    err_new = (after - (before + delta)).abs().mean()
    err_old = (after - before).abs().mean()
    assert err_new < err_old


@pytest.mark.parametrize("bits", [4, 8])
def test_parameter_count_of_a_quantized_model_includes_its_quantized_weights(bits):
    # The packed weights are buffers; "all params" must still count them, as peft does for bitsandbytes
    plain = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    quantized = dt.get_peft_model(quantize_model(tiny_llama(), QuantConfig(bits=bits)),
                                  dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert quantized.get_nb_trainable_parameters() == plain.get_nb_trainable_parameters()
