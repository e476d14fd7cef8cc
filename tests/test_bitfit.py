"""BitFit: only biases train. Closed forms (Δb on hand-sized layers, trainable counts, gradients equal to
training the base model's biases directly), invariants (disabled == base, merged == unmerged, switching
adapters), the life cycle on tiny GPT-2 and BERT-cls, and the errors."""
import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer, TrainingArguments

from deltatune import BitFitConfig, LoraConfig, PeftModel, get_peft_model
from deltatune.methods.bitfit import BitFitBias, bias_delta, resolve_bitfit_targets
from deltatune.surgery.layer import AdaptedLayer
from tiny import input_ids, perturb, tiny_bert_cls, tiny_gpt2, tiny_llama
from tolerances import assert_close


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls on a shared 2-core machine run ~30x slower with 2 intra-op threads than with 1.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _bias_numel(model, keep=lambda name: True):
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias") and keep(n))


def _with_biases(model, peft_model, adapter):
    """A plain copy of ``model`` whose biases are the adapter's: what BitFit means, computed directly."""
    plain = copy.deepcopy(model)
    for name, host in peft_model.base_model.model.named_modules():
        if isinstance(host, AdaptedLayer) and adapter in host.adapters:
            plain.get_submodule(name).bias.data.copy_(host.adapters[adapter].bias)
    return plain


class _Rows(torch.utils.data.Dataset):
    def __init__(self, labels_fn):
        ids = input_ids(batch=4, seq=8, seed=5)
        self.rows = [dict(input_ids=r, attention_mask=torch.ones_like(r), labels=labels_fn(r, i)) for i, r in enumerate(ids)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _train(model, dataset, tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
    )
    Trainer(model=model, args=args, train_dataset=dataset).train()
    model.eval()


# ---- closed forms ----------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [nn.Linear(4, 3), nn.LayerNorm(5), nn.Conv2d(2, 3, 3, padding=1), nn.GroupNorm(2, 4)])
def test_adapter_equals_layer_with_the_new_bias(layer):
    torch.manual_seed(0)
    x = {nn.Linear: (2, 6, 4), nn.LayerNorm: (2, 6, 5), nn.Conv2d: (2, 2, 5, 5), nn.GroupNorm: (2, 4, 3, 3)}[type(layer)]
    x = torch.randn(x)
    adapter = BitFitBias(layer)
    with torch.no_grad():
        adapter.bias.add_(torch.randn_like(adapter.bias))
    expected = copy.deepcopy(layer)
    expected.bias.data.copy_(adapter.bias)
    assert_close(adapter(x, layer, None), expected(x))


def test_bias_delta_shapes():
    out = torch.zeros(2, 3, 4, 4)
    delta = bias_delta(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 1.0]), out, channel_dim=1)
    assert delta.shape == (3, 1, 1) and delta.flatten().tolist() == [0.0, 1.0, 2.0]
    assert bias_delta(torch.ones(4), torch.zeros(4), torch.zeros(2, 4), channel_dim=-1).shape == (4,)


def test_trainable_counts_closed_form():
    gpt2 = tiny_gpt2()
    expected = _bias_numel(gpt2)
    assert expected > 0
    assert get_peft_model(tiny_gpt2(), BitFitConfig()).get_nb_trainable_parameters()[0] == expected
    only = get_peft_model(tiny_gpt2(), BitFitConfig(target_modules=["c_attn", "c_fc"]))
    assert only.get_nb_trainable_parameters()[0] == 2 * (3 * 32 + 4 * 32)  # per block: c_attn 3h, c_fc 4h
    regex = get_peft_model(tiny_gpt2(), BitFitConfig(target_modules=r".*\.h\.1\..*", exclude_modules=["ln_1", "ln_2"]))
    assert regex.get_nb_trainable_parameters()[0] == _bias_numel(gpt2, lambda n: ".h.1." in n and ".ln_" not in n)
    bert = tiny_bert_cls()
    head = sum(p.numel() for p in bert.classifier.parameters())  # SEQ_CLS trains the head in full
    cls = get_peft_model(tiny_bert_cls(), BitFitConfig(task_type="SEQ_CLS"))
    assert cls.get_nb_trainable_parameters()[0] == _bias_numel(bert, lambda n: not n.startswith("classifier")) + head


def test_gradients_equal_training_the_base_biases_directly():
    model, x = tiny_gpt2(), input_ids()
    plain = copy.deepcopy(model)
    for n, p in plain.named_parameters():
        p.requires_grad_(n.endswith(".bias"))
    plain(x, labels=x).loss.backward()
    peft_model = get_peft_model(model, BitFitConfig())
    peft_model(input_ids=x, labels=x).loss.backward()
    for name, host in peft_model.base_model.model.named_modules():
        if isinstance(host, AdaptedLayer):
            assert_close(host.adapters["default"].bias.grad, plain.get_submodule(name).bias.grad)
            assert host.base_layer.bias.grad is None and host.base_layer.weight.grad is None


# ---- invariants ------------------------------------------------------------------------------------
def test_disable_switch_merge_delete():
    model, x = tiny_gpt2(), input_ids()
    base = model(x).logits
    peft_model = get_peft_model(copy.deepcopy(model), BitFitConfig())
    perturb(peft_model, 1, std=0.3)
    peft_model.add_adapter("other", BitFitConfig(target_modules=["c_proj"]))
    peft_model.set_adapter("other")
    perturb(peft_model, 2, std=0.3)
    for name in ("default", "other", "default"):
        peft_model.set_adapter(name)
        assert_close(peft_model(x).logits, _with_biases(model, peft_model, name)(x).logits)
        with peft_model.disable_adapter():
            assert_close(peft_model(x).logits, base)
    peft_model.set_adapter("default")
    tuned = peft_model(x).logits
    peft_model.merge_adapter()
    assert_close(peft_model(x).logits, tuned)
    peft_model.unmerge_adapter()
    with peft_model.disable_adapter():
        assert_close(peft_model(x).logits, base)
    peft_model.delete_adapter("other")
    assert not any(isinstance(m, AdaptedLayer) and "other" in m.adapters for m in peft_model.modules())
    assert_close(peft_model(x).logits, tuned)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    assert not any(isinstance(m, AdaptedLayer) for m in merged.modules())
    assert_close(merged(x).logits, tuned)


def test_next_to_lora_on_the_same_layers():
    model, x = tiny_gpt2(), input_ids()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    peft_model.add_adapter("bitfit", BitFitConfig())
    perturb(peft_model, 3, std=0.3)  # only the active LoRA is trainable
    lora_only = peft_model(x).logits
    peft_model.set_adapter("bitfit")
    perturb(peft_model, 4, std=0.3)
    bitfit_only = peft_model(x).logits
    with peft_model.disable_adapter():
        base = peft_model(x).logits
    peft_model.set_adapter(["default", "bitfit"])
    both = peft_model(x).logits
    assert not torch.allclose(both, lora_only) and not torch.allclose(both, bitfit_only)
    assert not torch.allclose(bitfit_only, base)


# ---- life cycle ------------------------------------------------------------------------------------
def test_life_cycle_gpt2(tmp_path):
    model, x = tiny_gpt2(), input_ids()
    base = model(x).logits
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, BitFitConfig(task_type="CAUSAL_LM"))
    _train(peft_model, _Rows(lambda r, i: r.clone()), tmp_path)
    for n, p in model.named_parameters():  # the base model itself never changes
        if n in weights_before:
            assert torch.equal(p, weights_before[n]), n
    tuned = peft_model(x).logits
    assert not torch.allclose(tuned, base)
    with peft_model.disable_adapter():
        assert_close(peft_model(x).logits, base)
    peft_model.save_pretrained(tmp_path / "ad")
    saved = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    paths = resolve_bitfit_targets(tiny_gpt2(), BitFitConfig())
    assert sorted(saved) == sorted(f"base_model.model.{p}.bias" for p in paths)
    host = peft_model.base_model.model.transformer.h[0].attn.c_attn
    assert torch.equal(saved["base_model.model.transformer.h.0.attn.c_attn.bias"], host.adapters["default"].bias)
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ad")
    assert loaded.peft_config["default"].peft_type.value == "BITFIT"
    assert_close(loaded(x).logits, tuned)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # loaded for inference
    ours = peft_model.generate(input_ids=x, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(input_ids=x, max_new_tokens=3, do_sample=False, pad_token_id=0), ours)


def test_life_cycle_bert_cls(tmp_path):
    model, x = tiny_bert_cls(), input_ids()
    peft_model = get_peft_model(model, BitFitConfig(task_type="SEQ_CLS"))
    _train(peft_model, _Rows(lambda r, i: torch.tensor(i % 3)), tmp_path)
    tuned = peft_model(input_ids=x).logits
    peft_model.save_pretrained(tmp_path / "ad")
    saved = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(saved)
    assert "base_model.model.bert.pooler.dense.bias" in saved
    loaded = PeftModel.from_pretrained(tiny_bert_cls(), tmp_path / "ad")
    assert_close(loaded(input_ids=x).logits, tuned)
    with loaded.disable_adapter():
        assert_close(loaded(input_ids=x).logits, tiny_bert_cls()(input_ids=x).logits)


# ---- errors ----------------------------------------------------------------------------------------
def test_llama_has_no_biases():
    with pytest.raises(ValueError, match=r"no bias parameters in LlamaForCausalLM.*LoRA"):
        get_peft_model(tiny_llama(), BitFitConfig())


def test_selection_errors():
    with pytest.raises(ValueError, match=r"'c_atn' matches no module with a bias.*Did you mean 'c_attn'"):
        get_peft_model(tiny_gpt2(), BitFitConfig(target_modules=["c_atn"]))
    with pytest.raises(ValueError, match=r"no bias parameters .* target_modules='.*nothing.*'"):
        get_peft_model(tiny_gpt2(), BitFitConfig(target_modules=r".*nothing.*"))
    with pytest.raises(ValueError, match="after exclude_modules"):
        get_peft_model(tiny_gpt2(), BitFitConfig(target_modules=["c_fc"], exclude_modules=["c_fc"]))
    with pytest.raises(ValueError, match="does not compile"):
        BitFitConfig(target_modules="(")
    with pytest.raises(ValueError, match="modules_to_save entry 'nope'"):
        get_peft_model(tiny_gpt2(), BitFitConfig(modules_to_save=["nope"]))


def test_unsupported_layer_type_is_an_error_not_skipped():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(4))

        def forward(self, x):
            return x * 2 + self.bias

    model = nn.Sequential(nn.Linear(4, 4), Scale())
    with pytest.raises(ValueError, match=r"cannot adapt the bias of 1 \(Scale\).*exclude_modules=\['1'\]"):
        resolve_bitfit_targets(model, BitFitConfig())
    assert resolve_bitfit_targets(model, BitFitConfig(exclude_modules=["1"])) == ["0"]
