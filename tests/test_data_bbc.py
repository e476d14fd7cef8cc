"""The built-in BBC news topic dataset: contents, stratified split, token budget."""
from collections import Counter

import pytest
from support_data import tiny_tokenizer

from deltatune.data.bbc import BBC_SIZE, BBC_TOPICS, build_bbc_datasets, load_articles, stratified_split, truncate_to_tokens


@pytest.fixture(scope="module")
def articles():
    return load_articles()


def test_all_articles_are_read_with_their_topic(articles):
    assert len(articles) == BBC_SIZE
    counts = Counter(a["label"] for a in articles)
    assert counts == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
    assert articles[0]["id"] == "business/001" and articles[0]["title"] == "Ad sales boost Time Warner profit"
    assert all(a["title"] and a["body"] for a in articles)


def test_stratified_split_matches_class_shares_and_is_seeded(articles):
    labels = [a["label"] for a in articles]
    train, evaluation = stratified_split(labels, 200, seed=0)
    assert len(evaluation) == 200 and len(train) == BBC_SIZE - 200
    assert not set(train) & set(evaluation)
    counts = Counter(labels[i] for i in evaluation)
    for topic in BBC_TOPICS:
        assert abs(counts[topic] - 200 * labels.count(topic) / BBC_SIZE) < 1  # largest-remainder rounding
    assert stratified_split(labels, 200, seed=0) == (train, evaluation)
    assert stratified_split(labels, 200, seed=1)[1] != evaluation


def test_stratified_split_rejects_impossible_sizes():
    with pytest.raises(ValueError, match=r"eval_size=3 must be in \[0, 3\)"):
        stratified_split(["a", "b", "c"], 3, seed=0)


def test_truncate_to_tokens_respects_the_budget_and_token_boundaries():
    tok = tiny_tokenizer()
    text = "The quick brown fox jumps over the lazy dog. " * 20
    (cut,) = truncate_to_tokens([text], 10, tok)
    assert len(tok(cut, add_special_tokens=False)["input_ids"]) == 10
    assert text.startswith(cut)
    assert truncate_to_tokens(["short"], 10, tok) == ["short"]
    assert truncate_to_tokens([text], 8, None) == [" ".join(text.split()[:6])]


def test_build_bbc_datasets_frames_each_article_as_a_topic_question():
    train, evaluation = build_bbc_datasets(tiny_tokenizer(), article_tokens=32, eval_size=50, seed=0, max_train_examples=40)
    assert (len(train), len(evaluation)) == (40, 50)
    assert {"messages", "text", "label", "id"} <= set(train.column_names)
    row = evaluation[0]
    roles = [m["role"] for m in row["messages"]]
    assert roles == ["system", "user", "assistant"]
    assert row["messages"][2]["content"] == row["label"] in BBC_TOPICS
    assert all(t in row["messages"][1]["content"] for t in BBC_TOPICS)
    assert not set(train["id"][:]) & set(evaluation["id"][:])
    _, no_eval = build_bbc_datasets(None, eval_size=0, max_train_examples=5)
    assert no_eval is None
