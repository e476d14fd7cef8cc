"""LoRA and DoRA on nn.Conv1d/2d/3d against peft 0.21.2: keys, shapes, outputs, save/load both ways,
merging and training (methods/lora_conv.py)."""
import copy
import warnings

import peft
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods.lora_conv import LoraConv
from tolerances import assert_close


def _cnn(conv, nd, groups=1):
    torch.manual_seed(0)
    return nn.Sequential(
        conv(3, 8, 3, padding=1), nn.ReLU(), conv(8, 8, 3, stride=2, groups=groups), nn.Flatten(), nn.LazyLinear(4)
    )


SHAPES = {1: (2, 3, 9), 2: (2, 3, 9, 9), 3: (2, 3, 5, 5, 5)}
MODELS = {
    "conv1d": (nn.Conv1d, 1, 1),
    "conv2d": (nn.Conv2d, 2, 1),
    "conv3d": (nn.Conv3d, 3, 1),
    "conv2d-groups2": (nn.Conv2d, 2, 2),
}


def _pair(case, dora, **extra):
    conv, nd, groups = MODELS[case]
    base = _cnn(conv, nd, groups)
    torch.manual_seed(5)
    x = torch.randn(*SHAPES[nd])
    base(x)  # materialise the LazyLinear
    kw = dict(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False, use_dora=dora, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that grouped convs cannot merge
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    mine = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(**kw))
    # Same, nonzero factors on both (a perturbed magnitude too, so DoRA's scale is not 1).
    torch.manual_seed(7)
    sd = {k: v.detach() + 0.1 * torch.randn_like(v) for k, v in peft.get_peft_model_state_dict(theirs).items()}
    peft.set_peft_model_state_dict(theirs, sd)
    dt.set_peft_model_state_dict(mine, sd)
    return base, theirs.eval(), mine.eval(), x


CASES = [(c, d) for c in MODELS for d in (False, True)]


@pytest.mark.parametrize("case,dora", CASES)
def test_keys_shapes_and_outputs_match_peft(case, dora):
    base, theirs, mine, x = _pair(case, dora)
    sd_t, sd_o = peft.get_peft_model_state_dict(theirs), dt.get_peft_model_state_dict(mine)
    assert {k: tuple(v.shape) for k, v in sd_o.items()} == {k: tuple(v.shape) for k, v in sd_t.items()}
    with torch.no_grad():
        out = mine(x)
        assert (out - base(x)).abs().max() > 1e-3
        assert_close(out, theirs(x))


@pytest.mark.parametrize("case", [c for c in MODELS if MODELS[c][2] == 1])
def test_dora_initial_magnitude_matches_peft(case):
    conv, nd, _ = MODELS[case]
    base = _cnn(conv, nd)
    x = torch.randn(*SHAPES[nd])
    base(x)
    kw = dict(r=4, target_modules=["0", "2"], init_lora_weights=False, use_dora=True)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    mine = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(**kw))
    sd_t = peft.get_peft_model_state_dict(theirs)
    dt.set_peft_model_state_dict(mine, sd_t)
    for m in mine.modules():  # recompute m from peft's A and B, as at creation
        if isinstance(m, LoraConv):
            with torch.no_grad():
                m.lora_magnitude_vector.zero_()
    for name, layer in mine.named_modules():
        if hasattr(layer, "adapters"):
            layer.adapters["default"].init_magnitude(layer.base_layer)
    sd_o = dt.get_peft_model_state_dict(mine)
    for k, v in sd_t.items():
        assert_close(sd_o[k], v)
    with torch.no_grad():
        assert_close(mine(x), theirs(x))


@pytest.mark.parametrize("case,dora", CASES)
def test_save_load_both_ways(case, dora, tmp_path):
    base, theirs, mine, x = _pair(case, dora)
    mine.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_loads_ours = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    ours_loads_peft = dt.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        expected = theirs(x)
        assert_close(peft_loads_ours(x), expected)
        assert_close(ours_loads_peft(x), expected)


@pytest.mark.parametrize("case,dora", [c for c in CASES if MODELS[c[0]][2] == 1])
def test_merge_and_unload_equals_unmerged(case, dora):
    _, theirs, mine, x = _pair(case, dora)
    with torch.no_grad():
        unmerged = mine(x)
        mine.merge_adapter()
        assert_close(mine(x), unmerged, tier="reordered")
        mine.unmerge_adapter()
        assert_close(mine(x), unmerged, tier="reordered")
        merged_t = theirs.merge_and_unload()
        merged = mine.merge_and_unload()
        assert not any(isinstance(m, LoraConv) for m in merged.modules())
        assert_close(merged(x), unmerged, tier="reordered")
        assert_close(merged[2].weight, merged_t[2].weight, tier="reordered")


def test_grouped_conv_does_not_merge():
    _, _, mine, _ = _pair("conv2d-groups2", False)
    with pytest.raises(NotImplementedError, match="groups > 1"):
        mine.merge_adapter()


def test_rank_not_divisible_by_groups_and_unsupported_init_raise():
    base = _cnn(nn.Conv2d, 2, groups=2)
    with pytest.raises(ValueError, match="divisible by groups"):
        dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(r=3, target_modules=["2"]))
    with pytest.raises(ValueError, match="not supported on Conv2d"):
        dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(r=4, target_modules=["0"], init_lora_weights="pissa"))


@pytest.mark.parametrize("dora", [False, True])
def test_training_step_changes_only_adapter_params(dora):
    base, _, mine, x = _pair("conv2d", dora, lora_dropout=0.1)
    mine.train()
    before = {n: p.detach().clone() for n, p in mine.named_parameters()}
    trainable = {n for n, p in mine.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.SGD([p for p in mine.parameters() if p.requires_grad], lr=0.1)
    mine(x).square().mean().backward()
    opt.step()
    for n, p in mine.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in trainable), n


def test_default_init_is_identity():
    base = _cnn(nn.Conv2d, 2)
    x = torch.randn(*SHAPES[2])
    ref = base(x)
    for dora in (False, True):
        mine = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(r=4, target_modules=["0", "2"], use_dora=dora))
        with torch.no_grad():
            assert_close(mine(x), ref)


def test_resnet_convolutions_with_classifier_saved_match_peft(tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    base = ResNetForImageClassification(ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)).eval()
    kw = dict(r=4, target_modules=["convolution"], modules_to_save=["classifier"], init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw)).eval()
    mine = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(**kw)).eval()
    sd_t = peft.get_peft_model_state_dict(theirs)
    assert {k: tuple(v.shape) for k, v in dt.get_peft_model_state_dict(mine).items()} == {k: tuple(v.shape) for k, v in sd_t.items()}
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    dt.set_peft_model_state_dict(mine, sd_t)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = theirs(pixel_values=pixels).logits
        assert_close(mine(pixel_values=pixels).logits, expected)
    mine.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        assert_close(loaded(pixel_values=pixels).logits, expected)


def test_all_linear_leaves_convolutions_alone_as_peft_does():
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.Linear(8, 2))

    ours = dt.resolve_targets(model(), dt.LoraConfig(target_modules="all-linear"))
    theirs = peft.get_peft_model(model(), peft.LoraConfig(target_modules="all-linear")).targeted_module_names
    assert sorted(ours) == sorted(theirs) and "0" not in ours  # the Conv2d ("0") stays unwrapped
