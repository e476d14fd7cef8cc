"""The fused loss under adapter methods that change the forward: prompt tuning (virtual tokens in the
sequence), prefix tuning (a pre-filled cache) and AdaLoRA (an orthogonality penalty on the loss).

``causal_lm_loss`` on our PeftModel must give the model's own ``forward(..., labels=...).loss`` and its
gradients (tier b), which equals peft's loss on the same adapter weights (tier c); ``FusedLossTrainer``
and ``AdapterTrainer`` (``deltatune train``) must train like transformers' ``Trainer``.
"""
import warnings
from pathlib import Path

import peft
import pytest
import torch
from transformers import Trainer, TrainingArguments

import deltatune.train.adapter_trainer as adapter_trainer_mod
import deltatune.train.loss as loss_mod
import deltatune.train.trainer as trainer_mod
from deltatune import AdaLoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from deltatune.methods.adalora import AdaLoraCallback
from deltatune.train.adapter_trainer import AdapterTrainer
from deltatune.train.loss import causal_lm_loss
from deltatune.train.config import load_train_config
from deltatune.train.run import run_training
from deltatune.train.trainer import FusedLossTrainer
from support_train import tiny_run_files  # noqa: F401  (fixture)
from tiny import input_ids, tiny_llama
from tolerances import assert_close

CONFIGS = {
    "prompt": dict(cls=PromptTuningConfig, num_virtual_tokens=4),
    "prefix": dict(cls=PrefixTuningConfig, num_virtual_tokens=4),
    # Random factors (init_lora_weights=False): the penalty and the adapter's output are both far from 0.
    "adalora": dict(cls=AdaLoraConfig, init_r=4, target_r=2, total_step=3, init_lora_weights=False,
                    target_modules=["q_proj", "v_proj"]),
}
METHODS = list(CONFIGS)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _kwargs(method):
    return {k: v for k, v in CONFIGS[method].items() if k != "cls"} | dict(task_type="CAUSAL_LM")


def _peft_model(method, seed=0):
    torch.manual_seed(seed)
    pm = get_peft_model(tiny_llama(), CONFIGS[method]["cls"](**_kwargs(method)))
    return pm.train()


def _batch(seed=1):
    ids = input_ids(batch=2, seq=10, seed=seed)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding on the second row
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100  # a masked prompt, as in chat data
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def _count_fused_calls(monkeypatch):
    calls = []
    real = loss_mod.fused_linear_cross_entropy
    monkeypatch.setattr(loss_mod, "fused_linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


# ---- causal_lm_loss against the model's own loss ------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_fused_loss_and_gradients_equal_the_models_own(method, monkeypatch):
    pm, batch = _peft_model(method), _batch()
    fused_calls = _count_fused_calls(monkeypatch)
    want = pm(**batch).loss
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the full-logits path
        got, n = causal_lm_loss(pm, **batch)
    assert fused_calls == [1]
    assert_close(got, want)
    for g, w in zip(_grads(pm, got), _grads(pm, want)):
        assert_close(g, w)
    # The supervised positions: the labels' own, plus the last virtual token predicting the first real
    # token when prompt tuning puts the prompt in front.
    labels = batch["labels"]
    assert n == int((labels[:, 1:] != -100).sum()) + (method == "prompt") * int((labels[:, 0] != -100).sum())


@pytest.mark.parametrize("method", METHODS)
def test_num_items_in_batch_and_default_labels_follow_the_models_own(method):
    pm, batch = _peft_model(method), _batch()
    items = torch.tensor(23)
    assert_close(causal_lm_loss(pm, **batch, num_items_in_batch=items)[0], pm(**batch, num_items_in_batch=items).loss)
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    want = pm(**no_labels, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
    assert_close(causal_lm_loss(pm, **no_labels)[0], want)


def test_adalora_penalty_is_left_out_on_request_and_for_a_loaded_adapter(tmp_path):
    pm, batch = _peft_model("adalora"), _batch()
    with pm.disable_adapter():
        assert pm.loss_penalty() is None
    penalty = pm.loss_penalty()
    assert penalty.item() > 0.1  # random factors are far from orthogonal
    plain, _ = causal_lm_loss(pm, **batch, regularize=False)
    assert_close(plain + penalty, pm(**batch).loss)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)  # inference_mode: no penalty, as in its forward
    assert loaded.loss_penalty() is None
    assert_close(causal_lm_loss(loaded, **batch)[0], plain)


def test_shift_labels_under_prompt_tuning_is_refused_naming_the_fix():
    pm, batch = _peft_model("prompt"), _batch()
    shifted = torch.nn.functional.pad(batch.pop("labels"), (0, 1), value=-100)[:, 1:]
    with pytest.raises(ValueError, match="pass labels"):
        causal_lm_loss(pm, **batch, shift_labels=shifted)


# ---- against peft on the same adapter weights ---------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_fused_loss_equals_peft_loss_on_the_same_weights(method, tmp_path):
    ours, batch = _peft_model(method), _batch()
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # trainable, so that AdaLoRA adds its penalty (peft loads prompt adapters for inference only)
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path), is_trainable=method == "adalora").train()
    assert_close(causal_lm_loss(ours, **batch)[0], theirs(**batch).loss)


def test_peft_adalora_keeps_its_penalty(tmp_path, monkeypatch):
    """HF peft's AdaLoRA adds the penalty in its wrapper's forward, out of the fused path's reach: with the
    penalty its own loss is used; without, the fused loss equals ours on the same weights."""
    monkeypatch.setattr(loss_mod, "_warned_reasons", set())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**_kwargs("adalora"))).train()
    batch = _batch()
    with pytest.warns(UserWarning, match="orthogonality penalty"):
        got, _ = causal_lm_loss(theirs, **batch)
    assert_close(got, theirs(**batch).loss)
    theirs.save_pretrained(str(tmp_path))
    ours = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True).train()
    fused_calls = _count_fused_calls(monkeypatch)
    plain_theirs, _ = causal_lm_loss(theirs, **batch, regularize=False)
    assert_close(plain_theirs, causal_lm_loss(ours, **batch, regularize=False)[0])
    assert len(fused_calls) == 2


# ---- Trainers ---------------------------------------------------------------------------------------
class _Rows(torch.utils.data.Dataset):
    """Eight rows whose masked prompts have different lengths (so num_items_in_batch varies)."""

    def __init__(self):
        ids = input_ids(batch=8, seq=12, seed=3)
        self.rows = []
        for i in range(8):
            labels = ids[i].clone()
            labels[: 1 + i % 4] = -100
            self.rows.append(dict(input_ids=ids[i], attention_mask=torch.ones_like(ids[i]), labels=labels))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _train(trainer_cls, method, tmp_path):
    model = _peft_model(method)
    args = TrainingArguments(
        output_dir=str(tmp_path / trainer_cls.__name__), max_steps=3, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
    )
    callbacks = [AdaLoraCallback()] if method == "adalora" else []
    trainer = trainer_cls(model=model, args=args, train_dataset=_Rows(), callbacks=callbacks)
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log], model


@pytest.mark.parametrize("trainer_cls", [FusedLossTrainer, AdapterTrainer])
@pytest.mark.parametrize("method", METHODS)
def test_trainer_trains_like_the_standard_trainer(method, trainer_cls, tmp_path, monkeypatch):
    fused_calls = _count_fused_calls(monkeypatch)
    fused_losses, fused_model = _train(trainer_cls, method, tmp_path)
    assert len(fused_calls) == 6  # 3 steps x 2 micro-batches, none on the full-logits path
    std_losses, std_model = _train(Trainer, method, tmp_path)
    assert fused_losses == pytest.approx(std_losses, abs=1e-4)
    if method == "adalora":  # the allocator saw the same gradients and masked the same triplets
        pattern = fused_model.peft_config["default"].rank_pattern
        assert pattern and pattern == std_model.peft_config["default"].rank_pattern
    for p, q in zip(fused_model.parameters(), std_model.parameters()):
        # Adam divides by sqrt(second moment), so 1e-7 gradient differences grow over three steps
        # (as in test_loss_trainer.py)
        assert_close(p, q, scale=10.0)


@pytest.mark.parametrize("method", METHODS)
def test_deltatune_train_takes_the_models_own_loss(method, tiny_run_files, tmp_path, monkeypatch):
    """``deltatune train`` (examples/<method>.yaml on the tiny model): every training and eval loss the
    Trainer takes equals the model's own on that batch (without AdaLoRA's penalty for eval)."""
    real, seen = loss_mod.causal_lm_loss, []

    def checked(model, regularize=True, **inputs):
        loss, n = real(model, regularize=regularize, **inputs)
        with torch.no_grad():
            want = model(**inputs).loss
            penalty = model.loss_penalty()
            if not regularize and penalty is not None:
                want = want - penalty
        assert_close(loss.detach(), want)
        seen.append(regularize)
        return loss, n

    monkeypatch.setattr(trainer_mod, "causal_lm_loss", checked)
    monkeypatch.setattr(adapter_trainer_mod, "causal_lm_loss", checked)
    overrides = [
        f"model={tiny_run_files['model']}", f"data.source={tiny_run_files['data']}", "data.eval_size=4",
        "data.max_length=64", "train.max_steps=2", "train.batch_size=4", "train.eval_steps=2", "eval.accuracy=false",
        "train.save_steps=0", "train.progress_bar=false", "train.tensorboard=false", "train.plot=false",
        f"output_dir={tmp_path / 'run'}",
    ]
    if method == "adalora":
        overrides += ["method.tinit=0", "method.tfinal=0", "method.deltaT=1"]
    result = run_training(load_train_config(EXAMPLES / f"{method}.yaml", overrides), log=lambda line: None)
    assert result.status == "completed"
    assert True in seen and False in seen  # training and eval losses were both checked
