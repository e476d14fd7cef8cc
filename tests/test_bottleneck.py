"""Bottleneck adapters: closed form, identity at init, parameter counts, placement, disk format, errors.

peft has no bottleneck adapters, so there is no parity test; the numbers are checked against the
formula h + s · (U act(D h + b_D) + b_U) and the count 2·d·m + m + d per adapted module.
"""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from deltatune import BottleneckConfig, IA3Config, PeftModel, get_peft_model
from deltatune.methods.bottleneck import BottleneckAdapter
from deltatune.surgery.layer import AdaptedLayer
from tiny import input_ids, tiny_bert_cls, tiny_gpt2, tiny_llama
from tolerances import assert_close

ACTS = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu, "tanh": torch.tanh}


@pytest.mark.parametrize("act", sorted(ACTS))
def test_closed_form(act):
    torch.manual_seed(0)
    layer = nn.Linear(6, 8)
    adapter = BottleneckAdapter(8, 3, act, scaling=0.5, dtype=torch.float32, init_weights=False)
    x = torch.randn(2, 5, 6)
    h = layer(x)
    expected = h + 0.5 * (ACTS[act](h @ adapter.down_weight.T + adapter.down_bias) @ adapter.up_weight.T + adapter.up_bias)
    assert_close(adapter(x, layer, h), expected)
    assert_close(adapter(x, layer, None), expected)  # computes the base output itself when not given


def _adapters(pm):
    return {n: m.adapters["default"] for n, m in pm.get_base_model().named_modules() if isinstance(m, AdaptedLayer)}


@pytest.mark.parametrize(
    "make, placement, expected",
    [
        (tiny_llama, "houlsby", ["self_attn.o_proj", "mlp.down_proj"]),
        (tiny_llama, "pfeiffer", ["mlp.down_proj"]),
        (tiny_gpt2, "houlsby", ["attn.c_proj", "mlp.c_proj"]),
        (tiny_gpt2, "pfeiffer", ["mlp.c_proj"]),
        (tiny_bert_cls, "houlsby", ["attention.output.dense", "layer.0.output.dense", "layer.1.output.dense"]),
        (tiny_bert_cls, "pfeiffer", ["layer.0.output.dense", "layer.1.output.dense"]),
    ],
)
def test_placement_identity_init_and_counts(make, placement, expected):
    base = make()
    x = input_ids()
    ref = copy.deepcopy(base)(x).logits
    pm = get_peft_model(base, BottleneckConfig(placement=placement, reduction_factor=8)).eval()
    adapters = _adapters(pm)
    assert adapters and all(any(n.endswith(e) for e in expected) for n in adapters)
    assert {e for e in expected if any(n.endswith(e) for n in adapters)} == set(expected)
    if placement == "pfeiffer":
        assert not any("attention.output" in n or "o_proj" in n or "attn.c_proj" in n for n in adapters)
    assert torch.equal(pm(x).logits, ref)  # zero up-projection: exactly the base model at the start
    # Closed form: every adapted module here outputs d = 32, so m = 32 // 8 = 4 and each adds 2·d·m + m + d.
    d, m = 32, 4
    assert pm.get_nb_trainable_parameters()[0] == len(adapters) * (2 * d * m + m + d)


def test_counts_with_bottleneck_size_and_seq_cls():
    pm = get_peft_model(tiny_bert_cls(), BottleneckConfig(bottleneck_size=5, task_type="SEQ_CLS"))
    d, m, n_adapters = 32, 5, 4  # Houlsby: 2 per layer, 2 layers
    classifier = 32 * 3 + 3  # trained in full (modules_to_save)
    assert pm.get_nb_trainable_parameters()[0] == n_adapters * (2 * d * m + m + d) + classifier


def test_not_mergeable_error_says_why_and_what_to_do():
    pm = get_peft_model(tiny_llama(), BottleneckConfig())
    for call in (pm.merge_and_unload, pm.merge_adapter):
        with pytest.raises(ValueError, match=r"nonlinearity cannot be folded.*keep it unmerged.*LoRA"):
            call()
    x = input_ids()
    assert_close(pm(x).logits, pm(x).logits)  # the failed merge left the model usable
    assert not any(m.merged for m in pm.get_base_model().modules() if isinstance(m, AdaptedLayer))


def test_disk_layout_and_round_trip(tmp_path):
    x = input_ids()
    pm = get_peft_model(tiny_gpt2(), BottleneckConfig(non_linearity="gelu", scaling=2.0, init_weights=False)).eval()
    expected = pm(x).logits
    pm.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    prefix = "base_model.model.transformer.h.0.attn.c_proj."
    assert {k[len(prefix):]: tuple(v.shape) for k, v in sd.items() if k.startswith(prefix)} == {
        "adapter_down.weight": (2, 32), "adapter_down.bias": (2,), "adapter_up.weight": (32, 2), "adapter_up.bias": (32,),
    }
    assert len(sd) == 4 * 4  # 2 layers x 2 placements x 4 tensors
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BOTTLENECK" and cfg["target_modules"] == ["attn.c_proj", "mlp.c_proj"]
    assert cfg["non_linearity"] == "gelu" and cfg["scaling"] == 2.0
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    assert_close(loaded(x).logits, expected)
    assert isinstance(loaded.peft_config["default"], BottleneckConfig)


def test_target_modules_override_and_unknown_family():
    pm = get_peft_model(tiny_llama(), BottleneckConfig(target_modules=["up_proj"], placement="pfeiffer"))
    assert all(n.endswith("up_proj") for n in _adapters(pm))  # target_modules wins over placement
    assert all(a.down_weight.shape == (4, 64) for a in _adapters(pm).values())  # d = up_proj's output, 64
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no placement table for model type None.*target_modules"):
        get_peft_model(model, BottleneckConfig())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reduction_factor=0), "reduction_factor must be a positive integer"),
        (dict(bottleneck_size=-2), "bottleneck_size must be"),
        (dict(non_linearity="swish"), r"non_linearity='swish' is not supported.*gelu"),
        (dict(placement="after"), "placement must be 'houlsby' or 'pfeiffer'"),
        (dict(scaling=float("nan")), "scaling must be a finite number"),
        (dict(target_modules="(bad"), "target_modules regex"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BottleneckConfig(**kwargs)


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_base_keeps_its_dtype_and_the_adapter_trains_in_fp32(autocast):
    pm = get_peft_model(tiny_llama().to(torch.bfloat16), BottleneckConfig(init_weights=False), autocast_adapter_dtype=autocast)
    adapter = next(iter(_adapters(pm).values()))
    assert adapter.up_weight.dtype == (torch.float32 if autocast else torch.bfloat16)  # peft's autocast_adapter_dtype
    assert pm(input_ids()).logits.dtype == torch.bfloat16


def test_bottleneck_after_ia3_on_the_same_layer():
    """Stacked on one layer, the bottleneck sees what the earlier adapters produced (active order)."""
    pm = get_peft_model(tiny_llama(), IA3Config(target_modules=["o_proj"], feedforward_modules=[], init_ia3_weights=False), "ia3")
    pm.add_adapter("bn", BottleneckConfig(placement="pfeiffer", target_modules=["o_proj"], init_weights=False))
    pm.set_adapter(["ia3", "bn"])
    host = pm.get_base_model().model.layers[0].self_attn.o_proj
    h = torch.randn(3, 32)
    scaled = host.base_layer(h) * host.adapters["ia3"].vector
    assert_close(host(h), host.adapters["bn"](h, host.base_layer, scaled))
    pm.merge_adapter(["ia3"])  # IA³ first in the order: merging it alone is exact
    assert_close(host(h), host.adapters["bn"](h, host.base_layer, scaled), tier="reordered")
