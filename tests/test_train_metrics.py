"""score_accuracy: first-token and greedy scoring against fake models whose answers are known."""
import pytest
import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from deltatune.train.metrics import describe, first_tokens_distinct, score_accuracy
from support_data import tiny_tokenizer

TOPICS = ["business", "sports", "tech"]


def rows(golds, mention=None):
    """Chat rows whose user message names ``mention[i]`` (default: the gold topic)."""
    mention = mention or golds
    return [{"messages": [{"role": "user", "content": f"an article on {m}"},
                          {"role": "assistant", "content": g}], "label": g} for g, m in zip(golds, mention)]


class FakeLM(nn.Module):
    """Answers with the topic named in the prompt (or always ``fixed``): logits favour its first token."""

    def __init__(self, tok, fixed=None, reply=None):
        super().__init__()
        self.tok, self.fixed, self.reply = tok, fixed, reply
        self.weight = nn.Parameter(torch.zeros(1))
        self.calls = []

    def topic(self, ids, row=0):
        text = self.tok.decode(ids[row])
        return self.fixed or next(t for t in TOPICS if f"on {t}" in text)

    def forward(self, input_ids, logits_to_keep=0, use_cache=None, attention_mask=None, position_ids=None):
        self.calls.append(logits_to_keep)
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], len(self.tok))
        for row in range(input_ids.shape[0]):
            first = self.tok(self.topic(input_ids, row), add_special_tokens=False)["input_ids"][0]
            logits[row, -1, first] = 5.0
        return CausalLMOutput(logits=logits)

    def generate(self, input_ids, attention_mask=None, max_new_tokens=8, do_sample=False, pad_token_id=None):
        text = self.reply if self.reply is not None else f" {self.topic(input_ids).capitalize()}."
        new = torch.tensor([self.tok(text, add_special_tokens=False)["input_ids"]])
        return torch.cat([input_ids, new], dim=1)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_first_token_scoring_of_a_perfect_model(tok):
    golds = ["business", "sports", "tech", "sports"]
    model = FakeLM(tok).train()
    result = score_accuracy(model, tok, rows(golds), scoring="first_token")
    assert result["accuracy"] == 1.0 and result["correct"] == 4 and result["scoring"] == "first_token"
    assert result["per_label"] == {"business": 1.0, "sports": 1.0, "tech": 1.0}
    assert set(model.calls) == {1} and model.training  # last position only; training mode restored
    assert describe(result).startswith("100.0% (4/4), first-token log-prob over 3 labels")


def test_first_token_scoring_counts_mistakes_in_the_confusion_table(tok):
    result = score_accuracy(FakeLM(tok, fixed="tech"), tok, rows(["business", "tech", "tech", "sports"]))
    assert result["accuracy"] == 0.5 and result["confusion"]["business"] == {"tech": 1}
    assert result["per_label"]["tech"] == 1.0 and result["per_label"]["sports"] == 0.0


def test_greedy_scoring_normalises_case_and_punctuation(tok):
    result = score_accuracy(FakeLM(tok), tok, rows(["sports", "tech"]), scoring="greedy")
    assert result["accuracy"] == 1.0 and result["scoring"] == "greedy"
    wrong = score_accuracy(FakeLM(tok, reply=" no idea"), tok, rows(["sports", "tech"]), scoring="greedy")
    assert wrong["accuracy"] == 0.0 and wrong["confusion"]["sports"] == {"(other)": 1}


def test_auto_falls_back_to_greedy_when_first_tokens_collide(tok):
    labels = ["tech", "techno"]
    assert not first_tokens_distinct(tok, labels)
    data = rows(["tech", "tech"])
    assert score_accuracy(FakeLM(tok), tok, data, labels=labels)["scoring"] == "greedy"
    with pytest.raises(ValueError, match="distinct first tokens"):
        score_accuracy(FakeLM(tok), tok, data, labels=labels, scoring="first_token")


def test_max_examples_and_input_errors(tok):
    assert score_accuracy(FakeLM(tok), tok, rows(TOPICS), max_examples=2)["total"] == 2
    with pytest.raises(ValueError, match="label"):
        score_accuracy(FakeLM(tok), tok, [{"messages": []}])
    with pytest.raises(ValueError, match="scoring"):
        score_accuracy(FakeLM(tok), tok, rows(TOPICS), scoring="vibes")


def test_padded_batches_score_like_one_prompt_at_a_time(tok):
    """Left padding with real-token position ids: each row's last logits equal its unpadded forward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltatune.train.metrics import _forward_last_logits, _left_pad

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    prompts = [[5, 9, 3], [7, 2, 8, 4, 6, 1, 11], [12]]
    with torch.no_grad():
        batched = _forward_last_logits(model, *_left_pad(prompts, 0, "cpu"))
        alone = torch.cat([_forward_last_logits(model, torch.tensor([p])) for p in prompts])
    assert batched.shape == (3, len(tok))
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    # Many more rows than one batch: every row is scored once, in its own place in the confusion table.
    golds = [TOPICS[i % 3] for i in range(19)]
    result = score_accuracy(FakeLM(tok), tok, rows(golds))
    assert result["total"] == 19 and result["accuracy"] == 1.0


def test_rows_without_a_label_are_refused_not_scored_as_none(tok):
    data = rows(["sports", "tech", "tech"])
    data[1]["label"] = None
    with pytest.raises(ValueError, match=r"eval row 2 has no label.*data\.on_bad_rows=drop"):
        score_accuracy(FakeLM(tok), tok, data)


def test_accuracy_over_a_single_label_carries_a_warning(tok):
    result = score_accuracy(FakeLM(tok), tok, rows(["tech", "tech", "tech"]))
    assert result["accuracy"] == 1.0 and result["labels"] == ["tech"]
    assert len(result["warnings"]) == 1 and "every eval example has the label 'tech'" in result["warnings"][0]
    line = describe(result)
    assert "over 1 label;" in line and "says nothing" in line
    # Several gold labels: no warning, and the line is unchanged.
    several = score_accuracy(FakeLM(tok), tok, rows(TOPICS))
    assert several["warnings"] == [] and "warning" not in describe(several)


def test_training_warnings_flag_a_flat_loss_and_exploded_weights_only():
    from deltatune.train.metrics import training_warnings

    falling = [(i, 5.8 - 0.05 * i) for i in range(8)]
    flat = [(i, 5.78 + 0.01 * (i % 2)) for i in range(8)]
    assert training_warnings(falling, 2e-3, peak_weight=0.4, diverged=1e4) == []
    assert "did not go down" in training_warnings(flat, 1e-9, peak_weight=0.4, diverged=1e4)[0]
    assert "diverged" in training_warnings(falling, 1e6, peak_weight=3e30, diverged=1e4)[0]
    assert training_warnings(flat[:3], 1e-9, peak_weight=0.4, diverged=1e4) == []  # too few points to judge
