"""Row formats: detection from columns, conversion into messages/text, and errors that name columns."""
import datasets
import pytest

from deltatune.data.formats import detect_format, normalize, normalize_row


def _ds(rows):
    return datasets.Dataset.from_list(rows)


@pytest.mark.parametrize(
    ("columns", "fmt"),
    [
        (["messages"], "chat"),
        (["conversations", "id"], "sharegpt"),
        (["instruction", "input", "output"], "alpaca"),
        (["instruction", "output"], "alpaca"),
        (["prompt", "completion", "label"], "prompt_completion"),
        (["text"], "text"),
    ],
)
def test_detect_format_from_columns(columns, fmt):
    assert detect_format(columns) == fmt


def test_undetectable_columns_are_listed_with_the_expected_ones():
    with pytest.raises(ValueError, match=r"columns \['answer', 'question'\].*alpaca: instruction, output"):
        detect_format(["question", "answer"])


def test_explicit_format_with_missing_column_names_found_and_expected():
    expected = r"'alpaca' needs column\(s\) instruction, output.*output missing.*\['instruction'\]"
    with pytest.raises(ValueError, match=expected):
        normalize(_ds([{"instruction": "x"}]), "alpaca")


def test_alpaca_joins_instruction_and_input_into_the_user_turn():
    row = {"instruction": "Translate.", "input": "bonjour", "output": "hello"}
    assert normalize_row(row, "alpaca")["messages"] == [
        {"role": "user", "content": "Translate.\n\nbonjour"},
        {"role": "assistant", "content": "hello"},
    ]
    row["input"] = ""
    assert normalize_row(row, "alpaca")["messages"][0]["content"] == "Translate."


def test_sharegpt_roles_are_mapped():
    row = {"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
    ]}
    assert [m["role"] for m in normalize_row(row, "sharegpt")["messages"]] == ["system", "user", "assistant"]


def test_sharegpt_unknown_speaker_is_an_error():
    with pytest.raises(ValueError, match=r"Row 3, turn 0: speaker 'bot'"):
        normalize_row({"conversations": [{"from": "bot", "value": "x"}]}, "sharegpt", index=3)


def test_prompt_completion_becomes_user_and_assistant():
    out = normalize_row({"prompt": "2+2=", "completion": "4"}, "prompt_completion")
    assert out == {"messages": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}], "text": ""}


def test_text_rows_keep_the_document():
    assert normalize_row({"text": "A document."}, "text") == {"messages": [], "text": "A document."}


def test_chat_without_an_assistant_turn_is_an_error():
    with pytest.raises(ValueError, match="Row 0 has no assistant message"):
        normalize_row({"messages": [{"role": "user", "content": "hi"}]}, "chat")


def test_chat_with_an_unknown_role_is_an_error():
    with pytest.raises(ValueError, match="role 'bot' is not one of system, user, assistant"):
        normalize_row({"messages": [{"role": "bot", "content": "hi"}]}, "chat")


def test_normalize_keeps_label_and_drops_other_columns():
    ds = _ds([{"prompt": "p", "completion": "c", "label": "x", "extra": 1}])
    out, fmt = normalize(ds)
    assert fmt == "prompt_completion"
    assert sorted(out.column_names) == ["label", "messages", "text"]
    assert out[0]["label"] == "x"


def test_normalize_reads_messages_of_varying_shapes_through_arrow():
    rows = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "c"},
                      {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"},
                      {"role": "assistant", "content": "f"}]},
    ]
    out, fmt = normalize(_ds(rows))
    assert fmt == "chat"
    assert out.to_list() == [{"messages": r["messages"], "text": ""} for r in rows]
