"""data.on_bad_rows: rows without an answer or a label stop the run (naming file and row) or are dropped and counted."""
import datasets
import pytest
from support_data import tiny_tokenizer, write_jsonl

from deltatune.data import DataConfig, prepare_datasets, validate_data
from deltatune.data.formats import BadRow, normalize, normalize_row
from deltatune.train.config import load_train_config


def _pc_rows(n: int = 8) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}.", "label": str(i % 2)} for i in range(n)]


def test_config_accepts_error_and_drop_only():
    assert DataConfig().on_bad_rows == "error"
    assert DataConfig(on_bad_rows="drop").on_bad_rows == "drop"
    with pytest.raises(ValueError, match=r"DataConfig.on_bad_rows is 'skip'; expected one of error, drop"):
        DataConfig(on_bad_rows="skip")
    # The data: section of a train config is checked against DataConfig's fields, so the key works there.
    assert load_train_config(None, ["data.source=x.jsonl", "data.on_bad_rows=drop"]).data.on_bad_rows == "drop"


@pytest.mark.parametrize(
    ("row", "fmt", "match"),
    [
        ({"prompt": "p", "completion": None}, "prompt_completion", "has no 'completion'"),
        ({"prompt": "p", "completion": "  "}, "prompt_completion", "has an empty 'completion'"),
        ({"prompt": None, "completion": "c"}, "prompt_completion", "has no 'prompt'"),
        ({"instruction": "i", "output": None}, "alpaca", "has no 'output'"),
        ({"text": None}, "text", "has no 'text'"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}, "chat",
         "message 1 .assistant. has no content"),
        ({"prompt": "p", "completion": "c", "label": None}, "prompt_completion", "has no 'label'"),
    ],
)
def test_rows_missing_content_are_bad_rows(row, fmt, match):
    with pytest.raises(BadRow, match=match):
        normalize_row(row, fmt, index=4)


def test_a_null_or_missing_completion_is_an_error_naming_file_and_row(tmp_path):
    rows = _pc_rows()
    rows[2] = {"prompt": "What is 2 plus 2?", "label": "0"}  # no completion key at all
    rows[5]["completion"] = None
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match=r"d\.jsonl', row 3 has no 'completion'.*"
                                         r"2 of 8 rows.*set data\.on_bad_rows=drop to skip such rows"):
        validate_data(DataConfig(source=str(path), eval_size=0))


def test_a_csv_row_with_too_few_fields_is_an_error(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion,label\nWhat is 1?,It is 1.,a\nWhat is 2?\nWhat is 3?,It is 3.,b\n")
    with pytest.raises(ValueError, match=r"d\.csv', row 2 has no 'completion'.*fewer fields than the header"):
        validate_data(DataConfig(source=str(path), eval_size=0))


def test_an_eval_row_without_a_label_is_an_error(tmp_path):
    rows = _pc_rows()
    rows[6]["label"] = None
    train = write_jsonl(tmp_path / "train.jsonl", _pc_rows())
    evaluation = write_jsonl(tmp_path / "eval.jsonl", rows)
    with pytest.raises(ValueError, match=r"eval\.jsonl', row 7 has no 'label'"):
        validate_data(DataConfig(source=str(train), eval_source=str(evaluation)))


def test_drop_removes_bad_rows_and_counts_them_in_the_report(tmp_path):
    rows = _pc_rows(10)
    rows[1]["completion"] = None
    rows[4]["label"] = None
    del rows[7]["completion"]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    eval_rows = _pc_rows(4)
    eval_rows[0]["label"] = None
    eval_path = write_jsonl(tmp_path / "e.jsonl", eval_rows)
    cfg = DataConfig(source=str(path), eval_source=str(eval_path), on_bad_rows="drop", max_length=128)
    examples = validate_data(cfg)
    assert (len(examples.train), examples.train_dropped) == (7, 3)
    assert (len(examples.eval), examples.eval_dropped) == (3, 1)
    kept = {m[0]["content"] for m in examples.train["messages"][:]}
    assert kept == {r["prompt"] for i, r in enumerate(rows) if i not in (1, 4, 7)}
    assert all(m[1]["content"] for m in examples.train["messages"][:])  # no empty answer trains
    assert None not in examples.eval["label"][:]
    data = prepare_datasets(cfg, tiny_tokenizer(), examples)
    assert data.train_stats.bad_rows == 3 and data.eval_stats.bad_rows == 1
    assert "7 examples, 0 truncated, 3 dropped (3 bad rows)" in data.train_stats.summary()
    assert "3 examples, 0 truncated, 1 dropped (1 bad row)" in data.eval_stats.summary()


def test_drop_of_every_row_is_still_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": None}, {"prompt": "q", "completion": None}])
    with pytest.raises(ValueError, match=r"drop all 2 rows of .*d\.jsonl', leaving nothing; row 1 has no 'completion'"):
        validate_data(DataConfig(source=str(path), eval_size=0, on_bad_rows="drop"))


def test_normalize_without_a_file_names_the_row():
    ds = datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}, {"prompt": "q", "completion": None}])
    with pytest.raises(ValueError, match=r"^Row 2 has no 'completion'"):
        normalize(ds)
    out, _ = normalize(ds, on_bad_rows="drop")
    assert len(out) == 1


def test_a_malformed_row_is_an_error_either_way_and_names_the_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}])
    for policy in ("error", "drop"):
        with pytest.raises(ValueError, match=r"d\.jsonl': Row 1, message 0: role 'bot' is not one of"):
            validate_data(DataConfig(source=str(path), eval_size=0, on_bad_rows=policy))
