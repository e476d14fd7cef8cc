"""Merging a LoRA on a tied output head (or input embedding) keeps the adapted model's outputs."""
import warnings

import pytest
import torch

import deltatune as dt
from tiny import input_ids, tiny_gpt2
from tolerances import assert_close


@pytest.mark.parametrize("targets", [["lm_head"], ["wte"], ["c_attn", "lm_head"]])
def test_merge_and_unload_with_tied_embeddings_keeps_the_logits(targets):
    model = tiny_gpt2()  # GPT-2 ties wte and lm_head
    assert model.lm_head.weight is model.transformer.wte.weight
    pm = dt.get_peft_model(model, dt.LoraConfig(r=4, init_lora_weights=False, target_modules=targets)).eval()
    x = input_ids()
    with torch.no_grad():
        adapted = pm(input_ids=x).logits
        with pytest.warns(UserWarning, match="tied embeddings"):
            merged = pm.merge_and_unload()
        assert_close(merged(input_ids=x).logits, adapted, tier="reordered")  # merged vs unmerged sums
    assert merged.lm_head.weight is not merged.transformer.wte.weight
    assert merged.config.tie_word_embeddings is False


def test_merge_without_tied_weights_does_not_warn():
    pm = dt.get_peft_model(tiny_gpt2(), dt.LoraConfig(r=4, init_lora_weights=False, target_modules=["c_attn"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged = pm.merge_and_unload()
    assert merged.lm_head.weight is merged.transformer.wte.weight and merged.config.tie_word_embeddings
