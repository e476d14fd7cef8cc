"""prepare_model_for_kbit_training and merging a delta into a 4-bit layer."""
import pytest
import torch
from tiny import input_ids, tiny_llama
from torch import nn

from deltatune.quant import (
    Linear4bit, Linear8bit, QuantConfig, merge_delta_into_4bit, prepare_model_for_kbit_training, quantize_model,
)


def _checkpointing(model):
    # transformers 5 renamed is_gradient_checkpointing (the old name warns)
    new = hasattr(type(model), "is_activation_checkpointing")
    return model.is_activation_checkpointing if new else model.is_gradient_checkpointing


@pytest.fixture
def prepared():
    model = quantize_model(tiny_llama().to(torch.bfloat16))
    return prepare_model_for_kbit_training(model)


def test_norms_and_other_float_params_become_fp32(prepared):
    assert prepared.model.norm.weight.dtype == torch.float32
    assert prepared.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert prepared.lm_head.weight.dtype == torch.float32
    assert prepared.model.layers[0].self_attn.q_proj.absmax.dtype == torch.uint8  # quantized state untouched


def test_base_is_frozen_checkpointing_is_on_and_inputs_get_grads(prepared):
    assert not any(p.requires_grad for p in prepared.parameters())
    assert _checkpointing(prepared)
    seen = []
    prepared.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    prepared.train()
    prepared(input_ids())
    assert seen == [True]


def test_gradient_flows_through_checkpointed_4bit_layers(prepared):
    # A trainable parameter deep in the model (stand-in for an adapter) gets a gradient through
    # the frozen 4-bit layers above it, with checkpointing recomputing them in backward.
    norm = prepared.model.layers[0].post_attention_layernorm
    norm.weight.requires_grad_(True)
    prepared.train()
    prepared(input_ids(), labels=input_ids()).loss.backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


def test_without_checkpointing_only_freezes_and_casts():
    model = prepare_model_for_kbit_training(quantize_model(tiny_llama()), use_gradient_checkpointing=False)
    assert not _checkpointing(model)


def _layer(cls=Linear4bit, config=None, n_in=128, n_out=64):
    torch.manual_seed(0)
    return cls.from_linear(nn.Linear(n_in, n_out), config)


def test_merging_zero_changes_nothing():
    layer = _layer(config=QuantConfig(double_quant=False))
    before = layer.qweight.clone()
    report = merge_delta_into_4bit(layer, torch.zeros(64, 128))
    assert torch.equal(layer.qweight, before)
    assert report.max_abs_error == 0.0 and report.weight_max_abs_error == 0.0


@pytest.mark.parametrize("cls,config", [(Linear4bit, None), (Linear8bit, QuantConfig(bits=8))])
def test_merge_requantizes_w_plus_delta_and_reports_the_rounding(cls, config):
    layer = _layer(cls, config)
    g = torch.Generator().manual_seed(1)
    delta = (torch.randn(64, 4, generator=g) @ torch.randn(4, 128, generator=g)) * 0.01  # rank 4, LoRA-like
    exact = layer.dequantize_weight() + delta
    probe = torch.randn(16, 128, generator=g)
    report = merge_delta_into_4bit(layer, delta, probe)
    merged = layer.dequantize_weight()
    assert torch.equal(merged, cls.from_linear(_as_linear(exact), config).dequantize_weight())
    err = (probe @ merged.t() - probe @ exact.t()).abs()
    assert report.max_abs_error == pytest.approx(err.max().item())
    assert report.mean_abs_error == pytest.approx(err.mean().item())
    # rounding is a fraction of the output scale: the merge is lossy, not wrong
    assert 0 < report.mean_abs_error < (0.2 if cls is Linear4bit else 0.02) * report.mean_abs_output


def _as_linear(weight):
    lin = nn.Linear(weight.shape[1], weight.shape[0])
    lin.weight.data = weight
    return lin


def test_merge_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"\(64, 128\)"):
        merge_delta_into_4bit(_layer(), torch.zeros(128, 64))
