"""peft docs, ported: ``docs/source/task_guides/prompt_based_methods.md`` (huggingface/peft daf335f5^, the last
version of the page; its content now lives in ``package_reference/{p_tuning,prefix_tuning,prompt_tuning}.md``).

The whole guide: the RAFT twitter_complaints dataset with its ``text_label`` column, the tokenizer and
``preprocess_function``, the DataLoaders, the three configurations (p-tuning, prefix tuning, prompt
tuning with TEXT init), the training loop (AdamW + linear schedule, per-epoch loss and perplexity),
and inference (``AutoPeftModelForCausalLM`` then ``generate``). Changes: the hub parquet files -> 12
in-memory rows with the same columns and ClassLabel; ``bigscience/bloomz-560m`` -> a tiny random Bloom
and the tiny tokenizer saved in a local folder; ``num_epochs`` 50 -> 1; ``device`` "cuda" -> "cpu";
``max_length`` 64 -> 24; no tqdm. Both runs start from the same prompt weights (peft's, copied).
"""
from __future__ import annotations

import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, BloomConfig, BloomForCausalLM, default_data_collator, get_linear_schedule_with_warmup

from docs_support import bug, oracle, ours, same_start
from support_data import tiny_tokenizer
from tolerances import assert_close

TWEETS = [
    ("@HMRCcustomers No this is my first job", 2), ("@nationalgridus still no power, day three", 1),
    ("Thanks for the quick help @Delta", 2), ("@comcast internet down again. Why?", 1),
    ("@united lost my bag and nobody answers", 1), ("Loving the new update", 2),
    ("@NYTsupport papers thrown FAR from my door", 1), ("great service today", 2),
]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt_based")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    BloomForCausalLM(BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=2, n_head=4,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(root / "bloomz-560m")
    tok.save_pretrained(root / "bloomz-560m")
    features = Features({"Tweet text": Value("string"), "ID": Value("int64"),
                         "Label": ClassLabel(names=["Unlabeled", "complaint", "no complaint"])})
    rows = [{"Tweet text": t, "ID": i, "Label": label} for i, (t, label) in enumerate(TWEETS)]
    ds = DatasetDict({"train": Dataset.from_list(rows[:6], features=features), "test": Dataset.from_list(rows[6:], features=features)})
    return str(root / "bloomz-560m"), ds


@pytest.fixture(scope="module")
def prepared(hub):
    """The guide's Dataset section, run once (it is the same for both libraries)."""
    return data(hub)


def data(hub):
    """The guide's Dataset section, verbatim except for the data source and max_length."""
    model_id, ds = hub
    classes = [k.replace("_", " ") for k in ds["train"].features["Label"].names]
    ds = ds.map(
        lambda x: {"text_label": [classes[label] for label in x["Label"]]},
        batched=True,
        num_proc=1,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    target_max_length = max([len(tokenizer(class_label)["input_ids"]) for class_label in classes])
    max_length = 24

    def preprocess_function(examples, text_column="Tweet text", label_column="text_label"):
        batch_size = len(examples[text_column])
        inputs = [f"{text_column} : {x} Label : " for x in examples[text_column]]
        targets = [str(x) for x in examples[label_column]]
        model_inputs = tokenizer(inputs)
        labels = tokenizer(targets)
        classes = [k.replace("_", " ") for k in ds["train"].features["Label"].names]
        for i in range(batch_size):
            sample_input_ids = model_inputs["input_ids"][i]
            label_input_ids = labels["input_ids"][i]
            model_inputs["input_ids"][i] = [tokenizer.pad_token_id] * (
                max_length - len(sample_input_ids)
            ) + sample_input_ids
            model_inputs["attention_mask"][i] = [0] * (max_length - len(sample_input_ids)) + model_inputs[
                "attention_mask"
            ][i]
            labels["input_ids"][i] = [-100] * (max_length - len(label_input_ids)) + label_input_ids
            model_inputs["input_ids"][i] = torch.tensor(model_inputs["input_ids"][i][:max_length])
            model_inputs["attention_mask"][i] = torch.tensor(model_inputs["attention_mask"][i][:max_length])
            labels["input_ids"][i] = torch.tensor(labels["input_ids"][i][:max_length])
        model_inputs["labels"] = labels["input_ids"]
        return model_inputs

    processed_ds = ds.map(
        preprocess_function,
        batched=True,
        num_proc=1,
        remove_columns=ds["train"].column_names,
        load_from_cache_file=False,
        desc="Running tokenizer on dataset",
    )
    train_ds = processed_ds["train"]
    eval_ds = processed_ds["test"]

    batch_size = 4

    torch.manual_seed(0)
    train_dataloader = DataLoader(train_ds, shuffle=True, collate_fn=default_data_collator, batch_size=batch_size)
    eval_dataloader = DataLoader(eval_ds, collate_fn=default_data_collator, batch_size=batch_size)
    return tokenizer, ds, target_max_length, train_dataloader, eval_dataloader


def model_with(lib, hub, method, tokenizer):
    model_id, _ = hub
    model = AutoModelForCausalLM.from_pretrained(model_id)
    if method == "p-tuning":
        PromptEncoderConfig, get_peft_model = lib.PromptEncoderConfig, lib.get_peft_model

        peft_config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=20, encoder_hidden_size=128)
    elif method == "prefix tuning":
        PrefixTuningConfig, get_peft_model = lib.PrefixTuningConfig, lib.get_peft_model

        peft_config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)
    else:
        PromptTuningConfig, PromptTuningInit, get_peft_model = lib.PromptTuningConfig, lib.PromptTuningInit, lib.get_peft_model

        prompt_tuning_init_text = "Classify if the tweet is a complaint or no complaint.\n"
        peft_config = PromptTuningConfig(
            task_type="CAUSAL_LM",
            prompt_tuning_init=PromptTuningInit.TEXT,
            num_virtual_tokens=len(tokenizer(prompt_tuning_init_text)["input_ids"]),
            prompt_tuning_init_text=prompt_tuning_init_text,
            tokenizer_name_or_path=model_id,  # "bigscience/bloomz-560m"
        )
    model = get_peft_model(model, peft_config)
    model.print_trainable_parameters()
    return model


def train(model, train_dataloader, eval_dataloader):
    lr = 3e-2
    num_epochs = 1

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    lr_scheduler = get_linear_schedule_with_warmup(
        optimizer=optimizer,
        num_warmup_steps=0,
        num_training_steps=(len(train_dataloader) * num_epochs),
    )
    device = "cpu"
    model = model.to(device)
    history = []
    torch.manual_seed(0)  # the shuffling order, the same in both runs
    for epoch in range(num_epochs):
        model.train()
        total_loss = 0
        for step, batch in enumerate(train_dataloader):
            batch = {k: v.to(device) for k, v in batch.items()}
            outputs = model(**batch)
            loss = outputs.loss
            total_loss += loss.detach().float()
            loss.backward()
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()

        model.eval()
        eval_loss = 0

        for step, batch in enumerate(eval_dataloader):
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad():
                outputs = model(**batch)
            loss = outputs.loss
            eval_loss += loss.detach().float()

        eval_epoch_loss = eval_loss / len(eval_dataloader)
        eval_ppl = torch.exp(eval_epoch_loss)
        train_epoch_loss = total_loss / len(train_dataloader)
        train_ppl = torch.exp(train_epoch_loss)
        print(f"{epoch=}: {train_ppl=} {train_epoch_loss=} {eval_ppl=} {eval_epoch_loss=}")
        history.append((train_epoch_loss.item(), eval_epoch_loss.item()))
    return history


def infer(model, tokenizer, ds):
    text_column = "Tweet text"
    i = 1
    inputs = tokenizer(f'{text_column} : {ds["test"][i]["Tweet text"]} Label : ', return_tensors="pt")
    device = "cpu"
    with torch.no_grad():
        inputs = {k: v.to(device) for k, v in inputs.items()}
        outputs = model.generate(input_ids=inputs["input_ids"], max_new_tokens=10)
        return tokenizer.batch_decode(outputs.detach().cpu().numpy(), skip_special_tokens=True)


METHODS = [
    pytest.param("p-tuning", marks=bug("PromptEncoderConfig (p-tuning) is not implemented", raises=AttributeError)),
    "prefix tuning",
    "prompt tuning",
]


@pytest.mark.parametrize("method", METHODS)
def test_guide_end_to_end(hub, prepared, method, capsys):
    tokenizer, ds, target_max_length, train_dl, eval_dl = prepared
    assert ds["train"][0]["text_label"] == "no complaint" and target_max_length >= 2
    batch = next(iter(eval_dl))
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 24)

    theirs = oracle(model_with, hub, method, tokenizer)
    printed_t = capsys.readouterr().out
    mine = ours(model_with, hub, method, tokenizer)
    assert capsys.readouterr().out == printed_t  # print_trainable_parameters
    same_start(theirs, mine)

    history_t = oracle(lambda lib: train(theirs, train_dl, eval_dl))
    history_o = train(mine, train_dl, eval_dl)
    assert_close(torch.tensor(history_o), torch.tensor(history_t), scale=10)  # two optimizer steps deep
    assert infer(mine, tokenizer, ds) == oracle(lambda lib: infer(theirs, tokenizer, ds))


def test_prompt_tuning_text_init_is_the_texts_embeddings(hub, prepared):
    tokenizer, *_ = prepared
    theirs = oracle(model_with, hub, "prompt tuning", tokenizer)
    mine = ours(model_with, hub, "prompt tuning", tokenizer)
    import deltatune
    import peft

    prompt_o = deltatune.get_peft_model_state_dict(mine)["prompt_embeddings"]
    assert_close(prompt_o, peft.get_peft_model_state_dict(theirs)["prompt_embeddings"])
    ids = tokenizer("Classify if the tweet is a complaint or no complaint.\n")["input_ids"]
    assert_close(prompt_o, mine.get_base_model().get_input_embeddings().weight[ids])


def share_and_load(lib, hub, adapter_dir):
    model_id, ds = hub
    AutoPeftModelForCausalLM = lib.AutoPeftModelForCausalLM  # from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).to("cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    return infer(model, tokenizer, ds)


def test_inference_with_auto_peft_model(hub, prepared, tmp_path):
    tokenizer, ds, _, train_dl, eval_dl = prepared
    mine = ours(model_with, hub, "prefix tuning", tokenizer)
    train(mine, train_dl, eval_dl)
    mine.save_pretrained(tmp_path / "peft_model_id")  # model.push_to_hub(peft_model_id)
    expected = infer(mine, tokenizer, ds)
    assert oracle(share_and_load, hub, str(tmp_path / "peft_model_id")) == expected  # peft loads ours
    assert ours(share_and_load, hub, str(tmp_path / "peft_model_id")) == expected
