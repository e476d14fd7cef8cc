"""LoftQ initialisation (methods/lora_loftq.py): the error it is for, parity with peft, the QLoRA path.

peft 0.21.2's ``loftq_init`` cannot run on this CPU machine as shipped: it moves the weight to "cuda"
(or "xpu") and quantizes with bitsandbytes' ``Params4bit`` there, and ``LoraConfig`` insists on scipy.
:func:`peft_loftq_init` runs peft's own source with three substitutions, each asserted to still match
the source: the device is the CPU, ``bnb.nn.Params4bit`` quantizes with bitsandbytes' real
``quantize_4bit`` (its codes and absmax), and ``bnb.functional.dequantize_4bit`` decodes those codes
with bitsandbytes' own NF4 table (its CPU dequantize kernel is wrong on this machine, see
tests/test_quant_nf4.py). The loop, the SVD split and the factor assignment are peft's.
"""
import importlib.util
import inspect
import textwrap
from types import SimpleNamespace

import pytest
import torch

import deltatune as dt
from deltatune.methods.lora_loftq import loftq_decompose, low_rank, peft_roundtrip, replace_lora_weights_loftq
from deltatune.quant import Linear4bit, QuantConfig, quantize_model
from tiny import input_ids, tiny_llama
from tolerances import assert_close

peft = pytest.importorskip("peft")
bnb_f = pytest.importorskip("bitsandbytes.functional")
from peft.utils import loftq_utils  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


# ---- peft's loftq_init, on the CPU --------------------------------------------------------------------
class _Params4bit:
    """bitsandbytes' ``Params4bit(...).to(device)`` as peft uses it: quantize, keep codes and state."""

    def __init__(self, data, requires_grad=False, compress_statistics=True, quant_type="fp4", blocksize=64):
        self.data, self.quant_state = bnb_f.quantize_4bit(
            data, blocksize=blocksize, compress_statistics=compress_statistics, quant_type=quant_type)

    def to(self, device):
        return self


def _decode(packed, state):
    """The weights bitsandbytes' codes stand for: its NF4 table at each nibble times the block's absmax."""
    assert not state.nested  # peft quantizes with compress_statistics=False
    n = state.shape.numel()
    nibbles = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).view(-1)[:n].long()
    levels = bnb_f.get_4bit_type(state.quant_type, device="cpu")[nibbles]
    return (levels * state.absmax.float().repeat_interleave(state.blocksize)[:n]).view(state.shape)


_BNB = SimpleNamespace(nn=SimpleNamespace(Params4bit=_Params4bit), functional=SimpleNamespace(dequantize_4bit=_decode))


def _cpu_source() -> str:
    src = textwrap.dedent(inspect.getsource(loftq_utils.loftq_init))
    for old, new in [('compute_device = "xpu" if is_xpu_available() else "cuda"', 'compute_device = "cpu"'),
                     ("import bitsandbytes as bnb", "bnb = _BNB")]:
        assert old in src, f"peft's loftq_init changed: {old!r} is gone; update this port"
        src = src.replace(old, new)
    return src


_NS = {**vars(loftq_utils), "_BNB": _BNB}
exec(compile(_cpu_source(), loftq_utils.__file__, "exec"), _NS)
peft_loftq_init = _NS["loftq_init"]


def peft_loftq_model(model, monkeypatch, loftq_iter, **kw):
    real = importlib.util.find_spec
    with monkeypatch.context() as m:
        # peft's LoraConfig requires scipy for "loftq" although its bitsandbytes path never imports it
        m.setattr(importlib.util, "find_spec", lambda name, *a: True if name == "scipy" else real(name, *a))
        m.setattr("peft.tuners.lora.layer.loftq_init", peft_loftq_init)
        config = peft.LoraConfig(init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=loftq_iter), **kw)
        return peft.get_peft_model(model, config)


def ours(loftq_iter, **kw):
    config = dt.LoraConfig(init_lora_weights="loftq", loftq_config=dt.LoftQConfig(loftq_bits=4, loftq_iter=loftq_iter), **kw)
    return dt.get_peft_model(tiny_llama(), config)


def _layers(model):
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ == "AdaptedLayer"]


def _error(dense, model):
    """||W - (Q + s·B·A)||_F over the wrapped layers, W the original weights."""
    total = 0.0
    for name, host in _layers(model):
        W = dense.get_submodule(name.removeprefix("base_model.model.")).weight
        approx = host.base_layer.weight + host.adapters["default"].delta_weight(host.base_layer)
        total += (W - approx).square().sum().item()
    return total ** 0.5


# ---- tests --------------------------------------------------------------------------------------------
def test_same_as_peft_loftq_on_one_weight():
    torch.manual_seed(0)
    W = torch.randn(48, 80) * 0.05
    for steps in (1, 3):
        theirs_Q, theirs_A, theirs_B = peft_loftq_init(W, num_bits=4, reduced_rank=4, num_iter=steps)
        Q, L, R = loftq_decompose(W, 4, steps, peft_roundtrip(4))
        assert torch.equal(Q, theirs_Q)  # same NF4 codes: the quantizations are bit for bit the same
        assert_close(L @ R, theirs_B @ theirs_A, tier="reordered")


def test_model_parity_with_peft_both_ways(monkeypatch, tmp_path):
    # lora_alpha == r: peft's factors ignore the scaling (peft issue #1982); with s = 1 both agree
    kw = dict(r=4, lora_alpha=4, target_modules=TARGETS)
    theirs = peft_loftq_model(tiny_llama(), monkeypatch, 2, **kw)
    mine = ours(2, **kw)
    x = input_ids()
    assert_close(mine(x).logits, theirs(x).logits, tier="reordered")
    base = {k: v for k, v in theirs.state_dict().items() if "base_layer.weight" in k}
    for name, host in _layers(mine):
        assert torch.equal(host.base_layer.weight, base[name + ".base_layer.weight"])  # W replaced by the same Q
    # a saved LoftQ adapter keeps init_lora_weights="loftq": loading re-quantizes the dense base, then the weights
    mine.save_pretrained(tmp_path / "mine")
    with monkeypatch.context() as m:
        m.setattr("peft.tuners.lora.layer.loftq_init", peft_loftq_init)
        m.setattr(importlib.util, "find_spec", lambda name, *a, real=importlib.util.find_spec: True if name == "scipy" else real(name, *a))
        loaded_theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "mine")
    assert_close(loaded_theirs(x).logits, mine(x).logits, tier="reordered")
    theirs.save_pretrained(tmp_path / "theirs")
    loaded_mine = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs")
    assert_close(loaded_mine(x).logits, theirs(x).logits, tier="reordered")


def test_error_falls_below_plain_qlora_and_with_iterations():
    dense = tiny_llama()
    plain = 0.0  # QLoRA's start: Q(W) with B = 0
    for name, module in dense.named_modules():
        if name.split(".")[-1] in TARGETS:
            plain += (module.weight - peft_roundtrip(4)(module.weight)).square().sum().item()
    errors = [plain ** 0.5] + [_error(dense, ours(t, r=4, lora_alpha=8, target_modules=TARGETS)) for t in (1, 2, 3, 5)]
    assert errors[1] < 0.95 * errors[0]
    assert errors[2] < errors[1] and errors[3] < errors[2]  # strictly on the first steps
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errors, errors[1:]))


def test_scaling_does_not_change_the_start():
    # Q + s·B·A = Q + L·R whatever alpha (a deliberate difference from peft when alpha != r)
    one, four = ours(1, r=4, lora_alpha=4, target_modules=TARGETS), ours(1, r=4, lora_alpha=16, target_modules=TARGETS)
    for (_, a), (_, b) in zip(_layers(one), _layers(four)):
        assert_close(b.adapters["default"].delta_weight(b.base_layer), a.adapters["default"].delta_weight(a.base_layer), tier="reordered")


def test_qlora_layers_fit_their_own_quantization():
    dense = tiny_llama()
    weights = {n: m.weight.detach().clone() for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear)}
    errors = []
    for steps in (1, 3):
        model = quantize_model(tiny_llama(), QuantConfig(bits=4, double_quant=True, blocksize=32))
        pm = dt.get_peft_model(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
        done = replace_lora_weights_loftq(pm, weights, loftq_iter=steps)
        assert len(done) == 3 * 2
        err = 0.0
        for name, host in _layers(pm):
            assert isinstance(host.base_layer, Linear4bit) and host.base_layer.double_quant
            W, Q = weights[name.removeprefix("base_model.model.")], host.base_layer.dequantize_weight(torch.float32)
            delta = host.adapters["default"].delta_weight(host.base_layer)
            L, R = low_rank(W - Q, 4)  # fitted against exactly what the layer now holds
            assert_close(delta, L @ R, tier="reordered")
            err += (W - Q - delta).square().sum().item()
        errors.append(err ** 0.5)
    plain = sum((weights[n] - Linear4bit.from_linear(m, QuantConfig(blocksize=32)).dequantize_weight(torch.float32)).square().sum().item()
                for n, m in dense.named_modules() if n.split(".")[-1] in TARGETS) ** 0.5
    assert errors[1] < errors[0] < 0.95 * plain


def test_clear_errors():
    model = quantize_model(tiny_llama(), QuantConfig(bits=4))
    with pytest.raises(ValueError, match="replace_lora_weights_loftq"):
        dt.get_peft_model(model, dt.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1}, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="needs loftq_config"):
        dt.LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match="loftq_bits must be 4"):
        dt.LoftQConfig(loftq_bits=2)
    with pytest.raises(ValueError, match="no 4-bit/8-bit layer"):
        replace_lora_weights_loftq(dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"])), {})
