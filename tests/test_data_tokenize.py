"""Label masking and truncation."""
import datasets
from support_data import tiny_tokenizer

from deltatune.data.templates import render_segments
from deltatune.data.tokenize import IGNORE_INDEX, tokenize_dataset, tokenize_segments

MSGS = [{"role": "user", "content": "What is the topic?"}, {"role": "assistant", "content": "sports"}]


def _labelled_text(tok, out):
    return tok.decode([t for t, lab in zip(out["input_ids"], out["labels"]) if lab != IGNORE_INDEX])


def test_only_the_assistant_reply_carries_labels():
    tok = tiny_tokenizer()
    segs = render_segments({"messages": MSGS, "text": ""}, tok, "tokenizer")
    out = tokenize_segments(segs, tok, max_length=128)
    assert out["input_ids"] == tok.apply_chat_template(MSGS, tokenize=True, return_dict=True)["input_ids"]
    assert _labelled_text(tok, out) == "sports<|im_end|>\n"
    assert all(lab in (IGNORE_INDEX, tid) for tid, lab in zip(out["input_ids"], out["labels"]))
    assert not out["truncated"]


def test_train_on_prompt_labels_every_token():
    tok = tiny_tokenizer()
    segs = render_segments({"messages": MSGS, "text": ""}, tok, "tokenizer")
    out = tokenize_segments(segs, tok, max_length=128, train_on_prompt=True)
    assert out["labels"] == out["input_ids"]


def test_slow_path_without_offsets_gives_the_same_labels():
    tok = tiny_tokenizer()
    segs = render_segments({"messages": MSGS, "text": ""}, tok, "tokenizer")
    fast = tokenize_segments(segs, tok, max_length=128)

    class NoOffsets:  # a tokenizer without offset mappings, as slow tokenizers are
        is_fast = False

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": tok(text, add_special_tokens=add_special_tokens)["input_ids"]}

    assert tokenize_segments(segs, NoOffsets(), max_length=128) == fast


def test_truncation_cuts_the_end_and_is_flagged():
    tok = tiny_tokenizer()
    segs = render_segments({"messages": MSGS, "text": ""}, tok, "tokenizer")
    full = tokenize_segments(segs, tok, max_length=1000)
    n = len(full["input_ids"])
    cut = tokenize_segments(segs, tok, max_length=n - 1)
    assert cut["truncated"] and cut["input_ids"] == full["input_ids"][: n - 1]


def test_tokenize_dataset_counts_truncated_and_drops_rows_left_without_labels():
    tok = tiny_tokenizer()
    long_prompt = [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]
    rows = [{"messages": MSGS, "text": "", "label": "a"}, {"messages": long_prompt, "text": "", "label": "b"}]
    short = len(tokenize_segments(render_segments(rows[0], tok, "tokenizer"), tok, 1000)["input_ids"])
    out, stats = tokenize_dataset(datasets.Dataset.from_list(rows), tok, "tokenizer", max_length=short)
    assert (stats.examples, stats.truncated, stats.dropped) == (1, 1, 1)
    assert out["label"][:] == ["a"]  # extra columns survive for scoring
    assert stats.label_tokens == sum(lab != IGNORE_INDEX for lab in out[0]["labels"][1:])
    assert stats.longest == short
    assert "1 truncated, 1 dropped" in stats.summary()
