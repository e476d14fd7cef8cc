"""transformers' ``Trainer`` and ``Seq2SeqTrainer`` with default arguments on a deltatune model, against peft.

Source: the pattern of transformers' own fine-tuning docs (``docs/source/en/training.md``, "Fine-tune
with Trainer") and peft's quicktour: build the model, wrap it, ``Trainer(model, args, train_dataset,
eval_dataset, processing_class=tokenizer)``, ``train()``, ``evaluate()``, ``save_model()``, and
``train(resume_from_checkpoint=...)``. ``TrainingArguments`` get only what a user must set for a short
run here: ``output_dir``, ``max_steps`` (and ``save_steps`` for the resume case); everything else is
transformers' default (batch 8, learning rate 5e-5, AdamW, no logging until step 500, a checkpoint
at the last step). Hub ids are tiny local models (``tiny_hub``).

Every case runs with deltatune and with peft from the same adapter weights (``SameStart``) and must
agree: training loss, evaluation loss, predictions, the files of every checkpoint and of
``save_model``, and the saved tensors. ``tests/test_integration_trainer.py`` checks single behaviours
on deltatune alone; this file checks that the whole default path matches peft's.
"""
from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset
from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                          AutoTokenizer, Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments)

import tiny_hub
from port_harness import SameStart, adapter_files, assert_same, imports

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "stocks rose on good news", "it rained all day",
         "she sings in a band", "we ate pasta for lunch", "the train was late", "birds fly south"]
PAIRS = [("the cat sat", "a cat was sitting", 1), ("he left early", "stocks fell today", 0),
         ("it rains", "rain is falling", 1), ("buy now", "the sky is blue", 0)] * 2
CAUSAL = {"llama": "meta-llama/Llama-2-7b-hf", "gpt2": "gpt2", "opt": "facebook/opt-125m"}


def _lm_rows(tokenizer, n: int = 8) -> Dataset:
    enc = tokenizer(TEXTS[:n], padding="max_length", max_length=28, truncation=True)
    return Dataset.from_dict({**enc, "labels": [list(ids) for ids in enc["input_ids"]]})


def _assert_trained(saved: dict):
    """LoRA's B starts at zero: after the steps every B moved (else the comparison with peft is vacuous)."""
    b = [v for k, v in saved.items() if "lora_B" in k]
    assert b and all(v.abs().max() > 0 for v in b)


def _files(folder: str) -> list[str]:
    return sorted(os.listdir(folder))


def causal_trainer(lib: str, arch: str, workdir: str, same_start: SameStart) -> dict:
    LoraConfig, get_peft_model = imports(lib, "LoraConfig, get_peft_model")
    path = tiny_hub.path(CAUSAL[arch])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=8, task_type="CAUSAL_LM"))
    same_start(lib, model)
    data = _lm_rows(tokenizer)
    args = TrainingArguments(output_dir=os.path.join(workdir, "out"), max_steps=3)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, processing_class=tokenizer)
    train_loss = trainer.train().training_loss
    metrics = trainer.evaluate()
    trainer.save_model(os.path.join(workdir, "final"))
    predictions = torch.as_tensor(trainer.predict(data).predictions[:2])
    return {"train_loss": train_loss, "eval_loss": metrics["eval_loss"], "predictions": predictions,
            "final": adapter_files(os.path.join(workdir, "final")),
            "checkpoints": {c: _files(os.path.join(args.output_dir, c)) for c in sorted(os.listdir(args.output_dir))}}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_default_trainer_on_a_causal_lm_matches_peft(tmp_path, arch):
    start = SameStart()
    ours = causal_trainer("deltatune", arch, str(tmp_path / "dt"), start)
    theirs = causal_trainer("peft", arch, str(tmp_path / "peft"), start)
    # GPT-2 and OPT tie the input embeddings to lm_head: the end-of-training save is an adapter
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(ours["final"]["files"])
    assert "model.safetensors" not in ours["final"]["files"]
    assert list(ours["checkpoints"]) == ["checkpoint-3"]  # the default strategy saves at the last step
    assert "model.safetensors" not in ours["checkpoints"]["checkpoint-3"]
    _assert_trained(ours["final"])
    assert_same(ours, theirs)


def bert_pairs_trainer(lib: str, workdir: str, same_start: SameStart) -> dict:
    LoraConfig, get_peft_model = imports(lib, "LoraConfig, get_peft_model")
    path = tiny_hub.path("bert-base-uncased")
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)  # the new classifier head is drawn at random
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2),
                           LoraConfig(r=8, task_type="SEQ_CLS"))
    same_start(lib, model)
    seen = []  # the token_type_ids BERT's embeddings receive, in every forward of the run
    model.get_base_model().bert.embeddings.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("token_type_ids")), with_kwargs=True)
    data = Dataset.from_list([{"sentence1": a, "sentence2": b, "label": y} for a, b, y in PAIRS])
    data = data.map(lambda x: tokenizer(x["sentence1"], x["sentence2"], truncation=True), batched=True)
    args = TrainingArguments(output_dir=os.path.join(workdir, "out"), max_steps=3)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, processing_class=tokenizer)
    train_loss = trainer.train().training_loss
    metrics = trainer.evaluate()
    predictions = torch.as_tensor(trainer.predict(data).predictions)
    trainer.save_model(os.path.join(workdir, "final"))
    return {"train_loss": train_loss, "eval_loss": metrics["eval_loss"], "predictions": predictions,
            "final": adapter_files(os.path.join(workdir, "final")), "_seen": seen}


def test_default_trainer_on_bert_sentence_pairs_keeps_token_type_ids_and_matches_peft(tmp_path):
    start = SameStart()
    ours = bert_pairs_trainer("deltatune", str(tmp_path / "dt"), start)
    theirs = bert_pairs_trainer("peft", str(tmp_path / "peft"), start)
    # 3 training steps, 1 evaluation batch, 1 prediction batch: every forward saw the second segment
    assert len(ours["_seen"]) == 5
    assert all(t is not None and (t == 1).any() for t in ours["_seen"]), "token_type_ids did not reach BERT"
    _assert_trained(ours["final"])
    assert_same(ours, theirs)


def t5_seq2seq_trainer(lib: str, workdir: str, same_start: SameStart) -> dict:
    LoraConfig, get_peft_model = imports(lib, "LoraConfig, get_peft_model")
    path = tiny_hub.path("google-t5/t5-small")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(path), LoraConfig(r=8, task_type="SEQ_2_SEQ_LM"))
    same_start(lib, model)
    inputs = tokenizer([f"summarize: {t}" for t in TEXTS], padding="max_length", max_length=24, truncation=True)
    labels = tokenizer([t.split()[-1] for t in TEXTS], padding="max_length", max_length=6)["input_ids"]
    labels = [[t if t != tokenizer.pad_token_id else -100 for t in row] for row in labels]
    data = Dataset.from_dict({**inputs, "labels": labels})
    args = Seq2SeqTrainingArguments(output_dir=os.path.join(workdir, "out"), max_steps=3)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=data, eval_dataset=data, processing_class=tokenizer)
    train_loss = trainer.train().training_loss
    metrics = trainer.evaluate()
    trainer.save_model(os.path.join(workdir, "final"))
    return {"train_loss": train_loss, "eval_loss": metrics["eval_loss"],
            "final": adapter_files(os.path.join(workdir, "final")),
            "checkpoints": {c: _files(os.path.join(args.output_dir, c)) for c in sorted(os.listdir(args.output_dir))}}


def test_default_seq2seq_trainer_on_t5_matches_peft(tmp_path):
    start = SameStart()
    ours = t5_seq2seq_trainer("deltatune", str(tmp_path / "dt"), start)
    theirs = t5_seq2seq_trainer("peft", str(tmp_path / "peft"), start)
    assert {k.split(".")[-3] for k in ours["final"] if k.endswith("lora_A.weight")} == {"q", "v"}  # peft's T5 default
    _assert_trained(ours["final"])
    assert_same(ours, theirs)


# --- resume_from_checkpoint ---------------------------------------------------------------------------------

def resumable_run(lib: str, workdir: str, same_start: SameStart | None, resume: str | None = None) -> dict:
    LoraConfig, get_peft_model = imports(lib, "LoraConfig, get_peft_model")
    path = tiny_hub.path("meta-llama/Llama-2-7b-hf")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=8, task_type="CAUSAL_LM"))
    if same_start is not None:
        same_start(lib, model)
    data = _lm_rows(tokenizer, n=4)
    args = TrainingArguments(output_dir=os.path.join(workdir, "out"), max_steps=4, save_steps=2,
                             per_device_train_batch_size=2)
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=resume)
    ids = torch.tensor(data["input_ids"][:2])
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
    return {"global_step": trainer.state.global_step, "logits": logits, "_out": args.output_dir}


@pytest.mark.parametrize("checkpoint_by", ["deltatune", "peft"])
def test_resume_from_checkpoint_ends_where_an_uninterrupted_run_ends(tmp_path, checkpoint_by):
    """A run resumed from checkpoint-2 ends at the logits of an uninterrupted run, and at peft's.

    ``checkpoint_by="peft"``: the checkpoint was written by a peft run; a user who switched the import
    line resumes it with deltatune."""
    start = SameStart()
    straight = resumable_run("deltatune", str(tmp_path / "dt"), start)
    oracle = resumable_run("peft", str(tmp_path / "peft"), start)
    assert_same(straight, oracle)
    checkpoint = os.path.join((straight if checkpoint_by == "deltatune" else oracle)["_out"], "checkpoint-2")
    resumed = resumable_run("deltatune", str(tmp_path / "resumed"), None, resume=checkpoint)
    assert resumed["global_step"] == 4
    assert_same(resumed, straight)
