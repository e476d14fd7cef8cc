"""IA³ on nn.Conv1d/2d/3d (methods/ia3_conv.py): the closed form on hand-sized tensors, then against
peft 0.21.2 (which wraps Conv2d and Conv3d): keys, shapes, outputs, save/load both ways, merging."""
import copy
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.methods.ia3_conv import IA3Conv, ia3_conv_weight_factor
from tolerances import assert_close


def _cnn(conv, groups=1):
    """conv "0" (3 -> 8), conv "2" (8 -> 8, optionally grouped), a linear head."""
    torch.manual_seed(0)
    return nn.Sequential(conv(3, 8, 3, padding=1), nn.ReLU(), conv(8, 8, 3, stride=2, groups=groups), nn.Flatten(), nn.LazyLinear(4))


SHAPES = {nn.Conv1d: (2, 3, 9), nn.Conv2d: (2, 3, 9, 9), nn.Conv3d: (2, 3, 5, 5, 5)}
MODELS = {"conv2d": (nn.Conv2d, 1), "conv3d": (nn.Conv3d, 1), "conv2d-groups2": (nn.Conv2d, 2), "conv2d-groups4": (nn.Conv2d, 4)}
FEEDFORWARD = {"none": [], "second": ["2"], "both": ["0", "2"]}


def _base(case):
    conv, groups = MODELS[case]
    base = _cnn(conv, groups)
    torch.manual_seed(5)
    x = torch.randn(*SHAPES[conv])
    base(x)  # materialise the LazyLinear
    return base, x


def _pair(case, ff):
    base, x = _base(case)
    kw = dict(target_modules=["0", "2"], feedforward_modules=FEEDFORWARD[ff], init_ia3_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**kw))
    mine = dt.get_peft_model(copy.deepcopy(base), dt.IA3Config(**kw))
    torch.manual_seed(7)  # the same vectors on both, away from 1 and from 0
    sd = {k: 0.3 + torch.rand_like(v) for k, v in peft.get_peft_model_state_dict(theirs).items()}
    peft.set_peft_model_state_dict(theirs, sd)
    dt.set_peft_model_state_dict(mine, sd)
    return base, theirs.eval(), mine.eval(), x


# ---- tier (a): closed form ------------------------------------------------------------------------
@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d, nn.Conv3d])
@pytest.mark.parametrize("feedforward", [False, True])
def test_forward_and_merge_are_the_closed_form(conv, feedforward):
    torch.manual_seed(0)
    layer = conv(4, 6, 3, groups=2)
    x = torch.randn(*SHAPES[conv][:1], 4, *SHAPES[conv][2:])
    adapter = IA3Conv(layer, feedforward, init_ones=False)
    l = adapter.vector.detach()
    nd = layer.weight.dim() - 2
    ones = (1,) * nd
    if feedforward:  # conv(l ⊙ x): each input channel scaled
        expected = layer(x * l.view(1, -1, *ones))
    else:  # l ⊙ conv(x): each output channel scaled, bias included
        expected = layer(x) * l.view(1, -1, *ones)
    with torch.no_grad():
        assert_close(adapter(x, layer, None), expected)
        # The merged kernel, by hand: output channel o of group g sees input channels g*2 .. g*2+1.
        W = layer.weight.clone()
        for o in range(6):
            g = o // 3
            W[o] *= l[o] if not feedforward else l[2 * g: 2 * g + 2].view(2, *ones)
        merged = copy.deepcopy(layer)
        adapter.merge(merged)
        assert_close(merged.weight, W)
        assert_close(merged(x), expected, tier="reordered")
        adapter.unmerge(merged)
        assert_close(merged.weight, layer.weight, tier="reordered")
        assert_close(merged.bias, layer.bias, tier="reordered")


def test_unbatched_input_stays_unbatched():
    layer = nn.Conv2d(3, 4, 3)
    for ff in (False, True):
        adapter = IA3Conv(layer, ff, init_ones=False)
        x = torch.randn(3, 7, 7)
        with torch.no_grad():
            out = adapter(x, layer, None)
            assert out.shape == (4, 5, 5)
            assert_close(out, adapter(x[None], layer, None)[0])


def test_weight_factor_matches_a_grouped_conv_run_per_group():
    # conv(l ⊙ x, W) == conv(x, W ⊙ factor) for a grouped conv: the factor places each group's slice of l.
    torch.manual_seed(1)
    W, l, x = torch.randn(6, 2, 3, 3), torch.rand(6), torch.randn(1, 6, 5, 5)
    factor = ia3_conv_weight_factor(l, True, 3, 6, 2)
    assert_close(F.conv2d(x, W * factor, groups=3), F.conv2d(x * l.view(1, -1, 1, 1), W, groups=3), tier="reordered")


def test_merge_with_a_zero_in_the_vector_unmerges_exactly():
    layer = nn.Conv2d(3, 4, 3)
    before = copy.deepcopy(layer.state_dict())
    adapter = IA3Conv(layer, False)
    with torch.no_grad():
        adapter.ia3_l[0, 1] = 0.0
        adapter.merge(layer)
        assert layer.weight[1].abs().max() == 0 and layer.bias[1] == 0
        adapter.unmerge(layer)
    for k, v in before.items():
        assert torch.equal(layer.state_dict()[k], v), k


def test_conv1d_is_wrapped_and_default_init_is_identity():
    base = _cnn(nn.Conv1d)
    x = torch.randn(*SHAPES[nn.Conv1d])
    ref = base(x)
    mine = dt.get_peft_model(copy.deepcopy(base), dt.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    shapes = {k: tuple(v.shape) for k, v in dt.get_peft_model_state_dict(mine).items()}
    assert shapes == {"base_model.model.0.ia3_l": (1, 8, 1), "base_model.model.2.ia3_l": (1, 8, 1)}
    with torch.no_grad():
        assert_close(mine(x), ref)


def test_all_linear_leaves_convolutions_alone():
    base = _cnn(nn.Conv2d)
    assert dt.resolve_targets(base, dt.IA3Config(target_modules="all-linear")) == ["4"]


# ---- tier (c): parity with peft -------------------------------------------------------------------
CASES = [(c, f) for c in MODELS for f in FEEDFORWARD]


@pytest.mark.parametrize("case,ff", CASES)
def test_keys_shapes_and_outputs_match_peft(case, ff):
    base, theirs, mine, x = _pair(case, ff)
    sd_t, sd_o = peft.get_peft_model_state_dict(theirs), dt.get_peft_model_state_dict(mine)
    assert {k: tuple(v.shape) for k, v in sd_o.items()} == {k: tuple(v.shape) for k, v in sd_t.items()}
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    with torch.no_grad():
        out = mine(x)
        assert (out - base(x)).abs().max() > 1e-3
        assert_close(out, theirs(x))


@pytest.mark.parametrize("case,ff", [("conv2d", "second"), ("conv3d", "none"), ("conv2d-groups2", "both")])
def test_save_load_both_ways(case, ff, tmp_path):
    base, theirs, mine, x = _pair(case, ff)
    mine.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    peft_loads_ours = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    ours_loads_peft = dt.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        expected = theirs(x)
        assert_close(peft_loads_ours(x), expected)
        assert_close(ours_loads_peft(x), expected)


@pytest.mark.parametrize("case,ff", CASES)
def test_merge_unmerge_and_unload_match_peft(case, ff):
    base, theirs, mine, x = _pair(case, ff)
    with torch.no_grad():
        unmerged = mine(x)
        mine.merge_adapter()
        assert_close(mine(x), unmerged, tier="reordered")
        mine.unmerge_adapter()
        assert_close(mine(x), unmerged, tier="reordered")
        for i in (0, 2):  # unmerging restored the base kernel and bias
            assert_close(mine.base_model.model[i].base_layer.weight, base[i].weight, tier="reordered")
            assert_close(mine.base_model.model[i].base_layer.bias, base[i].bias, tier="reordered")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft: "Unmerge result can be inaccurate for (IA)^3"
            merged_t = theirs.merge_and_unload()
        merged = mine.merge_and_unload()
        assert not any(isinstance(m, IA3Conv) for m in merged.modules())
        assert_close(merged(x), unmerged, tier="reordered")
        for i in (0, 2):
            assert_close(merged[i].weight, merged_t[i].weight, tier="reordered")
            assert_close(merged[i].bias, merged_t[i].bias, tier="reordered")


def test_training_step_changes_only_the_vectors():
    _, _, mine, x = _pair("conv2d", "second")
    mine.train()
    before = {n: p.detach().clone() for n, p in mine.named_parameters()}
    trainable = {n for n, p in mine.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("ia3_l") for n in trainable)
    opt = torch.optim.SGD([p for p in mine.parameters() if p.requires_grad], lr=0.1)
    mine(x).square().mean().backward()
    opt.step()
    for n, p in mine.named_parameters():
        assert (not torch.equal(p, before[n])) == (n in trainable), n


def test_resnet_with_classifier_saved_loads_in_peft(tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    base = ResNetForImageClassification(ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)).eval()
    # Every conv scales its output, except the second conv of each basic block, which scales its input.
    kw = dict(target_modules=r".*convolution", feedforward_modules=r".*layer\.1\.convolution",
              modules_to_save=["classifier"], init_ia3_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**kw)).eval()
    mine = dt.get_peft_model(copy.deepcopy(base), dt.IA3Config(**kw)).eval()
    sd_t = peft.get_peft_model_state_dict(theirs)
    assert {k: tuple(v.shape) for k, v in dt.get_peft_model_state_dict(mine).items()} == {k: tuple(v.shape) for k, v in sd_t.items()}
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    dt.set_peft_model_state_dict(mine, sd_t)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = theirs(pixel_values=pixels).logits
        assert_close(mine(pixel_values=pixels).logits, expected)
    mine.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        assert_close(loaded(pixel_values=pixels).logits, expected)


def test_mixed_batches_refuse_conv_vectors():
    # Documented limit (docs/methods/ia3.md): a clear error, and the model is left as it was.
    _, _, mine, x = _pair("conv2d", "second")
    mine.add_adapter("other", dt.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    with pytest.raises(ValueError, match="IA3Conv adapter cannot be served in a mixed-adapter batch"):
        mine(x, adapter_names=["default", "other"])
    assert set(mine.peft_config) == {"default", "other"}


@pytest.mark.parametrize("case", ["conv2d", "conv3d", "conv2d-groups2"])
def test_weighted_combination_of_conv_vectors_matches_peft(case):
    # peft's IA3Model.add_weighted_adapter sums every IA3Layer's vectors, its conv layers included.
    _, theirs, mine, x = _pair(case, "second")
    kw = dict(target_modules=["0", "2"], feedforward_modules=["2"], init_ia3_weights=False)
    theirs.add_adapter("other", peft.IA3Config(**kw))
    mine.add_adapter("other", dt.IA3Config(**kw))
    torch.manual_seed(8)
    sd = {k: 0.3 + torch.rand_like(v) for k, v in peft.get_peft_model_state_dict(theirs, adapter_name="other").items()}
    peft.set_peft_model_state_dict(theirs, sd, adapter_name="other")
    dt.set_peft_model_state_dict(mine, sd, adapter_name="other")
    for model in (theirs, mine):
        model.add_weighted_adapter(["default", "other"], [0.7, -0.4], "sum")
        model.set_adapter("sum")
    combined = dt.get_peft_model_state_dict(mine, adapter_name="sum")
    expected = peft.get_peft_model_state_dict(theirs, adapter_name="sum")
    assert combined.keys() == expected.keys()
    first = dt.get_peft_model_state_dict(mine, adapter_name="default")
    for key, value in combined.items():
        assert value.shape == expected[key].shape  # (1, n, 1, …): the conv layout on disk
        assert_close(value, expected[key])
        assert_close(value, 0.7 * first[key] - 0.4 * sd[key])  # the closed form
    with torch.no_grad():
        assert_close(mine(x), theirs(x))
