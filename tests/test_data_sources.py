"""Reading local data files: every supported type, and a clear error for each way it can fail."""
import json

import datasets
import pytest
from support_data import write_jsonl

from deltatune.data.sources import load_source

ROWS = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]


def _write(path, kind):
    if kind == "jsonl":
        write_jsonl(path, ROWS)
    elif kind == "json":
        path.write_text(json.dumps(ROWS))
    elif kind == "csv":
        path.write_text("prompt,completion\na,b\nc,d\n")
    else:
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_each_supported_type_loads_the_same_rows(tmp_path, kind):
    ds = load_source(_write(tmp_path / f"data.{kind}", kind))
    assert ds.to_list() == ROWS


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl.*does not exist"):
        load_source(tmp_path / "nope.jsonl")


def test_folder_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="is a folder"):
        load_source(tmp_path)


def test_unsupported_extension_lists_the_supported_ones(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match=r"unsupported extension '\.txt'.*\.jsonl, \.json, \.csv, \.parquet"):
        load_source(path)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_source(path)


def test_csv_with_only_a_header_has_no_rows(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("prompt,completion\n")
    with pytest.raises(ValueError, match="holds no rows|Could not read"):
        load_source(path)


def test_malformed_json_says_what_was_expected(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": \n')
    with pytest.raises(ValueError, match="Could not read .*bad.jsonl.* as json"):
        load_source(path)
