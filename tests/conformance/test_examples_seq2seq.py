"""peft's seq2seq examples, ported: only the import line changed, hub ids swapped for tiny local models.

Sources (huggingface/peft, ``examples/conditional_generation/``):
- ``peft_lora_seq2seq.ipynb`` (LoRA, mt0 = mT5), ``peft_ia3_seq2seq.ipynb`` (IA³, mt0),
  ``peft_prefix_tuning_seq2seq.ipynb`` (prefix tuning, T5) and ``peft_prompt_tuning_seq2seq.ipynb``
  (prompt tuning, T5): one notebook (twitter financial news sentiment) with four config cells, label
  lengths and learning rates. Cut: ``load_dataset`` (5+2 rows of its columns), epochs and batch size
  (one epoch of 3 steps of 2 rows), ``max_length`` 128 -> 32, tqdm, ``du -h``, ``importlib.reload(peft)``
  (IA³), ``num_proc=1`` in ``map`` (datasets 5 starts a worker process for it).
- ``peft_adalora_seq2seq.py`` (AdaLoRA, BART): whole script, with ``model.base_model.peft_config[...]``
  and ``model.base_model.update_and_allocate(global_step)``. Cut as above, and the rank schedule
  (``tinit``, ``tfinal``, ``deltaT``) scaled to the 3 steps, so that ranks are pruned once.
- ``peft_prompt_tuning_seq2seq_with_generate.ipynb``: prompt tuning in ``Seq2SeqTrainer`` with
  ``predict_with_generate``. Cut: the financial_phrasebank download (4+2 rows), epochs (``max_steps=2``,
  evaluation at step 2 instead of every epoch), ``max_length`` 128 -> 16, ``shuffle()`` seeded.
Each runs with ``lib="deltatune"`` and ``lib="peft"`` (the oracle) from the same adapter weights
(``SameStart``); with ``lora_dropout`` > 0 only what does not depend on the dropout masks is compared
(deltatune draws them differently), plus peft loading deltatune's adapter to the same logits.
Not ported: ``multitask_prompt_tuning.ipynb`` (no ``MultitaskPromptTuningConfig``; import line tested),
the DeepSpeed/FSDP scripts (multi-process).
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader
from transformers import (AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig, Seq2SeqTrainer,
                          Seq2SeqTrainingArguments, default_data_collator, get_linear_schedule_with_warmup)

import tiny_hub
from port_harness import SameStart, adapter_files, assert_same, imports, shapes
from tolerances import assert_close

CLASSES = ["Bearish", "Bullish", "Neutral"]
_NEWS = [("Stocks fall on weak earnings", 0), ("Shares jump after upbeat outlook", 1), ("Company holds meeting", 2),
         ("Bank cuts forecast", 0), ("Profit beats estimates", 1), ("Oil steady ahead of data", 2),
         ("Tech rally lifts index", 1)]
TWITTER_FINANCIAL_NEWS = Dataset.from_list([{"text": t, "label": y} for t, y in _NEWS])


def _financial_news():
    dataset = TWITTER_FINANCIAL_NEWS.train_test_split(test_size=2, seed=0)
    dataset["validation"] = dataset["test"]
    del dataset["test"]
    classes = CLASSES
    return dataset.map(lambda x: {"text_label": [classes[label] for label in x["label"]]}, batched=True)


def financial_news_notebook(lib: str, workdir: str, same_start: SameStart, method: str,
                            targets_written_out: bool = False) -> dict:
    (get_peft_model, get_peft_model_state_dict, LoraConfig, IA3Config, PrefixTuningConfig, PromptTuningConfig,
     PromptTuningInit, TaskType) = imports(lib, "get_peft_model, get_peft_model_state_dict, LoraConfig, IA3Config, "
                                                "PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType")
    device = "cpu"
    hub_id = "bigscience/mt0-large" if method in ("lora", "ia3") else "t5-large"
    model_name_or_path = tiny_hub.path(hub_id)
    text_column = "text"
    label_column = "text_label"
    max_length = 32
    lr = {"lora": 1e-3, "ia3": 8e-3, "prefix": 1e-2, "prompt": 1}[method]
    num_epochs = 1
    batch_size = 2

    if method == "lora":
        peft_config = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, inference_mode=False, r=8, lora_alpha=32,
                                 lora_dropout=0.1)
    elif method == "ia3":
        peft_config = IA3Config(task_type=TaskType.SEQ_2_SEQ_LM, inference_mode=False, feedforward_modules=[])
        if targets_written_out:  # test harness: peft's IA3 default for mT5, which deltatune lacks (issue 18)
            peft_config = IA3Config(task_type=TaskType.SEQ_2_SEQ_LM, inference_mode=False, feedforward_modules=[],
                                    target_modules=["k", "v", "wi_1"])
    elif method == "prefix":
        peft_config = PrefixTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, inference_mode=False, num_virtual_tokens=20)
    else:
        peft_config = PromptTuningConfig(
            task_type=TaskType.SEQ_2_SEQ_LM,
            prompt_tuning_init=PromptTuningInit.TEXT,
            num_virtual_tokens=20,
            prompt_tuning_init_text="What is the sentiment of this article?\n",
            inference_mode=False,
            tokenizer_name_or_path=model_name_or_path,
        )
    model = AutoModelForSeq2SeqLM.from_pretrained(model_name_or_path)
    model = get_peft_model(model, peft_config)
    same_start(lib, model)  # test harness, not in the notebook
    model.print_trainable_parameters()

    dataset = _financial_news()
    classes = CLASSES
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    target_max_length = max([len(tokenizer(class_label)["input_ids"]) for class_label in classes])
    label_length = {"lora": 3, "ia3": 3, "prefix": 2, "prompt": target_max_length}[method]

    def preprocess_function(examples):
        inputs = examples[text_column]
        targets = examples[label_column]
        model_inputs = tokenizer(inputs, max_length=max_length, padding="max_length", truncation=True,
                                 return_tensors="pt")
        labels = tokenizer(targets, max_length=label_length, padding="max_length", truncation=True,
                           return_tensors="pt")
        labels = labels["input_ids"]
        labels[labels == tokenizer.pad_token_id] = -100
        model_inputs["labels"] = labels
        return model_inputs

    processed_datasets = dataset.map(preprocess_function, batched=True,
                                     remove_columns=dataset["train"].column_names, load_from_cache_file=False)
    train_dataset = processed_datasets["train"]
    eval_dataset = processed_datasets["validation"]
    train_dataloader = DataLoader(train_dataset, shuffle=True, collate_fn=default_data_collator, batch_size=batch_size)
    eval_dataloader = DataLoader(eval_dataset, collate_fn=default_data_collator, batch_size=batch_size)

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    lr_scheduler = get_linear_schedule_with_warmup(
        optimizer=optimizer, num_warmup_steps=0, num_training_steps=(len(train_dataloader) * num_epochs)
    )
    model = model.to(device)
    losses, eval_losses = [], []
    for epoch in range(num_epochs):
        model.train()
        for step, batch in enumerate(train_dataloader):
            batch = {k: v.to(device) for k, v in batch.items()}
            outputs = model(**batch)
            loss = outputs.loss
            losses.append(loss.item())
            loss.backward()
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()

        model.eval()
        eval_preds = []
        for step, batch in enumerate(eval_dataloader):
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad():
                outputs = model(**batch)
            eval_losses.append(outputs.loss.item())
            eval_preds.extend(
                tokenizer.batch_decode(torch.argmax(outputs.logits, -1).detach().cpu().numpy(), skip_special_tokens=True)
            )

    def generate_for(model, i):
        inputs = tokenizer(dataset["validation"][text_column][i], return_tensors="pt")
        with torch.no_grad():
            return model.generate(input_ids=inputs["input_ids"], max_new_tokens=10)

    model.eval()
    generated = generate_for(model, 1)
    peft_model_id = os.path.join(workdir, f"{hub_id}_{peft_config.peft_type}_{peft_config.task_type}")
    model.save_pretrained(peft_model_id)

    PeftModel, PeftConfig = imports(lib, "PeftModel, PeftConfig")
    config = PeftConfig.from_pretrained(peft_model_id)
    model = AutoModelForSeq2SeqLM.from_pretrained(config.base_model_name_or_path)
    model = PeftModel.from_pretrained(model, peft_model_id)
    model.eval()
    return {"losses": losses, "eval_losses": eval_losses, "eval_preds": eval_preds, "generated": generated,
            "reloaded_generated": generate_for(model, 1), "saved": adapter_files(peft_model_id), "_dir": peft_model_id,
            "_model": model}


def _seq2seq_logits(model, ids=torch.tensor([[20, 30, 40, 1]]), dec=torch.tensor([[0, 25, 26]])):
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=dec).logits


def test_financial_news_ia3_notebook_as_written(tmp_path):
    financial_news_notebook("deltatune", str(tmp_path / "dt"), SameStart(), "ia3")
    financial_news_notebook("peft", str(tmp_path / "peft"), SameStart(), "ia3")  # the oracle runs it


def test_financial_news_ia3_notebook_with_default_targets_written_out_matches_peft(tmp_path):
    start = SameStart()
    ours = financial_news_notebook("deltatune", str(tmp_path / "dt"), start, "ia3", targets_written_out=True)
    theirs = financial_news_notebook("peft", str(tmp_path / "peft"), start, "ia3", targets_written_out=True)
    assert len(ours["losses"]) == 3 and torch.equal(ours["reloaded_generated"], ours["generated"])
    assert_same(ours, theirs)


def test_financial_news_lora_notebook_matches_peft(tmp_path):
    start = SameStart()
    ours = financial_news_notebook("deltatune", str(tmp_path / "dt"), start, "lora")
    theirs = financial_news_notebook("peft", str(tmp_path / "peft"), start, "lora")
    assert torch.equal(ours["reloaded_generated"], ours["generated"])
    # lora_dropout=0.1: the trainings drew different masks; what was saved must have the same names and
    # shapes (mT5: peft's default targets q, v), and peft must load deltatune's adapter to the same logits
    assert_same(shapes(ours["saved"]), shapes(theirs["saved"]))
    import peft

    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_hub.path("bigscience/mt0-large"))
    loaded = peft.PeftModel.from_pretrained(base, ours["_dir"]).eval()
    assert_close(_seq2seq_logits(loaded), _seq2seq_logits(ours["_model"]))


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_financial_news_prompt_learning_notebook_matches_peft(tmp_path, method):
    start = SameStart()
    ours = financial_news_notebook("deltatune", str(tmp_path / "dt"), start, method)
    theirs = financial_news_notebook("peft", str(tmp_path / "peft"), start, method)
    assert torch.equal(ours["reloaded_generated"], ours["generated"])
    assert_same(ours, theirs)


# --- peft_adalora_seq2seq.py -------------------------------------------------------------------------------

def adalora_script(lib: str, workdir: str, same_start: SameStart, targets_written_out: bool = False) -> dict:
    AdaLoraConfig, PeftConfig, PeftModel, TaskType, get_peft_model = imports(
        lib, "AdaLoraConfig, PeftConfig, PeftModel, TaskType, get_peft_model")
    device = "cpu"
    model_name_or_path = tiny_hub.path("facebook/bart-base")
    text_column = "text"
    label_column = "text_label"
    max_length = 32
    lr = 1e-3
    num_epochs = 1
    batch_size = 2
    dataset = _financial_news()

    peft_config = AdaLoraConfig(
        init_r=12,
        target_r=8,
        beta1=0.85,
        beta2=0.85,
        tinit=1,  # cut: 200, 1000 and 10, the schedule for 9,000 rows x 8 epochs; 3 steps here
        tfinal=1,
        deltaT=1,
        lora_alpha=32,
        lora_dropout=0.1,
        task_type=TaskType.SEQ_2_SEQ_LM,
        inference_mode=False,
        total_step=len(dataset["train"]) * num_epochs,
        # test harness: peft's AdaLoRA default for BART written out, which deltatune lacks (issue 18)
        **({"target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]} if targets_written_out else {}),
    )
    model = AutoModelForSeq2SeqLM.from_pretrained(model_name_or_path)
    model = get_peft_model(model, peft_config)
    same_start(lib, model)  # test harness, not in the script
    model.print_trainable_parameters()

    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)

    def preprocess_function(examples):
        inputs = examples[text_column]
        targets = examples[label_column]
        model_inputs = tokenizer(inputs, max_length=max_length, padding="max_length", truncation=True,
                                 return_tensors="pt")
        labels = tokenizer(targets, max_length=3, padding="max_length", truncation=True, return_tensors="pt")
        labels = labels["input_ids"]
        labels[labels == tokenizer.pad_token_id] = -100
        model_inputs["labels"] = labels
        return model_inputs

    processed_datasets = dataset.map(preprocess_function, batched=True,
                                     remove_columns=dataset["train"].column_names, load_from_cache_file=False)
    train_dataset = processed_datasets["train"]
    eval_dataset = processed_datasets["validation"]
    train_dataloader = DataLoader(train_dataset, shuffle=True, collate_fn=default_data_collator, batch_size=batch_size)
    eval_dataloader = DataLoader(eval_dataset, collate_fn=default_data_collator, batch_size=batch_size)

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    lr_scheduler = get_linear_schedule_with_warmup(
        optimizer=optimizer, num_warmup_steps=0, num_training_steps=(len(train_dataloader) * num_epochs)
    )
    model.base_model.peft_config["default"].total_step = len(train_dataloader) * num_epochs

    model = model.to(device)
    global_step = 0
    losses = []
    for epoch in range(num_epochs):
        model.train()
        for step, batch in enumerate(train_dataloader):
            batch = {k: v.to(device) for k, v in batch.items()}
            outputs = model(**batch)
            loss = outputs.loss
            losses.append(loss.item())
            loss.backward()
            optimizer.step()
            lr_scheduler.step()
            # Update the importance of low-rank matrices
            # and allocate the budget accordingly.
            model.base_model.update_and_allocate(global_step)
            optimizer.zero_grad()
            global_step += 1

    peft_model_id = os.path.join(workdir, f"bart-base_{peft_config.peft_type}_{peft_config.task_type}")
    model.save_pretrained(peft_model_id)
    trained = model.eval()

    config = PeftConfig.from_pretrained(peft_model_id)
    model = AutoModelForSeq2SeqLM.from_pretrained(config.base_model_name_or_path)
    model = PeftModel.from_pretrained(model, peft_model_id)
    model.eval()
    inputs = tokenizer(dataset["validation"][text_column][1], return_tensors="pt")
    with torch.no_grad():
        outputs = model.generate(input_ids=inputs["input_ids"], max_new_tokens=10)
    return {"losses": losses, "saved": adapter_files(peft_model_id), "generated": outputs,
            "total_step": config.total_step, "_dir": peft_model_id, "_model": trained}


@pytest.mark.xfail(strict=True, raises=dataclasses.FrozenInstanceError,
                   reason="by design (docs/api.md, 'Configs are frozen'): the script sets "
                          "`model.base_model.peft_config['default'].total_step` after get_peft_model; deltatune's "
                          "configs are frozen, so set total_step in AdaLoraConfig(...) or use config.replace() "
                          "(BART's AdaLoRA default targets, issue 18, now work)")
def test_adalora_script_as_written(tmp_path):
    adalora_script("deltatune", str(tmp_path / "dt"), SameStart())
    adalora_script("peft", str(tmp_path / "peft"), SameStart())  # the oracle runs it


@pytest.mark.xfail(strict=True, raises=dataclasses.FrozenInstanceError,
                   reason="by design (docs/api.md, 'Configs are frozen'): the script sets "
                          "`model.base_model.peft_config['default'].total_step` after get_peft_model; deltatune's "
                          "configs are frozen, so set total_step in AdaLoraConfig(...) or use config.replace()")
def test_adalora_script_with_default_targets_written_out_matches_peft(tmp_path):
    start = SameStart()
    ours = adalora_script("deltatune", str(tmp_path / "dt"), start, targets_written_out=True)
    theirs = adalora_script("peft", str(tmp_path / "peft"), start, targets_written_out=True)
    assert ours["total_step"] == 3  # the script's update of total_step is saved
    # lora_dropout=0.1: compare names and shapes, and peft loading deltatune's adapter
    assert_same(shapes(ours["saved"]), shapes(theirs["saved"]))
    import peft

    loaded = peft.PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_hub.path("facebook/bart-base")),
                                            ours["_dir"]).eval()
    assert_close(_seq2seq_logits(loaded), _seq2seq_logits(ours["_model"]))


# --- peft_prompt_tuning_seq2seq_with_generate.ipynb -----------------------------------------------------------

def prompt_tuning_with_generate(lib: str, workdir: str, same_start: SameStart) -> dict:
    get_peft_model, PromptTuningInit, PromptTuningConfig, TaskType = imports(
        lib, "get_peft_model, PromptTuningInit, PromptTuningConfig, TaskType")
    model_name_or_path = tiny_hub.path("t5-large")
    text_column = "sentence"
    label_column = "text_label"
    max_length = 16
    lr = 1e0
    batch_size = 2
    peft_config = PromptTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM,
        prompt_tuning_init=PromptTuningInit.TEXT,
        num_virtual_tokens=20,
        prompt_tuning_init_text="What is the sentiment of this article?\n",
        inference_mode=False,
        tokenizer_name_or_path=model_name_or_path,
    )
    model = AutoModelForSeq2SeqLM.from_pretrained(model_name_or_path)
    model = get_peft_model(model, peft_config)
    same_start(lib, model)  # test harness, not in the notebook

    classes = ["negative", "neutral", "positive"]  # financial_phrasebank's label names
    dataset = DatasetDict({"train": Dataset.from_list([{"sentence": t, "label": y} for t, y in _NEWS[:4]]),
                           "validation": Dataset.from_list([{"sentence": t, "label": y} for t, y in _NEWS[4:6]])})
    dataset = dataset.map(lambda x: {"text_label": [classes[label] for label in x["label"]]}, batched=True)
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)

    def preprocess_function(examples):
        inputs = examples[text_column]
        targets = examples[label_column]
        model_inputs = tokenizer(inputs, max_length=max_length, padding="max_length", truncation=True,
                                 return_tensors="pt")
        labels = tokenizer(targets, max_length=2, padding="max_length", truncation=True, return_tensors="pt")
        labels = labels["input_ids"]
        labels[labels == tokenizer.pad_token_id] = -100
        model_inputs["labels"] = labels
        return model_inputs

    processed_datasets = dataset.map(preprocess_function, batched=True,
                                     remove_columns=dataset["train"].column_names, load_from_cache_file=False)
    train_dataset = processed_datasets["train"].shuffle(seed=0)
    eval_dataset = processed_datasets["validation"]

    def compute_metrics(eval_preds):
        preds, labels = eval_preds
        preds = tokenizer.batch_decode(preds, skip_special_tokens=True)
        labels = tokenizer.batch_decode(labels, skip_special_tokens=True)
        correct = sum(p.strip() == t.strip() for p, t in zip(preds, labels))
        return {"accuracy": correct / len(preds)}

    training_args = Seq2SeqTrainingArguments(
        os.path.join(workdir, "out"),
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        max_steps=2,  # cut: num_train_epochs=5
        eval_strategy="steps",  # cut: "epoch"; with max_steps, one evaluation at the end
        eval_steps=2,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        predict_with_generate=True,
        generation_config=GenerationConfig(max_length=max_length),
    )
    trainer = Seq2SeqTrainer(model=model, processing_class=tokenizer, args=training_args, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, data_collator=default_data_collator,
                             compute_metrics=compute_metrics)
    trainer.train()
    peft_model_id = os.path.join(workdir, f"t5-large_{peft_config.peft_type}_{peft_config.task_type}")
    model.save_pretrained(peft_model_id)
    keep = ("loss", "eval_loss", "eval_accuracy")
    history = [{k: v for k, v in h.items() if k in keep} for h in trainer.state.log_history]
    return {"history": history, "saved": adapter_files(peft_model_id)}


def test_prompt_tuning_with_generate_notebook_matches_peft(tmp_path):
    start = SameStart()
    ours = prompt_tuning_with_generate("deltatune", str(tmp_path / "dt"), start)
    theirs = prompt_tuning_with_generate("peft", str(tmp_path / "peft"), start)
    assert any("eval_accuracy" in h for h in ours["history"])
    assert_same(ours, theirs)


IMPORT_LINES = {
    "peft_lora_seq2seq.ipynb": ("get_peft_config, get_peft_model, get_peft_model_state_dict, LoraConfig, TaskType",
                                None),
    "peft_ia3_seq2seq.ipynb": ("get_peft_config, get_peft_model, get_peft_model_state_dict, IA3Config, TaskType",
                               None),
    "peft_prefix_tuning_seq2seq.ipynb": (
        "get_peft_config, get_peft_model, get_peft_model_state_dict, PrefixTuningConfig, TaskType", None),
    "peft_prompt_tuning_seq2seq.ipynb": ("get_peft_model, PromptTuningConfig, TaskType, PromptTuningInit", None),
    "peft_adalora_seq2seq.py": ("AdaLoraConfig, PeftConfig, PeftModel, TaskType, get_peft_model", None),
    "multitask_prompt_tuning.ipynb": ("get_peft_model, MultitaskPromptTuningConfig, TaskType, "
                                      "MultitaskPromptTuningInit",
                                      "BUG: MultitaskPromptTuningConfig is not implemented"),
}


@pytest.mark.parametrize("source", [
    pytest.param(k, marks=pytest.mark.xfail(strict=True, raises=ImportError, reason=v[1])) if v[1] else k
    for k, v in IMPORT_LINES.items()
])
def test_import_line_as_written(source):
    names = IMPORT_LINES[source][0]
    exec(f"from peft import {names}", {})  # the oracle: the line works with peft
    exec(f"from deltatune import {names}", {})
