"""DoRA's compiled backward pass over g and y (deltatune/native/dora.py): torch's formulas, in fp32 and bf16, on
any shape and thread count; the fused DoRA layer's gradients through it match the closed form."""
import pytest
import torch

from deltatune.methods.lora import dora_weight_norm
from deltatune.methods.lora_kernels import dora_linear
from deltatune.native import build
from deltatune.native import dora as native_dora
from tolerances import assert_close

HERE_OK = build.platform_problem() is None and build.compiler() is not None
needs_library = pytest.mark.skipif(not HERE_OK, reason="needs x86-64 Linux with AVX2, libgomp and a C compiler")


def test_the_library_builds_where_the_platform_allows():
    if HERE_OK:
        assert native_dora.library() is not None, native_dora.unavailable_reason()
    else:
        assert native_dora.library() is None and native_dora.unavailable_reason()


def _case(n, out, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, out, generator=g), torch.randn(n, out, generator=g), torch.randn(out, generator=g),
               torch.rand(out, generator=g) + 0.5]
    grad, y, b, scale = (t.to(dtype) for t in tensors)
    return grad, y, (b if bias else None), scale


@needs_library
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(3, 37), (300, 700)])  # columns not a multiple of 16; above the serial cutoff
def test_dora_grad_is_torchs_formulas(dtype, bias, shape):
    g, y, b, scale = _case(*shape, dtype, bias)
    gc, sums = native_dora.dora_grad(g, y, b, scale)
    assert gc.dtype == dtype and sums.dtype == torch.float32
    assert torch.equal(gc, g * scale)  # one product rounded once, as torch's elementwise multiply does
    z = (y.double() if b is None else y.double() - b.double())
    exact = (g.double() * z).sum(0)
    # fp32 sums of fp32 products (torch's bf16 path rounds each product to bf16 first: less precise)
    assert_close(sums.double(), exact, dtype=torch.float32, scale=shape[0] ** 0.5, tier="reordered")


@needs_library
def test_the_sums_do_not_depend_on_the_thread_count():
    g, y, b, scale = _case(500, 300, torch.float32, True)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            results.append(native_dora.dora_grad(g, y, b, scale))
        finally:
            torch.set_num_threads(2)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@needs_library
def test_calls_it_cannot_take_are_left_to_torch():
    g, y, b, scale = _case(8, 16, torch.float32, True)
    assert native_dora.dora_grad(g.double(), y.double(), b.double(), scale.double()) is None  # no float64 variant
    assert native_dora.dora_grad(g, y.bfloat16(), b, scale) is None  # mixed dtypes
    assert native_dora.dora_grad(g.T.contiguous().T, y, b, scale) is None  # not contiguous
    assert native_dora.dora_grad(g, y, b[:8], scale) is None  # wrong bias shape
    assert native_dora.dora_grad(g, y, b, scale.requires_grad_()) is None  # autograd would not see it
    with native_dora.switched(False):
        assert native_dora.dora_grad(g, y, b, scale.detach()) is None


@needs_library
@pytest.mark.parametrize("bias", [False, True])
def test_fused_dora_in_fp32_matches_the_closed_form(bias, monkeypatch):
    calls = []
    real = native_dora.dora_grad
    monkeypatch.setattr(native_dora, "dora_grad", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 50, 24, generator=g, requires_grad=True)
    W = torch.randn(40, 24, generator=g)
    A = torch.randn(4, 24, generator=g, requires_grad=True)
    B = torch.randn(40, 4, generator=g, requires_grad=True)
    m = (torch.rand(40, generator=g) + 0.5).requires_grad_()
    b = torch.randn(40, generator=g) if bias else None
    norm = dora_weight_norm(W, A.detach(), B.detach(), 0.5)
    fused = dora_linear(x, W, b, A, B, 0.5, m / norm, m)
    grad = torch.randn(fused.shape, generator=g)
    got = torch.autograd.grad(fused, (x, A, B, m), grad)
    assert calls == [1]  # the backward went through the library
    x64, A64, B64, m64 = (t.detach().double().requires_grad_() for t in (x, A, B, m))
    W64 = W.double()
    norm64 = (W64 + 0.5 * B64 @ A64).norm(dim=1).detach()  # DoRA §4.3: the norm is a constant
    want_y = (m64 / norm64) * (x64 @ W64.T + 0.5 * (x64 @ A64.T) @ B64.T)
    want_y = want_y if b is None else want_y + b.double()
    want = torch.autograd.grad(want_y, (x64, A64, B64, m64), grad.double())
    for a, e in zip(got, want):
        assert_close(a, e.float(), tier="reordered")
