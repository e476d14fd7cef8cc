"""fused_linear_cross_entropy against F.cross_entropy on materialised logits.

Tiers: (a) closed form (dL/dlogits = softmax - onehot on a 1-token, 3-word case); (b) invariants
(chunk size, recompute vs eager, all-ignored); (c) parity with F.cross_entropy in fp64, fp32,
bf16 and fp16, plus what the autograd Function keeps alive between forward and backward.
"""
import pytest
import torch
import torch.nn.functional as F

from deltatune.train.loss import chunk_size_for_budget, fused_linear_cross_entropy
from tolerances import assert_close

N, H, V = 37, 16, 50


def _inputs(dtype=torch.float32, bias=True, w_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).requires_grad_(w_grad)
    b = torch.randn(V, generator=g).to(dtype).requires_grad_(w_grad) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[::4] = -100  # a quarter ignored, as with masked prompts
    return h, w, b, y


def _reference(h, w, b, y, reduction="mean"):
    logits = h @ w.T if b is None else torch.addmm(b, h, w.T)  # (N, V) materialised, as transformers does
    # upcast to fp32 as transformers does; fp64 stays fp64 so that tier is tight
    acc = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(logits.to(acc), y, ignore_index=-100, reduction=reduction)


def _grads(loss, tensors):
    live = [t for t in tensors if t is not None and t.requires_grad]
    return torch.autograd.grad(loss, live)


def test_closed_form_gradient_is_softmax_minus_onehot():
    # W = I makes the hidden state the logits, so dL/dh is dL/dlogits itself.
    z = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    loss = fused_linear_cross_entropy(z, torch.eye(3, dtype=torch.float64), torch.tensor([1]))
    (grad,) = torch.autograd.grad(loss, z)
    p = torch.exp(z.detach()) / torch.exp(z.detach()).sum()
    assert_close(loss, torch.logsumexp(z.detach(), -1)[0] - 2.0)
    assert_close(grad, p - torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [1, 5, 16, N, 64, None])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_cross_entropy(dtype, chunk, reduction, recompute):
    h, w, b, y = _inputs(dtype)
    out = fused_linear_cross_entropy(h, w, y, bias=b, chunk_size=chunk, reduction=reduction, recompute=recompute)
    ref = _reference(h, w, b, y, reduction)
    # 1.7 stands in for a grad_output other than 1 (loss scaling, gradient accumulation).
    for got, want in zip(_grads(out * 1.7, (h, w, b)), _grads(ref * 1.7, (h, w, b))):
        assert got.dtype == want.dtype
        assert_close(got, want)
    assert_close(out, ref.to(out.dtype))


@pytest.mark.parametrize("recompute", [False, True])
def test_frozen_weight_gets_no_gradient_and_hidden_grad_matches(recompute):
    h, w, b, y = _inputs(w_grad=False)
    out = fused_linear_cross_entropy(h, w, y, bias=b, chunk_size=8, recompute=recompute)
    (got,) = torch.autograd.grad(out, h)
    (want,) = torch.autograd.grad(_reference(h, w, b, y), h)
    assert_close(got, want)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("recompute", [False, True])
def test_all_ignored_gives_zero_not_nan(reduction, recompute):
    h, w, b, y = _inputs()
    y = torch.full_like(y, -100)
    out = fused_linear_cross_entropy(h, w, y, bias=b, chunk_size=8, reduction=reduction, recompute=recompute)
    grads = _grads(out, (h, w, b))
    assert out.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_empty_batch():
    h, w, b, _ = _inputs()
    out = fused_linear_cross_entropy(h[:0], w, torch.zeros(0, dtype=torch.long), bias=b)
    assert out.item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in _grads(out, (h, w, b)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_match_reference_and_keep_dtypes(dtype):
    h, w, b, y = _inputs(dtype)
    out = fused_linear_cross_entropy(h, w, y, bias=b, chunk_size=7)
    ref = _reference(h, w, b, y)  # logits in `dtype`, upcast for the loss: what the model does
    assert out.dtype == torch.float32
    assert_close(out, ref, dtype=dtype)
    for got, want in zip(_grads(out, (h, w, b)), _grads(ref, (h, w, b))):
        assert got.dtype == dtype
        assert_close(got.float(), want.float(), dtype=dtype)


def test_fp16_gradients_survive_a_large_loss_scale():
    # A GradScaler-sized grad_output arrives only in backward; the stored fp32 grads keep entries
    # that fp16 would have flushed to zero before scaling.
    h, w, b, y = _inputs(torch.float16)
    scale = 2.0**16
    out = fused_linear_cross_entropy(h, w, y, bias=b, chunk_size=7, reduction="sum")
    got = _grads(out * scale, (h, w, b))
    want = _grads(_reference(h.float(), w.float(), b.float(), y, "sum") * scale, (h, w, b))
    for g, r in zip(got, want):
        assert_close(g.float() / scale, r.float() / scale, dtype=torch.float16)


def test_autocast_computes_in_autocast_dtype_and_returns_fp32_grads():
    h, w, b, y = _inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_linear_cross_entropy(h, w, y, bias=b, chunk_size=7)
        ref = _reference(h, w, b, y)  # addmm under autocast runs in bf16, like lm_head would
    for got, want in zip(_grads(out, (h, w, b)), _grads(ref, (h, w, b))):
        assert got.dtype == torch.float32
        assert_close(got, want, dtype=torch.bfloat16)
    assert_close(out, ref, dtype=torch.bfloat16)


def test_retain_graph_second_backward_errors_in_eager_mode_and_works_with_recompute():
    h, w, b, y = _inputs()
    eager = fused_linear_cross_entropy(h, w, y, bias=b, chunk_size=8)
    torch.autograd.grad(eager, h, retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace operation"):  # never silently wrong
        torch.autograd.grad(eager, h)
    again = fused_linear_cross_entropy(h, w, y, bias=b, chunk_size=8, recompute=True)
    first = torch.autograd.grad(again, h, retain_graph=True)[0]
    assert_close(torch.autograd.grad(again, h)[0], first)


def test_no_grad_returns_loss_without_graph():
    h, w, b, y = _inputs()
    with torch.no_grad():
        out = fused_linear_cross_entropy(h, w, y, bias=b, chunk_size=5)
    assert out.grad_fn is None
    assert_close(out, _reference(h, w, b, y).detach())


@pytest.mark.parametrize("w_grad", [True, False])
@pytest.mark.parametrize("recompute", [False, True])
def test_saves_nothing_of_size_tokens_by_vocab(recompute, w_grad):
    n, h_dim, v = 64, 8, 512
    h = torch.randn(n, h_dim, requires_grad=True)
    w = torch.randn(v, h_dim, requires_grad=w_grad)
    out = fused_linear_cross_entropy(h, w, torch.randint(0, v, (n,)), chunk_size=16, recompute=recompute)
    node = out.grad_fn
    kept = [t for t in node.saved_tensors if t is not None]
    kept += [t for t in vars(node).values() if isinstance(t, torch.Tensor)]
    assert all(t.numel() <= max(n, v) * h_dim for t in kept)
    if not w_grad:  # LoRA's frozen lm_head: only O(N * H) survives to backward
        # hidden or its gradient (N, H), plus labels (N,) and the 1/n scale when recomputing
        assert sum(t.numel() for t in kept if t is not w) <= n * h_dim + n + 1


def test_peak_memory_is_one_chunk_not_all_logits():
    """Allocation counting with the profiler's memory events: forward + backward must stay near one
    chunk of logits plus the (V, H) weight gradient, far below the (N, V) logits."""
    profiler = pytest.importorskip("torch.profiler")
    n, h_dim, v, chunk = 512, 32, 4096, 64
    h = torch.randn(n, h_dim, requires_grad=True)
    w = torch.randn(v, h_dim, requires_grad=True)
    y = torch.randint(0, v, (n,))

    def peak(fn):
        with profiler.profile(activities=[profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        results = getattr(prof.profiler, "kineto_results", None)
        if results is None:
            pytest.skip("this torch's profiler does not expose raw memory events")
        events = sorted((e for e in results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
        live = top = 0
        for e in events:
            live += e.nbytes()
            top = max(top, live)
        return top

    fused = peak(lambda: fused_linear_cross_entropy(h, w, y, chunk_size=chunk).backward())
    h.grad = w.grad = None
    standard = peak(lambda: F.cross_entropy(h @ w.T, y).backward())
    chunk_bytes, logits_bytes, weight_bytes = chunk * v * 4, n * v * 4, v * h_dim * 4
    assert standard >= 2 * logits_bytes  # sanity: the counter sees the reference's logits
    # one chunk of logits (the previous one freed first), the grad_W accumulator (scaled in place in
    # backward, then handed to w.grad), grad_h and h.grad, and 64 KiB for row stats and labels
    assert fused <= chunk_bytes + weight_bytes + 2 * n * h_dim * 4 + 64 * 1024
    assert fused < logits_bytes / 2


def test_chunk_size_for_budget():
    assert chunk_size_for_budget(49152, torch.float32, 64 * 2**20) == 64 * 2**20 // (49152 * 4)
    # bf16: a bf16 logits row plus its fp32 upcast per token
    assert chunk_size_for_budget(49152, torch.bfloat16, 64 * 2**20) == 64 * 2**20 // (49152 * 6)
    assert chunk_size_for_budget(10**9, torch.float32, 1) == 1


@pytest.mark.parametrize("bad, match", [
    (dict(labels=torch.tensor([0, V])), r"labels must be in \[0, 50\)"),
    (dict(labels=torch.tensor([0])), "labels of shape"),
    (dict(reduction="none"), "reduction must be"),
    (dict(chunk_size=0), "chunk_size must be"),
])
def test_errors_name_the_problem(bad, match):
    args = dict(hidden=torch.randn(2, H), weight=torch.randn(V, H), labels=torch.tensor([0, -100]))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)
