"""Two ``TrainingArguments`` options peft users turn on, and gradient checkpointing through the wrapper.

Sources: transformers' ``TrainingArguments`` docs for ``label_smoothing_factor`` and
``gradient_checkpointing``, and its performance guide ("Gradient checkpointing":
``model.gradient_checkpointing_enable()``), applied to a model wrapped by ``get_peft_model``, as
peft's examples do (``examples/sft/train.py``, ``peft_lora_clm_with_additional_tokens.ipynb``).
Hub ids are tiny local models (``tiny_hub``); arguments other than the option under test are
transformers' defaults (plus ``output_dir`` and ``max_steps``).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import tiny_hub
from port_harness import SameStart, adapter_files, assert_same, imports
from tolerances import assert_close

LLAMA = "meta-llama/Llama-2-7b-hf"
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "stocks rose on good news", "it rained all day"]


def _rows(tokenizer) -> Dataset:
    enc = tokenizer(TEXTS, padding="max_length", max_length=26)
    labels = [[t if m else -100 for t, m in zip(ids, mask)]
              for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
    return Dataset.from_dict({**enc, "labels": labels})


# --- label_smoothing_factor ----------------------------------------------------------------------------------

def smoothed_run(lib: str, workdir: str, same_start: SameStart, task_type: str | None) -> dict:
    LoraConfig, get_peft_model = imports(lib, "LoraConfig, get_peft_model")
    path = tiny_hub.path(LLAMA)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path)
    model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type=task_type))
    same_start(lib, model)
    data = _rows(tokenizer)
    args = TrainingArguments(output_dir=os.path.join(workdir, "out"), max_steps=2, label_smoothing_factor=0.1)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    before = trainer.evaluate()["eval_loss"]  # LoRA's B is zero: the model is still the base model
    train_loss = trainer.train().training_loss
    return {"eval_loss_before": before, "train_loss": train_loss, "eval_loss_after": trainer.evaluate()["eval_loss"],
            "_data": data, "_base_logits": _base_logits(path, data)}


def _base_logits(path, data):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path)(input_ids=torch.tensor(data["input_ids"]),
                                                          attention_mask=torch.tensor(data["attention_mask"])).logits


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None])
def test_label_smoothing_is_the_smoothed_next_token_loss_as_with_peft(tmp_path, task_type):
    start = SameStart()
    ours = smoothed_run("deltatune", str(tmp_path / "dt"), start, task_type)
    theirs = smoothed_run("peft", str(tmp_path / "peft"), start, task_type)
    # by hand, on the base model (one evaluation batch of 4 rows): predict token t+1 from position t
    logits, labels = ours["_base_logits"], torch.tensor(ours["_data"]["labels"])
    vocab = logits.shape[-1]
    next_token = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), label_smoothing=0.1)
    same_token = F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), label_smoothing=0.1)
    assert abs(next_token - same_token) > 1e-2, "the two readings must differ for this check to mean anything"
    assert_close(torch.tensor(ours["eval_loss_before"]), next_token)
    assert_same(ours, theirs)


# --- gradient checkpointing ----------------------------------------------------------------------------------

def _count_layer_forwards(model) -> list[int]:
    """Counts attention forwards: a checkpointed layer recomputes them in backward (transformers calls
    the layer's ``forward`` again, which skips hooks on the layer itself, not on its children)."""
    calls = [0]
    for layer in model.get_base_model().model.layers:
        layer.self_attn.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": True}], ids=["default", "reentrant"])
@pytest.mark.parametrize("lib", ["deltatune", "peft"])
def test_gradient_checkpointing_enable_on_the_wrapper_gives_the_same_gradients(lib, kwargs):
    LoraConfig, get_peft_model = imports(lib, "LoraConfig, get_peft_model")
    path = tiny_hub.path(LLAMA)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                           LoraConfig(r=8, init_lora_weights=False, task_type="CAUSAL_LM"))  # B != 0: A gets gradients
    batch = _rows(AutoTokenizer.from_pretrained(path))[:2]
    batch = {k: torch.tensor(v) for k, v in batch.items()}
    calls = _count_layer_forwards(model)

    def grads():
        model.zero_grad()
        calls[0] = 0
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, calls[0]

    model.train()
    plain, forwards = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert model.get_base_model().is_gradient_checkpointing
    checkpointed, recomputed = grads()
    assert forwards == 2 and recomputed == 4, "each layer runs again in backward when checkpointed"
    assert plain.keys() == checkpointed.keys() and len(plain) == 8
    for name, g in plain.items():
        assert g.abs().max() > 0, name
        assert_close(checkpointed[name], g)


def checkpointed_trainer(lib: str, workdir: str, same_start: SameStart, checkpointing: bool) -> dict:
    LoraConfig, get_peft_model = imports(lib, "LoraConfig, get_peft_model")
    path = tiny_hub.path(LLAMA)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=8, task_type="CAUSAL_LM"))
    same_start(lib, model)
    calls = _count_layer_forwards(model)
    args = TrainingArguments(output_dir=os.path.join(workdir, "out"), max_steps=2, gradient_checkpointing=checkpointing)
    trainer = Trainer(model=model, args=args, train_dataset=_rows(tokenizer))
    train_loss = trainer.train().training_loss
    trainer.save_model(os.path.join(workdir, "final"))
    return {"train_loss": train_loss, "final": adapter_files(os.path.join(workdir, "final")), "_forwards": calls[0]}


def test_training_arguments_gradient_checkpointing_trains_as_without_and_as_peft(tmp_path):
    start = SameStart()
    ours = checkpointed_trainer("deltatune", str(tmp_path / "dt"), start, checkpointing=True)
    theirs = checkpointed_trainer("peft", str(tmp_path / "peft"), start, checkpointing=True)
    without = checkpointed_trainer("deltatune", str(tmp_path / "plain"), start, checkpointing=False)  # same start
    assert ours["_forwards"] == 2 * without["_forwards"] == 8  # 2 steps x 2 layers, recomputed in backward
    assert_same(ours, theirs)
    assert_same(ours, without)
