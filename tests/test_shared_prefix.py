"""A token prefix shared by every row runs once (deltatune.train.shared_prefix), with the same results.

Tier "reordered": the shared path computes the same math in another order (cached vs full attention,
the prefix's gradient summed over rows by autograd). Each test also checks which path ran, by the rows a
layer saw, so a silent fallback to the plain trunk fails the sharing tests.
"""
import pytest
import torch

import deltatune
from deltatune.train import shared_prefix
from deltatune.train.loss import causal_lm_loss
from deltatune.train.metrics import _forward_last_logits, _left_pad, score_accuracy
from tiny import VOCAB, tiny_gpt2, tiny_llama
from tolerances import assert_close

PREFIX = 20


def _rows(batch=4, prefix=PREFIX, tails=(9, 7, 9, 5), seed=3):
    """Right-padded rows sharing ``prefix`` tokens; labels only on each row's last 3 real tokens."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(3, VOCAB, (prefix,), generator=g)
    width = prefix + max(tails)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, n in enumerate(tails[:batch]):
        ids[i, :prefix] = head
        ids[i, prefix:prefix + n] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, :prefix + n] = 1
        labels[i, prefix + n - 3:prefix + n] = ids[i, prefix + n - 3:prefix + n]
    return ids, mask, labels


def _seen_rows(model):
    """Record the (batch, tokens) of every call to the first q_proj/c_attn layer's input."""
    seen = []
    layer = next(m for n, m in model.named_modules() if n.endswith(("q_proj", "c_attn")))
    layer.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape[:2])))
    return seen


def _loss_and_grads(model, ids, mask, labels, **kw):
    loss, _ = causal_lm_loss(model, ids, attention_mask=mask, labels=labels, **kw)
    params = [p for p in model.parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, params)


def _dropout_free(model):
    """tiny GPT-2 keeps GPT2Config's 0.1 dropouts, which (rightly) turn sharing off while training."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _unshared(monkeypatch):
    monkeypatch.setattr(shared_prefix, "MIN_SHARED_TOKENS", 10**9)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_training_loss_and_gradients_equal_the_plain_trunk(make, method, monkeypatch):
    config = deltatune.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=method == "dora",
                                  init_lora_weights=False)
    model = deltatune.get_peft_model(_dropout_free(make()), config)
    model.train()
    ids, mask, labels = _rows()
    seen = _seen_rows(model)
    shared, shared_grads = _loss_and_grads(model, ids, mask, labels)
    # the prefix ran for one row, then every row's remainder
    assert seen == [(1, PREFIX), (4, ids.shape[1] - PREFIX)]
    _unshared(monkeypatch)
    seen.clear()
    plain, plain_grads = _loss_and_grads(model, ids, mask, labels)
    assert seen == [(4, ids.shape[1])]
    assert_close(shared, plain, tier="reordered")
    for got, want in zip(shared_grads, plain_grads):
        assert_close(got, want, tier="reordered")


def test_bf16_autocast_shares_too(monkeypatch):
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(r=4, target_modules="all-linear",
                                                                        init_lora_weights=False))
    model.train()
    ids, mask, labels = _rows()
    seen = _seen_rows(model)
    with torch.autocast("cpu", torch.bfloat16):
        shared, _ = _loss_and_grads(model, ids, mask, labels)
        _unshared(monkeypatch)
        plain, _ = _loss_and_grads(model, ids, mask, labels)
    assert seen[:2] == [(1, PREFIX), (4, ids.shape[1] - PREFIX)]
    assert_close(shared, plain, dtype=torch.bfloat16)


def _calls_after(model, ids, mask, labels, **kw):
    seen = _seen_rows(model)
    causal_lm_loss(model, ids, attention_mask=mask, labels=labels, **kw)
    return seen


def test_falls_back_where_sharing_would_change_the_result():
    ids, mask, labels = _rows()
    full = [(4, ids.shape[1])]
    # LoRA dropout: one prefix pass would draw one mask for every row
    drop = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"))
    drop.train()
    assert _calls_after(drop, ids, mask, labels) == full
    # its eval mode draws nothing: shared again
    drop.eval()
    assert _calls_after(drop, ids, mask, labels)[0] == (1, PREFIX)
    # packed rows restart their positions
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(r=4, target_modules="all-linear"))
    packed = torch.arange(ids.shape[1]).repeat(4, 1)
    packed[:, 15:] -= 15
    assert _calls_after(model, ids, mask, labels, position_ids=packed) == full
    # left padding puts pads in the prefix
    assert _calls_after(model, ids, mask.flip(1), labels) == full
    # the model's own dropout (GPT-2's config has 0.1)
    gpt2 = deltatune.get_peft_model(tiny_gpt2(), deltatune.LoraConfig(r=4, target_modules="all-linear"))
    gpt2.train()
    assert _calls_after(gpt2, ids, mask, labels) == full
    # a prefix shorter than MIN_SHARED_TOKENS is not worth a second call
    short, short_mask, short_labels = _rows(prefix=shared_prefix.MIN_SHARED_TOKENS - 1)
    assert _calls_after(model, short, short_mask, short_labels) == [(4, short.shape[1])]


def test_gradient_checkpointing_falls_back():
    base = tiny_llama()
    # transformers 5.25 renamed it (the old name warns)
    (getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable)()
    model = deltatune.get_peft_model(base, deltatune.LoraConfig(r=4, target_modules="all-linear"))
    model.train()
    ids, mask, labels = _rows()
    assert _calls_after(model, ids, mask, labels) == [(4, ids.shape[1])]


def test_prompt_tuning_falls_back():
    model = deltatune.get_peft_model(tiny_llama(), deltatune.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model.train()
    ids, mask, labels = _rows()
    seen = _calls_after(model, ids, mask, labels)
    assert seen == [(4, ids.shape[1] + 3)]


def test_common_prefix_length():
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 5, 4]])
    assert shared_prefix.common_prefix_length(ids) == 2
    assert shared_prefix.common_prefix_length(ids[:1]) == 4


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_scoring_prefix_cache_gives_the_padded_batch_logits(make):
    model = deltatune.get_peft_model(make(), deltatune.LoraConfig(r=4, target_modules="all-linear",
                                                                  init_lora_weights=False)).eval()
    ids, mask, _ = _rows()
    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]  # remainders of 9, 7, 9, 5 tokens
    with torch.no_grad():
        cache = shared_prefix.PrefixCache.build(model, model.get_base_model(), rows, torch.device("cpu"))
        assert cache is not None and cache.length == PREFIX
        got = cache.forward(model, rows, 0, torch.device("cpu"))
        want = _forward_last_logits(model, *_left_pad(rows, 0, torch.device("cpu")))
    assert_close(got, want, tier="reordered")


class _Tok:
    """A character tokenizer with a chat template: enough for score_accuracy."""
    pad_token_id, eos_token_id = 0, 1
    chat_template = "x"

    def __call__(self, text, add_special_tokens=False, **_):
        return {"input_ids": [3 + (ord(c) % (VOCAB - 3)) for c in text]}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False, **_):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def test_score_accuracy_is_unchanged_by_sharing(monkeypatch):
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(r=4, target_modules="all-linear",
                                                                        init_lora_weights=False))
    system = {"role": "system", "content": "Pick a letter for the text that follows."}
    rows = [{"messages": [system, {"role": "user", "content": f"text {i} " * (1 + i % 3)}], "label": "abc"[i % 3]}
            for i in range(12)]
    seen = _seen_rows(model)
    shared = score_accuracy(model, _Tok(), rows, template="tokenizer", labels=["a", "b", "c"], scoring="first_token")
    assert seen[0][0] == 1  # the prefix ran once, for one row
    _unshared(monkeypatch)
    plain = score_accuracy(model, _Tok(), rows, template="tokenizer", labels=["a", "b", "c"], scoring="first_token")
    assert shared["confusion"] == plain["confusion"]


def test_reused_cast_reuses_a_live_cast_only():
    from deltatune.methods.lora_kernels import reused_cast

    w = torch.randn(6, 4)
    first = reused_cast(w, torch.bfloat16)
    assert reused_cast(w, torch.bfloat16) is first  # alive (as when saved for backward): reused
    assert reused_cast(w, torch.float16).dtype == torch.float16  # another dtype: its own cast
    with torch.no_grad():
        w.add_(1.0)  # an in-place change bumps the version: cast again, with the new values
    again = reused_cast(w, torch.bfloat16)
    assert again is not first and torch.equal(again, w.to(torch.bfloat16))
    ref = __import__("weakref").ref(again)
    del first, again
    assert ref() is None  # nothing here kept the cast alive
    assert reused_cast(w, torch.float32) is w  # no cast needed: the weight itself
    with torch.inference_mode():
        made_here = torch.randn(6, 4)  # an inference tensor has no version counter: always a fresh cast
    assert torch.equal(reused_cast(made_here, torch.bfloat16), made_here.to(torch.bfloat16))


@pytest.mark.parametrize("config, shares", [
    (deltatune.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), False),
    (deltatune.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), False),
    (deltatune.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                         feedforward_modules=["down_proj"]), True),
], ids=["prompt", "prefix", "ia3"])
def test_scoring_shares_only_where_the_forward_adds_no_virtual_tokens(config, shares):
    model = deltatune.get_peft_model(tiny_llama(), config).eval()
    rows = [[5] * PREFIX + [7, 8], [5] * PREFIX + [9]]
    with torch.no_grad():
        cache = shared_prefix.PrefixCache.build(model, model.get_base_model(), rows, torch.device("cpu"))
    assert (cache is not None) == shares
