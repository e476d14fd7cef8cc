"""peft's causal-LM examples, ported: only the import line changed, hub ids swapped for tiny local models.

Sources (huggingface/peft, ``examples/causal_language_modeling/``):
- ``peft_lora_clm_accelerate_ds_zero3_offload.py``: ``main()``. Cut: the DeepSpeed config (plain
  ``Accelerator()`` on CPU), ``TorchTracemalloc`` memory prints, ``do_test``, the hub download of
  ought/raft (4 rows of the same columns), epochs and batch size (one epoch of 2 steps of 2 rows),
  ``max_new_tokens`` 10 -> 4.
- ``peft_prompt_tuning_clm.ipynb``: whole notebook. Cut: the dataset as above, epochs and batch size
  (one epoch of 2 steps), tqdm, ``du -h``.
- ``peft_prefix_tuning_clm.ipynb``: the same notebook with ``PrefixTuningConfig``.
- ``peft_lora_clm_with_additional_tokens.ipynb``: added special tokens, LoRA on ``embed_tokens`` and
  ``lm_head`` of a resized model, ``Trainer``, sampled ``generate``, reload. Cut: ``bf16``,
  ``push_to_hub``/``hub_*`` (``save_pretrained`` to the folder it would push), wandb, the dataset
  (5 rows), epochs (``max_steps=2``), ``max_length`` 512 -> 48, ``max_new_tokens`` 256 -> 8, learning
  rate 1e-5 -> 1e-2 (see the comment there); ``torch.manual_seed(0)`` before each sampled ``generate``.
- Everywhere: ``num_proc=1`` in ``map`` (datasets 5 starts a worker process for it).
- The notebooks' own import lines, as written, are a separate test (they name things never used).
- Not ported: ``peft_ln_tuning_clm.ipynb`` (deltatune has no LN tuning; its import line is tested).

Each example runs twice, with ``lib="deltatune"`` and with ``lib="peft"`` (the oracle), from the same
adapter weights (``SameStart``), and the two runs must agree.
"""
from __future__ import annotations

import os
from enum import Enum

import pytest
import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader
from transformers import (AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator,
                          get_linear_schedule_with_warmup)

import tiny_hub
from port_harness import SameStart, adapter_files, assert_same, imports, shapes
from tolerances import assert_close

RAFT_TWITTER = DatasetDict({  # ought/raft "twitter_complaints": the columns the examples read
    "train": Dataset.from_list([
        {"Tweet text": "my phone broke again", "ID": 0, "Label": 0},
        {"Tweet text": "thanks for the help!", "ID": 1, "Label": 1},
        {"Tweet text": "still no refund @shop", "ID": 2, "Label": 0},
        {"Tweet text": "love the new app", "ID": 3, "Label": 1},
    ]),
    "test": Dataset.from_list([{"Tweet text": "where is my order", "ID": 4, "Label": 0}]),
})
CLASSES = ["complaint", "no complaint"]


def _raft():
    return RAFT_TWITTER.map(lambda x: {"text_label": [CLASSES[label] for label in x["Label"]]}, batched=True)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- peft_lora_clm_accelerate_ds_zero3_offload.py ---------------------------------------------------------

def lora_clm_accelerate(lib: str, workdir: str, same_start: SameStart) -> dict:
    from accelerate import Accelerator
    from transformers import set_seed

    LoraConfig, TaskType, get_peft_model = imports(lib, "LoraConfig, TaskType, get_peft_model")
    accelerator = Accelerator()
    model_name_or_path = tiny_hub.path("bigscience/bloomz-7b1")
    dataset_name = "twitter_complaints"
    peft_config = LoraConfig(task_type=TaskType.CAUSAL_LM, inference_mode=False, r=8, lora_alpha=32, lora_dropout=0.1)
    text_column = "Tweet text"
    label_column = "text_label"
    lr = 3e-3
    num_epochs = 1
    batch_size = 2
    seed = 42
    max_length = 64
    set_seed(seed)

    dataset = _raft()
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)

    def preprocess_function(examples):
        batch_size = len(examples[text_column])
        inputs = [f"{text_column} : {x} Label : " for x in examples[text_column]]
        targets = [str(x) for x in examples[label_column]]
        model_inputs = tokenizer(inputs)
        labels = tokenizer(targets, add_special_tokens=False)  # don't add bos token because we concatenate with inputs
        for i in range(batch_size):
            sample_input_ids = model_inputs["input_ids"][i]
            label_input_ids = labels["input_ids"][i] + [tokenizer.eos_token_id]
            model_inputs["input_ids"][i] = sample_input_ids + label_input_ids
            labels["input_ids"][i] = [-100] * len(sample_input_ids) + label_input_ids
            model_inputs["attention_mask"][i] = [1] * len(model_inputs["input_ids"][i])
        for i in range(batch_size):
            sample_input_ids = model_inputs["input_ids"][i]
            label_input_ids = labels["input_ids"][i]
            model_inputs["input_ids"][i] = [tokenizer.pad_token_id] * (
                max_length - len(sample_input_ids)
            ) + sample_input_ids
            model_inputs["attention_mask"][i] = [0] * (max_length - len(sample_input_ids)) + model_inputs[
                "attention_mask"
            ][i]
            labels["input_ids"][i] = [-100] * (max_length - len(sample_input_ids)) + label_input_ids
            model_inputs["input_ids"][i] = torch.tensor(model_inputs["input_ids"][i][:max_length])
            model_inputs["attention_mask"][i] = torch.tensor(model_inputs["attention_mask"][i][:max_length])
            labels["input_ids"][i] = torch.tensor(labels["input_ids"][i][:max_length])
        model_inputs["labels"] = labels["input_ids"]
        return model_inputs

    def test_preprocess_function(examples):
        batch_size = len(examples[text_column])
        inputs = [f"{text_column} : {x} Label : " for x in examples[text_column]]
        model_inputs = tokenizer(inputs)
        for i in range(batch_size):
            sample_input_ids = model_inputs["input_ids"][i]
            model_inputs["input_ids"][i] = [tokenizer.pad_token_id] * (
                max_length - len(sample_input_ids)
            ) + sample_input_ids
            model_inputs["attention_mask"][i] = [0] * (max_length - len(sample_input_ids)) + model_inputs[
                "attention_mask"
            ][i]
            model_inputs["input_ids"][i] = torch.tensor(model_inputs["input_ids"][i][:max_length])
            model_inputs["attention_mask"][i] = torch.tensor(model_inputs["attention_mask"][i][:max_length])
        return model_inputs

    with accelerator.main_process_first():
        processed_datasets = dataset.map(preprocess_function, batched=True,
                                         remove_columns=dataset["train"].column_names, load_from_cache_file=False)
    train_dataset = processed_datasets["train"]
    with accelerator.main_process_first():
        processed_datasets = dataset.map(test_preprocess_function, batched=True,
                                         remove_columns=dataset["train"].column_names, load_from_cache_file=False)
    eval_dataset = processed_datasets["train"]

    train_dataloader = DataLoader(train_dataset, shuffle=True, collate_fn=default_data_collator, batch_size=batch_size)
    eval_dataloader = DataLoader(eval_dataset, collate_fn=default_data_collator, batch_size=batch_size)

    # creating model
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path)
    model = get_peft_model(model, peft_config)
    same_start(lib, model)  # test harness, not in the example
    model.print_trainable_parameters()

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    lr_scheduler = get_linear_schedule_with_warmup(
        optimizer=optimizer, num_warmup_steps=0, num_training_steps=(len(train_dataloader) * num_epochs)
    )
    model, train_dataloader, eval_dataloader, optimizer, lr_scheduler = accelerator.prepare(
        model, train_dataloader, eval_dataloader, optimizer, lr_scheduler
    )
    losses = []
    for epoch in range(num_epochs):
        model.train()
        for step, batch in enumerate(train_dataloader):
            outputs = model(**batch)
            loss = outputs.loss
            losses.append(loss.item())
            accelerator.backward(loss)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()

        model.eval()
        eval_preds = []
        for _, batch in enumerate(eval_dataloader):
            batch = {k: v for k, v in batch.items() if k != "labels"}
            with torch.no_grad():
                outputs = accelerator.unwrap_model(model).generate(**batch, synced_gpus=False, max_new_tokens=4)
            outputs = accelerator.pad_across_processes(outputs, dim=1, pad_index=tokenizer.pad_token_id)
            preds = accelerator.gather_for_metrics(outputs)
            preds = preds[:, max_length:].detach().cpu().numpy()
            eval_preds.extend(tokenizer.batch_decode(preds, skip_special_tokens=True))

    peft_model_id = f"{dataset_name}_{model_name_or_path}_{peft_config.peft_type}_{peft_config.task_type}".replace(
        "/", "_"
    )
    peft_model_id = os.path.join(workdir, peft_model_id)
    model.save_pretrained(peft_model_id)
    return {"losses": losses, "eval_preds": eval_preds, "saved": adapter_files(peft_model_id),
            "peft_model_id": os.path.basename(peft_model_id), "_model": accelerator.unwrap_model(model),
            "_dir": peft_model_id}


def test_lora_clm_accelerate_script_matches_peft(tmp_path):
    start = SameStart()
    ours = lora_clm_accelerate("deltatune", str(tmp_path / "dt"), start)
    theirs = lora_clm_accelerate("peft", str(tmp_path / "peft"), start)
    assert len(ours["losses"]) == 2
    # lora_dropout=0.1: deltatune draws its dropout masks differently from peft (one mask for the
    # adapters that read the same input), so the runs agree exactly only up to the first update.
    assert_same(ours["losses"][0], theirs["losses"][0])
    assert_same(shapes(ours["saved"]), shapes(theirs["saved"]))
    assert ours["peft_model_id"] == theirs["peft_model_id"]
    # peft loads what deltatune trained and saved, to the same logits
    import peft

    ids = torch.tensor([[5, 17, 33, 2, 40, 41]])
    base = AutoModelForCausalLM.from_pretrained(tiny_hub.path("bigscience/bloomz-7b1"))
    loaded = peft.PeftModel.from_pretrained(base, ours["_dir"]).eval()
    assert_close(_logits(loaded, ids), _logits(ours["_model"].eval(), ids))


# --- peft_prompt_tuning_clm.ipynb and peft_prefix_tuning_clm.ipynb (the same notebook, two configs) --------

def twitter_complaints_notebook(lib: str, workdir: str, same_start: SameStart, method: str) -> dict:
    get_peft_model, PromptTuningInit, PromptTuningConfig, PrefixTuningConfig, TaskType, PeftType = imports(
        lib, "get_peft_model, PromptTuningInit, PromptTuningConfig, PrefixTuningConfig, TaskType, PeftType")
    device = "cpu"
    model_name_or_path = tiny_hub.path("bigscience/bloomz-560m")
    tokenizer_name_or_path = tiny_hub.path("bigscience/bloomz-560m")
    if method == "prompt":
        peft_config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            prompt_tuning_init=PromptTuningInit.TEXT,
            num_virtual_tokens=8,
            prompt_tuning_init_text="Classify if the tweet is a complaint or not:",
            tokenizer_name_or_path=model_name_or_path,
        )
    else:
        peft_config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=30)

    dataset_name = "twitter_complaints"
    text_column = "Tweet text"
    label_column = "text_label"
    max_length = 64
    lr = 3e-2
    num_epochs = 1
    batch_size = 2

    dataset = _raft()
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id

    def preprocess_function(examples):
        batch_size = len(examples[text_column])
        inputs = [f"{text_column} : {x} Label : " for x in examples[text_column]]
        targets = [str(x) for x in examples[label_column]]
        model_inputs = tokenizer(inputs)
        labels = tokenizer(targets, add_special_tokens=False)  # don't add bos token because we concatenate with inputs
        for i in range(batch_size):
            sample_input_ids = model_inputs["input_ids"][i]
            label_input_ids = labels["input_ids"][i] + [tokenizer.eos_token_id]
            model_inputs["input_ids"][i] = sample_input_ids + label_input_ids
            labels["input_ids"][i] = [-100] * len(sample_input_ids) + label_input_ids
            model_inputs["attention_mask"][i] = [1] * len(model_inputs["input_ids"][i])
        for i in range(batch_size):
            sample_input_ids = model_inputs["input_ids"][i]
            label_input_ids = labels["input_ids"][i]
            model_inputs["input_ids"][i] = [tokenizer.pad_token_id] * (
                max_length - len(sample_input_ids)
            ) + sample_input_ids
            model_inputs["attention_mask"][i] = [0] * (max_length - len(sample_input_ids)) + model_inputs[
                "attention_mask"
            ][i]
            labels["input_ids"][i] = [-100] * (max_length - len(sample_input_ids)) + label_input_ids
            model_inputs["input_ids"][i] = torch.tensor(model_inputs["input_ids"][i][:max_length])
            model_inputs["attention_mask"][i] = torch.tensor(model_inputs["attention_mask"][i][:max_length])
            labels["input_ids"][i] = torch.tensor(labels["input_ids"][i][:max_length])
        model_inputs["labels"] = labels["input_ids"]
        return model_inputs

    processed_datasets = dataset.map(preprocess_function, batched=True,
                                     remove_columns=dataset["train"].column_names, load_from_cache_file=False)
    train_dataset = processed_datasets["train"]
    eval_dataset = processed_datasets["train"]
    train_dataloader = DataLoader(train_dataset, shuffle=True, collate_fn=default_data_collator, batch_size=batch_size)
    eval_dataloader = DataLoader(eval_dataset, collate_fn=default_data_collator, batch_size=batch_size)

    # creating model
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path)
    model = get_peft_model(model, peft_config)
    same_start(lib, model)  # test harness, not in the notebook
    model.print_trainable_parameters()

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
        inputs = tokenizer(f'{text_column} : {dataset["test"][i]["Tweet text"]} Label : ', return_tensors="pt")
        with torch.no_grad():
            inputs = {k: v.to(device) for k, v in inputs.items()}
            return model.generate(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=10, eos_token_id=3
            )

    model.eval()
    generated = generate_for(model, 0)

    # saving model
    peft_model_id = f"{dataset_name}_{model_name_or_path}_{peft_config.peft_type}_{peft_config.task_type}".replace(
        "/", "_"
    )
    peft_model_id = os.path.join(workdir, peft_model_id)
    model.save_pretrained(peft_model_id)

    PeftModel, PeftConfig = imports(lib, "PeftModel, PeftConfig")
    config = PeftConfig.from_pretrained(peft_model_id)
    model = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path)
    model = PeftModel.from_pretrained(model, peft_model_id)
    model.to(device)
    model.eval()
    return {"losses": losses, "eval_losses": eval_losses, "eval_preds": eval_preds, "generated": generated,
            "reloaded_generated": generate_for(model, 0), "saved": adapter_files(peft_model_id),
            "base_model_name_or_path": config.base_model_name_or_path}


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_twitter_complaints_notebook_matches_peft(tmp_path, method):
    start = SameStart()
    ours = twitter_complaints_notebook("deltatune", str(tmp_path / "dt"), start, method)
    theirs = twitter_complaints_notebook("peft", str(tmp_path / "peft"), start, method)
    assert len(ours["losses"]) == 2 and ours["base_model_name_or_path"] == tiny_hub.path("bigscience/bloomz-560m")
    assert torch.equal(ours["reloaded_generated"], ours["generated"])
    assert_same(ours, theirs)


# --- peft_lora_clm_with_additional_tokens.ipynb --------------------------------------------------------------

class SpecialTokens(str, Enum):
    begin_target = "<|begintarget|>"
    end_target = "<|endtarget|>"
    begin_context = "<|begincontext|>"
    end_context = "<|endcontext|>"
    system = "<|system|>"
    user = "<|user|>"
    begin_last_user_utterance = "<|beginlastuserutterance|>"
    end_last_user_utterance = "<|endlastuserutterance|>"
    pad_token = "<|pad|>"
    bos_token = "<|startoftext|>"

    @classmethod
    def list(cls):
        return [c.value for c in cls]


ASSISTANT_CHATBOT = Dataset.from_list([  # smangrul/assistant_chatbot_dataset: "context" and "target"
    {"context": f"<|begincontext|><|user|>book a table for {n}<|endcontext|>",
     "target": f"<|begintarget|>table for {n} booked<|endtarget|>"} for n in range(5)
])


def lora_with_additional_tokens(lib: str, workdir: str, same_start: SameStart) -> dict:
    LoraConfig, PeftConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training = imports(
        lib, "LoraConfig, PeftConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training")
    model_name = tiny_hub.path("mistralai/Mistral-7B-v0.1")
    tokenizer = AutoTokenizer.from_pretrained(
        model_name,
        pad_token=SpecialTokens.pad_token.value,
        bos_token=SpecialTokens.bos_token.value,
        eos_token=SpecialTokens.end_target.value,
        additional_special_tokens=SpecialTokens.list(),
    )
    model = AutoModelForCausalLM.from_pretrained(model_name, low_cpu_mem_usage=True)
    model.resize_token_embeddings(len(tokenizer))

    config = LoraConfig(
        r=64, lora_alpha=128, lora_dropout=0.0, target_modules=["embed_tokens", "lm_head", "q_proj", "v_proj"]
    )
    model = get_peft_model(model, config)
    same_start(lib, model)  # test harness, not in the notebook
    model.print_trainable_parameters()

    dataset = ASSISTANT_CHATBOT.train_test_split(0.2, seed=0)
    text_column = "context"
    label_column = "target"
    max_length = 48

    def preprocess_function(examples):
        batch_size = len(examples[text_column])
        targets = [str(x) for x in examples[label_column]]
        model_inputs = tokenizer(examples[text_column])
        labels = tokenizer(targets, add_special_tokens=False)  # don't add bos token because we concatenate with inputs
        for i in range(batch_size):
            sample_input_ids = model_inputs["input_ids"][i]
            label_input_ids = labels["input_ids"][i] + [tokenizer.eos_token_id]
            model_inputs["input_ids"][i] = sample_input_ids + label_input_ids
            labels["input_ids"][i] = [-100] * len(sample_input_ids) + label_input_ids
            model_inputs["attention_mask"][i] = [1] * len(model_inputs["input_ids"][i])
        for i in range(batch_size):
            sample_input_ids = model_inputs["input_ids"][i]
            label_input_ids = labels["input_ids"][i]
            model_inputs["input_ids"][i] = [tokenizer.pad_token_id] * (
                max_length - len(sample_input_ids)
            ) + sample_input_ids
            model_inputs["attention_mask"][i] = [0] * (max_length - len(sample_input_ids)) + model_inputs[
                "attention_mask"
            ][i]
            labels["input_ids"][i] = [-100] * (max_length - len(sample_input_ids)) + label_input_ids
            model_inputs["input_ids"][i] = model_inputs["input_ids"][i][:max_length]
            model_inputs["attention_mask"][i] = model_inputs["attention_mask"][i][:max_length]
            labels["input_ids"][i] = labels["input_ids"][i][:max_length]
        model_inputs["labels"] = labels["input_ids"]
        return model_inputs

    processed_datasets = dataset.map(preprocess_function, batched=True,
                                     remove_columns=dataset["train"].column_names, load_from_cache_file=False)
    train_dataset = processed_datasets["train"]

    training_args = TrainingArguments(
        output_dir=os.path.join(workdir, "mistral_lora_clm_with_added_tokens"),
        max_steps=2,  # cut: num_train_epochs=2
        save_total_limit=5,
        per_device_train_batch_size=2,
        warmup_steps=10,
        weight_decay=0.0001,
        dataloader_drop_last=True,
        logging_steps=10,
        learning_rate=1e-2,  # the notebook's 1e-5 moves a tiny model by less than fp32 can tell apart
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        remove_unused_columns=False,
        report_to=[],  # cut: wandb, push_to_hub, hub_model_id, hub_private_repo, bf16
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, data_collator=default_data_collator)
    train_loss = trainer.train().training_loss

    context = dataset["test"][0]["context"]
    batch = tokenizer(context, return_tensors="pt")
    model.eval()
    torch.manual_seed(0)
    output_tokens = model.generate(**batch, max_new_tokens=8, do_sample=True, temperature=0.2, top_p=0.95, top_k=50,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    target_predicted = tokenizer.decode(output_tokens[0], skip_special_tokens=False).split("<|endcontext|>")[1]

    trainer.model.save_pretrained(training_args.output_dir)  # cut: trainer.model.push_to_hub(...)

    inference_model = AutoModelForCausalLM.from_pretrained(model_name, low_cpu_mem_usage=True)
    inference_model.resize_token_embeddings(len(tokenizer))
    inference_model = PeftModel.from_pretrained(inference_model, training_args.output_dir)
    inference_model.eval()
    torch.manual_seed(0)
    output_tokens = inference_model.generate(**batch, max_new_tokens=8, do_sample=True, temperature=0.2, top_p=0.95,
                                             top_k=50, eos_token_id=tokenizer.eos_token_id,
                                             pad_token_id=tokenizer.pad_token_id)
    reloaded_predicted = tokenizer.decode(output_tokens[0], skip_special_tokens=False).split("<|endcontext|>")[1]
    return {"train_loss": train_loss, "target_predicted": target_predicted, "reloaded_predicted": reloaded_predicted,
            "logits": _logits(model, batch["input_ids"]),
            "reloaded_logits": _logits(inference_model, batch["input_ids"]),
            "saved": adapter_files(training_args.output_dir)}


def test_lora_with_additional_tokens_matches_peft(tmp_path):
    start = SameStart()
    ours = lora_with_additional_tokens("deltatune", str(tmp_path / "dt"), start)
    theirs = lora_with_additional_tokens("peft", str(tmp_path / "peft"), start)
    # the resized embedding rows are drawn at random: only a saved embedding makes the reload exact
    assert_close(ours["reloaded_logits"], ours["logits"])
    assert_same(ours, theirs)


# --- the examples' import lines, as written ----------------------------------------------------------------

IMPORT_LINES = {
    "peft_lora_clm_accelerate_ds_zero3_offload.py": ("LoraConfig, TaskType, get_peft_model", None),
    "peft_lora_clm_with_additional_tokens.ipynb": (
        "LoraConfig, PeftConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training", None),
    "peft_prompt_tuning_clm.ipynb": ("get_peft_config, get_peft_model, PromptTuningInit, PromptTuningConfig, TaskType, "
                                     "PeftType", None),
    "peft_prefix_tuning_clm.ipynb": ("get_peft_config, get_peft_model, PrefixTuningConfig, TaskType, PeftType", None),
    "peft_ln_tuning_clm.ipynb": ("get_peft_config, get_peft_model, LNTuningConfig, TaskType, PeftType",
                                 "BUG: LNTuningConfig (LayerNorm tuning) is not implemented"),
}


@pytest.mark.parametrize("source", [
    pytest.param(k, marks=pytest.mark.xfail(strict=True, raises=ImportError, reason=v[1])) if v[1] else k
    for k, v in IMPORT_LINES.items()
])
def test_import_line_as_written(source):
    names = IMPORT_LINES[source][0]
    exec(f"from peft import {names}", {})  # the oracle: the line works with peft
    exec(f"from deltatune import {names}", {})
