"""CUDA numerics: every computation on DEVICE against the same computation on CPU in fp32.

Run on a GPU machine with ``pytest -q tests/test_gpu.py``. Without CUDA every test here is skipped;
``DELTATUNE_GPU_TESTS_ON_CPU=1`` runs them with DEVICE = "cpu" as a dry run of the test logic only
(see tests/conftest.py). Imports stay within torch, transformers, safetensors and deltatune's core:
no datasets, gguf, optuna, bitsandbytes or trl on the GPU machine.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainingArguments

import deltatune as dt
from deltatune.quant import QuantConfig, quantize_model
from deltatune.train.adapter_trainer import AdapterTrainer
from deltatune.train.loss import causal_lm_loss, fused_linear_cross_entropy
from tiny import input_ids, perturb, tiny_gpt2, tiny_llama
from tolerances import assert_close

pytestmark = pytest.mark.gpu
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_CUDA = DEVICE == "cuda"
# Cross-device fp32: CPU and CUDA run different GEMM/SDPA kernels that sum in different orders. Measured
# on CPU, fp32 vs fp64 through these tiny models stays under 0.13 of the fp32 tolerance (logits, loss and
# grads, every method), so two fp32 results differ by ~0.26 of it at most; 10x leaves room for unlucky
# rounding without hiding a bug (a wrong term moves logits, |logit| < 0.5 here, by 1e-2 or more).
XDEV = 10.0


@pytest.fixture(scope="module", autouse=True)
def _no_tf32():
    # TF32 rounds fp32 matmul inputs to 10 mantissa bits (~1e-3): the fp32 comparisons would fail on it.
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _build(make, config, seed=0):
    """A perturbed adapter on a CPU fp32 model, in eval mode (GPT-2's dropout 0.1 would differ per device)."""
    pm = dt.get_peft_model(make(), config)
    perturb(pm, seed)
    return pm.eval()


def _to(model, device, dtype=None):
    return copy.deepcopy(model).to(device=device, dtype=dtype)


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _close(name, actual, expected, **kw):
    try:
        assert_close(actual, expected, **kw)
    except AssertionError as e:
        raise AssertionError(f"{name}: {e}") from None


def _run(model, x):
    """Forward with labels, backward; logits, loss and every trainable parameter's grad, on CPU."""
    model.zero_grad(set_to_none=True)
    x = x.to(next(model.parameters()).device)
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in _trainable(model).items()}
    return out.logits.detach().float().cpu(), out.loss.detach().float().cpu(), grads


# ---- 1. every method, forward + backward ------------------------------------------------------------
CAUSAL = dict(task_type="CAUSAL_LM")
LORA = dict(init_lora_weights=False, **CAUSAL)
METHODS = {
    "lora": (tiny_llama, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], **LORA)),
    "rslora": (tiny_llama, dt.LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear", **LORA)),
    "dora": (tiny_llama, dt.LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj", "gate_proj"], **LORA)),
    "ia3": (tiny_llama, dt.IA3Config(init_ia3_weights=False, **CAUSAL)),
    "prompt": (tiny_llama, dt.PromptTuningConfig(num_virtual_tokens=4, **CAUSAL)),
    "prefix": (tiny_llama, dt.PrefixTuningConfig(num_virtual_tokens=3, **CAUSAL)),
    "bottleneck": (tiny_llama, dt.BottleneckConfig(init_weights=False, bottleneck_size=8, **CAUSAL)),  # 2 relu units can all die
    "adalora": (tiny_llama, dt.AdaLoraConfig(total_step=10, target_modules=["q_proj", "v_proj"], **LORA)),
    "gpt2-lora": (tiny_gpt2, dt.LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, **LORA)),
    "gpt2-dora": (tiny_gpt2, dt.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True, **LORA)),
}


@pytest.mark.parametrize("case", METHODS)
def test_forward_backward_matches_cpu(case):
    make, config = METHODS[case]
    ref = _build(make, config)
    x = input_ids(batch=2, seq=8)
    logits, loss, grads = _run(ref, x)
    d_logits, d_loss, d_grads = _run(_to(ref, DEVICE), x)
    assert_close(d_logits, logits, scale=XDEV)
    assert_close(d_loss, loss, scale=XDEV)
    assert d_grads.keys() == grads.keys() and grads
    for n in grads:
        assert grads[n].abs().max() > 0, f"{n}: no gradient reaches this parameter"
        _close(n, d_grads[n], grads[n], scale=XDEV)  # fp32 vs fp64 grads: <= 0.13 of the tolerance (XDEV)


@pytest.mark.parametrize("case", [*METHODS, "pissa", "olora"])
def test_adapters_attach_to_a_model_already_on_device(case):
    """get_peft_model on a model that is already on the GPU: adapters are created there (random
    init still drawn from the CPU generator, as peft does), and give the CPU-built model's logits."""
    make, config = METHODS.get(case) or (
        tiny_llama, dt.LoraConfig(r=4, init_lora_weights=case, use_dora=True, target_modules=["q_proj", "up_proj"], **CAUSAL)
    )
    torch.manual_seed(0)
    ref = dt.get_peft_model(make(), config).eval()
    torch.manual_seed(0)
    on_device = dt.get_peft_model(make().to(DEVICE), config).eval()
    assert {p.device.type for p in on_device.parameters()} == {DEVICE}
    x = input_ids(batch=2, seq=8)
    logits, loss, grads = _run(ref, x)
    d_logits, d_loss, d_grads = _run(on_device, x)
    assert_close(d_logits, logits, scale=XDEV)
    assert d_grads.keys() == grads.keys() and grads


# ---- 2. bf16 base ---------------------------------------------------------------------------------
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_bf16_base_trains_and_tracks_fp32(use_dora):
    config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"], use_dora=use_dora, **LORA)
    ref = _build(tiny_llama, config)
    x = input_ids(batch=2, seq=8)
    logits, loss, grads = _run(ref, x)
    pm = dt.get_peft_model(tiny_llama().to(torch.bfloat16), config).eval()
    # autocast_adapter_dtype (peft's default): LoRA factors and DoRA magnitudes on a bf16 base are fp32.
    params = _trainable(pm)
    assert params.keys() == _trainable(ref).keys()
    assert all(p.dtype == torch.float32 for p in params.values())
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(_trainable(ref)[n])
    b_logits, b_loss, b_grads = _run(pm.to(DEVICE), x)
    assert torch.isfinite(b_loss) and all(torch.isfinite(g).all() for g in b_grads.values())
    # Every weight and activation is rounded to 8 mantissa bits at each of ~10 matmuls in two layers;
    # measured on CPU at 0.28 of the bf16 tolerance; 3x leaves room for CUDA's own rounding.
    assert_close(b_logits, logits, dtype=torch.bfloat16, scale=3)
    assert_close(b_loss, loss, dtype=torch.bfloat16)
    for n, g in grads.items():
        # Elementwise bf16 grads are noisy; their direction must match fp32's (0.9998 measured on CPU).
        cos = F.cosine_similarity(b_grads[n].flatten(), g.flatten(), dim=0)
        assert cos > 0.99, f"{n}: cosine {cos:.4f} to the fp32 gradient"


# ---- 3. merge / unmerge / save on DEVICE ----------------------------------------------------------
@pytest.mark.parametrize("case", ["lora", "dora", "ia3", "gpt2-dora"])
def test_merge_unmerge_and_save_from_device(case, tmp_path):
    make, config = METHODS[case]
    ref = _build(make, config)
    x = input_ids()
    with torch.no_grad():
        expected = ref(x).logits
        pm = _to(ref, DEVICE)
        base = {n: t.clone() for n, t in pm.state_dict().items() if ".adapters." not in n}
        xd = x.to(DEVICE)
        unmerged = pm(xd).logits
        pm.merge_adapter()
        merged = pm(xd).logits
        pm.unmerge_adapter()
    assert_close(unmerged.cpu(), expected, scale=XDEV)
    assert_close(merged, unmerged, tier="reordered")  # one matmul on W + ΔW instead of two: fp32 reassociation
    for n, t in pm.state_dict().items():
        if n in base:
            _close(n, t, base[n])
    pm.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(make(), tmp_path)  # a CPU base
    assert next(loaded.parameters()).device.type == "cpu"
    with torch.no_grad():
        assert_close(loaded(x).logits, expected)


# ---- 4. QLoRA -------------------------------------------------------------------------------------
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_qlora_matches_cpu(compute):
    dtype = getattr(torch, compute)
    base = quantize_model(tiny_llama(hidden=64), QuantConfig(compute_dtype=compute))
    ref = dt.get_peft_model(base, dt.LoraConfig(r=4, target_modules="all-linear", **LORA)).eval()
    perturb(ref)
    x = input_ids(batch=2, seq=8)
    logits, loss, grads = _run(ref, x)
    d_logits, d_loss, d_grads = _run(_to(ref, DEVICE), x)
    assert grads and all(".lora_" in n for n in grads)
    # Same 4-bit codes on both devices (buffers move, never requantize); only the matmuls differ. With bf16
    # compute, bf16 vs fp32 compute on CPU is <= 0.25 of the bf16 tolerance: two bf16 runs differ by ~0.5
    # of it at most, and 2x allows CUDA's bf16 rounding to be twice as far off as the CPU's.
    scale = XDEV if dtype == torch.float32 else 2.0
    assert_close(d_logits, logits, dtype=dtype, scale=scale)
    assert_close(d_loss, loss, dtype=dtype, scale=scale)
    for n in grads:
        _close(n, d_grads[n], grads[n], dtype=dtype, scale=scale)


# ---- 5. mixed-adapter serving ---------------------------------------------------------------------
SERVED = {
    "lora4": dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **LORA),
    "rslora8": dt.LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear", **LORA),
    "dora2": dt.LoraConfig(r=2, use_dora=True, target_modules=["k_proj", "down_proj", "up_proj"], **LORA),
    "ia3": dt.IA3Config(init_ia3_weights=False, **CAUSAL),
}
ROWS = ["lora4", "__base__", "rslora8", "dora2", "ia3", "lora4"]


def _served():
    (first, config), *rest = SERVED.items()
    pm = dt.get_peft_model(tiny_llama(), config, first)
    for name, config in rest:
        pm.add_adapter(name, config)
    for i, name in enumerate(SERVED):
        pm.set_adapter(name)
        perturb(pm, seed=i, std=0.2)
    return pm.eval()


def _alone(pm, name, fn):
    if name == "__base__":
        with pm.disable_adapter():
            return fn()
    pm.set_adapter(name)
    return fn()


@torch.no_grad()
def test_mixed_batch_on_device_equals_each_adapter_alone_on_cpu():
    ref = _served()
    dev = _to(ref, DEVICE)
    x = input_ids(batch=len(ROWS), seq=6, seed=10)  # greedy top-2 gaps >= 5e-3 on CPU
    mixed = dev(input_ids=x.to(DEVICE), adapter_names=ROWS).logits.cpu()
    for i, name in enumerate(ROWS):
        alone = _alone(ref, name, lambda: ref(input_ids=x[i : i + 1]).logits)
        assert_close(mixed[i : i + 1], alone, scale=XDEV)

    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    got = dev.generate(input_ids=x.to(DEVICE), adapter_names=ROWS, **kw).cpu()
    for i, name in enumerate(ROWS):
        want = _alone(ref, name, lambda: ref.generate(input_ids=x[i : i + 1], **kw))
        # Greedy tokens are only comparable across devices if no step was a near-tie on CPU.
        top2 = _alone(ref, name, lambda: ref(input_ids=want).logits[0, x.shape[1] - 1 : -1].topk(2).values)
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-3, f"row {i}: a near-tie makes this seed unfit"
        assert torch.equal(got[i : i + 1], want), f"row {i} ({name})"


# ---- 6. fused loss --------------------------------------------------------------------------------
def _ce(h, w, b, y):
    # What transformers does: logits in the inputs' dtype, upcast to fp32 for the loss.
    return F.cross_entropy(torch.addmm(b, h, w.T).float(), y, ignore_index=-100)


def _fused(h, w, b, y):
    return fused_linear_cross_entropy(h, w, y, bias=b, chunk_size=16)  # 75 tokens: five chunks, the last short


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_loss_on_device_equals_cross_entropy(dtype):
    g = torch.Generator().manual_seed(0)
    n, h_dim, v = 75, 32, 500
    inputs = (torch.randn(n, h_dim, generator=g), torch.randn(v, h_dim, generator=g) / h_dim**0.5,
              torch.randn(v, generator=g))
    y = torch.randint(0, v, (n,), generator=g)
    y[::4] = -100

    def run(fn, device, dt_):
        ts = [t.to(device, dt_).requires_grad_() for t in inputs]
        loss = fn(*ts, y.to(device))
        grads = torch.autograd.grad(loss * 1.7, ts)  # 1.7: a grad_output other than 1 (loss scaling)
        return loss.detach().cpu(), [t.cpu() for t in grads]

    loss, grads = run(_fused, DEVICE, dtype)
    # fp32: against the CPU reference. bf16: against torch on the same bf16 inputs on DEVICE (both round
    # the logits to bf16 before the fp32 upcast, so they agree to bf16 precision).
    want_loss, want = run(_ce, "cpu", dtype) if dtype == torch.float32 else run(_ce, DEVICE, dtype)
    assert loss.dtype == torch.float32
    assert_close(loss, want_loss.float(), dtype=dtype, scale=XDEV if dtype == torch.float32 else 1.0)
    for got, ref in zip(grads, want):
        assert got.dtype == dtype
        assert_close(got.float(), ref.float(), dtype=dtype, scale=XDEV if dtype == torch.float32 else 1.0)


def test_causal_lm_loss_on_device_equals_model_loss():
    pm = _to(_build(tiny_llama, METHODS["lora"][1]), DEVICE)
    x = input_ids(batch=3, seq=9).to(DEVICE)
    labels = x.clone()
    labels[0, :4] = -100  # a masked prompt
    own = pm(input_ids=x, labels=labels).loss
    want = torch.autograd.grad(own, list(_trainable(pm).values()))
    fused, n = causal_lm_loss(pm, input_ids=x, labels=labels, chunk_size=5)
    got = torch.autograd.grad(fused, list(_trainable(pm).values()))
    assert n == 3 * 8 - 3  # one fewer target per row after the shift, and 3 masked in row 0
    assert_close(fused, own)
    for a, b in zip(got, want):
        assert_close(a, b, tier="reordered")  # same math, the head's matmul summed in chunks


# ---- 7. AdapterTrainer ----------------------------------------------------------------------------
class _Rows(torch.utils.data.Dataset):
    def __init__(self):
        ids = input_ids(batch=8, seq=12, seed=5)
        self.rows = [dict(input_ids=ids[i], labels=ids[i]) for i in range(8)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_adapter_trainer_on_device(tmp_path):
    pm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules="all-linear", **CAUSAL))
    before = {n: t.detach().clone().cpu() for n, t in pm.state_dict().items()}
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=5, per_device_train_batch_size=2, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        bf16=ON_CUDA, use_cpu=not ON_CUDA,  # bf16 autocast is what a GPU run uses; the CPU dry run stays fp32
    )
    trainer = AdapterTrainer(model=pm, args=args, train_dataset=_Rows())
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)
    assert next(pm.parameters()).device.type == DEVICE
    trained = set(_trainable(pm))
    assert trained and all(".lora_" in n for n in trained)
    for n, t in pm.state_dict().items():
        if n in trained:
            assert not torch.equal(t.cpu(), before[n]), f"{n} did not train"
        else:
            assert torch.equal(t.cpu(), before[n]), f"{n} changed: only the adapter may train"
            assert t.dtype == before[n].dtype  # bf16 autocast keeps fp32 weights
    trainer.save_model(str(tmp_path / "final"))
    files = {p.name for p in (tmp_path / "final").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "final")
    # The saved adapter is exactly the trained one. (Comparing logits with ``pm`` itself would not do:
    # accelerate leaves bf16 autocast wrapped around the trained model's forward.)
    for n, t in _trainable(pm).items():
        assert torch.equal(loaded.state_dict()[n], t.detach().cpu()), n
