"""peft docs, ported: IA³.

- ``docs/source/package_reference/ia3.md`` (huggingface/peft main, 5d602fdb), "Usage": ``IA3Config`` for a
  causal LM with ``k_proj``/``v_proj``/``down_proj`` and ``feedforward_modules=["down_proj"]``
  (``HuggingFaceTB/SmolLM-135M`` -> a tiny random Llama, SmolLM's architecture).
- ``docs/source/task_guides/ia3.md`` (huggingface/peft daf335f5^, the last version of the guide): the
  financial-sentiment dataset and its preprocessing, ``IA3Config(task_type="SEQ_2_SEQ_LM")`` on
  ``bigscience/mt0-large``, the training loop, and inference with ``AutoPeftModelForSeq2SeqLM``.
  ``mt0-large`` (mT5) -> a tiny random mT5, and for the loop a tiny T5 (the guide: "you can use any
  sequence-to-sequence model you like"); the hub dataset -> 10 in-memory rows; ``max_length`` 128 -> 16;
  ``num_epochs`` 3 -> 1; ``batch_size`` 8 -> 4; no tqdm. ``conceptual_guides/ia3.md`` has no code.
"""
from __future__ import annotations

import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Value
from torch.utils.data import DataLoader
from transformers import (AutoModelForSeq2SeqLM, AutoTokenizer, MT5Config, MT5ForConditionalGeneration, T5Config,
                          T5ForConditionalGeneration, default_data_collator, get_linear_schedule_with_warmup)

from docs_support import load_causal_lm, local_llama, oracle, ours, perturb, same_start
from support_data import tiny_tokenizer
from tolerances import assert_close

X = torch.tensor([[5, 6, 7, 8, 9]])


def usage(lib, model_id):
    IA3Config, TaskType, get_peft_model = lib.IA3Config, lib.TaskType, lib.get_peft_model  # from peft import ...

    model = load_causal_lm(model_id)  # AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM-135M")
    peft_config = IA3Config(
        task_type=TaskType.CAUSAL_LM,
        target_modules=["k_proj", "v_proj", "down_proj"],
        feedforward_modules=["down_proj"],
    )
    model = get_peft_model(model, peft_config)
    model.print_trainable_parameters()
    return model


def test_usage_causal_lm_config(tmp_path, capsys):
    model_id = local_llama(tmp_path / "SmolLM-135M")
    theirs = oracle(usage, model_id)
    printed_t = capsys.readouterr().out
    mine = ours(usage, model_id)
    assert capsys.readouterr().out == printed_t
    # k_proj, v_proj scale their outputs (16 each: 2 kv heads x 8), down_proj its input (64): 2 layers
    assert mine.get_nb_trainable_parameters()[0] == 2 * (16 + 16 + 64)
    with torch.no_grad():  # IA³ starts as the identity
        assert_close(mine(input_ids=X).logits, load_causal_lm(model_id)(input_ids=X).logits)
    # trained vectors: same outputs as peft, and either library loads the other's file
    same_start(perturb(theirs), mine)
    mine.save_pretrained(tmp_path / "ours")
    loaded = oracle(lambda lib: lib.PeftModel.from_pretrained(load_causal_lm(model_id), str(tmp_path / "ours")))
    with torch.no_grad():
        assert_close(mine(input_ids=X).logits, theirs(input_ids=X).logits)
        assert_close(loaded(input_ids=X).logits, theirs(input_ids=X).logits)


ROWS = [
    ("Morrisons reports first sales rise in four years", 1), ("Shares slump after profit warning", 0),
    ("Company keeps its dividend unchanged", 2), ("Record quarter lifts the stock", 1),
    ("Bank cuts outlook as costs climb", 0), ("Board meets on Tuesday", 2),
    ("Strong demand drives revenue higher", 1), ("Regulator fines the lender", 0),
    ("The robust growth was the result of the inclusion of clothing chain Lindex", 1), ("Results due next week", 2),
]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("ia3")
    tok = tiny_tokenizer()
    common = dict(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                  decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    for name, cfg_cls, model_cls in (("mt0-large", MT5Config, MT5ForConditionalGeneration), ("t5", T5Config, T5ForConditionalGeneration)):
        torch.manual_seed(0)
        model_cls(cfg_cls(**common)).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    features = Features({"text": Value("string"), "label": ClassLabel(names=["bearish", "bullish", "neutral"])})
    ds = Dataset.from_list([{"text": t, "label": label} for t, label in ROWS], features=features)
    return {"mt0": str(root / "mt0-large"), "t5": str(root / "t5"), "ds": ds}


@pytest.fixture(scope="module")
def prepared(hub):
    """The guide's Dataset section, once (it is the same for both libraries)."""
    ds = hub["ds"].train_test_split(test_size=0.2, seed=0)  # the guide: ds["train"].train_test_split(test_size=0.1)
    ds["validation"] = ds["test"]
    del ds["test"]

    classes = ds["train"].features["label"].names
    ds = ds.map(
        lambda x: {"text_label": [classes[label] for label in x["label"]]},
        batched=True,
    )
    text_column = "text"
    label_column = "text_label"
    max_length = 16

    tokenizer = AutoTokenizer.from_pretrained(hub["t5"])  # "bigscience/mt0-large"

    def preprocess_function(examples):
        inputs = examples[text_column]
        targets = examples[label_column]
        model_inputs = tokenizer(inputs, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
        labels = tokenizer(targets, max_length=3, padding="max_length", truncation=True, return_tensors="pt")
        labels = labels["input_ids"]
        labels[labels == tokenizer.pad_token_id] = -100
        model_inputs["labels"] = labels
        return model_inputs

    processed_ds = ds.map(
        preprocess_function,
        batched=True,
        remove_columns=ds["train"].column_names,
        load_from_cache_file=False,
        desc="Running tokenizer on dataset",
    )
    train_ds = processed_ds["train"]
    eval_ds = processed_ds["validation"]

    batch_size = 4

    train_dataloader = DataLoader(train_ds, shuffle=True, collate_fn=default_data_collator, batch_size=batch_size)
    eval_dataloader = DataLoader(eval_ds, collate_fn=default_data_collator, batch_size=batch_size)
    return tokenizer, ds, train_dataloader, eval_dataloader


def seq2seq_model(lib, model_id):
    IA3Config, get_peft_model = lib.IA3Config, lib.get_peft_model  # from peft import IA3Config, get_peft_model

    model = AutoModelForSeq2SeqLM.from_pretrained(model_id)
    peft_config = IA3Config(task_type="SEQ_2_SEQ_LM")
    model = get_peft_model(model, peft_config)
    model.print_trainable_parameters()
    return model


def test_guide_config_on_mt0(hub, capsys):
    theirs = oracle(seq2seq_model, hub["mt0"])
    printed_t = capsys.readouterr().out
    mine = ours(seq2seq_model, hub["mt0"])
    assert capsys.readouterr().out == printed_t
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def train(model, tokenizer, train_dataloader, eval_dataloader):
    lr = 8e-3
    num_epochs = 1

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    lr_scheduler = get_linear_schedule_with_warmup(
        optimizer=optimizer,
        num_warmup_steps=0,
        num_training_steps=(len(train_dataloader) * num_epochs),
    )
    device = "cpu"
    model = model.to(device)
    torch.manual_seed(0)  # shuffling and T5's dropout, the same in both runs
    history = []
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
        eval_preds = []
        for step, batch in enumerate(eval_dataloader):
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad():
                outputs = model(**batch)
            loss = outputs.loss
            eval_loss += loss.detach().float()
            eval_preds.extend(
                tokenizer.batch_decode(torch.argmax(outputs.logits, -1).detach().cpu().numpy(), skip_special_tokens=True)
            )

        eval_epoch_loss = eval_loss / len(eval_dataloader)
        eval_ppl = torch.exp(eval_epoch_loss)
        train_epoch_loss = total_loss / len(train_dataloader)
        train_ppl = torch.exp(train_epoch_loss)
        print(f"{epoch=}: {train_ppl=} {train_epoch_loss=} {eval_ppl=} {eval_epoch_loss=}")
        history.append((train_epoch_loss.item(), eval_epoch_loss.item()))
    return history, eval_preds


def generate(model, tokenizer, ds):
    text_column = "text"
    i = 1
    inputs = tokenizer(ds["validation"][text_column][i], return_tensors="pt")
    with torch.no_grad():
        outputs = model.generate(input_ids=inputs["input_ids"], max_new_tokens=10)
        return tokenizer.batch_decode(outputs.detach().cpu().numpy(), skip_special_tokens=True)


def test_guide_training_loop_and_inference_on_t5(hub, prepared, capsys):
    tokenizer, ds, train_dl, eval_dl = prepared
    theirs = oracle(seq2seq_model, hub["t5"])
    printed_t = capsys.readouterr().out
    mine = ours(seq2seq_model, hub["t5"])
    assert capsys.readouterr().out == printed_t
    history_t, preds_t = oracle(lambda lib: train(theirs, tokenizer, train_dl, eval_dl))
    history_o, preds_o = train(mine, tokenizer, train_dl, eval_dl)
    assert_close(torch.tensor(history_o), torch.tensor(history_t), scale=10)  # two optimizer steps deep
    assert preds_o == preds_t
    assert generate(mine, tokenizer, ds) == oracle(lambda lib: generate(theirs, tokenizer, ds))


def auto_load(lib, adapter_dir, model_id, ds):
    AutoPeftModelForSeq2SeqLM = lib.AutoPeftModelForSeq2SeqLM  # from peft import AutoPeftModelForSeq2SeqLM

    device = "cpu"
    model = AutoPeftModelForSeq2SeqLM.from_pretrained(adapter_dir).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_id)  # "bigscience/mt0-large"
    return generate(model, tokenizer, ds)


def test_guide_inference_with_auto_peft_model_for_seq2seq_lm(hub, prepared, tmp_path):
    tokenizer, ds, _, _ = prepared
    mine = perturb(ours(seq2seq_model, hub["t5"])).eval()
    mine.save_pretrained(tmp_path / "mt0-large-ia3")  # model.push_to_hub(peft_model_id)
    expected = generate(mine, tokenizer, ds)
    assert oracle(auto_load, str(tmp_path / "mt0-large-ia3"), hub["t5"], ds) == expected
    assert ours(auto_load, str(tmp_path / "mt0-large-ia3"), hub["t5"], ds) == expected
