"""``AutoPeftModelForQuestionAnswering`` against peft 0.21.2's on a tiny ``BertForQuestionAnswering``: the base
is built from ``adapter_config.json``'s ``base_model_name_or_path``, the class is the QA task class, and the
span logits equal peft's for the same saved adapter (saved by either library)."""
from __future__ import annotations

import peft
import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering

import deltatune as dt
from tiny import VOCAB, input_ids, perturb
from tolerances import assert_close

X = input_ids()


@pytest.fixture
def bert_dir(tmp_path):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    folder = tmp_path / "bert-qa"
    BertForQuestionAnswering(cfg).save_pretrained(folder)
    return str(folder)


def _adapter(lib, base_dir, out):
    """A QA LoRA adapter with non-zero weights (LoRA B and the ``qa_outputs`` copy moved), saved to ``out``."""
    model = lib.get_peft_model(
        BertForQuestionAnswering.from_pretrained(base_dir),
        lib.LoraConfig(task_type="QUESTION_ANS", r=4, target_modules=["query", "value"]),
    )
    perturb(model, seed=1)
    model.save_pretrained(out)
    return str(out)


def _spans(model):
    with torch.no_grad():
        out = model(input_ids=X)
    return torch.stack([out.start_logits, out.end_logits])


@pytest.mark.parametrize("saved_by", ["peft", "deltatune"])
def test_loads_base_and_adapter_like_peft(tmp_path, bert_dir, saved_by):
    adapter = _adapter(peft if saved_by == "peft" else dt, bert_dir, tmp_path / "adapter")
    mine = dt.AutoPeftModelForQuestionAnswering.from_pretrained(adapter)
    theirs = peft.AutoPeftModelForQuestionAnswering.from_pretrained(adapter)
    assert type(mine) is dt.PeftModelForQuestionAnswering and type(theirs).__name__ == type(mine).__name__
    assert not mine.training and not any(p.requires_grad for p in mine.parameters())
    assert_close(_spans(mine), _spans(theirs))
    base = BertForQuestionAnswering.from_pretrained(bert_dir).eval()
    assert not torch.allclose(_spans(mine), _spans(base))  # the adapter (and its qa_outputs copy) is loaded


def test_is_trainable_keeps_the_head_and_adapter_trainable(tmp_path, bert_dir):
    adapter = _adapter(dt, bert_dir, tmp_path / "adapter")
    mine = dt.AutoPeftModelForQuestionAnswering.from_pretrained(adapter, is_trainable=True)
    theirs = peft.AutoPeftModelForQuestionAnswering.from_pretrained(adapter, is_trainable=True)
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert any(p.requires_grad for n, p in mine.named_parameters() if "qa_outputs" in n)


def test_other_task_types_point_to_their_class(tmp_path, bert_dir):
    adapter = _adapter(dt, bert_dir, tmp_path / "adapter")
    with pytest.raises(ValueError, match="AutoPeftModelForQuestionAnswering"):
        dt.AutoPeftModelForCausalLM.from_pretrained(adapter)
    with pytest.raises(ValueError, match="AutoPeftModelForQuestionAnswering"):
        dt.AutoPeftModel.from_pretrained(adapter)
