"""Partial fine-tuning: chosen blocks/modules train in full through modules_to_save copies. Closed forms
(index selection, trainable counts = parameters of the selected modules), invariants (originals never
change, disabled == base, switching adapters == loading the copies into a plain model), the life cycle
on tiny LLaMA, GPT-2 and BERT-cls, peft's key format, and the errors."""
import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from deltatune import BitFitConfig, LoraConfig, PartialConfig, PeftModel, get_peft_model
from deltatune.methods.partial import drop_nested, resolve_partial_targets, select_layer_indices
from deltatune.surgery.layer import ModulesToSaveWrapper
from tiny import input_ids, perturb, tiny_bert_cls, tiny_gpt2, tiny_llama
from tolerances import assert_close


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls on a shared 2-core machine run ~30x slower with 2 intra-op threads than with 1.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _numel(module):
    return sum(p.numel() for p in module.parameters())


def _plain_with_copies(model, peft_model, adapter):
    """A plain copy of ``model`` with the adapter's trained copies loaded: what the adapter means."""
    plain = copy.deepcopy(model)
    for name, wrapper in peft_model.base_model.model.named_modules():
        if isinstance(wrapper, ModulesToSaveWrapper) and adapter in wrapper.modules_to_save:
            plain.get_submodule(name).load_state_dict(wrapper.modules_to_save[adapter].state_dict())
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
def test_select_layer_indices():
    assert select_layer_indices("last:2", 5) == [3, 4]
    assert select_layer_indices("first:1", 5) == [0]
    assert select_layer_indices([-1, 0, 4], 5) == [0, 4]
    assert select_layer_indices(2, 5) == [2]
    with pytest.raises(ValueError, match="index 5 is out of range: model.layers has 5 blocks"):
        select_layer_indices([5], 5, "model.layers")
    with pytest.raises(ValueError, match="asks for 3 blocks but h has 2"):
        select_layer_indices("last:3", 2, "h")


def test_drop_nested():
    assert drop_nested(["a.b.c", "a.b", "a.bc", "a.b"]) == ["a.b", "a.bc"]


def test_trainable_counts_closed_form():
    llama = tiny_llama()
    last = get_peft_model(tiny_llama(), PartialConfig(layers_to_train="last:1", modules=["lm_head", "norm"]))
    # "norm" is a suffix match on whole path components: model.norm, not the blocks' input_layernorm.
    expected = _numel(llama.model.layers[1]) + _numel(llama.lm_head) + _numel(llama.model.norm)
    assert last.get_nb_trainable_parameters()[0] == expected
    assert last.get_nb_trainable_parameters()[1] == _numel(llama) + expected  # originals + copies, as peft counts
    gpt2 = tiny_gpt2()
    first = get_peft_model(tiny_gpt2(), PartialConfig(layers_to_train=[0]))
    assert first.get_nb_trainable_parameters()[0] == _numel(gpt2.transformer.h[0])
    bert = tiny_bert_cls()
    cls = get_peft_model(tiny_bert_cls(), PartialConfig(layers_to_train="last:1", task_type="SEQ_CLS"))
    assert cls.get_nb_trainable_parameters()[0] == _numel(bert.bert.encoder.layer[1]) + _numel(bert.classifier)


def test_dry_run_names_outermost_modules_in_model_order():
    config = PartialConfig(layers_to_train="last:1", modules=r".*\.mlp", modules_to_save=["lm_head"])
    assert resolve_partial_targets(tiny_llama(), config) == ["model.layers.0.mlp", "model.layers.1", "lm_head"]


# ---- invariants ------------------------------------------------------------------------------------
def test_disable_and_switch_between_two_adapters():
    model, x = tiny_llama(), input_ids()
    base = model(x).logits
    peft_model = get_peft_model(copy.deepcopy(model), PartialConfig(layers_to_train="last:1"))
    perturb(peft_model, 1, std=0.3)
    peft_model.add_adapter("other", PartialConfig(layers_to_train=[0, 1], modules=["lm_head"]))
    peft_model.set_adapter("other")
    perturb(peft_model, 2, std=0.3)
    for name in ("default", "other", "default"):
        peft_model.set_adapter(name)
        out = peft_model(x).logits
        assert not torch.allclose(out, base)
        assert_close(out, _plain_with_copies(model, peft_model, name)(x).logits)
        with peft_model.disable_adapter():
            assert_close(peft_model(x).logits, base)
    peft_model.delete_adapter("other")
    assert not any(isinstance(m, ModulesToSaveWrapper) for m in peft_model.model.lm_head.modules())
    expected = _plain_with_copies(model, peft_model, "default")(x).logits
    assert_close(peft_model.unload()(x).logits, expected)  # unload keeps the active trained copies


def test_bitfit_and_lora_next_to_partial():
    model, x = tiny_gpt2(), input_ids()
    peft_model = get_peft_model(model, PartialConfig(layers_to_train="last:1"))
    peft_model.add_adapter("lora", LoraConfig(r=2, target_modules=["c_attn"], layers_to_transform=[0]))
    peft_model.add_adapter("bitfit", BitFitConfig(target_modules=r".*\.h\.0\..*"))
    with pytest.raises(ValueError, match=r"BitFit cannot train the bias of transformer.h.1.ln_1: it lies inside transformer.h.1"):
        peft_model.add_adapter("bitfit_all", BitFitConfig())
    with pytest.raises(ValueError, match=r"cannot train transformer.h.0 in full: .*attn.c_attn holds adapters \['lora', 'bitfit'\]"):
        peft_model.add_adapter("partial0", PartialConfig(layers_to_train=[0]))
    assert sorted(peft_model.peft_config) == ["bitfit", "default", "lora"]  # failed adds left nothing behind
    peft_model.set_adapter(["default", "lora", "bitfit"])
    assert peft_model(x).logits.shape == (2, 8, 96)


# ---- life cycle ------------------------------------------------------------------------------------
def _round_trip(peft_model, make, x, tmp_path, **kw):
    tuned = peft_model(input_ids=x).logits
    peft_model.save_pretrained(tmp_path / "ad")
    loaded = PeftModel.from_pretrained(make(), tmp_path / "ad")
    assert loaded.peft_config["default"].peft_type.value == "PARTIAL"
    assert_close(loaded(input_ids=x).logits, tuned)
    with loaded.disable_adapter():
        assert_close(loaded(input_ids=x).logits, make()(input_ids=x).logits)
    return load_file(tmp_path / "ad" / "adapter_model.safetensors"), loaded


def test_life_cycle_llama(tmp_path):
    x = input_ids()
    peft_model = get_peft_model(tiny_llama(), PartialConfig(layers_to_train="last:1", task_type="CAUSAL_LM"))
    frozen = copy.deepcopy(peft_model.model.model.layers[1].original_module)
    _train(peft_model, _Rows(lambda r, i: r.clone()), tmp_path)
    for p, q in zip(peft_model.model.model.layers[1].original_module.parameters(), frozen.parameters()):
        assert torch.equal(p, q)  # the original block never changes; its copy trained
    saved, loaded = _round_trip(peft_model, tiny_llama, x, tmp_path)
    block = tiny_llama().model.layers[1]
    assert sorted(saved) == sorted(f"base_model.model.model.layers.1.{k}" for k in block.state_dict())
    copy_ = peft_model.model.model.layers[1].modules_to_save["default"]
    assert not torch.equal(copy_.mlp.down_proj.weight, frozen.mlp.down_proj.weight)
    ours = peft_model.generate(input_ids=x, max_new_tokens=3, do_sample=False)
    assert torch.equal(loaded.generate(input_ids=x, max_new_tokens=3, do_sample=False), ours)


def test_life_cycle_gpt2_and_bert_cls(tmp_path):
    x = input_ids()
    gpt2 = get_peft_model(tiny_gpt2(), PartialConfig(layers_to_train=[-1], modules=["ln_f"], task_type="CAUSAL_LM"))
    _train(gpt2, _Rows(lambda r, i: r.clone()), tmp_path)
    saved, _ = _round_trip(gpt2, tiny_gpt2, x, tmp_path / "gpt2")
    assert "base_model.model.transformer.ln_f.weight" in saved and "base_model.model.transformer.h.1.attn.c_attn.weight" in saved
    bert = get_peft_model(tiny_bert_cls(), PartialConfig(layers_to_train="last:1", task_type="SEQ_CLS"))
    _train(bert, _Rows(lambda r, i: torch.tensor(i % 3)), tmp_path)
    saved, _ = _round_trip(bert, tiny_bert_cls, x, tmp_path / "bert")
    assert {"base_model.model.classifier.weight", "base_model.model.bert.encoder.layer.1.output.dense.bias"} <= set(saved)


def test_keys_match_peft_modules_to_save_format():
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    their_keys = {k for k in peft.get_peft_model_state_dict(theirs) if "lm_head" in k}
    ours = get_peft_model(tiny_llama(), PartialConfig(modules=["lm_head"]))
    assert set(ours.get_adapter_state_dict("default")) == their_keys == {"base_model.model.lm_head.weight"}


# ---- errors ----------------------------------------------------------------------------------------
def test_config_errors():
    with pytest.raises(ValueError, match="selects nothing to train"):
        PartialConfig()
    with pytest.raises(ValueError, match="'last-2' is not understood"):
        PartialConfig(layers_to_train="last-2")
    with pytest.raises(ValueError, match="non-empty list of ints"):
        PartialConfig(layers_to_train=[])
    with pytest.raises(ValueError, match="only makes sense together with layers_to_train"):
        PartialConfig(modules=["lm_head"], layers_pattern="layers")


def test_selection_errors():
    with pytest.raises(ValueError, match=r"'lm_haed' matches no module of LlamaForCausalLM. Did you mean 'lm_head'"):
        get_peft_model(tiny_llama(), PartialConfig(modules=["lm_haed"]))
    with pytest.raises(ValueError, match="regex 'nothing' matches no module path"):
        get_peft_model(tiny_llama(), PartialConfig(modules="nothing"))
    with pytest.raises(ValueError, match="index 7 is out of range: model.layers has 2 blocks"):
        get_peft_model(tiny_llama(), PartialConfig(layers_to_train=[7]))
    with pytest.raises(ValueError, match=r"layers_pattern='blocks' matches no list.*model.layers \(2\)"):
        get_peft_model(tiny_llama(), PartialConfig(layers_to_train=[0], layers_pattern="blocks"))
    with pytest.raises(ValueError, match="is a ModuleList.*select its blocks with layers_to_train"):
        get_peft_model(tiny_llama(), PartialConfig(modules=["layers"]))
    with pytest.raises(ValueError, match="has no parameters to train"):
        get_peft_model(tiny_llama(), PartialConfig(modules=["act_fn"]))
    model = get_peft_model(tiny_llama(), PartialConfig(layers_to_train=[1]))
    with pytest.raises(ValueError, match="model.layers.1.mlp lies inside model.layers.1, which another adapter"):
        model.add_adapter("mlp", PartialConfig(modules=["mlp"]))
