"""peft docs, ported: ``docs/source/quicktour.md`` (huggingface/peft main, 5d602fdb), every snippet in order.

Changes from the page: the import line (``lib``), ``meta-llama/Llama-3.2-1B`` / ``facebook/opt-350m`` /
the adapter repos -> a tiny random Llama and tokenizer in a local folder, the Trainer's dataset -> a
few in-memory rows, ``push_to_hub`` not run (no hub), ``max_new_tokens`` 50 -> 8. The
``from transformers import AutoPeftModelForCausalLM`` typo in the page is read as ``AutoModelForCausalLM``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

from docs_support import load_causal_lm, local_llama, oracle, ours, same_start
from tolerances import assert_close

PROMPT = "Preheat the oven to 350 degrees and place the cookie dough"


def config_and_model(lib, model_id):
    LoraConfig, TaskType = lib.LoraConfig, lib.TaskType  # from peft import LoraConfig, TaskType

    peft_config = LoraConfig(target_modules=["q_proj"], task_type=TaskType.CAUSAL_LM, inference_mode=False, r=8, lora_alpha=32, lora_dropout=0.1)
    model = load_causal_lm(model_id)  # AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B")
    get_peft_model = lib.get_peft_model  # from peft import get_peft_model

    peft_model = get_peft_model(model, peft_config)
    peft_model.print_trainable_parameters()
    return model, peft_model


def test_config_get_peft_model_and_trainable_parameters(tmp_path, capsys):
    model_id = local_llama(tmp_path / "llama")
    base_t, theirs = oracle(config_and_model, model_id)
    printed_t = capsys.readouterr().out
    base_o, mine = ours(config_and_model, model_id)
    printed_o = capsys.readouterr().out
    assert printed_o == printed_t and printed_o.startswith("trainable params: 1,024 ||")
    assert type(mine).__name__ == type(theirs).__name__ == "PeftModelForCausalLM"
    # "these changes are done in-place ... your base model is now modified": every q_proj is wrapped.
    for base in (base_t, base_o):
        assert all(type(layer.self_attn.q_proj) is not torch.nn.Linear for layer in base.model.layers)
        assert all(type(layer.self_attn.k_proj) is torch.nn.Linear for layer in base.model.layers)


def _lm_dataset(tokenizer) -> DatasetDict:
    texts = [f"Step {i}: preheat the oven and bake the cookies for {10 + i} minutes." for i in range(6)]
    ds = Dataset.from_dict({"text": texts}).map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
    return DatasetDict({"train": ds.select(range(4)), "test": ds.select(range(4, 6))})


def train_with_trainer(lib, model_id, out):
    _, peft_model = config_and_model(lib, model_id)
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    tokenized_datasets = _lm_dataset(tokenizer)
    data_collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    def compute_metrics(eval_pred):
        return {"rows": float(len(eval_pred.label_ids))}

    training_args = TrainingArguments(
        output_dir=str(out / "your-name/meta-llama/my-llama3.2-adapter"),
        learning_rate=1e-3,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=32,
        num_train_epochs=2,
        weight_decay=0.01,
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        report_to="none",  # not in the page: no logging integrations on this machine
    )
    trainer = Trainer(
        model=peft_model,
        args=training_args,
        train_dataset=tokenized_datasets["train"],
        eval_dataset=tokenized_datasets["test"],
        data_collator=data_collator,
        compute_metrics=compute_metrics,
    )
    trainer.train()
    peft_model.save_pretrained(str(out / "output_dir"))
    return trainer, peft_model


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_trainer_with_load_best_model_at_end_then_save(tmp_path):
    model_id = local_llama(tmp_path / "llama")
    trainer_t, theirs = oracle(train_with_trainer, model_id, tmp_path / "peft")
    trainer_o, mine = ours(train_with_trainer, model_id, tmp_path / "ours")
    assert trainer_o.state.global_step == trainer_t.state.global_step == 2
    assert Path(trainer_o.state.best_model_checkpoint).name == Path(trainer_t.state.best_model_checkpoint).name
    assert [e["epoch"] for e in trainer_o.state.log_history if "eval_rows" in e] == [1.0, 2.0]
    # Each epoch's checkpoint holds the same files as peft's (adapter, optimizer, scheduler, trainer state).
    for ckpt in ("checkpoint-1", "checkpoint-2"):
        run = "your-name/meta-llama/my-llama3.2-adapter/" + ckpt
        files_o = _listing(tmp_path / "ours" / run) - {"README.md"}  # the model card: see test_docs_checkpoint
        assert files_o == _listing(tmp_path / "peft" / run) - {"README.md"}
    # "only save the extra PEFT weights": the two adapter files, and peft loads ours to the same logits.
    saved = tmp_path / "ours/output_dir"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= _listing(saved)
    assert (saved / "adapter_model.safetensors").stat().st_size < 20_000
    x = torch.tensor([[5, 6, 7, 8, 9]])
    mine.eval()
    reloaded = oracle(lambda lib: lib.PeftModel.from_pretrained(load_causal_lm(model_id), str(saved)))
    with torch.no_grad():
        assert_close(mine(input_ids=x).logits, reloaded(input_ids=x).logits)


def auto_peft_inference(lib, adapter_dir, model_id):
    AutoPeftModelForCausalLM = lib.AutoPeftModelForCausalLM  # from peft import AutoPeftModelForCausalLM

    device = "cpu"
    peft_model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_id)  # "facebook/opt-350m"

    peft_model = peft_model.to(device)
    peft_model.eval()
    inputs = tokenizer(PROMPT, return_tensors="pt")

    outputs = peft_model.generate(input_ids=inputs["input_ids"].to(peft_model.device), max_new_tokens=8)
    return tokenizer.batch_decode(outputs.detach().cpu().numpy(), skip_special_tokens=True)[0]


def _trained_adapter(tmp_path, task_type="CAUSAL_LM") -> tuple[str, str]:
    """A peft-saved adapter with a non-zero B, on a local base (stands in for ybelkada/opt-350m-lora)."""
    import peft

    model_id = local_llama(tmp_path / "llama")
    model = peft.get_peft_model(load_causal_lm(model_id), peft.LoraConfig(task_type=task_type, init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    return str(tmp_path / "adapter"), model_id


def test_inference_with_auto_peft_model_for_causal_lm(tmp_path):
    adapter_dir, model_id = _trained_adapter(tmp_path)
    expected = oracle(auto_peft_inference, adapter_dir, model_id)
    assert ours(auto_peft_inference, adapter_dir, model_id) == expected


def auto_peft_model(lib, adapter_dir):
    AutoPeftModel = lib.AutoPeftModel  # from peft import AutoPeftModel

    peft_model = AutoPeftModel.from_pretrained(adapter_dir)  # "smangrul/openai-whisper-large-v2-LORA-colab"
    return peft_model


def test_auto_peft_model_for_other_tasks(tmp_path):
    # AutoPeftModel is for adapters saved without a task type (peft refuses CAUSAL_LM ones here).
    adapter_dir, _ = _trained_adapter(tmp_path, task_type=None)
    theirs = oracle(auto_peft_model, adapter_dir)
    mine = ours(auto_peft_model, adapter_dir)
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert_close(mine(input_ids=x).logits, theirs(input_ids=x).logits)


def peft_model_from_pretrained(lib, adapter_dir, model_id):
    PeftModel = lib.PeftModel  # from peft import PeftModel

    base_model = load_causal_lm(model_id)  # AutoModelForCausalLM.from_pretrained("meta-llama/llama3.2-1B")
    peft_model = PeftModel.from_pretrained(base_model, adapter_dir)  # you can also pass a directory instead of a hub path
    return peft_model


def test_most_general_loading_with_peft_model_from_pretrained(tmp_path):
    adapter_dir, model_id = _trained_adapter(tmp_path)
    theirs = oracle(peft_model_from_pretrained, adapter_dir, model_id)
    mine = ours(peft_model_from_pretrained, adapter_dir, model_id)
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        assert_close(mine(**inputs).logits, theirs(**inputs).logits)
        base = load_causal_lm(model_id)(**inputs).logits
    assert not torch.allclose(mine(**inputs).logits, base)  # the adapter does something
    out_t = theirs.generate(**inputs, max_new_tokens=8)
    assert torch.equal(mine.generate(**inputs, max_new_tokens=8), out_t)


def multiple_adapters(lib, model_id):
    _, peft_model = config_and_model(lib, model_id)
    peft_model.add_adapter(adapter_name='new_adapter')
    peft_model.set_adapter('new_adapter')
    return peft_model


def test_multiple_adapters_quick_example(tmp_path):
    # The page's quick example omits add_adapter's required peft_config, so peft 0.21.2 itself raises
    # TypeError; deltatune must fail the same way rather than invent a default config.
    import deltatune
    import peft

    model_id = local_llama(tmp_path / "llama")
    for lib in (peft, deltatune):
        with pytest.raises(TypeError, match="peft_config"):
            multiple_adapters(lib, model_id)


def multiple_adapters_with_config(lib, model_id):
    _, peft_model = config_and_model(lib, model_id)
    peft_model.add_adapter(adapter_name='new_adapter', peft_config=lib.LoraConfig(target_modules=["v_proj"], init_lora_weights=False))
    peft_model.set_adapter('new_adapter')
    return peft_model


def test_multiple_adapters_with_the_config_the_page_leaves_out(tmp_path):
    model_id = local_llama(tmp_path / "llama")
    theirs = oracle(multiple_adapters_with_config, model_id)
    mine = ours(multiple_adapters_with_config, model_id)
    assert mine.active_adapter == theirs.active_adapter == "new_adapter"
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    same_start(theirs, mine, adapter_name="new_adapter")
    x = torch.tensor([[5, 6, 7, 8]])
    mine.eval()
    theirs.eval()
    with torch.no_grad():
        assert_close(mine(input_ids=x).logits, theirs(input_ids=x).logits)
