"""Linear4bit / Linear8bit: forward and backward equal dense math on the dequantized weight."""
import multiprocessing

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close
from torch import nn

from deltatune.quant import Linear4bit, Linear8bit, QuantConfig, cached_dequant, quantize_nf4
from deltatune.quant.kernels import _dequant_tile, byte_levels
from deltatune.quant.matmul import tile_rows, tiled_linear, tiled_linear_grad_input
from deltatune.quant.nf4 import absmax_float, dequantize_range


def _linear(n_in, n_out, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias)


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# Shapes: tiles of several rows, a width that is not a multiple of the block (tiles must align
# to blocks), an odd number of values (last byte half used), and a single tile.
SHAPES = [(256, 2100), (100, 48), (33, 17), (64, 64)]


@pytest.mark.parametrize("n_in,n_out", SHAPES)
@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(quant_type="fp4", double_quant=False),
                                    QuantConfig(bits=8)], ids=["nf4-dq", "fp4", "int8"])
def test_forward_equals_linear_on_dequantized_weight(n_in, n_out, config):
    lin = _linear(n_in, n_out)
    layer = (Linear4bit if config.bits == 4 else Linear8bit).from_linear(lin, config)
    layer.tile_rows = min(layer.tile_rows, tile_rows(n_in, n_out, getattr(layer, "blocksize", 1), 4096))
    x = _x(3, 5, n_in)
    expected = F.linear(x, layer.dequantize_weight(), lin.bias)
    assert_close(layer(x), expected)


def test_tiles_of_several_rows_are_really_used():
    layer = Linear4bit.from_linear(_linear(2100, 256))
    layer.tile_rows = tile_rows(2100, 256, 64, tile_values=8192)
    assert 1 < layer.tile_rows < 256 and (layer.tile_rows * 2100) % 64 == 0
    x = _x(4, 2100)
    assert_close(layer(x), F.linear(x, layer.dequantize_weight(), layer.bias))


def test_input_gradient_equals_dense_gradient_and_nothing_dense_is_saved():
    layer = Linear4bit.from_linear(_linear(96, 200))
    layer.tile_rows = 32
    w = layer.dequantize_weight()
    x = _x(7, 96).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    grad_out = _x(7, 200, seed=2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = layer(x)
    y.backward(grad_out)
    F.linear(x_ref, w, layer.bias).backward(grad_out)
    assert_close(x.grad, x_ref.grad)
    assert torch.Size([200, 96]) not in saved  # the dense weight is rebuilt in backward, not kept


def test_worker_thread_tiles_equal_serial_tiles_and_work_in_inference_mode():
    layer = Linear4bit.from_linear(_linear(512, 256))
    layer.tile_rows = 32  # 8 tiles, split between the conftest's 2 torch threads
    rows, x = layer._make_dequant_rows(layer.compute_dtype), _x(3, 512)
    serial = tiled_linear(x, rows, 256, 32, parallel=False)
    assert torch.equal(tiled_linear(x, rows, 256, 32, parallel=True), serial)
    with torch.inference_mode():
        assert_close(layer(x), serial + layer.bias)
    g = _x(3, 256, seed=3)
    assert_close(tiled_linear_grad_input(g, rows, 512, 32, parallel=True),
                 tiled_linear_grad_input(g, rows, 512, 32, parallel=False))


@pytest.mark.parametrize("n_rows, tile, pooled", [(1024, 128, False), (1024, 32, True), (8, 128, True)])
def test_the_pool_takes_calls_of_many_tiles_or_few_rows(n_rows, tile, pooled, monkeypatch):
    # 2 tiles on 1,024 rows run inline (with the pool, the caller's spinning OpenMP threads halved their
    # speed); 8 tiles, or 8 rows, go to the pool. Forward and backward decide alike; results are the same.
    from deltatune.quant import matmul

    asked = []
    real = matmul.run_split
    monkeypatch.setattr(matmul, "run_split", lambda fn, items, device, parallel: asked.append(parallel)
                        or real(fn, items, device, parallel))
    layer = Linear4bit.from_linear(_linear(64, 256))
    layer.tile_rows = tile
    rows, x, g = layer._make_dequant_rows(layer.compute_dtype), _x(n_rows, 64), _x(n_rows, 256, seed=3)
    y, dx = tiled_linear(x, rows, 256, tile), tiled_linear_grad_input(g, rows, 64, tile)
    assert asked == [pooled, pooled]
    w = rows(0, 256)
    assert_close(y, x @ w.T)
    assert_close(dx, g @ w)


def _forward_in_child(queue):
    layer = Linear4bit.from_linear(_linear(512, 256))
    layer.tile_rows = 32
    queue.put(layer(_x(2, 512)).sum().item())


def test_forked_child_gets_fresh_worker_threads():
    parent = Linear4bit.from_linear(_linear(512, 256))
    parent.tile_rows = 32
    expected = parent(_x(2, 512)).sum().item()  # the parent's pool exists now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_forward_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():  # a hang is the failure this test is about; do not leave it running
        child.kill()
    assert child.exitcode == 0 and queue.get(timeout=5) == pytest.approx(expected, rel=1e-6)


def test_weight_is_frozen_and_bias_follows_the_source_layer():
    lin = _linear(64, 32)
    layer = Linear4bit.from_linear(lin)
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    assert layer.bias.requires_grad and torch.equal(layer.bias, lin.bias)
    assert not Linear4bit.from_linear(_linear(64, 32, bias=False)).state_dict().get("bias")


@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float16"])
def test_compute_dtype_casts_in_and_out(compute_dtype):
    config = QuantConfig(compute_dtype=compute_dtype)
    layer = Linear4bit.from_linear(_linear(128, 64), config)
    x = _x(4, 128)
    y = layer(x)
    dt = config.torch_compute_dtype
    expected = F.linear(x.to(dt), layer.dequantize_weight(dt), layer.bias.to(dt)).float()
    assert y.dtype == torch.float32
    assert_close(y, expected, dtype=dt)


def test_to_dtype_keeps_quantization_constants_exact():
    layer = Linear4bit.from_linear(_linear(128, 64))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.to(torch.bfloat16)
    for name in ("qweight", "absmax", "nested_absmax", "nested_offset"):
        assert torch.equal(getattr(layer, name), before[name]) and getattr(layer, name).dtype == before[name].dtype
    assert layer.bias.dtype == torch.bfloat16  # the bias is an ordinary parameter
    layer.to("cpu")  # device moves work (CUDA is covered by the gpu test)
    assert layer.qweight.device.type == "cpu"


def test_bits_per_param_of_layer_state():
    layer = Linear4bit.from_linear(_linear(1024, 1024, bias=False))
    assert layer.quant_state.bits_per_param() == pytest.approx(4.127, abs=0.001)
    n_bytes = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    assert 8 * n_bytes / (1024 * 1024) <= 4.2


def test_requantize_replaces_the_weight():
    layer = Linear4bit.from_linear(_linear(64, 32))
    new = _linear(64, 32, seed=5).weight
    layer.requantize_(new)
    expected = quantize_nf4(new)
    assert torch.equal(layer.qweight, expected.packed) and torch.equal(layer.absmax, expected.absmax)
    with pytest.raises(ValueError, match=r"\(32, 64\)"):
        layer.requantize_(new.t())


def test_cached_dequant_gives_the_same_outputs_and_drops_the_cache():
    layer = Linear4bit.from_linear(_linear(128, 64))
    x = _x(4, 128)
    y = layer(x)
    with cached_dequant(layer):
        assert_close(layer(x), y)
        assert layer._weight_cache is not None
    assert layer._weight_cache is None and not layer.cache_weight


def test_compiled_kernel_math_equals_eager_kernel():
    # The torch.compile-d path runs _dequant_tile; compiling itself is torch's job (and ~10 s).
    s = quantize_nf4(_x(64, 128) * 0.05)
    absmax = absmax_float(s)
    assert torch.equal(_dequant_tile(s.packed, absmax, byte_levels("nf4", torch.device("cpu")), 64),
                       dequantize_range(s.packed, absmax, "nf4", 64, 0, s.numel))


def test_errors_are_explained():
    layer = Linear4bit.from_linear(_linear(64, 32))
    with pytest.raises(ValueError, match="expects 64"):
        layer(_x(2, 63))
    plain = Linear4bit(64, 32, double_quant=False)  # uint8 absmax must not be cast into float32
    with pytest.raises(RuntimeError, match="double_quant"):
        plain.load_state_dict(layer.state_dict())


def test_int8_codes_equal_bitsandbytes():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    lin = _linear(96, 40)
    layer = Linear8bit.from_linear(lin)
    codes, scales, _ = bnb_f.int8_vectorwise_quant(lin.weight.detach().clone())
    assert torch.equal(layer.qweight, codes) and torch.equal(layer.row_absmax, scales)
    assert torch.equal(layer.dequantize_weight(), bnb_f.int8_vectorwise_dequant(codes, scales))


@pytest.mark.gpu
@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(bits=8)], ids=["nf4", "int8"])
def test_cuda_layer_equals_cpu_layer(config):
    lin = _linear(512, 300)
    cpu = (Linear4bit if config.bits == 4 else Linear8bit).from_linear(lin, config)
    gpu = (Linear4bit if config.bits == 4 else Linear8bit).from_linear(_linear(512, 300).cuda(), config)
    # Quantized on the GPU: the same state, except that CUDA reduces the double-quant offset (the
    # mean of all absmax) in another order: on an H100 it differed by one ulp (8.6e-8 relative), the
    # nested scales max|absmax - offset| by up to 1.6e-6 relative, every code was equal, and the
    # dequantized weights agreed to 2.4e-7. A code on a rounding boundary may flip.
    for name, t in cpu.state_dict().items():
        g = gpu.state_dict()[name].cpu()
        if t.is_floating_point():
            torch.testing.assert_close(g, t, atol=0, rtol=1e-5, msg=name)
        else:
            assert (g != t).float().mean() <= 1e-3, name
    assert_close(gpu.dequantize_weight().cpu(), cpu.dequantize_weight())
    x = _x(6, 512)
    expected = F.linear(x, cpu.dequantize_weight(), lin.bias)
    moved = cpu.to("cuda")
    # scale: cuBLAS sums the 512 products in a different order than the CPU
    assert_close(moved(x.cuda()).cpu(), expected, tier="reordered")
