"""Trainable tokens (peft's ``TrainableTokensConfig`` and LoRA's ``trainable_token_indices``): parity with peft
both ways and on-disk keys equal to peft's, with tied and untied embeddings and a resized vocabulary; a training
step that changes only the chosen rows (the same step as peft's); merge/unmerge/unload; generate with an adapter
that carries its tokenizer; errors."""
import warnings

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from tolerances import assert_close

peft = pytest.importorskip("peft")
X = torch.tensor([[1, 3, 5, 2, 3, 7], [0, 21, 4, 20, 9, 1]])
ROWS = [1, 3, 20]


def tiny(tie: bool, vocab: int = 22, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=tie)).eval()


def config(lib, kind: str, rows=ROWS, **kw):
    kw.setdefault("init_lora_weights", False)
    if kind == "lora":
        return lib.LoraConfig(target_modules=["q_proj"], trainable_token_indices=list(rows), **kw)
    if kind == "lora_dict":
        return lib.LoraConfig(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": list(rows)}, **kw)
    kw.pop("init_lora_weights")
    return lib.TrainableTokensConfig(token_indices=list(rows), init_weights=False, **kw)


def logits(model):
    with torch.no_grad():
        return model(input_ids=X).logits


CASES = [(tie, kind) for tie in (True, False) for kind in ("lora", "lora_dict", "tokens")]


@pytest.mark.parametrize("tie,kind", CASES)
def test_peft_save_loads_in_deltatune_and_ours_in_peft_with_peft_keys(tie, kind, tmp_path):
    torch.manual_seed(1)
    theirs = peft.get_peft_model(tiny(tie), config(peft, kind))
    theirs.save_pretrained(tmp_path / "peft")
    ours = dt.PeftModel.from_pretrained(tiny(tie), tmp_path / "peft")
    assert_close(logits(ours), logits(theirs))
    assert ours.targeted_module_names == theirs.targeted_module_names
    counted = dt.get_peft_model(tiny(tie), config(dt, kind)).get_nb_trainable_parameters()
    assert counted == theirs.get_nb_trainable_parameters()
    ours.save_pretrained(tmp_path / "ours")
    mine, peft_keys = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert set(mine) == set(peft_keys)
    for k in mine:
        torch.testing.assert_close(mine[k], peft_keys[k], atol=0, rtol=0)
    back = peft.PeftModel.from_pretrained(tiny(tie), tmp_path / "ours")
    assert_close(logits(back), logits(theirs))
    if tie:  # the output layer reads the trained rows too: the logits of those tokens moved
        assert not torch.allclose(logits(ours)[..., ROWS], logits(tiny(tie))[..., ROWS])


@pytest.mark.parametrize("tie", [True, False])
def test_resized_vocabulary_saves_peft_keys_and_loads_both_ways(tie, tmp_path):
    """peft's recipe: add tokens, resize, train their rows; the resized matrices are saved with the adapter."""
    tiny(tie, vocab=20).save_pretrained(tmp_path / "base")

    def resized(lib_model_seed):
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(tmp_path / "base")
        torch.manual_seed(lib_model_seed)
        model.resize_token_embeddings(22)
        return model.eval()

    torch.manual_seed(2)
    theirs = peft.get_peft_model(resized(0), config(peft, "lora", rows=[20, 21]))
    ours = dt.get_peft_model(resized(0), config(dt, "lora", rows=[20, 21]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "peft")
        ours.save_pretrained(tmp_path / "ours")
    peft_keys = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(mine) == set(peft_keys)
    assert any(k.endswith("embed_tokens.token_adapter.base_layer.weight") for k in mine)
    # loading grows a fresh base to the saved vocabulary first (new rows drawn with another seed)
    back = peft.PeftModel.from_pretrained(resized(5), tmp_path / "ours")
    assert_close(logits(back), logits(ours))
    ours_again = dt.PeftModel.from_pretrained(resized(5), tmp_path / "peft")
    assert_close(logits(ours_again), logits(theirs))


@pytest.mark.parametrize("kind", ["lora", "tokens"])
def test_a_training_step_changes_only_the_chosen_rows_as_in_peft(kind):
    models = {}
    for name, lib in (("peft", peft), ("ours", dt)):
        torch.manual_seed(3)
        model = lib.get_peft_model(tiny(True), config(lib, kind, init_lora_weights=True) if kind == "lora"
                                   else lib.TrainableTokensConfig(token_indices=ROWS))
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(trainable, lr=0.5)
        model(input_ids=X, labels=X).loss.backward()
        opt.step()
        models[name] = model.eval()
    ours, theirs = models["ours"], models["peft"]
    assert_close(logits(ours), logits(theirs), scale=10)  # one SGD step: rounding of the two forwards adds up
    base = tiny(True)
    embed = ours.base_model.model.model.get_input_embeddings()
    layer = embed.token_adapter if kind == "lora" else embed
    delta = layer.adapters["default"].trainable_tokens_delta
    torch.testing.assert_close(layer.base_layer.weight, base.model.embed_tokens.weight, atol=0, rtol=0)  # frozen
    effective = layer.base_layer.weight.index_copy(0, torch.tensor(ROWS), delta.detach())
    changed = (effective != base.model.embed_tokens.weight).any(dim=1).nonzero().flatten().tolist()
    assert changed == ROWS
    names = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "trainable_tokens_delta" in n for n in names)
    assert ours.base_model.model.lm_head.weight is ours.base_model.model.model.embed_tokens.weight  # still tied


@pytest.mark.parametrize("tie,kind", [(True, "lora"), (True, "tokens"), (False, "lora")])
def test_merge_unmerge_and_unload(tie, kind):
    torch.manual_seed(4)
    model = dt.get_peft_model(tiny(tie), config(dt, kind))
    adapted, base = logits(model), logits(tiny(tie))
    model.merge_adapter()
    assert_close(logits(model), adapted)
    model.unmerge_adapter()
    assert_close(logits(model), adapted)
    with model.disable_adapter():
        assert_close(logits(model), base)
    plain = model.merge_and_unload()
    assert type(plain.model.embed_tokens).__name__ == "Embedding"
    assert type(plain.lm_head).__name__ == "Linear"
    assert (plain.lm_head.weight is plain.model.embed_tokens.weight) == tie
    assert_close(logits(plain), adapted)


def test_deleting_the_adapter_gives_back_the_plain_embedding():
    model = dt.get_peft_model(tiny(True), config(dt, "lora"))
    model.add_adapter("other", dt.LoraConfig(target_modules=["v_proj"]))
    model.delete_adapter("default")
    assert type(model.base_model.model.model.embed_tokens).__name__ == "Embedding"
    assert type(model.base_model.model.lm_head).__name__ == "Linear"


def test_combining_and_mixed_batches_are_refused_with_reasons():
    model = dt.get_peft_model(tiny(True), config(dt, "lora"))
    model.add_adapter("b", dt.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="cannot combine"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "c", combination_type="linear")
    with pytest.raises(ValueError, match="mixed-adapter batch"):
        model(input_ids=X, adapter_names=["default", "b"])


def test_errors_are_for_people():
    with pytest.raises(ValueError, match="outside the embedding's 22 rows"):
        dt.get_peft_model(tiny(False), config(dt, "lora", rows=[1, 30]))
    with pytest.raises(ValueError, match="modules_to_save"):
        dt.get_peft_model(tiny(False), config(dt, "lora", modules_to_save=["embed_tokens"]))
    with pytest.raises(ValueError, match="trains nothing"):
        dt.get_peft_model(tiny(False), dt.TrainableTokensConfig())
    with pytest.raises(ValueError, match="convert_tokens_to_ids"):
        dt.LoraConfig(trainable_token_indices=["<tool>"])
    with pytest.raises(ValueError, match="repeat"):
        dt.TrainableTokensConfig(token_indices=[3, 3])
    with pytest.raises(ValueError, match="no layer named"):
        dt.get_peft_model(tiny(False), config(dt, "lora", rows=[1]).replace(trainable_token_indices={"emb": (1,)}))


def test_generate_export_and_the_adapter_check_use_the_tokenizer_saved_with_the_adapter(tmp_path):
    from deltatune.cli.generate import load_for_generation
    from deltatune.export.merging import merged_model
    from deltatune.inspect.adapter_check import load_problems, read_adapter, tokenizer_verdict
    from deltatune.models import load_model_and_tokenizer, model_config
    from support_cli_generate import write_tiny_model

    folder = write_tiny_model(tmp_path / "base")
    model, tok = load_model_and_tokenizer(folder)
    tok.add_special_tokens({"additional_special_tokens": ["<tool>", "</tool>"]}, replace_extra_special_tokens=False)
    model.resize_token_embeddings(len(tok))
    new = tok.convert_tokens_to_ids(["<tool>", "</tool>"])
    torch.manual_seed(0)
    trained = dt.get_peft_model(model, dt.LoraConfig(target_modules=["q_proj"], trainable_token_indices=new,
                                                     init_lora_weights=False)).eval()
    with torch.no_grad():
        trained.base_model.model.model.embed_tokens.token_adapter.adapters["default"].trainable_tokens_delta.mul_(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    loaded, loaded_tok = load_for_generation(str(folder), str(tmp_path / "adapter"), device="cpu")
    ids = loaded_tok("hi <tool> x </tool>", return_tensors="pt")["input_ids"]
    assert set(new) <= set(ids[0].tolist())
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)
    merged, merged_tok, _ = merged_model(tmp_path / "adapter", str(folder))  # what `deltatune export` writes
    assert len(merged_tok) == len(tok)
    with torch.no_grad():
        assert_close(merged(input_ids=ids).logits, trained(input_ids=ids).logits)
    files = read_adapter(tmp_path / "adapter")
    cfg = model_config(str(folder))
    assert load_problems(files, dt.PeftConfig.from_pretrained(tmp_path / "adapter"), cfg) == []
    assert "use the tokenizer saved in" in tokenizer_verdict(files, cfg)


def test_a_layer_that_is_no_embedding_is_refused_before_anything_is_wrapped():
    from transformers import LlamaConfig, LlamaForCausalLM

    import deltatune as dt
    from deltatune.surgery.layer import AdaptedLayer

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    config = dt.TrainableTokensConfig(target_modules=["embed_tokens", "norm"], token_indices=[1, 2])
    with pytest.raises(ValueError, match="is a LlamaRMSNorm; trainable tokens need an nn.Embedding"):
        dt.get_peft_model(model, config)
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())  # nothing half-done
