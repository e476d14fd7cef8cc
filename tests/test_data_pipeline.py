"""DataConfig validation and the two pipeline steps: validate before the model, prepare with its tokenizer."""
import dataclasses

import pytest
import torch
from support_data import chat_rows, tiny_tokenizer, write_jsonl

from deltatune.data import DataConfig, IGNORE_INDEX, prepare_datasets, validate_data


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"format": "xml"}, r"DataConfig.format is 'xml'; expected one of auto, alpaca"),
        ({"template": "vicuna"}, "DataConfig.template is 'vicuna'"),
        ({"max_length": 4}, r"max_length is 4; expected an integer >= 8"),
        ({"eval_size": -1}, "eval_size is -1"),
        ({"max_train_examples": 0}, "max_train_examples is 0"),
        ({"packed_mask": "2d"}, "packed_mask is '2d'"),
        ({"article_tokens": 200}, r"article_tokens is 200; expected at most max_length - 64 = 192"),
        ({"article_tokens": 4}, r"article_tokens is 4; expected an integer >= 8"),
        ({"source": ""}, "DataConfig.source is ''"),
        ({"format": "alpaca"}, "'auto' for the built-in 'bbc-news'"),
        ({"eval_source": "e.jsonl"}, "eval_source is 'e.jsonl'; expected None for the built-in"),
    ],
)
def test_config_validation_says_what_was_expected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


def test_config_is_frozen_and_round_trips_through_a_dict():
    cfg = DataConfig(source="x.jsonl", packing=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.packing = False
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"Unknown data config key\(s\) \['pack'\]"):
        DataConfig.from_dict({"pack": True})


def test_validate_data_fails_on_bad_rows_without_a_tokenizer(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match="has no assistant message"):
        validate_data(DataConfig(source=str(path), eval_size=0))


def test_eval_size_larger_than_the_data_is_explained(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(6))
    with pytest.raises(ValueError, match=r"eval_size=200 but .* has only 6 examples.*e.g. 1"):
        validate_data(DataConfig(source=str(path)))


def test_split_and_separate_eval_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(10))
    ex = validate_data(DataConfig(source=str(path), eval_size=3, seed=1))
    assert (len(ex.train), len(ex.eval), ex.format) == (7, 3, "chat")
    assert sorted(ex.train["label"][:] + ex.eval["label"][:]) == sorted(r["label"] for r in chat_rows(10))
    eval_path = write_jsonl(tmp_path / "e.jsonl", chat_rows(2))
    ex = validate_data(DataConfig(source=str(path), eval_source=str(eval_path), max_train_examples=4))
    assert (len(ex.train), len(ex.eval)) == (4, 2)


@pytest.mark.parametrize("packing", [False, True])
def test_prepare_datasets_gives_batches_a_model_accepts(tmp_path, packing):
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(10))
    cfg = DataConfig(source=str(path), eval_size=2, packing=packing, max_length=128)
    data = prepare_datasets(cfg, tiny_tokenizer())
    assert data.template == "tokenizer" and data.train_stats.examples == 8
    assert len(data.train) < 8 if packing else len(data.train) == 8
    batch = data.collator([data.train[i] for i in range(len(data.train))])
    assert batch["input_ids"].shape == batch["labels"].shape
    assert (batch["labels"] != IGNORE_INDEX).any()
    if packing:
        assert batch["attention_mask"].dim() == 4 and "position_ids" in batch
    eval_batch = data.collator([data.eval[0], data.eval[1]])
    assert eval_batch["attention_mask"].dtype == torch.long
    assert set(data.eval.column_names) >= {"messages", "label", "input_ids", "labels"}
