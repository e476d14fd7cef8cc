"""``TaskType.QUESTION_ANS`` (tasks.py, ``PeftModelForQuestionAnswering``) against peft 0.21.2 on a tiny
``BertForQuestionAnswering``: the class, ``qa_outputs`` trained in full, counts, keys, outputs and a save/load
round trip both ways."""
import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForQuestionAnswering

import deltatune as dt
from tiny import VOCAB, input_ids, perturb
from tolerances import assert_close


def tiny_bert_qa(seed: int = 0) -> BertForQuestionAnswering:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    return BertForQuestionAnswering(cfg).eval()


CONFIGS = {
    "lora": lambda lib, **kw: lib.LoraConfig(task_type="QUESTION_ANS", r=4, target_modules=["query", "value"], **kw),
    "ia3": lambda lib, **kw: lib.IA3Config(task_type="QUESTION_ANS", target_modules=["key", "value", "output.dense"],
                                           feedforward_modules=["output.dense"], **kw),
}


@pytest.mark.parametrize("method", CONFIGS)
def test_class_head_counts_and_keys_match_peft(method):
    mine = dt.get_peft_model(tiny_bert_qa(), CONFIGS[method](dt))
    theirs = peft.get_peft_model(tiny_bert_qa(), CONFIGS[method](peft))
    assert type(mine) is dt.PeftModelForQuestionAnswering and type(theirs).__name__ == type(mine).__name__
    assert "qa_outputs" in mine.peft_config["default"].modules_to_save
    assert list(mine.peft_config["default"].modules_to_save) == list(theirs.peft_config["default"].modules_to_save)
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    trainable = {n for n, p in mine.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "qa_outputs" in n} == {
        "base_model.model.qa_outputs.modules_to_save.default.weight", "base_model.model.qa_outputs.modules_to_save.default.bias"}
    assert dt.get_peft_model_state_dict(mine).keys() == peft.get_peft_model_state_dict(theirs).keys()


def test_explicit_modules_to_save_is_extended_not_replaced():
    kw = dict(task_type="QUESTION_ANS", target_modules=["query"], modules_to_save=["LayerNorm"])
    mine = dt.get_peft_model(tiny_bert_qa(), dt.LoraConfig(**kw))
    theirs = peft.get_peft_model(tiny_bert_qa(), peft.LoraConfig(**kw))
    assert list(mine.peft_config["default"].modules_to_save) == ["LayerNorm", "qa_outputs"]
    assert list(mine.peft_config["default"].modules_to_save) == list(theirs.peft_config["default"].modules_to_save)
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("method", CONFIGS)
def test_outputs_and_loss_match_peft_and_save_load_both_ways(method, tmp_path):
    x = input_ids()
    starts, ends = torch.tensor([1, 2]), torch.tensor([3, 5])
    mine = perturb(dt.get_peft_model(tiny_bert_qa(), CONFIGS[method](dt)), seed=3).eval()
    theirs = peft.get_peft_model(tiny_bert_qa(), CONFIGS[method](peft)).eval()
    peft.set_peft_model_state_dict(theirs, dt.get_peft_model_state_dict(mine))
    with torch.no_grad():
        out_o = mine(input_ids=x, start_positions=starts, end_positions=ends)
        out_t = theirs(input_ids=x, start_positions=starts, end_positions=ends)
        assert (out_o.start_logits - tiny_bert_qa()(input_ids=x).start_logits).abs().max() > 1e-3
        for key in ("start_logits", "end_logits", "loss"):
            assert_close(out_o[key], out_t[key])
    mine.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "ours/adapter_config.json").read_text())["task_type"] == "QUESTION_ANS"
    assert load_file(tmp_path / "ours/adapter_model.safetensors").keys() == load_file(tmp_path / "peft/adapter_model.safetensors").keys()
    peft_loads_ours = peft.PeftModel.from_pretrained(tiny_bert_qa(), str(tmp_path / "ours")).eval()
    ours_loads_peft = dt.PeftModel.from_pretrained(tiny_bert_qa(), str(tmp_path / "peft")).eval()
    assert type(ours_loads_peft) is dt.PeftModelForQuestionAnswering
    with torch.no_grad():
        assert_close(peft_loads_ours(input_ids=x).end_logits, out_t.end_logits)
        assert_close(ours_loads_peft(input_ids=x).end_logits, out_t.end_logits)
