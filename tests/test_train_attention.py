"""deltatune_eager (train/attention.py): eager attention's results, without keeping its probabilities (issue 17)."""
import pytest
import torch
from transformers.models.llama.modeling_llama import eager_attention_forward

from deltatune.train import attention
from tiny import tiny_gpt2, tiny_llama

MIN = torch.finfo(torch.float32).min


class _Module:
    training, num_key_value_groups = True, 3


def _inputs(heads: int, kv_heads: int, tq: int, tk: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, tq, 8, generator=g).requires_grad_()
    k = torch.randn(2, kv_heads, tk, 8, generator=g).requires_grad_()
    v = torch.randn(2, kv_heads, tk, 8, generator=g).requires_grad_()
    return q, k, v


def _mask(tq: int, tk: int, heads: int = 1) -> torch.Tensor:
    """Causal for queries at the end of the keys (a cached prefix when tq < tk), row 0 left-padded by 2."""
    mask = torch.zeros(2, heads, tq, tk)
    mask.masked_fill_(~torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq), MIN)
    mask[0, :, :, :2] = MIN
    return mask


def _run(fn, q, k, v, mask, autocast: bool):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out, _ = fn(_Module(), q, k, v, mask, scaling=8 ** -0.5, dropout=0.0)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype))
    return out.detach().float(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("tq, tk, mask_heads", [(6, 6, 1), (4, 10, 1), (5, 5, 6)])
def test_the_function_computes_eagers_attention_and_gradients(tq, tk, mask_heads):
    # grouped-query heads (6 query heads on 2 key/value heads), a padded row, a cached prefix (tq < tk),
    # a per-head mask; fp32, so the tolerance can be tight
    q, k, v = _inputs(6, 2, tq, tk)
    mask = _mask(tq, tk, mask_heads)
    _Module.num_key_value_groups = 3
    for ours, theirs in zip(_run(attention.attention_forward, q, k, v, mask, False),
                            _run(eager_attention_forward, q, k, v, mask, False)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tq, tk", [(7, 7), (4, 9)])
def test_under_bf16_autocast_it_is_eagers_to_the_bit(tq, tk):
    # the same bf16 scores, fp32 softmax and bf16 product; backward sums over the query heads in eager's order
    q, k, v = _inputs(6, 2, tq, tk)
    mask = _mask(tq, tk)
    ours, theirs = (_run(fn, q, k, v, mask, True) for fn in (attention.attention_forward, eager_attention_forward))
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_a_model_trains_the_same_on_it(make):
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    results = []
    for attn in ("eager", attention.register()):
        model = make()  # eval(): GPT-2's attention dropout off, so both run the kernel under test
        model.set_attn_implementation(attn)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def _saved_shapes(model, ids) -> list[tuple[tuple[int, ...], torch.dtype]]:
    seen = []

    def pack(t):
        seen.append((tuple(t.shape), t.dtype))
        return t

    with torch.autocast("cpu", torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    return seen


def test_backward_keeps_no_probabilities_and_no_repeated_keys():
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    model = tiny_llama()  # 4 query heads on 2 key/value heads
    found = {}
    for attn in ("eager", attention.register()):
        model.set_attn_implementation(attn)
        shapes = _saved_shapes(model, ids)
        found[attn] = ([s for s, _ in shapes if len(s) == 4 and s[1] > 1 and s[-2:] in ((12, 12), (24, 12))],  # heads x queries x keys: probabilities
                       [s for s, _ in shapes if len(s) == 4 and s[1] == 4 and s[2] == 12])  # keys repeated to 4 heads
    assert found["eager"][0] and found["eager"][1]  # what eager keeps: the test can see it
    assert found[attention.NAME] == ([], [])


def test_calls_it_does_not_cover_go_to_sdpa(monkeypatch):
    from transformers.integrations import sdpa_attention

    calls = []
    real = sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", lambda *a, **k: calls.append(k) or real(*a, **k))
    q, k, v = _inputs(6, 2, 5, 5)
    mask = _mask(5, 5)
    module = _Module()
    attention.attention_forward(module, q, k, v, mask, scaling=0.3, dropout=0.1)  # attention dropout while training
    attention.attention_forward(module, q, k, v, mask, scaling=0.3, position_bias=torch.zeros(1, 6, 5, 5))
    attention.attention_forward(module, q, k, v, mask > MIN / 2, scaling=0.3)  # a boolean mask
    assert len(calls) == 3
    module.training = False  # dropout is off in eval: this one is ours
    attention.attention_forward(module, q, k, v, mask, scaling=0.3, dropout=0.1)
    assert len(calls) == 3
