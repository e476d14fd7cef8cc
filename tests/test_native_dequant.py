"""Linear4bit's compiled 4-bit code (deltatune/native/dequant.py). The tile dequantization gives the same bits
as the torch path (dequantize_range, itself checked against bitsandbytes in test_quant_nf4.py) for every block
size, both 4-bit types, fp32 and bf16, any block-aligned range. The few-row product equals x · Wᵀ on the
dequantized W. Linear4bit's forward uses each where it applies; calls they cannot take are left to torch."""
import ctypes

import pytest
import torch
from torch import nn

from deltatune.native import build
from deltatune.native import dequant as native_dequant
from deltatune.quant import Linear4bit, QuantConfig
from deltatune.quant.codebooks import code_4bit, dynamic_map
from deltatune.quant.linear import FEW_ROWS
from deltatune.quant.nf4 import BLOCKSIZES, absmax_float, dequantize_range, quantize_4bit
from tolerances import assert_close

HERE_OK = build.platform_problem() is None and build.compiler() is not None
needs_library = pytest.mark.skipif(not HERE_OK, reason="needs x86-64 Linux with AVX2, libgomp and a C compiler")


def test_the_library_builds_where_the_platform_allows():
    if HERE_OK:
        assert native_dequant.library() is not None, native_dequant.unavailable_reason()
    else:
        assert native_dequant.library() is None and native_dequant.unavailable_reason()


def _range(state, start, stop, dtype):
    bs = state.blocksize
    absmax = absmax_float(state, start // bs, -(-stop // bs))
    got = native_dequant.dequantize_4bit(state.packed, absmax, code_4bit(state.quant_type), start, stop, bs, dtype)
    want = dequantize_range(state.packed, absmax, state.quant_type, bs, start, stop).to(dtype)
    return got, want


@needs_library
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_every_block_size_gives_the_torch_paths_bits(quant_type, blocksize, double_quant):
    g = torch.Generator().manual_seed(blocksize)
    n = 3 * 4096 + 2 * blocksize + 46  # whole blocks, then a cut last block with a 30-value vector tail
    state = quantize_4bit(torch.randn(n, generator=g) * 0.02, quant_type, blocksize, double_quant)
    for dtype in (torch.float32, torch.bfloat16):
        for start, stop in ((0, n), (blocksize, n - 1), (2 * blocksize, 2 * blocksize + 31), (0, 1)):
            got, want = _range(state, start, stop, dtype)
            assert got.dtype == dtype and got.shape == want.shape == (stop - start,)
            assert torch.equal(got, want), (dtype, start, stop)


@needs_library
def test_a_range_over_the_parallel_cutoff_is_the_same():
    state = quantize_4bit(torch.randn(300_000) * 0.02, "nf4", 64, True)  # > 65,536 values: OpenMP splits the blocks
    for dtype in (torch.float32, torch.bfloat16):
        got, want = _range(state, 64 * 7, 299_999, dtype)
        assert torch.equal(got, want)


@needs_library
@pytest.mark.parametrize("bf16", [False, True])
def test_linear4bit_takes_the_compiled_tiles_with_the_same_output(bf16, monkeypatch):
    torch.manual_seed(0)
    lin = nn.Linear(256, 3000)  # tiles of 2048 rows: two calls, the second cut short
    q = Linear4bit.from_linear(lin, QuantConfig())
    calls = []
    real = native_dequant.dequantize_4bit

    def counted(*args):
        out = real(*args)
        calls.append(None if out is None else out.dtype)
        return out

    monkeypatch.setattr("deltatune.quant.linear.dequantize_4bit", counted)
    x = torch.randn(FEW_ROWS + 5, 256)  # more rows than the few-row kernel takes: the tiles
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        compiled = q(x)
        with native_dequant.switched(False):
            plain = q(x)
    want_dtype = torch.bfloat16 if bf16 else torch.float32
    tiles = -(-3000 // q.tile_rows)
    assert calls == [want_dtype] * tiles + [None] * tiles  # compiled for every tile, then torch's path for every one
    assert torch.equal(compiled, plain)


@needs_library
def test_calls_it_cannot_take_are_left_to_torch():
    state = quantize_4bit(torch.randn(4096) * 0.02, "nf4", 64, False)
    absmax, code = absmax_float(state), code_4bit("nf4")
    take = native_dequant.dequantize_4bit
    assert take(state.packed, absmax, code, 0, 4096, 64, torch.float16) is None  # no fp16 variant
    assert take(state.packed, absmax, code, 32, 4096, 64, torch.float32) is None  # not block-aligned
    assert take(state.packed, absmax[:10], code, 0, 4096, 64, torch.float32) is None  # too few absmax
    assert take(state.packed, absmax.double(), code, 0, 4096, 64, torch.float32) is None
    assert take(state.packed.view(-1, 2).t(), absmax, code, 0, 4096, 64, torch.float32) is None  # not contiguous
    with native_dequant.switched(False):
        assert take(state.packed, absmax, code, 0, 4096, 64, torch.float32) is None
    assert torch.equal(take(state.packed, absmax, code, 0, 4096, 64, torch.float32),
                       dequantize_range(state.packed, absmax, "nf4", 64, 0, 4096))


@needs_library
def test_the_avx2_build_gives_the_same_bits(tmp_path, monkeypatch):
    # This machine builds the AVX-512 variant; a CPU without AVX-512 gets the scalar loop of the same source.
    monkeypatch.setenv("DELTATUNE_CACHE_DIR", str(tmp_path))
    avx2 = ctypes.CDLL(str(build.build(build.compiler(), native_dequant.SOURCE, build.BASE_FLAGS)))
    native_dequant._declare(avx2)
    state = quantize_4bit(torch.randn(70_000) * 0.02, "nf4", 64, True)
    absmax, code = absmax_float(state), code_4bit("nf4")
    for dtype, fn in ((torch.float32, avx2.dt_dequant4_f32), (torch.bfloat16, avx2.dt_dequant4_bf16)):
        out = torch.empty(70_000 - 128 - 3, dtype=dtype)
        fn(state.packed.data_ptr() + 64, absmax[2:].data_ptr(), code.data_ptr(), out.numel(), 64, out.data_ptr(), 2)
        want = native_dequant.dequantize_4bit(state.packed, absmax[2:], code, 128, 70_000 - 3, 64, dtype)
        assert torch.equal(out, want)
    # the few-row product's scalar loop: the same sums in another order
    W = quantize_4bit(torch.randn(40, 96) * 0.02, "nf4", 64, True)
    x, absmax = torch.randn(11, 96), absmax_float(W)
    y = torch.empty(11, 40)
    avx2.dt_linear4_f32(x.data_ptr(), W.packed.data_ptr(), absmax.data_ptr(), None, None, None, 0.0, code.data_ptr(),
                        y.data_ptr(), None, 11, 96, 40, 64, 2)
    assert_close(y, native_dequant.linear_4bit(x, W.packed, absmax, code, 40, 64), tier="reordered")


def _few_row_case(n, n_in, n_out, blocksize, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = quantize_4bit(torch.randn(n_out, n_in, generator=g) * 0.02, "nf4", blocksize, True)
    x = torch.randn(n, n_in, generator=g).to(dtype)
    W = dequantize_range(state.packed, absmax_float(state), "nf4", blocksize, 0, n_out * n_in).view(n_out, n_in)
    got = native_dequant.linear_4bit(x, state.packed, absmax_float(state), code_4bit("nf4"), n_out, blocksize)
    return got, (x.double() @ W.double().T)


@needs_library
@pytest.mark.parametrize("n", [1, 3, 8, 9, 16])  # one pass over W per 8 rows: full and partial groups
@pytest.mark.parametrize("blocksize", [32, 64, 4096])  # 4096 > in: blocks span several rows of W
def test_the_few_row_product_is_x_times_the_dequantized_weight(n, blocksize):
    for dtype in (torch.float32, torch.bfloat16):
        got, exact = _few_row_case(n, 96, 50, blocksize, dtype, seed=n)
        assert got.dtype == dtype and got.shape == (n, 50)
        # fp32 sums in another order than a BLAS; bf16: the input was rounded, the result is rounded once
        assert_close(got.double(), exact, dtype=dtype, tier="reordered")


@needs_library
@pytest.mark.parametrize("bf16", [False, True])
def test_the_few_row_product_decodes_double_quantization_to_absmax_floats_bits(bf16):
    # the kernel decodes each block's absmax from its 8-bit code; the same product from absmax_float's fp32
    # values (the torch path's decoding) must be the same to the bit
    state = quantize_4bit(torch.randn(70, 256) * 0.02, "nf4", 64, True)
    x = torch.randn(5, 256).to(torch.bfloat16 if bf16 else torch.float32)
    code = code_4bit("nf4")
    decoded = native_dequant.linear_4bit(x, state.packed, state.absmax, code, 70, 64, nested=state.nested_absmax,
                                         offset=float(state.nested_offset), levels=dynamic_map())
    given = native_dequant.linear_4bit(x, state.packed, absmax_float(state), code, 70, 64)
    assert decoded is not None and torch.equal(decoded, given)
    assert native_dequant.linear_4bit(x, state.packed, state.absmax, code, 70, 64) is None  # codes without the map


@needs_library
def test_the_few_row_product_refuses_what_it_cannot_take():
    state = quantize_4bit(torch.randn(8, 48) * 0.02, "nf4", 64, True)  # in = 48: not a multiple of 32
    args = (state.packed, absmax_float(state), code_4bit("nf4"), 8, 64)
    assert native_dequant.linear_4bit(torch.randn(2, 48), *args) is None
    state = quantize_4bit(torch.randn(8, 64) * 0.02, "nf4", 64, True)
    args = (state.packed, absmax_float(state), code_4bit("nf4"), 8, 64)
    assert native_dequant.linear_4bit(torch.randn(2, 64).half(), *args) is None  # no fp16 variant
    assert native_dequant.linear_4bit(torch.randn(64, 2).T, *args) is None  # not contiguous
    assert native_dequant.linear_4bit(torch.randn(2, 64), *args[:3], 9, 64) is None  # more rows than W has
    assert native_dequant.linear_4bit(torch.randn(2, 64), *args) is not None


@needs_library
@pytest.mark.parametrize("bf16", [False, True])
def test_linear4bit_decodes_with_the_few_row_kernel_without_autograd(bf16, monkeypatch):
    torch.manual_seed(0)
    q = Linear4bit.from_linear(nn.Linear(256, 300), QuantConfig())
    calls = []
    real = native_dequant.linear_4bit
    monkeypatch.setattr("deltatune.quant.linear.linear_4bit",
                        lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    dtype = torch.bfloat16 if bf16 else torch.float32
    for n in (1, FEW_ROWS, FEW_ROWS + 1):
        x = torch.randn(n, 256)
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            got = q(x)
            with native_dequant.switched(False):
                tiled = q(x)
        assert got.dtype == tiled.dtype == dtype
        assert_close(got.float(), tiled.float(), dtype=dtype, tier="reordered")
    assert calls == [1, 1, FEW_ROWS, FEW_ROWS]  # each n twice (the switched-off call asks too); FEW_ROWS + 1 never
    calls.clear()
    x = torch.randn(2, 256, requires_grad=True)
    q(x).sum().backward()  # a gradient to x: the tiled autograd path
    assert calls == [] and x.grad is not None
