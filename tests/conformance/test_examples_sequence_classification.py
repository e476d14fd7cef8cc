"""peft's sequence-classification notebooks, ported: only the import line changed, hub ids swapped for tiny models.

Sources (huggingface/peft, ``examples/sequence_classification/``): ``LoRA.ipynb``, ``IA3.ipynb``,
``Prompt_Tuning.ipynb`` and ``prefix_tuning.ipynb``, copies of one notebook (RoBERTa on GLUE MRPC) that
differ in the config cell and the learning rate; ``IA3.ipynb`` writes ``import peft`` / ``peft.IA3Config``,
ported as ``import deltatune as peft``. Cut: ``load_dataset("glue", "mrpc")`` (6 rows of its columns),
``evaluate.load("glue", "mrpc")`` (no hub: accuracy counted by hand), epochs (one epoch of 2 steps),
tqdm, ``push_to_hub`` (``save_pretrained`` to a folder, which the notebook then loads back).
Not ported: ``P_Tuning.ipynb`` (``PromptEncoderConfig``), ``VeRA``, ``FourierFT``, ``C3A``, ``VBLoRA``,
torchao notebooks, ``peft_no_lora_accelerate.py``: methods deltatune does not have (their import
lines are in the import-line test).

Each notebook runs with ``lib="deltatune"`` and ``lib="peft"`` (the oracle) from the same adapter
weights; RoBERTa's own dropout draws the same masks in both runs, so everything is compared, except
for LoRA with ``lora_dropout=0.1``, whose masks deltatune draws differently from peft.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch
from datasets import Dataset, DatasetDict
from torch.optim import AdamW
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

import tiny_hub
from port_harness import SameStart, adapter_files, assert_same, imports, shapes
from tolerances import assert_close

_PAIRS = [("The cat sat.", "A cat was sitting.", 1), ("He left early.", "Stocks fell today.", 0),
          ("It rains.", "Rain is falling.", 1), ("Buy now!", "The sky is blue.", 0),
          ("Prices rose.", "Prices went up.", 1), ("I ran.", "She sings.", 0)]
GLUE_MRPC = DatasetDict({  # glue/mrpc: the columns the notebook reads and removes
    split: Dataset.from_list([{"sentence1": a, "sentence2": b, "label": y, "idx": i}
                              for i, (a, b, y) in enumerate(rows)])
    for split, rows in (("train", _PAIRS[:4]), ("validation", _PAIRS[4:]), ("test", _PAIRS[4:]))
})


class Accuracy:
    """Stands in for ``evaluate.load("glue", "mrpc")`` (a hub download): add_batch / compute."""

    def __init__(self):
        self.right, self.total = 0, 0

    def add_batch(self, predictions, references):
        self.right += int((predictions == references).sum())
        self.total += len(references)

    def compute(self):
        return {"accuracy": self.right / self.total}


def mrpc_notebook(lib: str, workdir: str, same_start: SameStart, method: str) -> dict:
    get_peft_model, LoraConfig, PeftType, PrefixTuningConfig, PromptTuningConfig = imports(
        lib, "get_peft_model, LoraConfig, PeftType, PrefixTuningConfig, PromptTuningConfig")
    peft = importlib.import_module(lib)  # IA3.ipynb: `import peft`

    batch_size = 2
    model_name_or_path = tiny_hub.path("roberta-large")
    task = "mrpc"
    device = "cpu"
    num_epochs = 1
    if method == "lora":
        peft_type = PeftType.LORA
        peft_config = LoraConfig(task_type="SEQ_CLS", inference_mode=False, r=8, lora_alpha=16, lora_dropout=0.1)
        lr = 3e-4
    elif method == "ia3":
        peft_type = peft.PeftType.IA3
        peft_config = peft.IA3Config(task_type="SEQ_CLS", inference_mode=False)
        lr = 1e-3
    elif method == "prompt":
        peft_type = PeftType.PROMPT_TUNING
        peft_config = PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=10)
        lr = 1e-3
    else:
        peft_type = PeftType.PREFIX_TUNING
        peft_config = PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=20)
        lr = 1e-2

    if any(k in model_name_or_path for k in ("gpt", "opt", "bloom")):
        padding_side = "left"
    else:
        padding_side = "right"

    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, padding_side=padding_side)
    if getattr(tokenizer, "pad_token_id") is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id

    datasets = GLUE_MRPC
    metric = Accuracy()

    def tokenize_function(examples):
        # max_length=None => use the model max length (it's actually the default)
        outputs = tokenizer(examples["sentence1"], examples["sentence2"], truncation=True, max_length=None)
        return outputs

    tokenized_datasets = datasets.map(tokenize_function, batched=True, remove_columns=["idx", "sentence1", "sentence2"])
    tokenized_datasets = tokenized_datasets.rename_column("label", "labels")

    def collate_fn(examples):
        return tokenizer.pad(examples, padding="longest", return_tensors="pt")

    train_dataloader = DataLoader(tokenized_datasets["train"], shuffle=True, collate_fn=collate_fn,
                                  batch_size=batch_size)
    eval_dataloader = DataLoader(tokenized_datasets["validation"], shuffle=False, collate_fn=collate_fn,
                                 batch_size=batch_size)

    torch.manual_seed(0)  # test harness: the new classifier head is drawn at random
    model = AutoModelForSequenceClassification.from_pretrained(model_name_or_path, return_dict=True)
    model = get_peft_model(model, peft_config)
    same_start(lib, model)  # test harness, not in the notebook
    model.print_trainable_parameters()

    optimizer = AdamW(params=model.parameters(), lr=lr)
    lr_scheduler = get_linear_schedule_with_warmup(
        optimizer=optimizer,
        num_warmup_steps=0.06 * (len(train_dataloader) * num_epochs),
        num_training_steps=(len(train_dataloader) * num_epochs),
    )

    model.to(device)
    losses, logits = [], []
    for epoch in range(num_epochs):
        model.train()
        for step, batch in enumerate(train_dataloader):
            batch.to(device)
            outputs = model(**batch)
            loss = outputs.loss
            losses.append(loss.item())
            loss.backward()
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()

        model.eval()
        for step, batch in enumerate(eval_dataloader):
            batch.to(device)
            with torch.no_grad():
                outputs = model(**batch)
            logits.append(outputs.logits)
            predictions = outputs.logits.argmax(dim=-1)
            predictions, references = predictions, batch["labels"]
            metric.add_batch(predictions=predictions, references=references)
        eval_metric = metric.compute()

    peft_model_id = os.path.join(workdir, f"roberta-large-peft-{method}")
    model.save_pretrained(peft_model_id)  # cut: model.push_to_hub("smangrul/roberta-large-peft-lora", ...)

    PeftModel, PeftConfig = imports(lib, "PeftModel, PeftConfig")
    config = PeftConfig.from_pretrained(peft_model_id)
    inference_model = AutoModelForSequenceClassification.from_pretrained(config.base_model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(config.base_model_name_or_path)
    inference_model = PeftModel.from_pretrained(inference_model, peft_model_id)
    inference_model.to(device)
    inference_model.eval()
    metric = Accuracy()
    reloaded_logits = []
    for step, batch in enumerate(eval_dataloader):
        batch.to(device)
        with torch.no_grad():
            outputs = inference_model(**batch)
        reloaded_logits.append(outputs.logits)
        predictions = outputs.logits.argmax(dim=-1)
        metric.add_batch(predictions=predictions, references=batch["labels"])
    return {"peft_type": str(peft_type.value), "losses": losses, "logits": torch.cat(logits),
            "eval_metric": eval_metric,
            "reloaded_logits": torch.cat(reloaded_logits), "reloaded_metric": metric.compute(),
            "saved": adapter_files(peft_model_id), "_dir": peft_model_id, "_model": model}


@pytest.mark.parametrize("method", ["ia3", "prompt"])
def test_mrpc_notebook_matches_peft(tmp_path, method):
    start = SameStart()
    ours = mrpc_notebook("deltatune", str(tmp_path / "dt"), start, method)
    theirs = mrpc_notebook("peft", str(tmp_path / "peft"), start, method)
    assert len(ours["losses"]) == 2
    assert_close(ours["reloaded_logits"], ours["logits"])  # the saved classifier head came back too
    assert_same(ours, theirs)


def test_mrpc_prefix_tuning_notebook_runs_where_peft_fails(tmp_path):
    """peft 0.21 fails this notebook on transformers 5.25: "Model does not support past key values which
    are required for prefix tuning" (RoBERTa's forward takes ``cache`` there). deltatune runs it. On
    transformers 5.17 (``make test-oldest``) peft runs it too, and the two runs must agree."""
    start = SameStart()
    ours = mrpc_notebook("deltatune", str(tmp_path / "dt"), start, "prefix")
    assert len(ours["losses"]) == 2 and all(torch.isfinite(torch.tensor(ours["losses"])))
    assert_close(ours["reloaded_logits"], ours["logits"])
    assert any(k.endswith("prompt_embeddings") for k in ours["saved"])
    try:
        theirs = mrpc_notebook("peft", str(tmp_path / "peft"), start, "prefix")
    except ValueError as err:
        assert "does not support past key values" in str(err)
    else:
        assert_same(ours, theirs)


def test_mrpc_lora_notebook_matches_peft(tmp_path):
    start = SameStart()
    ours = mrpc_notebook("deltatune", str(tmp_path / "dt"), start, "lora")
    theirs = mrpc_notebook("peft", str(tmp_path / "peft"), start, "lora")
    assert_close(ours["reloaded_logits"], ours["logits"])
    # lora_dropout=0.1: the two trainings drew different masks; compare what does not depend on them
    assert_same(shapes(ours["saved"]), shapes(theirs["saved"]))
    assert len(ours["losses"]) == len(theirs["losses"]) == 2
    import peft

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_hub.path("roberta-large"))
    loaded = peft.PeftModel.from_pretrained(base, ours["_dir"]).eval()
    ids = torch.tensor([[0, 40, 41, 42, 2, 2, 50, 51, 2]])
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, ours["_model"].eval()(input_ids=ids).logits)


# --- the notebooks' import lines, as written -----------------------------------------------------------------

_NOTEBOOK_LINE = ("get_peft_config, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict, LoraConfig, "
                  "PeftType, PrefixTuningConfig, PromptEncoderConfig")
IMPORT_LINES = {  # notebook -> (names, why deltatune fails it)
    "LoRA.ipynb": (_NOTEBOOK_LINE, "BUG: PromptEncoderConfig (P-tuning) is not implemented"),
    "Prompt_Tuning.ipynb": (_NOTEBOOK_LINE.replace("LoraConfig, ", "") + ", PromptTuningConfig",
                            "BUG: PromptEncoderConfig (P-tuning) is not implemented"),
    "every notebook, reload cell": ("PeftModel, PeftConfig", None),
    "P_Tuning.ipynb": (_NOTEBOOK_LINE.replace("LoraConfig, ", ""),
                       "BUG: PromptEncoderConfig (P-tuning) is not implemented"),
    "VeRA.ipynb": ("get_peft_model, VeraConfig, PeftType", "BUG: VeraConfig (VeRA) is not implemented"),
    "FourierFT.ipynb": ("get_peft_model, FourierFTConfig, PeftType", "BUG: FourierFTConfig is not implemented"),
    "C3A.ipynb": ("get_peft_model, C3AConfig, PeftType", "BUG: C3AConfig is not implemented"),
    "VBLoRA.ipynb": ("get_peft_model, VBLoRAConfig, PeftType", "BUG: VBLoRAConfig is not implemented"),
}


@pytest.mark.parametrize("source", [
    pytest.param(k, marks=pytest.mark.xfail(strict=True, raises=ImportError, reason=v[1])) if v[1] else k
    for k, v in IMPORT_LINES.items()
])
def test_import_line_as_written(source):
    names = IMPORT_LINES[source][0]
    exec(f"from peft import {names}", {})  # the oracle: the line works with peft
    exec(f"from deltatune import {names}", {})
