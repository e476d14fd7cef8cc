"""Tier (b): invariants of merging, disabling and multi-adapter management."""
import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune import LoraConfig, get_peft_model
from deltatune.surgery.layer import AdaptedLayer, ModulesToSaveWrapper
from tiny import input_ids, tiny_gpt2, tiny_llama
from tolerances import assert_close

CASES = {
    "llama-lora": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama-dora": (tiny_llama, dict(target_modules=["q_proj", "up_proj"], use_dora=True)),
    "llama-rslora-embed": (tiny_llama, dict(target_modules=["embed_tokens", "o_proj"], use_rslora=True)),
    "gpt2-conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"])),
    "gpt2-dora": (tiny_gpt2, dict(target_modules=["c_attn"], use_dora=True)),
}


def _model(case, **extra):
    make, kw = CASES[case]
    base = make()
    ref = copy.deepcopy(base)
    pm = get_peft_model(base, LoraConfig(r=4, init_lora_weights=False, **kw, **extra))
    pm.eval()
    return pm, ref


@pytest.mark.parametrize("case", CASES)
def test_merge_unmerge_disable(case):
    pm, ref = _model(case)
    x = input_ids()
    base_logits = ref(x).logits
    unmerged = pm(x).logits
    assert (unmerged - base_logits).abs().max() > 1e-3, "adapter must change the output for this test to mean anything"
    with pm.disable_adapter():
        assert_close(pm(x).logits, base_logits)
    pm.merge_adapter()
    assert_close(pm(x).logits, unmerged, scale=10)  # merged vs unmerged differ only by fp32 summation order
    before = {n: p.clone() for n, p in pm.named_parameters()}
    pm.merge_adapter()  # merging twice is idempotent
    for n, p in pm.named_parameters():
        assert torch.equal(p, before[n]), n
    pm.unmerge_adapter()
    ref_params = dict(ref.named_parameters())
    for name, host in ((n, m) for n, m in pm.get_base_model().named_modules() if isinstance(m, AdaptedLayer)):
        assert_close(host.base_layer.weight, ref_params[name + ".weight"], scale=10)
    assert_close(pm(x).logits, unmerged)


@pytest.mark.parametrize("case", ["llama-lora", "gpt2-conv1d", "llama-dora"])
def test_merge_and_unload_gives_plain_model(case):
    pm, _ = _model(case)
    x = input_ids()
    expected = pm(x).logits
    plain = pm.merge_and_unload()
    assert not any(isinstance(m, (AdaptedLayer, ModulesToSaveWrapper)) for m in plain.modules())
    assert_close(plain(x).logits, expected, scale=10)


def test_unload_drops_adapters():
    pm, ref = _model("llama-lora")
    x = input_ids()
    plain = pm.unload()
    assert_close(plain(x).logits, ref(x).logits)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_residual_inits_keep_the_model(init):
    base = tiny_llama()
    x = input_ids()
    expected = base(x).logits
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init)).eval()
    assert_close(pm(x).logits, expected, scale=100)  # the SVD/QR round trip costs a few ulps per weight
    adapter = pm.get_base_model().model.layers[0].self_attn.q_proj.adapters["default"]
    assert adapter.lora_B.abs().sum() > 0  # unlike the default init, both factors are non-zero


def test_multi_adapter_add_switch_delete():
    base = tiny_llama()
    ref = copy.deepcopy(base)
    x = input_ids()
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).eval()
    out_default = pm(x).logits
    pm.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj", "q_proj"], init_lora_weights=False))
    assert pm.active_adapter == "default"
    assert_close(pm(x).logits, out_default)  # adding does not activate
    pm.set_adapter("other")
    out_other = pm(x).logits
    assert (out_other - out_default).abs().max() > 1e-3
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".other." in n for n in trainable)
    pm.set_adapter("default")
    assert_close(pm(x).logits, out_default)
    pm.delete_adapter("other")
    assert_close(pm(x).logits, out_default)
    assert "other" not in pm.peft_config
    # v_proj only carried 'other': its wrapper is gone
    assert not isinstance(pm.get_base_model().model.layers[0].self_attn.v_proj, AdaptedLayer)
    pm.delete_adapter("default")
    assert_close(pm(x).logits, ref(x).logits)
    with pytest.raises(ValueError, match="no adapter named"):
        pm.set_adapter("missing")


def test_only_adapters_train_and_gradients_reach_them():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1, init_lora_weights=False))
    pm.train()
    x = input_ids()
    loss = pm(input_ids=x, labels=x).loss
    loss.backward()
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    assert {n.rsplit(".", 1)[-1] for n, p in pm.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


def test_bias_modes():
    counts = {}
    for bias in ("none", "lora_only", "all"):
        pm = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], bias=bias))
        counts[bias] = pm.get_nb_trainable_parameters()[0]
    c_attn_bias = 2 * 3 * 32  # 2 layers, bias of size 3*hidden
    assert counts["lora_only"] - counts["none"] == c_attn_bias
    assert counts["all"] > counts["lora_only"]


def test_lora_on_plain_mlp():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    expected = mlp(x)
    pm = get_peft_model(mlp, LoraConfig(r=2, target_modules=["0", "2"]))
    assert_close(pm(x), expected)  # B = 0 at init
    assert pm.get_nb_trainable_parameters()[0] == 2 * (4 + 8) + 2 * (8 + 2)


def test_dropout_only_in_training():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5, init_lora_weights=False))
    x = input_ids()
    pm.eval()
    assert torch.equal(pm(x).logits, pm(x).logits)
    pm.train()
    torch.manual_seed(0)
    a = pm(x).logits
    torch.manual_seed(1)
    b = pm(x).logits
    assert (a - b).abs().max() > 0


def test_lora_and_dora_train_under_bf16_autocast():
    for dora in (False, True):
        pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=dora, init_lora_weights=False))
        x = input_ids()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None for p in pm.parameters() if p.requires_grad)


def test_dropout_mask_is_shared_by_modules_reading_the_same_input():
    from deltatune.methods import lora

    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "k_proj"], lora_dropout=0.3)).train()
    seen = []
    real = lora._shared_dropout_mask

    def spy(x, p, user):
        mask = real(x, p, user)
        seen.append((x, mask))
        return mask

    lora._shared_dropout_mask = spy
    try:
        pm(input_ids())
    finally:
        lora._shared_dropout_mask = real
    (xq, mq), (xk, mk) = seen[0], seen[1]  # layer 0: q_proj then k_proj read the same hidden state
    assert xq is xk and mq is mk
    keep = torch.cat([m.flatten().float() for _, m in seen]).mean()
    assert 0.6 < keep < 0.8  # p = 0.3


@pytest.mark.parametrize("config", [
    lambda: dt.LoraConfig(exclude_modules="("), lambda: dt.LoraConfig(rank_pattern={"q[": 2}),
    lambda: dt.LoraConfig(alpha_pattern={"+v": 2}), lambda: dt.AdaLoraConfig(total_step=10, exclude_modules="a)"),
    lambda: dt.IA3Config(feedforward_modules="(", target_modules="("),
])
def test_every_regex_of_a_config_is_compiled_when_it_is_built(config):
    with pytest.raises(ValueError, match="regex .* does not compile"):
        config()


@pytest.mark.parametrize("use_dora", [False, True])
def test_inference_takes_one_path_whatever_the_token_count(use_dora, monkeypatch):
    """A batch of 64 tokens and its rows one at a time run the same low-rank kernel and agree. (The
    layer used to switch to W + sBA by itself above ~21 tokens, so eval numerics hung on batch size.)"""
    from deltatune.methods import lora

    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=use_dora,
                                                 init_lora_weights=False)).eval()
    name = "dora_linear" if use_dora else "lora_linear"
    real, tokens = getattr(lora, name), []
    monkeypatch.setattr(lora, name, lambda x, *a: tokens.append(x.shape[:-1].numel()) or real(x, *a))
    x = input_ids(batch=4, seq=16)
    with torch.no_grad():
        whole = pm(x).logits
        rows = torch.cat([pm(x[i:i + 1]).logits for i in range(4)])
    assert tokens == [64] * 4 + [16] * 16  # 2 layers x (q, v): every call took the kernel
    assert_close(whole, rows)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merged_inference_is_explicit_scoped_and_matches_the_default(use_dora, monkeypatch):
    from deltatune.methods import lora

    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=use_dora,
                                                 lora_dropout=0.1, init_lora_weights=False))
    with pytest.raises(ValueError, match="model.eval"):  # dropout is on in training mode
        with lora.merged_inference(pm):
            pass
    pm.eval()
    calls = []
    real = lora.LoraLinear.merged_forward
    monkeypatch.setattr(lora.LoraLinear, "merged_forward", lambda self, *a: calls.append(1) or real(self, *a))
    x = input_ids(batch=4, seq=16)
    with torch.no_grad():
        default = pm(x).logits
    assert calls == []
    with lora.merged_inference(pm):
        merged = pm(x).logits
        one_token = pm(x[:1, :1]).logits
        with torch.enable_grad(), pytest.raises(RuntimeError, match="for inference"):
            pm(x)
    assert len(calls) == 2 * 4 + 1  # every LoRA layer, whatever the batch (the failed call counted once)
    assert_close(merged, default)
    assert_close(one_token, default[:1, :1])
    assert not any(m.run_merged for m in pm.modules() if isinstance(m, lora.LoraLinear))


def test_dropout_masks_are_fresh_when_the_same_input_tensor_is_fed_again():
    """Training twice on the very same input tensor must not reuse the first step's mask (the shared
    mask used to be keyed on the tensor and its private version counter only)."""
    torch.manual_seed(0)
    pm = get_peft_model(nn.Sequential(nn.Linear(16, 16)),
                        LoraConfig(r=4, target_modules=["0"], lora_dropout=0.5, init_lora_weights=False)).train()
    x = torch.randn(8, 16)
    first, second = pm(x), pm(x)
    assert not torch.equal(first, second)


def test_shared_dropout_masks_survive_activation_checkpointing():
    """The recomputation in backward draws where the forward drew, so it rebuilds the same shared masks."""
    from deltatune.models.checkpointing import enable_activation_checkpointing

    def grads(checkpointing: bool) -> dict:
        targets = ["q_proj", "k_proj", "v_proj", "up_proj", "gate_proj"]
        pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=targets, lora_dropout=0.3, init_lora_weights=False)).train()
        if checkpointing:
            enable_activation_checkpointing(pm.base_model.model, {"use_reentrant": False})
        x = input_ids()
        torch.manual_seed(3)
        pm(input_ids=x, labels=x).loss.backward()
        return {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}

    plain, recomputed = grads(False), grads(True)
    for n in plain:
        assert_close(recomputed[n], plain[n])
