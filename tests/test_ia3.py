"""IA³: closed form on hand-sized layers, merge invariants, config validation and per-family defaults."""
import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune import IA3Config, LoraConfig, get_peft_model, inject_adapter_in_model
from deltatune.methods.ia3 import IA3Scale, is_feedforward
from deltatune.surgery.layer import AdaptedLayer
from deltatune.surgery.targets import resolve_targets
from tiny import input_ids, tiny_bert_cls, tiny_gpt2, tiny_llama
from tolerances import assert_close


def _host(layer: nn.Module, feedforward: bool, l: torch.Tensor) -> AdaptedLayer:
    out_f, in_f = (layer.out_features, layer.in_features) if isinstance(layer, nn.Linear) else (layer.nf, layer.nx)
    adapter = IA3Scale(in_f, out_f, feedforward)
    with torch.no_grad():
        adapter.ia3_l.copy_(l.reshape(adapter.ia3_l.shape))
    host = AdaptedLayer(layer)
    host.add("a", adapter)
    host.set_active(("a",))
    return host


def _layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.Linear(5, 4) if kind == "linear" else Conv1D(4, 5)  # both map 5 -> 4
    nn.init.normal_(layer.bias)
    return layer


def _w(layer: nn.Module) -> torch.Tensor:
    return layer.weight if isinstance(layer, nn.Linear) else layer.weight.T  # (out, in)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_closed_form(kind):
    x = torch.randn(3, 5)
    layer = _layer(kind)
    W, b = _w(layer).detach().clone(), layer.bias.detach().clone()
    l_out, l_in = torch.tensor([0.5, 2.0, -1.0, 3.0]), torch.tensor([1.5, 0.0, 2.0, -0.5, 1.0])
    assert_close(_host(copy.deepcopy(layer), False, l_out)(x), (x @ W.T + b) * l_out)  # l ⊙ (W x + b)
    assert_close(_host(copy.deepcopy(layer), True, l_in)(x), (x * l_in) @ W.T + b)  # W (l ⊙ x) + b


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_matches_forward_and_unmerge_restores(kind, feedforward):
    layer = _layer(kind)
    W0, b0 = _w(layer).detach().clone(), layer.bias.detach().clone()
    n = 5 if feedforward else 4
    l = torch.linspace(-1.5, 2.0, n)
    l[1] = 0.0  # a zero entry: division cannot undo it, so unmerge must restore it from a copy
    host = _host(layer, feedforward, l)
    x = torch.randn(3, 5)
    unmerged = host(x)
    host.merge()
    assert host.merged == ["a"]
    assert_close(host(x), unmerged)
    host.merge()  # idempotent
    assert host.merged == ["a"]
    # Output scaling multiplies rows and the bias; input scaling multiplies columns and leaves the bias.
    expected_w = W0 * (l[None, :] if feedforward else l[:, None])
    assert_close(_w(host.base_layer), expected_w)
    assert_close(host.base_layer.bias, b0 if feedforward else b0 * l)
    host.unmerge()
    assert_close(_w(host.base_layer), W0)
    assert_close(host.base_layer.bias, b0)
    assert_close(host(x), unmerged)


def test_vector_stays_float32_on_bf16_base():
    layer = nn.Linear(5, 4).to(torch.bfloat16)
    host = _host(layer, False, torch.full((4,), 1.5))
    assert host.adapters["a"].ia3_l.dtype == torch.float32
    out = host(torch.randn(2, 5, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_feedforward_subset_rule():
    with pytest.raises(ValueError, match=r"subset of target_modules.*\['up_proj'\]"):
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["up_proj"])
    IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    IA3Config(target_modules=".*proj", feedforward_modules=["down_proj"])  # peft only checks two lists


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(feedforward_modules="(unclosed"), "feedforward_modules regex"),
        (dict(target_modules="[bad"), "target_modules regex"),
        (dict(layers_pattern="layers"), "layers_pattern only makes sense"),
        (dict(init_ia3_weights="yes"), "init_ia3_weights must be"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IA3Config(**kwargs)


def test_is_feedforward_uses_peft_rules():
    assert is_feedforward(("output.dense",), "bert.encoder.layer.0.attention.output.dense")
    assert is_feedforward(("down_proj",), "model.layers.1.mlp.down_proj")
    assert not is_feedforward(("down_proj",), "model.layers.1.mlp.up_proj")
    assert is_feedforward(r".*\.mlp\..*", "model.layers.1.mlp.up_proj")
    assert not is_feedforward(r"mlp", "model.layers.1.mlp.up_proj")  # a regex must match the whole path
    assert not is_feedforward((), "anything")


@pytest.mark.parametrize(
    "make, targets, feedforward",
    [
        (tiny_llama, {"k_proj", "v_proj", "down_proj"}, {"down_proj"}),
        (tiny_gpt2, {"attn.c_attn", "mlp.c_proj"}, {"mlp.c_proj"}),
        (tiny_bert_cls, {"self.key", "self.value", "attention.output.dense", "layer.0.output.dense", "layer.1.output.dense"},
         {"attention.output.dense", "layer.0.output.dense", "layer.1.output.dense"}),
    ],
)
def test_family_defaults(make, targets, feedforward):
    pm = get_peft_model(make(), IA3Config())
    config = pm.peft_config["default"]
    assert config.target_modules is not None and config.feedforward_modules is not None  # saved resolved
    hosts = {n: m.adapters["default"] for n, m in pm.get_base_model().named_modules() if isinstance(m, AdaptedLayer)}
    assert all(any(n.endswith(t) for t in targets) for n in hosts)
    assert {n for n, a in hosts.items() if a.feedforward} == {n for n in hosts if any(n.endswith(f) for f in feedforward)}
    assert config.fan_in_fan_out == (make is tiny_gpt2)  # set for Conv1D targets, as peft does


def test_unknown_family_needs_targets():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no IA³ default for model type None.*Layers that can be targeted: 0, 2"):
        inject_adapter_in_model(IA3Config(), model)
    inject_adapter_in_model(IA3Config(target_modules=["0", "2"]), model)  # no feed-forward modules then
    assert not model[0].adapters["default"].feedforward


def test_inject_adapter_in_model_uses_ia3_defaults():
    model = tiny_llama()
    inject_adapter_in_model(IA3Config(), model)
    assert isinstance(model.model.layers[0].self_attn.k_proj, AdaptedLayer)
    assert not isinstance(model.model.layers[0].self_attn.q_proj, AdaptedLayer)  # not LoRA's default
    assert model.model.layers[0].mlp.down_proj.adapters["default"].feedforward


def test_layers_to_transform_and_disk_keys():
    config = IA3Config(layers_to_transform=[1])
    assert resolve_targets(tiny_llama(), IA3Config(target_modules=["k_proj"], layers_to_transform=[1])) == [
        "model.layers.1.self_attn.k_proj"
    ]
    assert "layers_to_transform" in config.to_dict()
    assert "layers_to_transform" not in IA3Config().to_dict()  # peft's IA3Config has no such field


def test_model_level_invariants():
    base = tiny_llama()
    ref = copy.deepcopy(base)
    pm = get_peft_model(base, IA3Config(init_ia3_weights=False)).eval()
    x = input_ids()
    unmerged = pm(x).logits
    assert (unmerged - ref(x).logits).abs().max() > 1e-3
    with pm.disable_adapter():
        assert_close(pm(x).logits, ref(x).logits)
    pm.merge_adapter()
    assert_close(pm(x).logits, unmerged, tier="reordered")  # merged vs unmerged: fp32 rounding through 2 layers
    pm.unmerge_adapter()
    assert_close(pm(x).logits, unmerged, tier="reordered")
    plain = pm.merge_and_unload()
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    assert_close(plain(x).logits, unmerged, tier="reordered")


def test_ia3_scales_what_lora_added_on_the_same_layer():
    """Output scaling applies to everything before it in the active order (LoRA then IA³ here)."""
    pm = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False), "lora")
    pm.add_adapter("ia3", IA3Config(target_modules=["v_proj"], feedforward_modules=[], init_ia3_weights=False))
    pm.set_adapter(["lora", "ia3"])
    host = pm.get_base_model().model.layers[0].self_attn.v_proj
    lora, ia3 = host.adapters["lora"], host.adapters["ia3"]
    h = torch.randn(3, 32)
    base_plus_lora = host.base_layer(h) + h @ lora.delta_weight(host.base_layer).T
    assert_close(host(h), base_plus_lora * ia3.vector, tier="reordered")
