"""LoRA dropout's compiled CPU path (deltatune/native/dropout.py): the same results as torch's path on the same
mask, masks that depend only on (seed, index), and a fallback wherever the library cannot take a call."""
import ctypes
import os

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods import lora_kernels
from deltatune.native import build
from deltatune.native import dropout as native_dropout
from tolerances import assert_close

HERE_OK = build.platform_problem() is None and build.compiler() is not None
needs_library = pytest.mark.skipif(not HERE_OK, reason="needs x86-64 Linux with AVX2, libgomp and a C compiler")
P = 0.1
THRESHOLD = round(P * 2**16) - 2**15


def test_the_library_builds_where_the_platform_allows():
    # On this project's machines it must be live: otherwise dropout silently costs ~3 points of a step more.
    if HERE_OK:
        assert native_dropout.library() is not None, native_dropout.unavailable_reason()
    else:
        assert native_dropout.library() is None and native_dropout.unavailable_reason()
    with native_dropout.switched(False):
        assert native_dropout.library() is None and "switched off" in native_dropout.unavailable_reason()
        assert native_dropout.keep_mask(torch.empty(8), THRESHOLD) is None


@needs_library
def test_loras_keep_mask_is_the_compiled_one_seeded_from_torchs_generator():
    x = torch.empty(37, 41)
    torch.manual_seed(3)
    compiled = lora_kernels.keep_mask(x, P)
    torch.manual_seed(3)
    assert torch.equal(compiled, native_dropout.keep_mask(x, THRESHOLD))  # the compiled path ran
    torch.manual_seed(3)
    assert torch.equal(compiled, lora_kernels.keep_mask(x, P))  # manual_seed repeats it
    with native_dropout.switched(False):
        torch.manual_seed(3)
        assert not torch.equal(compiled, lora_kernels.keep_mask(x, P))  # torch's own draws: other bits


@needs_library
@pytest.mark.parametrize("n", [1, 3, 4, 5, 4099, 65536 + 7])  # a cut last word; below and above the serial cutoff
def test_a_mask_depends_only_on_seed_and_index(n):
    lib = native_dropout.library()
    masks = {}
    for threads, length in ((1, n), (2, n), (2, n + 9)):
        mask = torch.empty(length, dtype=torch.bool)
        lib.dt_keep_mask(mask.data_ptr(), length, 12345, THRESHOLD, threads)
        masks[threads, length] = mask
    assert torch.equal(masks[1, n], masks[2, n])  # not on the thread count
    assert torch.equal(masks[2, n + 9][:n], masks[2, n])  # a longer mask starts with the shorter one
    other = torch.empty(n + 9, dtype=torch.bool)
    lib.dt_keep_mask(other.data_ptr(), n + 9, 12346, THRESHOLD, 2)
    assert not torch.equal(other, masks[2, n + 9])  # another seed, other bits (n + 9 >= 10 elements)


def _special(x: torch.Tensor) -> torch.Tensor:
    x.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    return x


@needs_library
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5), (257, 300)])  # a vector tail; above the serial cutoff
def test_masked_scale_is_torchs_where_and_mul(dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = _special(torch.randn(shape, generator=g).to(dtype))
    mask = torch.rand(shape, generator=g) > P
    mask.view(-1)[:4] = True
    keep = 1 / (1 - P)
    got = native_dropout.masked_scale(x, mask, keep)
    want = torch.where(mask, x, 0.0).mul_(keep)
    assert got.dtype == dtype and torch.equal(got.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))  # bit for bit, bf16 rounding included


@needs_library
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5), (257, 300)])
def test_masked_add_adds_only_where_kept(dtype, shape):
    g = torch.Generator().manual_seed(1)
    acc, t = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    mask = torch.rand(shape, generator=g) > P
    keep = 1 / (1 - P)
    want = acc.add(torch.where(mask, t, 0.0), alpha=keep)
    before = acc.clone()
    assert native_dropout.masked_add_(acc, t, mask, keep)
    assert torch.equal(acc[~mask], before[~mask])  # dropped elements untouched
    # kept: acc + keep * t formed in fp32 (a fused multiply-add) and rounded once; torch may round keep * t
    # first. Either is within an ulp of the dtype at the operands' magnitude (the sum itself may cancel).
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-23
    bound = ulp * (before.float().abs() + keep * t.float().abs())
    assert ((acc.float() - want.float()).abs() <= bound).all()


@needs_library
def test_calls_the_library_cannot_take_are_left_to_torch():
    x, mask = torch.randn(6, 8), torch.ones(6, 8, dtype=torch.bool)
    assert native_dropout.masked_scale(x.T, mask.T, 2.0) is None  # not contiguous
    assert native_dropout.masked_scale(x.double(), mask, 2.0) is None  # no float64 variant
    assert native_dropout.masked_scale(x.half(), mask, 2.0) is None
    assert native_dropout.masked_scale(x.requires_grad_(), mask, 2.0) is None  # autograd would not see it
    with torch.no_grad():
        assert native_dropout.masked_scale(x, mask, 2.0) is not None
    acc = torch.randn(6, 8)
    assert not native_dropout.masked_add_(acc, torch.randn(6, 8, dtype=torch.bfloat16), mask, 2.0)  # mixed dtypes
    assert not native_dropout.masked_add_(acc, torch.randn(6, 8), mask[:, :4], 2.0)  # wrong mask shape
    assert native_dropout.keep_mask(torch.empty(4, device="meta"), THRESHOLD) is None  # not a CPU tensor


def test_a_failed_build_falls_back_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setattr(build, "platform_problem", lambda: None)
    lib, why = native_dropout.LIBRARY._load()
    assert lib is None and "could not build dropout.c" in why
    assert os.listdir(tmp_path / "kernels") == []  # nothing half-written


def _lora(dtype_of_run):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 40))
    return dt.get_peft_model(base, dt.LoraConfig(r=8, target_modules=["0", "2"], lora_dropout=P,
                                                 init_lora_weights=False)).train()


@needs_library
@pytest.mark.parametrize("bf16", [False, True])
def test_a_lora_step_gives_the_same_gradients_with_and_without_the_library(bf16, monkeypatch):
    # Same masks on both paths (the draw is fixed), so only the masked copy and gradient term differ in who runs them.
    masks = {}
    monkeypatch.setattr(lora_kernels, "keep_mask", lambda x, p: masks.setdefault(x.shape, torch.rand(x.shape) > p))
    calls = []
    for name in ("masked_scale", "masked_add_"):
        real = getattr(native_dropout, name)
        monkeypatch.setattr(native_dropout, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    x = torch.randn(4, 9, 64)
    grads = []
    for compiled in (True, False):
        model = _lora(bf16)
        with native_dropout.switched(compiled), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            model(x).float().square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert calls.count("masked_scale") >= 2 and calls.count("masked_add_") >= 1  # both layers' forward, one backward
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4
    for name in grads[0]:
        # fp32: the one fused multiply-add may round differently; bf16: the gradient term is rounded once, not twice
        assert_close(grads[0][name], grads[1][name], dtype=torch.bfloat16 if bf16 else torch.float32, tier="reordered")


@needs_library
def test_the_avx2_build_gives_the_same_bits(tmp_path, monkeypatch):
    # This machine builds with AVX-512; a CPU without it runs the same source compiled for AVX2.
    monkeypatch.setenv("DELTATUNE_CACHE_DIR", str(tmp_path))
    avx2 = ctypes.CDLL(str(build.build(build.compiler(), native_dropout.SOURCE, build.BASE_FLAGS)))
    native_dropout._declare(avx2)
    n = 100_003
    masks = [torch.empty(n, dtype=torch.bool) for _ in range(2)]
    for lib, mask in zip((avx2, native_dropout.library()), masks):
        lib.dt_keep_mask(mask.data_ptr(), n, 99, THRESHOLD, 2)
    assert torch.equal(*masks)
    x = torch.randn(n).bfloat16()
    out = torch.empty_like(x)
    avx2.dt_masked_scale_bf16(x.data_ptr(), masks[0].data_ptr(), out.data_ptr(), n, 1 / (1 - P), 2)
    assert torch.equal(out, native_dropout.masked_scale(x, masks[0], 1 / (1 - P)))
