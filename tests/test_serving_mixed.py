"""Mixed-adapter batches on a PeftModel: each row equals that adapter alone, and peft's adapter_names path."""
import copy
import warnings

import peft
import pytest
import torch

import deltatune as dt
from deltatune.serving import cpu_kernel
from tiny import input_ids, perturb, tiny_bert_cls, tiny_gpt2, tiny_llama
from tolerances import assert_close

LLAMA_ADAPTERS = {
    "lora4": dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "rslora8": dt.LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
    "dora2": dt.LoraConfig(r=2, use_dora=True, target_modules=["k_proj", "down_proj", "up_proj"]),
    "emb3": dt.LoraConfig(r=3, target_modules=["embed_tokens", "o_proj"]),
    "ia3": dt.IA3Config(),  # k_proj, v_proj (output) and down_proj (input, feed-forward)
}
ROWS = ["lora4", "rslora8", "__base__", "dora2", "ia3", "emb3", "rslora8"]


def _build(make, adapters):
    (first, cfg), *rest = adapters.items()
    model = dt.get_peft_model(make(), cfg.replace(init_lora_weights=False) if hasattr(cfg, "r") else cfg, first)
    for name, cfg in rest:
        model.add_adapter(name, cfg.replace(init_lora_weights=False) if hasattr(cfg, "r") else cfg)
    for name in adapters:
        model.set_adapter(name)
        perturb(model, seed=len(name), std=0.2)
    return model.eval()


def _alone(model, names, **kw):
    """Reference: each row run through its adapter alone (set_adapter), or with adapters disabled."""
    outs = []
    for i, name in enumerate(names):
        row = {k: v[i : i + 1] for k, v in kw.items()}
        if name == "__base__":
            with model.disable_adapter():
                outs.append(model(**row).logits)
        else:
            model.set_adapter(name)
            outs.append(model(**row).logits)
    return torch.cat(outs)


@pytest.fixture(scope="module")
def llama():
    return _build(tiny_llama, LLAMA_ADAPTERS)


@pytest.mark.parametrize("compiled", [True, False], ids=["cpu-kernel", "torch-path"])
@torch.no_grad()
def test_each_row_equals_its_adapter_alone(llama, compiled):
    x = input_ids(batch=len(ROWS), seq=13)  # 13 tokens: two full 6-token tiles of the CPU kernel and a remainder
    with cpu_kernel.switched(compiled):
        mixed = llama(input_ids=x, adapter_names=ROWS).logits
    assert_close(mixed, _alone(llama, ROWS, input_ids=x))


@torch.no_grad()
def test_mixed_rows_under_bf16_autocast(llama):
    # bf16 serving on CPUs with native bf16 (issue 17, item 3): the in-place low-rank update used to mix
    # the autocast bf16 product with the fp32 bank ("expected scalar type")
    x = input_ids(batch=len(ROWS), seq=13)
    with torch.autocast("cpu", torch.bfloat16):
        mixed = llama(input_ids=x, adapter_names=ROWS).logits
        alone = _alone(llama, ROWS, input_ids=x)
    assert mixed.dtype == alone.dtype == torch.bfloat16
    # both sides round every product to bf16 (2^-8 relative), in different orders: a few bf16 ulps
    # of logits of size ~1 through 2 layers
    torch.testing.assert_close(mixed.float(), alone.float(), rtol=0, atol=0.1)
    assert (mixed.float() - alone.float()).abs().mean() < 0.02


@pytest.mark.parametrize("compiled", [True, False], ids=["cpu-kernel", "torch-path"])
@torch.no_grad()
def test_rows_in_any_order_and_one_adapter_for_all(llama, compiled):
    x = input_ids(batch=4, seq=5, seed=3)
    for names in (["ia3", "dora2", "dora2", "lora4"], ["rslora8"] * 4, ["emb3"] * 4, ["dora2"] * 4, ["__base__"] * 4):
        with cpu_kernel.switched(compiled):
            mixed = llama(input_ids=x, adapter_names=names).logits
        assert_close(mixed, _alone(llama, names, input_ids=x))


@torch.no_grad()
def test_left_padding_with_attention_mask(llama):
    x = input_ids(batch=3, seq=6, seed=4)
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    names = ["dora2", "emb3", "__base__"]
    mixed = llama(input_ids=x, attention_mask=mask, adapter_names=names).logits
    assert_close(mixed, _alone(llama, names, input_ids=x, attention_mask=mask))


@torch.no_grad()
def test_matches_peft_adapter_names(tmp_path):
    # peft mixes LoRA adapters only, and refuses DoRA in mixed batches
    lora_only = {k: v for k, v in LLAMA_ADAPTERS.items() if k not in ("ia3", "dora2")}
    ours = _build(tiny_llama, lora_only)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = list(lora_only)
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / names[0], adapter_name=names[0])
        for n in names[1:]:
            theirs.load_adapter(tmp_path / n, adapter_name=n)
    theirs.eval()
    rows = [n for n in ROWS if n in lora_only or n == "__base__"]
    x = input_ids(batch=len(rows), seq=6, seed=5)
    assert_close(ours(input_ids=x, adapter_names=rows).logits, theirs(input_ids=x, adapter_names=rows).logits)
    # Sampling draws the same tokens from the same per-row distributions, step after step.
    kw = dict(max_new_tokens=5, do_sample=True, top_k=0, pad_token_id=0)
    torch.manual_seed(11)
    sampled = ours.generate(input_ids=x, adapter_names=rows, **kw)
    torch.manual_seed(11)
    assert torch.equal(sampled, theirs.generate(input_ids=x, adapter_names=rows, **kw))


@torch.no_grad()
def test_gpt2_conv1d_and_bert_modules_to_save():
    gpt = _build(tiny_gpt2, {
        "a": dt.LoraConfig(r=2, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
        "b": dt.LoraConfig(r=5, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True),
        "c": dt.IA3Config(),
    })
    x, names = input_ids(batch=4, seq=5), ["c", "a", "__base__", "b"]
    assert_close(gpt(input_ids=x, adapter_names=names).logits, _alone(gpt, names, input_ids=x))
    bert = _build(tiny_bert_cls, {
        "p": dt.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"),
        "q": dt.LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"),
    })
    names = ["q", "p", "__base__", "q"]
    x = input_ids(batch=4, seq=5)
    assert_close(bert(input_ids=x, adapter_names=names).logits, _alone(bert, names, input_ids=x))


@torch.no_grad()
def test_generate_follows_rows_through_the_kv_cache(llama):
    x = input_ids(batch=4, seq=5, seed=7)
    names = ["dora2", "__base__", "ia3", "rslora8"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    mixed = llama.generate(input_ids=x, adapter_names=names, **kw)
    for i, name in enumerate(names):
        if name == "__base__":
            with llama.disable_adapter():
                ref = llama.generate(input_ids=x[i : i + 1], **kw)
        else:
            llama.set_adapter(name)
            ref = llama.generate(input_ids=x[i : i + 1], **kw)
        assert torch.equal(mixed[i : i + 1], ref), name


@torch.no_grad()
def test_generate_beam_search_and_several_samples_per_row(llama):
    # Beams of one input stay inside its block of rows, so the row's adapter follows them.
    x = input_ids(batch=3, seq=4, seed=8)
    names = ["emb3", "lora4", "__base__"]
    kw = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    mixed = llama.generate(input_ids=x, adapter_names=names, **kw)
    assert mixed.shape[0] == 6
    for i, name in enumerate(names):
        llama.set_adapter(name if name != "__base__" else "lora4")
        ctx = llama.disable_adapter() if name == "__base__" else torch.no_grad()
        with ctx:
            ref = llama.generate(input_ids=x[i : i + 1], **kw)
        assert torch.equal(mixed[2 * i : 2 * i + 2], ref), name


def test_errors_say_what_to_do(llama):
    x = input_ids(batch=2, seq=4)
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        llama(input_ids=x, adapter_names=["nope", "ia3"])
    with pytest.raises(ValueError, match="one name per row"):
        llama(input_ids=x, adapter_names=["ia3"])
    with pytest.raises(TypeError, match="list of str"):
        llama(input_ids=x, adapter_names="ia3")
    llama.train()
    with pytest.raises(ValueError, match="model.eval"):
        llama(input_ids=x, adapter_names=["ia3", "ia3"])
    llama.eval()
    llama.set_adapter("lora4")
    llama.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        llama(input_ids=x, adapter_names=["ia3", "lora4"])
    llama.unmerge_adapter()


@torch.no_grad()
def test_bank_follows_weight_changes_and_deletions():
    model = _build(tiny_llama, {"a": dt.LoraConfig(r=2, target_modules=["q_proj"]), "b": dt.IA3Config()})
    x, names = input_ids(batch=2, seq=4), ["a", "b"]
    model(input_ids=x, adapter_names=names)
    model.set_adapter("a")
    perturb(model, seed=9, std=0.2)  # e.g. more training after a first mixed call: the bank must re-read "a"
    assert_close(model(input_ids=x, adapter_names=names).logits, _alone(model, names, input_ids=x))
    model.delete_adapter("b")
    with pytest.raises(ValueError, match="no adapter named 'b'"):
        model(input_ids=x, adapter_names=names)
    names = ["a", "__base__"]
    assert_close(model(input_ids=x, adapter_names=names).logits, _alone(model, names, input_ids=x))


@torch.no_grad()
def test_a_deep_copy_serves_its_own_weights():
    model = _build(tiny_llama, {"a": dt.LoraConfig(r=2, target_modules=["q_proj"])})
    x, names = input_ids(batch=2, seq=4), ["a", "__base__"]
    model(input_ids=x, adapter_names=names)  # the bank is cached on the model now
    twin = copy.deepcopy(model)
    perturb(twin, seed=3, std=0.2)
    assert_close(twin(input_ids=x, adapter_names=names).logits, _alone(twin, names, input_ids=x))
    assert_close(model(input_ids=x, adapter_names=names).logits, _alone(model, names, input_ids=x))


def test_prompt_learning_adapters_are_refused():
    model = dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")).eval()
    with pytest.raises(ValueError, match="cannot be mixed per row"):
        model(input_ids=input_ids(batch=1), adapter_names=["default"])
