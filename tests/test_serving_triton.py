"""The Triton mixed-LoRA kernels (CUDA only) against the pure-torch path they replace."""
import pytest
import torch

from deltatune.serving import kernels, triton_lora

pytestmark = pytest.mark.gpu
CASES = [  # (rows, length, in, out, rank)
    (3, 5, 40, 70, 4),  # nothing a multiple of a block
    (2, 128, 512, 512, 16),
    (4, 1, 96, 50, 20),  # one decode step; a rank above 16 pads to 32
    (32, 128, 512, 1408, 16),
]


def _inputs(rows, length, n_in, n_out, rank, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, length, n_in, generator=g).to("cuda", dtype)
    A = (torch.randn(rows, rank, n_in, generator=g) / n_in**0.5).to("cuda", dtype)
    Bt = torch.randn(rows, n_out, rank, generator=g).to("cuda", dtype).transpose(1, 2)  # the plans' layout
    y = torch.randn(rows, length, n_out, generator=g).to("cuda", dtype)
    return y, x, A, Bt


def _torch_path(y, x, A, Bt):
    with triton_lora.switched(False):
        return kernels.mixed_lora_(y, x, A, Bt)


@pytest.fixture(autouse=True)
def _needs_triton(monkeypatch):
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setattr(triton_lora, "ENABLED", True)  # opt-in (DELTATUNE_TRITON=1) for these tests
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference must be true fp32
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.mark.parametrize("shape", CASES)
def test_fp32_equals_torch_path(shape):
    y, x, A, Bt = _inputs(*shape, torch.float32)
    expected = _torch_path(y.clone(), x, A, Bt)
    got = y.clone()
    assert triton_lora.usable(got, x, A, Bt)
    out = triton_lora.mixed_lora_triton_(got, x, A, Bt)
    assert out.data_ptr() == got.data_ptr()  # updated in place
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(dtype):
    y, x, A, Bt = _inputs(4, 64, 256, 320, 16, dtype)
    exact = _torch_path(y.float(), x.float(), A.float(), Bt.float())
    got = triton_lora.mixed_lora_triton_(y.clone(), x, A, Bt)
    assert got.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.float(), exact, atol=64 * eps, rtol=16 * eps)


def test_strided_inputs():
    # A row slice of a larger activation and a bank slice: nothing has to be contiguous
    y, x, A, Bt = _inputs(3, 9, 64, 48, 8, torch.float32)
    wide = torch.randn(3, 9, 128, device="cuda")[:, :, 32:96].copy_(x)
    expected = _torch_path(y.clone(), x, A, Bt)
    torch.testing.assert_close(triton_lora.mixed_lora_triton_(y.clone(), wide, A, Bt), expected, atol=2e-5, rtol=1e-5)


def test_dispatch_is_triton_when_enabled_and_torch_under_autograd_or_when_off(monkeypatch):
    calls = []
    real = triton_lora.mixed_lora_triton_
    monkeypatch.setattr(triton_lora, "mixed_lora_triton_", lambda *a: calls.append(1) or real(*a))
    y, x, A, Bt = _inputs(2, 8, 32, 32, 4, torch.float32)
    kernels.mixed_lora_(y.clone(), x, A, Bt)
    assert calls == [1]
    x.requires_grad_(True)
    out = kernels.mixed_lora_(y.clone(), x, A, Bt)
    assert calls == [1] and out.requires_grad  # autograd keeps the differentiable torch path
    monkeypatch.setattr(triton_lora, "ENABLED", False)
    kernels.mixed_lora_(y.clone(), x.detach(), A, Bt)
    assert calls == [1]  # the default: off
