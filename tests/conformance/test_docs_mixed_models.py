"""peft docs, ported: ``docs/source/developer_guides/mixed_models.md`` and the section "Inference with different
LoRA adapters in the same batch" of ``docs/source/developer_guides/lora.md`` (huggingface/peft daf335f5^,
the last version of that page; the section now lives in ``package_reference/lora.md``).

Mixed adapter types: ``PeftMixedModel.from_pretrained`` + ``load_adapter`` + ``set_adapter([...])`` with
a LoRA and a LoHa adapter (the page's example pair: deltatune refuses LoHa, which it does not implement) and
with two LoRA adapters. Mixed batches: the page's load (``adapter_fr``,
``adapter_de``), its nine sentences and ``adapter_names`` with ``"__base__"``, then the caveats it
lists (order does not matter, ``disable_adapter`` takes precedence, merged adapters and DoRA are
refused, ``modules_to_save`` heads follow the row's adapter). The model id -> a tiny Llama and tokenizer
in a local folder; the adapters -> random LoRA adapters saved by peft; ``max_new_tokens`` 20 -> 5.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaForSequenceClassification

from docs_support import llama_config, load_causal_lm, local_llama, oracle, ours
from support_data import tiny_tokenizer
from tolerances import assert_close

SENTENCES = [
    "Hello, my dog is cute",
    "Hello, my cat is awesome",
    "Hello, my fish is great",
    "Salut, mon chien est mignon",
    "Salut, mon chat est génial",
    "Salut, mon poisson est super",
    "Hallo, mein Hund ist süß",
    "Hallo, meine Katze ist toll",
    "Hallo, mein Fisch ist großartig",
]
ADAPTER_NAMES = [
    "__base__", "__base__", "__base__",
    "adapter_fr", "adapter_fr", "adapter_fr",
    "adapter_de", "adapter_de", "adapter_de",
]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    import peft

    root = tmp_path_factory.mktemp("mixed")
    model_id = local_llama(root / "base")
    for seed, (name, kw) in enumerate({
        "lora_fr": dict(target_modules=["q_proj", "v_proj"]),
        "lora_de": dict(target_modules=["q_proj", "o_proj", "up_proj"]),
        "dora": dict(target_modules=["q_proj", "v_proj"], use_dora=True),
    }.items()):
        torch.manual_seed(seed)
        model = peft.get_peft_model(load_causal_lm(model_id), peft.LoraConfig(r=4, init_lora_weights=False, **kw))
        model.save_pretrained(root / name)
    torch.manual_seed(5)
    loha = peft.get_peft_model(load_causal_lm(model_id), peft.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False))
    loha.save_pretrained(root / "loha")
    return {"model_id": model_id, **{n: str(root / n) for n in ("lora_fr", "lora_de", "dora", "loha")}}


def mixed_types(lib, hub, other="loha"):
    PeftMixedModel = lib.PeftMixedModel  # from peft import PeftMixedModel

    base_model = load_causal_lm(hub["model_id"])  # load the base model, e.g. from transformers
    # load first adapter, which will be called "default"
    peft_model = PeftMixedModel.from_pretrained(base_model, hub["lora_fr"])
    peft_model.load_adapter(hub[other], adapter_name="other")
    peft_model.set_adapter(["default", "other"])
    return peft_model


def test_peft_mixed_model_lora_plus_loha(hub):
    # The page's pair. deltatune has no LoHa (issue 18: documented refusal in docs/api.md), so loading it
    # is an error that names the type, says it is not implemented and what to use instead.
    theirs = oracle(mixed_types, hub)
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        both = theirs(input_ids=x).logits
        theirs.set_adapter("default")
        assert not torch.allclose(theirs(input_ids=x).logits, both)  # both adapters were active
    with pytest.raises(NotImplementedError, match=r"LoHa adapter .*deltatune does not implement LoHa.*LoRA"):
        ours(mixed_types, hub)


def test_peft_mixed_model_lora_plus_lora(hub):
    # The page's example with a second LoRA (other targets) in place of the LoHa: both active, summed.
    theirs, mine = oracle(mixed_types, hub, "lora_de"), ours(mixed_types, hub, "lora_de")
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        both = mine(input_ids=x).logits
        assert_close(both, theirs(input_ids=x).logits)
        mine.set_adapter("default")
        assert not torch.allclose(mine(input_ids=x).logits, both)  # both adapters were active


def load_fr_de(lib, hub):
    PeftModel = lib.PeftModel  # from peft import PeftModel

    model_id = hub["model_id"]
    tokenizer = AutoTokenizer.from_pretrained(model_id)

    model = load_causal_lm(model_id)
    # load the LoRA adapter for French
    peft_model = PeftModel.from_pretrained(model, hub["lora_fr"], adapter_name="adapter_fr")
    # next, load the LoRA adapter for German
    peft_model.load_adapter(hub["lora_de"], adapter_name="adapter_de")
    return peft_model, tokenizer


def mixed_batch(lib, hub, adapter_names=ADAPTER_NAMES, sentences=SENTENCES):
    peft_model, tokenizer = load_fr_de(lib, hub)
    inputs = tokenizer(sentences, return_tensors="pt", padding=True)
    output = peft_model.generate(**inputs, adapter_names=adapter_names, max_new_tokens=5)
    return output, peft_model, inputs


def test_mixed_batch_generate_matches_peft_and_each_adapter_alone(hub):
    out_t, _, _ = oracle(mixed_batch, hub)
    out_o, model, inputs = ours(mixed_batch, hub)
    assert torch.equal(out_o, out_t)
    # each row is what its adapter alone (or the base model) generates
    for name, rows in (("adapter_fr", slice(3, 6)), ("adapter_de", slice(6, 9)), ("__base__", slice(0, 3))):
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(**inputs, max_new_tokens=5)
        else:
            model.set_adapter(name)
            alone = model.generate(**inputs, max_new_tokens=5)
        assert torch.equal(out_o[rows], alone[rows]), name


def test_mixed_batch_order_does_not_matter(hub):
    perm = [8, 3, 0, 5, 7, 1, 4, 2, 6]
    out, model, _ = ours(mixed_batch, hub)
    shuffled, _, _ = ours(mixed_batch, hub, [ADAPTER_NAMES[i] for i in perm], [SENTENCES[i] for i in perm])
    out_t, _, _ = oracle(mixed_batch, hub, [ADAPTER_NAMES[i] for i in perm], [SENTENCES[i] for i in perm])
    assert torch.equal(shuffled, out_t)
    # rows padded to the same length in both batches compare directly
    tok = tiny_tokenizer()
    lengths = [len(tok(s)["input_ids"]) for s in SENTENCES]
    for new_pos, old_pos in enumerate(perm):
        if lengths[old_pos] == max(lengths):
            assert torch.equal(shuffled[new_pos], out[old_pos])


def disabled(lib, hub):
    peft_model, tokenizer = load_fr_de(lib, hub)
    inputs = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    with torch.no_grad(), peft_model.disable_adapter():
        return peft_model(**inputs, adapter_names=ADAPTER_NAMES).logits, load_causal_lm(hub["model_id"])(**inputs).logits


def test_mixed_batch_caveat_disable_adapter_takes_precedence(hub):
    out_t, base = oracle(disabled, hub)
    assert_close(out_t, base)
    out_o, base = ours(disabled, hub)
    assert_close(out_o, base)


def merged(lib, hub):
    peft_model, tokenizer = load_fr_de(lib, hub)
    peft_model.merge_adapter()
    inputs = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="(?i)unmerge"):
        peft_model(**inputs, adapter_names=ADAPTER_NAMES)
    peft_model.unmerge_adapter()
    return peft_model(**inputs, adapter_names=ADAPTER_NAMES).logits


def test_mixed_batch_caveat_merged_adapters_are_refused(hub):
    # "You cannot pass adapter_names when some adapter weights were merged ... unmerge all adapters first"
    assert_close(ours(merged, hub), oracle(merged, hub))


def dora(lib, hub):
    peft_model = lib.PeftModel.from_pretrained(load_causal_lm(hub["model_id"]), hub["dora"], adapter_name="dora")
    ids = torch.tensor([[5, 6, 7], [7, 8, 9]])
    with torch.no_grad():
        alone = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
        mixed = peft_model(input_ids=ids, adapter_names=["dora", "__base__"]).logits
    return mixed, alone, base


def test_mixed_batch_caveat_dora_refused_by_peft_served_by_deltatune(hub):
    # "This feature does not currently work with DoRA": peft 0.21.2 raises. deltatune serves DoRA rows
    # (docs/serving.md), which is allowed if each row gets exactly what its adapter alone gives.
    with pytest.raises(ValueError, match="DoRA"):
        dora(__import__("peft"), hub)
    mixed, alone, base = ours(dora, hub)
    assert_close(mixed[0], alone[0])
    assert_close(mixed[1], base[1])
    assert not torch.allclose(alone[0], base[0])


def classifier_heads(lib, tmp_path):
    """"The same approach also works with the modules_to_save feature" (a classification head per adapter)."""
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(_cls_config(tok)).eval()
    peft_model = lib.get_peft_model(model, lib.LoraConfig(task_type="SEQ_CLS", target_modules=["q_proj"], init_lora_weights=False), adapter_name="a")
    peft_model.add_adapter("b", lib.LoraConfig(task_type="SEQ_CLS", target_modules=["v_proj"], init_lora_weights=False))
    return peft_model


def _cls_config(tok):
    cfg = llama_config(tok)
    cfg.num_labels = 3
    return cfg


def test_mixed_batch_with_modules_to_save_heads(tmp_path):
    import deltatune
    import peft

    theirs = oracle(classifier_heads, tmp_path)
    mine = ours(classifier_heads, tmp_path)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # different heads and adapters, the same in both libraries (through peft's keys)
        for name in ("a", "b"):
            sd = peft.get_peft_model_state_dict(theirs, adapter_name=name)
            sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
            peft.set_peft_model_state_dict(theirs, sd, adapter_name=name)
            deltatune.set_peft_model_state_dict(mine, sd, adapter_name=name)
    theirs.eval()
    mine.eval()
    ids = torch.tensor([[5, 6, 7, 8]] * 3)
    names = ["a", "b", "__base__"]
    with torch.no_grad():
        out_t = theirs(input_ids=ids, adapter_names=names).logits
        out_o = mine(input_ids=ids, adapter_names=names).logits
    assert_close(out_o, out_t)
    assert not torch.allclose(out_o[0], out_o[1])
