"""peft's DoRA fine-tuning script, ported: only the import line changed, hub ids swapped for tiny local models.

Source: huggingface/peft ``examples/dora_finetuning/dora_finetuning.py``, ``train_model()`` as written,
called as its ``__main__`` would be with ``--use_dora``. Cut: ``load_dataset(data_path)`` (8 rows of a
``text`` column), ``push_to_hub``/``hub_token``, ``fp16=True`` (needs a GPU; this runs on CPU), the
``quantize`` branch (QDoRA: bitsandbytes 4-bit on a GPU), ``logging_dir`` (removed in transformers 5),
and ``train_model`` returns its trainer
so the test can read the loss. Arguments a user passes on the command line: ``--device cpu`` (the
default ``auto`` assumes an accelerator), ``--lora_dropout 0`` (deltatune draws dropout masks
differently from peft, and the comparison wants identical runs), ``--learning_rate 0.3`` (with the
script's 100 warm-up steps, the first step has rate 0 and the second 3e-3), ``--batch_size 4
--num_epochs 2`` (two optimizer steps).
Not ported: ``dora-caching.py`` (a GPU benchmark of ``peft.helpers.DoraCaching``).
"""
from __future__ import annotations

import os

import torch
from datasets import Dataset, DatasetDict
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                          TrainingArguments)

import tiny_hub
from port_harness import SameStart, adapter_files, assert_same, imports
from tolerances import assert_close

GUANACO = DatasetDict({  # timdettmers/openassistant-guanaco: a "text" column
    split: Dataset.from_list([{"text": f"### Human: What is {i} + {i}?### Assistant: {2 * i}."} for i in rows])
    for split, rows in (("train", range(8)), ("test", range(8, 10)))
})


def train_model(lib, same_start, base_model, data_path, output_dir, batch_size, num_epochs, learning_rate, cutoff_len,
                val_set_size, use_dora, quantize, eval_step, save_step, device, lora_r, lora_alpha, lora_dropout,
                lora_target_modules, hub_model_id, push_to_hub):
    LoraConfig, get_peft_model, prepare_model_for_kbit_training = imports(
        lib, "LoraConfig, get_peft_model, prepare_model_for_kbit_training")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if device == "auto":
        device = torch.accelerator.current_accelerator().type if hasattr(torch, "accelerator") else "cuda"
    else:
        device = torch.device(device)

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    assert not quantize  # cut: the QDoRA branch
    model = AutoModelForCausalLM.from_pretrained(base_model)
    lora_config = LoraConfig(
        use_dora=use_dora,  # to use Dora OR compare to Lora just set the --use_dora
        r=lora_r,  # Rank of matrix
        lora_alpha=lora_alpha,
        target_modules=(
            lora_target_modules.split(",")
            if lora_target_modules
            else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        ),
        lora_dropout=lora_dropout,
        bias="none",
    )
    model = get_peft_model(model, lora_config)
    same_start(lib, model)  # test harness, not in the script
    model.to(device)  # MODEL TO GPU/CUDA
    tokenizer.pad_token = tokenizer.eos_token

    dataset = data_path  # cut: load_dataset(data_path)

    def tokenize_function(examples):
        inputs = tokenizer(examples["text"], padding="max_length", truncation=True, max_length=cutoff_len)
        inputs["labels"] = inputs["input_ids"].copy()  # setting labels for a language modeling task
        return inputs

    tokenized_datasets = dataset.map(tokenize_function, batched=True, remove_columns=dataset["train"].column_names)
    data_collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    training_args = TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=num_epochs,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        warmup_steps=100,
        weight_decay=0.01,
        logging_steps=eval_step,
        save_steps=save_step,
        save_total_limit=2,
        push_to_hub=push_to_hub,
        hub_model_id=hub_model_id,
        gradient_accumulation_steps=16,
        learning_rate=learning_rate,
        report_to=[],
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=tokenized_datasets["train"],
        eval_dataset=tokenized_datasets["test"],
        data_collator=data_collator,
    )
    trainer.train()
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return trainer


def _run(lib, workdir, start):
    base = tiny_hub.path("huggyllama/llama-7b")
    trainer = train_model(lib, start, base_model=base, data_path=GUANACO, output_dir=workdir, batch_size=4,
                          num_epochs=2, learning_rate=0.3, cutoff_len=32, val_set_size=500, use_dora=True,
                          quantize=False, eval_step=10, save_step=100, device="cpu", lora_r=8, lora_alpha=16,
                          lora_dropout=0.0, lora_target_modules=None, hub_model_id="path/to/repo", push_to_hub=False)
    files = adapter_files(workdir)
    return trainer, {"steps": trainer.state.global_step, "saved": files, "eval_loss": trainer.evaluate()["eval_loss"],
                     "tokenizer_saved": os.path.exists(os.path.join(workdir, "tokenizer_config.json"))}


def test_dora_finetuning_script_matches_peft(tmp_path):
    start = SameStart()
    trainer, ours = _run("deltatune", str(tmp_path / "dt"), start)
    _, theirs = _run("peft", str(tmp_path / "peft"), start)
    assert ours["steps"] == 2  # 8 rows, batch 4, 16 accumulation steps: one optimizer step per epoch
    magnitudes = [k for k in ours["saved"] if k.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == 14  # 7 projections x 2 layers
    assert_same(ours, theirs)
    # the step moved every DoRA magnitude, and peft loads the result to the same logits
    import peft

    model = trainer.model.eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_hub.path("huggyllama/llama-7b"))
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "dt")).eval()
    ids = torch.tensor([[5, 40, 41, 42, 43]])
    with torch.no_grad():
        assert_close(loaded(ids).logits, model(ids).logits)
    initial = start.state
    for key in magnitudes:
        assert (ours["saved"][key] - initial[key]).abs().max() > 1e-3, key
