"""peft's low-level API (inject_adapter_in_model + get/set_peft_model_state_dict on a plain model) and
cast_mixed_precision_params, each against peft 0.21."""
from __future__ import annotations

import peft
import pytest
import torch
from torch import nn
from torch.testing import assert_close

import deltatune
from tiny import input_ids, tiny_llama


class DummyModel(nn.Module):
    """The model of peft's low-level API page."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 10)
        self.linear = nn.Linear(10, 10)
        self.lm_head = nn.Linear(10, 10)

    def forward(self, input_ids):
        return self.lm_head(self.linear(self.embedding(input_ids)))


X = torch.LongTensor([[0, 1, 2, 3, 4, 5, 6, 7]])


def doc_example(lib):
    torch.manual_seed(0)
    lora_config = lib.LoraConfig(lora_alpha=16, lora_dropout=0.1, r=64, bias="none", target_modules=["linear"])
    model = lib.inject_adapter_in_model(lora_config, DummyModel())
    model.eval()
    return model, lib.get_peft_model_state_dict(model)


def test_the_doc_page_example_matches_peft():
    theirs, sd_t = doc_example(peft)
    mine, sd_m = doc_example(deltatune)
    assert {k: v.shape for k, v in sd_m.items()} == {k: v.shape for k, v in sd_t.items()}
    assert list(mine.peft_config) == list(theirs.peft_config) == ["default"]
    # same weights in, same outputs out (B starts at zero: perturb it through the state dict)
    sd = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) for i, (k, v) in enumerate(sorted(sd_t.items()))}
    peft.set_peft_model_state_dict(theirs, sd)
    deltatune.set_peft_model_state_dict(mine, sd)
    mine.embedding.load_state_dict(theirs.embedding.state_dict())
    mine.lm_head.load_state_dict(theirs.lm_head.state_dict())
    mine.linear.base_layer.load_state_dict(theirs.linear.base_layer.state_dict())
    with torch.no_grad():
        assert_close(mine(X), theirs(X))
    for k, v in deltatune.get_peft_model_state_dict(mine).items():
        assert_close(v, sd[k])


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_injecting_from_a_state_dict_uses_its_keys(low_cpu_mem_usage):
    _, sd = doc_example(deltatune)
    results = {}
    for lib in (peft, deltatune):
        config = lib.LoraConfig(r=64, target_modules=["lm_head"])
        with pytest.warns(RuntimeWarning, match="lm_head"):
            model = lib.inject_adapter_in_model(config, DummyModel(), state_dict=sd, low_cpu_mem_usage=low_cpu_mem_usage)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert all(p.is_meta == low_cpu_mem_usage for p in trainable.values())
        lib.set_peft_model_state_dict(model, sd, low_cpu_mem_usage=low_cpu_mem_usage)
        assert not any(p.is_meta for p in model.parameters())
        results[lib.__name__] = lib.get_peft_model_state_dict(model)
    assert results["deltatune"].keys() == results["peft"].keys() == sd.keys()
    for k in sd:
        assert_close(results["deltatune"][k], sd[k])


def test_a_failed_load_keeps_meta_adapters_on_meta():
    _, sd = doc_example(deltatune)
    model = deltatune.inject_adapter_in_model(deltatune.LoraConfig(r=64, target_modules=["linear"]), DummyModel(),
                                              low_cpu_mem_usage=True)
    with pytest.raises(ValueError, match="missing"):
        deltatune.set_peft_model_state_dict(model, {"linear.lora_A.weight": sd["linear.lora_A.weight"]})
    assert all(p.is_meta for p in model.parameters() if p.requires_grad)


def test_llama_injection_matches_peft_keys_and_two_adapters_keep_both_configs():
    sds = {}
    for lib in (peft, deltatune):
        model = tiny_llama()
        lib.inject_adapter_in_model(lib.LoraConfig(target_modules=["q_proj", "v_proj"]), model)
        lib.inject_adapter_in_model(lib.IA3Config(target_modules=["k_proj", "down_proj"],
                                                  feedforward_modules=["down_proj"]), model, adapter_name="ia3")
        assert sorted(model.peft_config) == ["default", "ia3"]
        sds[lib.__name__] = {n: {k: v.shape for k, v in lib.get_peft_model_state_dict(model, adapter_name=n).items()}
                             for n in ("default", "ia3")}
    assert sds["deltatune"] == sds["peft"]


def test_ia3_from_a_state_dict_round_trips():
    src = tiny_llama()
    deltatune.inject_adapter_in_model(deltatune.IA3Config(target_modules=["k_proj", "down_proj"],
                                                          feedforward_modules=["down_proj"]), src)
    sd = {k: v + 0.1 for k, v in deltatune.get_peft_model_state_dict(src).items()}
    dst = tiny_llama()
    config = deltatune.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    deltatune.inject_adapter_in_model(config, dst, state_dict=sd, low_cpu_mem_usage=True)
    deltatune.set_peft_model_state_dict(dst, sd)
    deltatune.set_peft_model_state_dict(src, sd)
    with torch.no_grad():
        assert_close(dst(input_ids=input_ids()).logits, src(input_ids=input_ids()).logits)


def test_clear_errors():
    with pytest.raises(ValueError, match="inject_adapter_in_model"):
        deltatune.get_peft_model_state_dict(DummyModel())
    model, sd = doc_example(deltatune)
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        deltatune.set_peft_model_state_dict(model, sd, adapter_name="other")
    with pytest.raises(ValueError, match="names a module"):
        deltatune.inject_adapter_in_model(deltatune.LoraConfig(target_modules=["linear"]), DummyModel(),
                                          state_dict={"base_model.model.linear.lora_A.weight": torch.zeros(8, 10)})


def fp16_peft_model(lib):
    torch.manual_seed(0)
    model = tiny_llama().to(torch.float16)
    return lib.get_peft_model(model, lib.LoraConfig(target_modules=["q_proj", "v_proj"]), autocast_adapter_dtype=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_mixed_precision_params_matches_peft(dtype):
    dtypes = {}
    for lib in (peft, deltatune):
        model = fp16_peft_model(lib)
        lib.cast_mixed_precision_params(model, dtype)
        dtypes[lib.__name__] = sorted((p.requires_grad, p.dtype) for p in model.parameters())
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
        assert {p.dtype for p in model.parameters() if not p.requires_grad} == {dtype}
    assert dtypes["deltatune"] == dtypes["peft"]
    from deltatune.helpers import cast_mixed_precision_params

    assert cast_mixed_precision_params is deltatune.cast_mixed_precision_params
