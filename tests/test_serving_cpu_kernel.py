"""The compiled CPU kernel of mixed-adapter serving: equal to the closed form on every tile shape,
dispatched only where it applies, and built once, atomically, into its cache."""
import os

import pytest
import torch

from deltatune.native import build
from deltatune.serving import cpu_kernel
from deltatune.serving.kernels import mixed_lora_, single_lora_
from tolerances import assert_close

HERE_OK = build.platform_problem() is None and build.compiler() is not None
FP32 = cpu_kernel.LIBRARIES[torch.float32]
HERE_BF16 = HERE_OK and cpu_kernel._bf16_problem() is None
needs_kernel = pytest.mark.skipif(not HERE_OK, reason="the kernel needs x86-64 Linux with AVX2, libgomp and a C compiler")
needs_bf16_kernel = pytest.mark.skipif(not HERE_BF16, reason="the bf16 kernel needs a CPU with AVX512-BF16")


def _closed_form(y, x, A, Bt):
    return y + torch.bmm(torch.bmm(x.double(), A.double().transpose(1, 2)), Bt.double()).float()


def _factors(b, r, n_in, n_out, seed=0):
    """A (b, r, in) with unit stride along r, as the bank stores it, and Bt (b, r, out)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(b, n_in, r, generator=g).transpose(1, 2)
    return A, torch.randn(b, r, n_out, generator=g) / r


def test_the_kernel_builds_where_the_platform_allows():
    # On this project's machines (x86-64 Linux, gcc, torch with libgomp) the kernel must be live:
    # otherwise serving silently runs ~1 point slower and nothing else would notice.
    if HERE_OK:
        assert cpu_kernel.library() is not None, cpu_kernel.unavailable_reason()
    else:
        assert cpu_kernel.library() is None and cpu_kernel.unavailable_reason()
    if HERE_BF16:  # this project's CPU has AVX512-BF16: bf16 models get their kernel too
        assert cpu_kernel.library(torch.bfloat16) is not None, cpu_kernel.unavailable_reason(torch.bfloat16)
    else:
        assert cpu_kernel.library(torch.bfloat16) is None and cpu_kernel.unavailable_reason(torch.bfloat16)
    assert cpu_kernel.library(torch.float16) is None and "no compiled kernel" in cpu_kernel.unavailable_reason(torch.float16)


@needs_kernel
@pytest.mark.parametrize("L", [1, 5, 6, 7, 13, 128])
@pytest.mark.parametrize("r", [8, 16, 24, 40])
@torch.no_grad()
def test_equals_the_closed_form_on_every_tile_shape(L, r):
    # L: short tiles, exact 6-token tiles, and remainders; r: the 16-column block, the 8-column tail;
    # out = 37 and in = 19: the 16-wide expand blocks, an 8-wide block, and scalar columns.
    for n_in, n_out in ((19, 37), (64, 48)):
        x = torch.randn(3, L, n_in)
        A, Bt = _factors(3, r, n_in, n_out, seed=L + r)
        y = torch.randn(3, L, n_out)
        expected = _closed_form(y, x, A, Bt)
        out = cpu_kernel.mixed_lora_cpu_(y, x, A, Bt)
        assert out is y  # in place
        assert_close(out, expected)


@needs_kernel
@torch.no_grad()
def test_strided_batches_and_shared_factors():
    """Rows of x and y at any batch stride (a slice of a bigger batch), one A for every row (stride 0)."""
    big_x, big_y = torch.randn(6, 9, 32), torch.randn(6, 9, 24)
    x, y = big_x[::2], big_y[::2]  # batch stride 2 rows
    A, Bt = _factors(1, 16, 32, 24)
    A3, Bt3 = A.expand(3, -1, -1), Bt.expand(3, -1, -1)
    expected = _closed_form(y.clone(), x, A3, Bt3)
    assert cpu_kernel.usable(y, x, A3, Bt3)
    cpu_kernel.mixed_lora_cpu_(y, x, A3, Bt3)
    assert_close(big_y[::2], expected)
    assert_close(big_y[1::2], big_y[1::2].clone())  # untouched rows stay as they were


@needs_kernel
def test_dispatch_takes_the_kernel_only_where_it_applies(monkeypatch):
    calls = []
    real = cpu_kernel.mixed_lora_cpu_
    monkeypatch.setattr(cpu_kernel, "mixed_lora_cpu_", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 7, 16)
    A, Bt = _factors(2, 8, 16, 12)
    y = torch.randn(2, 7, 12)
    expected = _closed_form(y, x, A, Bt)
    with torch.no_grad():
        assert_close(mixed_lora_(y.clone(), x, A, Bt), expected)
    assert calls == [1]
    refused = {
        "autograd": dict(x=x.clone().requires_grad_()),
        "a rank that is not a multiple of 8": dict(A=A[:, :6], Bt=Bt[:, :6]),
        "fp16": dict(y=y.half(), x=x.half(), A=A.half(), Bt=Bt.half()),
        "bf16 x with fp32 factors": dict(y=y.bfloat16(), x=x.bfloat16()),
        "A with unit stride along in": dict(A=A.contiguous()),
        "switched off": {},
    }
    for why, change in refused.items():
        args = dict(y=y.clone(), x=x, A=A, Bt=Bt) | change
        want = _closed_form(args["y"].float(), args["x"].detach().float(), args["A"].float(), args["Bt"].float())
        with cpu_kernel.switched(why != "switched off"):
            got = mixed_lora_(args["y"], args["x"], args["A"], args["Bt"])
        dtype = {torch.float16: torch.float16, torch.bfloat16: torch.bfloat16}.get(args["y"].dtype, torch.float32)
        assert_close(got.detach().float(), want, dtype=dtype)
        assert calls == [1], why


def test_switched_off_says_so():
    with cpu_kernel.switched(False):
        assert cpu_kernel.library() is None
        assert "switched off" in cpu_kernel.unavailable_reason()


@needs_kernel
def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE_DIR", str(tmp_path))
    cc = build.compiler()
    first = build.build(cc, FP32.source, FP32.flags)
    assert first.parent == tmp_path / "kernels" and first.exists()
    stamp = first.stat().st_mtime_ns
    assert build.build(cc, FP32.source, FP32.flags) == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert os.listdir(first.parent) == [first.name]  # no temporary left behind


def test_a_failed_build_falls_back_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setattr(build, "platform_problem", lambda: None)
    lib, why = FP32._load()
    assert lib is None and "could not build" in why
    assert not any((tmp_path / "kernels").iterdir())  # nothing half-written


@needs_kernel
@torch.no_grad()
def test_one_adapter_for_every_row_runs_as_one_long_row(monkeypatch):
    calls = []
    real = cpu_kernel.mixed_lora_cpu_
    monkeypatch.setattr(cpu_kernel, "mixed_lora_cpu_", lambda *a: calls.append(a[1].shape) or real(*a))
    x, y = torch.randn(3, 7, 16), torch.randn(3, 7, 12)
    A, Bt = _factors(1, 8, 16, 12)
    expected = y + (x @ A[0].T) @ Bt[0]
    assert single_lora_(y, x, A[0], Bt[0]) is y
    assert_close(y, expected)
    assert calls == [(1, 21, 16)]


@needs_kernel
@pytest.mark.parametrize("L", [1, 7, 12])
@torch.no_grad()
def test_overwrite_mode_never_reads_y(L):
    x = torch.randn(2, L, 19)
    A, Bt = _factors(2, 16, 19, 37, seed=L)
    init = torch.randn(37)
    y = torch.full((2, L, 37), float("nan"))  # any read of y would show
    cpu_kernel.mixed_lora_cpu_(y, x, A, Bt, init=init)
    assert_close(y, _closed_form(init.expand(2, L, 37), x, A, Bt))
    with pytest.raises(ValueError, match="contiguous torch.float32 vector of 37"):
        cpu_kernel.mixed_lora_cpu_(y, x, A, Bt, init=torch.zeros(36))


def _served_model():
    import deltatune as dt
    from tiny import tiny_llama

    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "up_proj"], init_lora_weights=False), "a")
    model.add_adapter("b", dt.LoraConfig(r=8, target_modules=["q_proj"], init_lora_weights=False))
    return model.eval()


@needs_kernel
def test_lora_linears_run_fused_for_the_request_only(monkeypatch):
    from tiny import input_ids

    model, x, names = _served_model(), input_ids(batch=3, seq=9), ["a", "b", "__base__"]
    with torch.no_grad():
        expected = model(input_ids=x, adapter_names=names).logits  # warm the bank
        inits = []
        real = cpu_kernel.mixed_lora_cpu_
        monkeypatch.setattr(cpu_kernel, "mixed_lora_cpu_", lambda *a, **k: inits.append(k.get("init")) or real(*a, **k))
        got = model(input_ids=x, adapter_names=names).logits
    assert_close(got, expected)
    layers = model.base_model.model.model.layers
    assert len(inits) == 2 * len(layers) and all(i is not None for i in inits)  # q_proj and up_proj, fused
    assert all("forward" not in vars(m) for m in model.modules())  # nothing left behind


@needs_kernel
def test_a_replaced_forward_or_autograd_takes_the_hook_path(monkeypatch):
    from tiny import input_ids

    model, x, names = _served_model(), input_ids(batch=2, seq=5), ["a", "b"]
    with torch.no_grad():
        expected = model(input_ids=x, adapter_names=names).logits
    q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    calls = []
    q.forward = lambda inp: calls.append(1) or torch.nn.Linear.forward(q, inp)  # as accelerate's hooks do
    with torch.no_grad():
        assert_close(model(input_ids=x, adapter_names=names).logits, expected)
    assert calls == [1] and "forward" in vars(q)  # kept, and run once
    del q.forward
    for p in model.parameters():
        p.requires_grad_(True)  # autograd through the base weights: the fused forward steps aside
    logits = model(input_ids=x, adapter_names=names).logits
    assert logits.requires_grad
    assert_close(logits.detach(), expected)


# ---- the bf16 kernel (AVX512-BF16) ----------------------------------------------------------------------
def _bf16_case(L, r, n_in, n_out, seed):
    x = torch.randn(3, L, n_in).bfloat16()
    A, Bt = (t.bfloat16() for t in _factors(3, r, n_in, n_out, seed=seed))
    return x, A, Bt


def _bf16_error(got, exact):
    return ((got.double() - exact).abs().max() / exact.abs().max()).item()


@needs_bf16_kernel
@pytest.mark.parametrize("L", [1, 7, 8, 9, 128])
@pytest.mark.parametrize("r", [8, 16, 24, 40])
@torch.no_grad()
def test_bf16_kernel_is_as_close_as_torchs_bf16_path(L, r):
    # L: single tokens, a short tile, an exact 8-token tile, a remainder; r: 16-column blocks and an 8-column
    # tail; in = 19 (an odd input: the last pair padded), out = 37 (16-wide blocks and a masked tail)
    for n_in, n_out in ((19, 37), (64, 48), (576, 1536)):
        x, A, Bt = _bf16_case(L, r, n_in, n_out, seed=L + r)
        y = torch.randn(3, L, n_out).bfloat16()
        exact = y.double() + torch.bmm(torch.bmm(x.double(), A.double().transpose(1, 2)), Bt.double())
        torchs = y.float() + torch.bmm(torch.bmm(x, A.transpose(1, 2)), Bt).float()  # each product rounded to bf16
        assert cpu_kernel.usable(y, x, A, Bt)
        out = cpu_kernel.mixed_lora_cpu_(y, x, A, Bt)
        assert out is y and out.dtype == torch.bfloat16
        # rounding differs (pairwise fp32 sums, one rounding of y) but is of the same size as torch's
        assert _bf16_error(out, exact) <= 2.5 * _bf16_error(torchs, exact) + 1e-3


@needs_bf16_kernel
@pytest.mark.parametrize("L", [1, 12])
@torch.no_grad()
def test_bf16_overwrite_mode_never_reads_y(L):
    x, A, Bt = _bf16_case(L, 16, 19, 37, seed=L)
    init = torch.randn(37).bfloat16()
    y = torch.full((3, L, 37), float("nan")).bfloat16()
    cpu_kernel.mixed_lora_cpu_(y, x, A, Bt, init=init)
    exact = init.double() + torch.bmm(torch.bmm(x.double(), A.double().transpose(1, 2)), Bt.double())
    assert not y.isnan().any() and _bf16_error(y, exact) < 2e-2
    with pytest.raises(ValueError, match="contiguous torch.bfloat16 vector of 37"):
        cpu_kernel.mixed_lora_cpu_(y, x, A, Bt, init=init.float())


@needs_bf16_kernel
def test_a_bf16_model_serves_its_lora_linears_through_the_bf16_kernel(monkeypatch):
    from tiny import input_ids

    model, x, names = _served_model().to(torch.bfloat16), input_ids(batch=3, seq=9), ["a", "b", "__base__"]
    with torch.no_grad(), cpu_kernel.switched(False):
        expected = model(input_ids=x, adapter_names=names).logits  # the torch path (bf16 bmm)
    calls = []
    real = cpu_kernel.mixed_lora_cpu_
    monkeypatch.setattr(cpu_kernel, "mixed_lora_cpu_", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    with torch.no_grad():
        got = model(input_ids=x, adapter_names=names).logits
    layers = model.base_model.model.model.layers
    assert calls == [torch.bfloat16] * (2 * len(layers))  # q_proj and up_proj, in bf16
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=0.05, atol=0.05)
