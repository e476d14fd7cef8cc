"""LoRA on nn.Parameters (``target_parameters``): MoE expert stacks of tiny Mixtral, Qwen3-MoE and gpt-oss
models built from configs, checked against peft 0.21.2 (its ``lora.ParamWrapper``).

Tiers (tests/tolerances.py): the closed form of the per-expert update on hand-sized tensors; invariants
(merged == unmerged, disabled == base, a training step moves only adapter tensors); parity with peft both
ways (our save -> peft's load and the reverse give the same logits), and the same keys, counts and config.
"""
from __future__ import annotations

import warnings

import peft
import pytest
import torch
from transformers import (
    GptOssConfig, GptOssForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM,
)

import deltatune
from deltatune.inspect.parameters import parameter_groups
from deltatune.inspect.presets import preset_table
from deltatune.methods.lora_param import LoraParameters, adapted_weight, expert_delta
from deltatune.plan.meta import count_parameters
from deltatune.plan.setup import TrainSetup
from deltatune.surgery.params import ParamAdaptedLayer
from support_train import tiny_run_files  # noqa: F401 (fixture)
from tolerances import assert_close

SMALL = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
CONFIGS = {
    "mixtral": (MixtralForCausalLM, MixtralConfig(**SMALL, intermediate_size=12, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig(
        **SMALL, intermediate_size=12, moe_intermediate_size=12, head_dim=8, num_experts=4, num_experts_per_tok=2)),
    # gpt-oss stores its experts transposed, (experts, in, out), and has expert biases
    "gpt_oss": (GptOssForCausalLM, GptOssConfig(
        **SMALL, intermediate_size=12, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"])),
}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
X = torch.tensor([[3, 14, 15, 9, 26, 5, 35], [8, 9, 7, 9, 3, 2, 38]])


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


_WEIGHTS: dict[str, dict] = {}


def base(arch: str) -> torch.nn.Module:
    """A fresh copy of the arch's tiny model, always with the same random weights."""
    cls, cfg = CONFIGS[arch]
    if arch not in _WEIGHTS:
        torch.manual_seed(0)
        _WEIGHTS[arch] = cls(cfg).state_dict()
    model = cls(cfg)
    model.load_state_dict(_WEIGHTS[arch])
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


def lora(lib, **kw):
    return lib.LoraConfig(**{"r": 2, "lora_alpha": 4, "init_lora_weights": False, **kw})


# ---- closed form -----------------------------------------------------------------------------------
@pytest.mark.parametrize("transposed", [False, True])
def test_update_is_one_lora_per_expert_in_peft_layout(transposed):
    torch.manual_seed(0)
    E, r, d_in, d_out, s = 3, 2, 5, 4, 0.5
    A, B = torch.randn(r * E, d_in), torch.randn(d_out, r * E)
    W = torch.randn(E, d_in, d_out) if transposed else torch.randn(E, d_out, d_in)
    # peft's layout: expert e's A is rows e*r..e*r+r-1 of A, its B the columns j*E + e of B
    per_expert = torch.stack([s * B[:, e::E] @ A[e * r:(e + 1) * r] for e in range(E)])  # (E, out, in)
    want = per_expert.transpose(1, 2) if transposed else per_expert
    assert_close(expert_delta(A, B, s, E, transposed), want)
    assert_close(adapted_weight(W, A, B, s, transposed), W + want)
    W2 = torch.randn(d_out, d_in)  # a 2-D weight is the one-expert case, ΔW = s·B·A
    A2, B2 = A[:r], B[:, :r]
    assert_close(adapted_weight(W2, A2, B2, s), W2 + s * B2 @ A2)


# ---- parity with peft ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_logits_and_keys_equal_peft_both_ways(arch, tmp_path):
    kw = dict(target_modules=["q_proj"], target_parameters=EXPERTS)
    torch.manual_seed(1)
    ours = deltatune.get_peft_model(base(arch), lora(deltatune, **kw)).eval()
    assert any(isinstance(m, ParamAdaptedLayer) for m in ours.modules())
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(base(arch), tmp_path / "ours").eval()
    assert_close(logits(theirs), logits(ours))
    assert (logits(ours) - logits(base(arch))).abs().max() > 1e-3  # the adapter does change the output

    torch.manual_seed(2)
    theirs = peft.get_peft_model(base(arch), lora(peft, **kw)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = deltatune.PeftModel.from_pretrained(base(arch), tmp_path / "theirs", is_trainable=True).eval()
    assert_close(logits(loaded), logits(theirs))
    assert sorted(loaded.get_adapter_state_dict("default")) == sorted(peft.get_peft_model_state_dict(theirs))
    assert loaded.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


# peft 0.21 rewrites transformers-4 names on these families (router "gate" -> gate.weight; fused experts at
# twice the rank); LoraConfig(target_parameters=...) alone adapts no attention layer there.
CONVERTED = [
    ("mixtral", dict(target_parameters=["experts.down_proj"])),
    ("mixtral", dict(target_modules=["gate"])),
    ("mixtral", dict(target_modules=["q_proj", "w1", "w2", "w3"])),
    ("mixtral", dict(target_modules="all-linear")),
    ("qwen3_moe", dict(target_modules=["gate_proj", "up_proj", "down_proj"])),
    ("gpt_oss", dict(target_parameters=["experts.gate_up_proj"])),
]


@pytest.mark.parametrize("arch,kw", CONVERTED, ids=[f"{a}-{sorted(k.items())}" for a, k in CONVERTED])
def test_targets_resolve_as_in_peft(arch, kw, tmp_path):
    ours = deltatune.get_peft_model(base(arch), lora(deltatune, **kw))
    theirs = peft.get_peft_model(base(arch), lora(peft, **kw))
    assert sorted(ours.get_adapter_state_dict("default")) == sorted(peft.get_peft_model_state_dict(theirs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    mine, peft_cfg = ours.peft_config["default"], theirs.peft_config["default"]
    assert set(mine.target_modules) == set(peft_cfg.target_modules or ())
    assert set(mine.target_parameters or ()) == set(peft_cfg.target_parameters or ())
    assert dict(mine.rank_pattern) == dict(peft_cfg.rank_pattern)
    assert sorted(ours.targeted_module_names) == sorted(theirs.targeted_module_names)
    assert sorted(ours.base_model.targeted_parameter_names) == sorted(theirs.base_model.targeted_parameter_names)
    ours.save_pretrained(tmp_path)  # the rewritten config loads in peft to the same model
    assert_close(logits(peft.PeftModel.from_pretrained(base(arch), tmp_path).eval()), logits(ours.eval()))


def test_fused_experts_need_both_halves():
    with pytest.raises(ValueError, match="w1 without w3"):
        deltatune.get_peft_model(base("mixtral"), lora(deltatune, target_modules=["w1"]))


# ---- training, merging, adapters -------------------------------------------------------------------
def _adapter_params(model) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, deltatune.surgery.adapter.Adapter) for p in m.parameters()}


def test_training_step_moves_only_the_adapter():
    model = deltatune.get_peft_model(base("qwen3_moe"), lora(deltatune, target_modules=["q_proj"], target_parameters=EXPERTS))
    adapter = _adapter_params(model)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == adapter and trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).zero_grad()
    model(X, labels=X).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == (id(p) in adapter), n
    factors = [f for m in model.modules() if isinstance(m, LoraParameters) for f in m.factors.values()]
    assert len(factors) == 4  # 2 layers x (gate_up_proj, down_proj)


def test_merge_unmerge_and_unload_match_peft():
    kw = dict(target_modules=["q_proj"], target_parameters=EXPERTS)
    torch.manual_seed(3)
    ours = deltatune.get_peft_model(base("gpt_oss"), lora(deltatune, **kw)).eval()
    experts = ours.base_model.model.model.layers[0].mlp.experts.base_layer
    W0 = experts.gate_up_proj.detach().clone()
    unmerged = logits(ours)
    ours.merge_adapter()
    assert_close(logits(ours), unmerged, tier="reordered")
    ours.merge_adapter()  # merging twice changes nothing
    assert_close(logits(ours), unmerged, tier="reordered")
    ours.unmerge_adapter()
    assert_close(experts.gate_up_proj, W0, tier="reordered")
    with ours.disable_adapter():
        assert_close(logits(ours), logits(base("gpt_oss")))
    theirs = peft.get_peft_model(base("gpt_oss"), lora(peft, **kw)).eval()
    peft.set_peft_model_state_dict(theirs, ours.get_adapter_state_dict("default"))
    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    assert not any(isinstance(m, ParamAdaptedLayer) for m in merged_ours.modules())
    for (n, a), (m, b) in zip(merged_ours.state_dict().items(), merged_theirs.state_dict().items()):
        assert n == m
        assert_close(a, b, tier="reordered")
    assert_close(logits(merged_ours), unmerged, tier="reordered")


def test_several_adapters_and_mixed_batches():
    model = deltatune.get_peft_model(base("mixtral"), lora(deltatune, target_modules=[], target_parameters=EXPERTS))
    torch.manual_seed(4)
    model.add_adapter("other", lora(deltatune, target_modules=[], target_parameters=EXPERTS))
    alone = deltatune.get_peft_model(base("mixtral"), lora(deltatune, target_modules=[], target_parameters=EXPERTS))
    alone.load_adapter_state_dict(model.get_adapter_state_dict("other"))
    model.set_adapter("other")
    assert_close(logits(model.eval()), logits(alone.eval()))
    with pytest.raises(ValueError, match="same parameters"):
        model.add_adapter("third", lora(deltatune, target_modules=[], target_parameters=["experts.down_proj"]))
    with pytest.raises(ValueError, match="cannot be mixed per row"):
        model(X, adapter_names=["default", "other"])


# ---- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,message", [
    (dict(target_parameters=["mlp.experts.gate_up_prj"]), "Did you mean 'mlp.experts.gate_up_proj'"),
    (dict(target_parameters=["input_layernorm.weight"]), "only 2-D weights and 3-D"),
    (dict(target_parameters=EXPERTS, lora_dropout=0.1), "lora_dropout=0.1"),
    (dict(target_modules=["q_proj"], target_parameters=["q_proj.weight"]), "adapted one way only"),
])
def test_errors_say_what_to_do(kw, message):
    with pytest.raises(ValueError, match=message):
        deltatune.get_peft_model(base("mixtral"), lora(deltatune, **kw))


# ---- plan and inspect ------------------------------------------------------------------------------
def test_plan_and_inspect_count_the_real_adapter():
    cfg = CONFIGS["mixtral"][1].to_dict()
    setup = TrainSetup(method="lora", r=2, lora_alpha=4, lora_dropout=0.0, targets="q_proj", target_parameters=",".join(EXPERTS))
    real = deltatune.get_peft_model(base("mixtral"), lora(deltatune, target_modules=["q_proj"], target_parameters=EXPERTS))
    assert count_parameters(cfg, setup).trainable == real.get_nb_trainable_parameters()[0]
    groups = [g for g in parameter_groups(base("gpt_oss")) if g.experts > 1]
    assert [g.target for g in groups] == ["experts.gate_up_proj", "experts.down_proj"]
    assert [(g.in_features, g.out_features) for g in groups] == [(16, 24), (12, 16)]  # read through is_transposed
    only = deltatune.get_peft_model(base("gpt_oss"), lora(deltatune, target_parameters=[g.target for g in groups]))
    assert sum(g.lora_parameters(2) for g in groups) == only.get_nb_trainable_parameters()[0]
    # inspect's preset table counts what peft's rewrite of all-linear trains on Mixtral (router and experts too)
    row = next(row for row in preset_table(base("mixtral"), "mixtral", 4) if row.name == "all-linear")
    everything = deltatune.get_peft_model(base("mixtral"), deltatune.LoraConfig(r=4, target_modules="all-linear"))
    assert row.trainable == everything.get_nb_trainable_parameters()[0]


def test_deltatune_train_adapts_the_experts_and_peft_loads_the_result(tmp_path, tiny_run_files):  # noqa: F811
    # method.target_parameters through the CLI's config on a tiny Mixtral with the tests' chat tokenizer:
    # two steps train the expert adapters, and peft loads the saved adapter with equal logits.
    from support_data import tiny_tokenizer
    from deltatune.models.tokenizer import CHATML_TEMPLATE
    from deltatune.train.config import load_train_config
    from deltatune.train.run import run_training

    tok = tiny_tokenizer(CHATML_TEMPLATE)
    cls, _ = CONFIGS["mixtral"]
    torch.manual_seed(0)
    model = cls(MixtralConfig(**{**SMALL, "vocab_size": len(tok)}, intermediate_size=12, num_local_experts=4,
                              num_experts_per_tok=2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id))
    model.save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    config = load_train_config(None, [
        f"model={tmp_path / 'moe'}", f"data.source={tiny_run_files['data']}", "data.eval_size=0", "data.max_length=64",
        "method.target_modules=[q_proj]", f"method.target_parameters=[{','.join(EXPERTS)}]", "method.lora_dropout=0",
        "train.max_steps=2", "train.batch_size=4", "train.save_steps=0", "train.progress_bar=false",
        "train.tensorboard=false", "train.plot=false", "train.lr=0.05", f"output_dir={tmp_path / 'run'}"])
    result = run_training(config, log=lambda line: None)
    assert result.status == "completed"
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert any("experts" in n for n in trained) and any("q_proj" in n for n in trained)
    adapter = tmp_path / "run" / "adapter"
    ids = X.clamp(max=len(tok) - 1)
    with torch.no_grad():
        ours = deltatune.PeftModel.from_pretrained(cls.from_pretrained(tmp_path / "moe"), adapter).eval()(ids).logits
        theirs = peft.PeftModel.from_pretrained(cls.from_pretrained(tmp_path / "moe"), adapter).eval()(ids).logits
        plain = cls.from_pretrained(tmp_path / "moe").eval()(ids).logits
    assert (ours - plain).abs().max() > 1e-5
    assert_close(ours, theirs, tier="exact")
