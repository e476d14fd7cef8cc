"""train.bf16: what ``auto`` chooses, and that bf16 really runs on the CPU when chosen (issue 17, items 1-2)."""
import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

import deltatune as dt
from deltatune.train import precision
from deltatune.train.config import load_train_config
from deltatune.train.precision import choose_precision
from deltatune.train.trainer import FusedLossTrainer
from tiny import tiny_llama


@pytest.mark.parametrize("feature, expected", [("avx512_bf16", True), ("amx_bf16", True), (None, False)])
def test_auto_follows_the_cpus_native_bf16(feature, expected, monkeypatch):
    monkeypatch.setattr(precision, "_cpu_bf16_feature", lambda: feature)
    chosen = choose_precision("auto", cuda=False)
    assert chosen.bf16 is expected
    assert str(chosen).startswith(f"bf16 autocast: {'on' if expected else 'off'} (")
    assert (feature or "without AVX512-BF16") in str(chosen)


def test_true_and_false_force_it(monkeypatch):
    monkeypatch.setattr(precision, "_cpu_bf16_feature", lambda: None)
    assert choose_precision(True, cuda=False).bf16 and not choose_precision(False, cuda=False).bf16


def test_this_machines_cpu_is_read_from_torch():
    # what auto says here must be what torch reports (the flags oneDNN dispatches on)
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert choose_precision("auto", cuda=False).bf16 is native


def _train(bf16: bool, tmp_path):
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    dtypes = []
    model.get_base_model().model.layers[0].mlp.up_proj.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    ids = torch.randint(3, 90, (8, 16), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path / str(bf16)), max_steps=3, per_device_train_batch_size=4, bf16=bf16,
                             use_cpu=True, save_strategy="no", logging_steps=1, learning_rate=1e-2)
    trainer = FusedLossTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])
    return losses, set(dtypes), {p.dtype for p in model.parameters() if p.requires_grad}


def test_bf16_runs_the_trunk_in_bf16_under_the_fused_loss_and_keeps_adapters_fp32(tmp_path):
    # Before: accelerate's autocast wrapped only model.forward, which the fused loss bypasses: a bf16 run
    # was fp32 to the last digit.
    fp32, fp32_dtypes, _ = _train(False, tmp_path)
    bf16, bf16_dtypes, adapter_dtypes = _train(True, tmp_path)
    assert fp32_dtypes == {torch.float32} and bf16_dtypes == {torch.bfloat16}
    assert adapter_dtypes == {torch.float32}  # adapters and so the optimizer state stay fp32
    assert not torch.equal(bf16, fp32)
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per product); through 2 layers and 3 steps the
    # loss moves by well under 1% (measured ~1e-5 relative here); 2% is the bf16 tier of tests/tolerances.py
    torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=0)


def test_qlora_trains_under_bf16_with_bf16_tiles(tmp_path):
    from deltatune.quant import QuantConfig, quantize_model

    torch.manual_seed(0)
    model = dt.get_peft_model(quantize_model(tiny_llama(), QuantConfig(bits=4)),
                              dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    dtypes = []
    model.get_base_model().model.layers[0].mlp.up_proj.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    ids = torch.randint(3, 90, (8, 16), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, bf16=True,
                             use_cpu=True, save_strategy="no", logging_steps=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    FusedLossTrainer(model=model, args=args, train_dataset=data).train()
    assert set(dtypes) == {torch.bfloat16}  # the 4-bit layer dequantized to bf16 and multiplied in it
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if n in before)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def _shared_and_own(monkeypatch, unshare, config, counted, bf16: bool = True):
    """Train one step of a tiny LLaMA with the sibling layers sharing a copy of their input, then with
    ``unshare()`` in effect; per run: (distinct saved storages that ``counted`` picks, loss, grads)."""
    ids = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    results = []
    for shared in (True, False):
        if not shared:
            unshare()
        model = dt.get_peft_model(tiny_llama(), config).train()
        storages = set()

        def pack(t):
            if counted(t, ids.numel()):
                storages.add(t.untyped_storage().data_ptr())
            return t

        torch.manual_seed(1)  # the same dropout masks in both runs
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((len(storages), loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    (_, shared_loss, shared_grads), (_, own_loss, own_grads) = results
    assert torch.equal(shared_loss, own_loss)  # the same result to the bit
    assert all(torch.equal(a, b) for a, b in zip(shared_grads, own_grads))
    return results[0][0], results[1][0]


@pytest.mark.parametrize("use_dora", [False, True])
def test_layers_reading_one_input_share_its_bf16_cast_with_the_same_gradients(use_dora, monkeypatch):
    # q/k/v_proj (and gate/up_proj) read the same fp32 hidden states; under autocast each fused layer used to
    # save its own bf16 cast of them. Now they share one.
    from deltatune.methods import dora_kernels, lora_kernels

    def unshare():
        for kernels in (lora_kernels, dora_kernels):
            monkeypatch.setattr(kernels, "_operand", lambda x, dtype: x.to(dtype))

    shared, own = _shared_and_own(
        monkeypatch, unshare,
        dt.LoraConfig(r=4, target_modules="all-linear", use_dora=use_dora),
        lambda t, n: t.dtype == torch.bfloat16 and t.dim() == 3 and t.shape[-1] == 32)  # (B, T, hidden) inputs
    # per layer, without sharing: 2 more casts of the attention input (q, k, v), 1 more of the MLP's (gate, up)
    assert own - shared == 2 * 3


@pytest.mark.parametrize("bf16", [True, False])
def test_layers_reading_one_input_share_its_dropped_copy_with_the_same_gradients(bf16, monkeypatch):
    # with lora_dropout, q/k/v_proj (and gate/up_proj) share one mask, so one x * mask * k serves them all;
    # it is saved for backward instead of x
    from deltatune.methods import lora_kernels

    shared, own = _shared_and_own(
        monkeypatch, lambda: monkeypatch.setattr(lora_kernels._DROPPED, "get", lambda source, tag: None),
        dt.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1),
        lambda t, n: t.dim() == 2 and t.shape[0] == n and t.shape[1] in (32, 64), bf16)  # (N, in): each x̃
    layers = 2
    assert (shared, own) == (4 * layers, 7 * layers)  # per block: attention, o_proj, MLP, down_proj inputs


# ---- attention while training, and scoring in the run's precision (issue 17) ------------------------------
def test_cpu_bf16_training_uses_eager_attention_and_gives_the_model_back():
    from deltatune.train.attention import NAME
    from deltatune.train.precision import Precision, training_attention

    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    with training_attention(model, Precision(True, "test"), cuda=False) as used:
        assert used == NAME and model.config._attn_implementation == NAME
    assert model.config._attn_implementation == "sdpa"
    for precision, cuda in [(Precision(False, "test"), False), (Precision(True, "test"), True)]:
        with training_attention(model, precision, cuda=cuda) as used:  # fp32, or a GPU: the model's own kernel
            assert used is None and model.config._attn_implementation == "sdpa"


def test_eager_attention_computes_what_sdpa_does():
    # the switch is for speed only: the same loss and gradients (fp32 here, so the tolerance can be tight)
    model, ids = tiny_llama(), torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    results = []
    for attn in ("sdpa", "eager"):
        model.set_attn_implementation(attn)
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bf16", [True, False])
def test_the_runs_accuracy_scoring_runs_in_its_precision(bf16, monkeypatch):
    from deltatune.train import session as session_module
    from deltatune.train.precision import Precision

    seen = []
    monkeypatch.setattr(session_module, "score_accuracy",
                        lambda *a, **k: seen.append(torch.is_autocast_enabled("cpu")) or {"seconds": 0.0})
    monkeypatch.setattr(session_module, "describe", lambda result: "")
    run = object.__new__(session_module.TrainingSession)  # only what score() reads
    run.config, run.tokenizer, run.log, run.precision = load_train_config(None, []), None, lambda line: None, Precision(bf16, "test")
    run.prepared = type("Prepared", (), {"eval": [], "template": "auto"})()
    run.score(tiny_llama(), "accuracy")
    assert seen == [bf16]


def test_model_dtype_loads_bf16_weights_and_keeps_adapters_fp32(monkeypatch):
    from deltatune.train import loading

    asked = []

    def fake_load(name, dtype, device=None):
        asked.append(dtype)
        return tiny_llama().to(dtype), None

    monkeypatch.setattr(loading, "load_model_and_tokenizer", fake_load)
    config = load_train_config(None, ["model_dtype=bfloat16"])
    assert config.to_dict()["model_dtype"] == "bfloat16"
    base = loading.load_model(config, log=lambda line: None)
    assert asked == [torch.bfloat16] and base.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    model = dt.get_peft_model(base, config.method.build(10, num_layers=len(base.model.layers)))
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert trainable == {torch.float32}  # peft's autocast_adapter_dtype: adapters (and Adam's state) stay fp32
    assert load_train_config(None, []).model_dtype == "float32"


def test_a_bad_model_dtype_names_the_choices():
    from deltatune.train.config import ConfigError

    with pytest.raises(ConfigError, match="model_dtype.*float16.*expected one of float32, bfloat16"):
        load_train_config(None, ["model_dtype=float16"])
