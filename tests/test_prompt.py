"""Prompt tuning (Lester et al., 2021): closed form, initialisations, life cycle, peft parity, generate."""
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from deltatune import PeftModel, get_peft_model
from deltatune.methods.prompt import PromptTuningConfig, fit_token_ids, prepend_prompt
from test_prompt_common import MODELS, check_generate_matches_reference, check_life_cycle, peft_round_trip
from tiny import VOCAB, input_ids, tiny_gpt2, tiny_llama
from tolerances import assert_close

TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert-cls": "SEQ_CLS"}


def _config(case, **kw):
    return PromptTuningConfig(num_virtual_tokens=4, task_type=TASK[case], **kw)


# ---- closed form ----------------------------------------------------------------------------------------------
def test_prepend_prompt_closed_form():
    prompt, embeds = torch.arange(4.0).view(2, 2), torch.full((3, 1, 2), 9.0)
    out = prepend_prompt(prompt, embeds)
    assert out.shape == (3, 3, 2)
    assert torch.equal(out[:, :2], prompt.expand(3, 2, 2)) and torch.equal(out[:, 2:], embeds)


def test_fit_token_ids_repeats_or_cuts():
    assert fit_token_ids([1, 2, 3], 7) == [1, 2, 3, 1, 2, 3, 1]
    assert fit_token_ids([1, 2, 3], 2) == [1, 2]


def test_forward_feeds_prompt_then_inputs_with_extended_mask_and_labels():
    pm = get_peft_model(tiny_llama(), _config("llama"))
    seen = {}
    pm.base_model.model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    x = input_ids(batch=2, seq=5)
    mask = torch.ones_like(x)
    mask[0, 0] = 0
    out = pm(input_ids=x, attention_mask=mask, labels=x)
    prompt = pm.prompt_encoder["default"].embedding.weight
    emb = pm.get_input_embeddings()(x)
    assert seen.get("input_ids") is None
    assert torch.equal(seen["inputs_embeds"], torch.cat([prompt.expand(2, 4, 32), emb], 1))
    assert seen["attention_mask"].tolist()[0] == [1, 1, 1, 1, 0, 1, 1, 1, 1]
    assert (seen["labels"][:, :4] == -100).all() and torch.equal(seen["labels"][:, 4:], x)
    assert out.logits.shape == (2, 9, VOCAB) and torch.isfinite(out.loss)
    # inputs_embeds instead of input_ids gives the same result
    assert_close(pm(inputs_embeds=emb, attention_mask=mask).logits, out.logits)


# ---- initialisation -------------------------------------------------------------------------------------------
def test_sample_vocab_rows_are_vocabulary_embeddings():
    pm = get_peft_model(tiny_llama(), _config("llama", prompt_tuning_init="SAMPLE_VOCAB"))
    table, vocab = pm.prompt_encoder["default"].embedding.weight, pm.get_input_embeddings().weight
    assert table.dtype == torch.float32
    for row in table:
        assert (vocab == row).all(dim=1).any()


def test_text_init_uses_the_local_tokenizer(tmp_path):
    words = {"[UNK]": 0, "classify": 7, "this": 11, "review": 13}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    pm = get_peft_model(
        tiny_llama(),
        _config("llama", prompt_tuning_init="TEXT", prompt_tuning_init_text="classify this review", tokenizer_name_or_path=str(tmp_path)),
    )
    vocab = pm.get_input_embeddings().weight
    # 3 text tokens repeated to 4 virtual tokens
    assert torch.equal(pm.prompt_encoder["default"].embedding.weight, vocab[[7, 11, 13, 7]])
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        _config("llama", prompt_tuning_init="TEXT", prompt_tuning_init_text="x")
    with pytest.raises(ValueError, match="local files only"):
        get_peft_model(tiny_llama(), _config("llama", prompt_tuning_init="TEXT", prompt_tuning_init_text="x",
                                             tokenizer_name_or_path=str(tmp_path / "nowhere")))


# ---- life cycle, parity ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", MODELS)
def test_life_cycle(case, tmp_path):
    pm = check_life_cycle(MODELS[case], _config(case), tmp_path)
    sd = pm.get_adapter_state_dict("default")
    assert sd["prompt_embeddings"].shape == (4, 32)
    if case == "bert-cls":  # the classifier trained in full and is saved as peft writes it
        assert set(sd) == {"prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"}


@pytest.mark.parametrize("case", MODELS)
def test_peft_parity_both_directions(case, tmp_path):
    import peft

    kw = dict(num_virtual_tokens=4, task_type=TASK[case])
    x = input_ids()
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    ours, loaded = peft_round_trip(MODELS[case], PromptTuningConfig(**kw), peft.PromptTuningConfig(**kw), tmp_path, mask)
    dims = ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules")
    assert [getattr(loaded.peft_config["default"], f) for f in dims] == [getattr(ours.peft_config["default"], f) for f in dims]


# ---- generate, adapters ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_generate_with_and_without_cache_matches_full_forwards(make):
    pm = get_peft_model(make(), _config("llama"))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.mul_(3.0)  # make the prompt matter
    check_generate_matches_reference(pm.eval())


def test_disable_adapter_generates_like_the_base_model():
    pm = get_peft_model(tiny_llama(), _config("llama")).eval()
    x = input_ids(batch=1)
    with pm.disable_adapter():
        got = pm.generate(input_ids=x, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, tiny_llama().generate(input_ids=x, max_new_tokens=4, do_sample=False))


def test_two_prompt_adapters_switch_train_and_delete(tmp_path):
    pm = get_peft_model(tiny_llama(), _config("llama"))
    pm.add_adapter("other", PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    x = input_ids()
    first = pm(input_ids=x).logits
    enc = pm.prompt_encoder
    assert enc["default"].embedding.weight.requires_grad and not enc["other"].embedding.weight.requires_grad
    pm.set_adapter("other")
    assert pm(input_ids=x).logits.shape[1] == x.shape[1] + 2
    assert enc["other"].embedding.weight.requires_grad and not enc["default"].embedding.weight.requires_grad
    assert pm.get_nb_trainable_parameters()[0] == 2 * 32
    pm.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").exists()
    pm.delete_adapter("other")
    assert list(pm.prompt_encoder) == ["default"] and pm.active_adapter == "default"
    assert_close(pm(input_ids=x).logits, first)


def test_loaded_prompt_can_resume_training(tmp_path):
    get_peft_model(tiny_llama(), _config("llama")).save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == 4 * 32


def test_merge_and_unload_refuses_prompt_tuning():
    import deltatune as dt
    from tiny import tiny_llama

    pm = dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    import pytest as _pytest

    with _pytest.raises(ValueError, match="cannot be merged"):
        pm.merge_and_unload()
