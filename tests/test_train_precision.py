"""train.bf16: what ``auto`` chooses, and that bf16 really runs on the CPU when chosen (issue 17, items 1-2)."""
import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

import deltatune as dt
from deltatune.train import precision
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
