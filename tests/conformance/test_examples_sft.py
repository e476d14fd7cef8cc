"""peft's SFT example, ported: only the import line changed, hub ids swapped for tiny local models.

Source: huggingface/peft ``examples/sft/``: ``utils.py`` (``create_and_prepare_model``,
``create_datasets``) and ``train.py`` (``main``), with the arguments of ``run_peft.sh`` (ChatML template
and special tokens, LoRA on ``all-linear``, gradient checkpointing with ``use_reentrant=True``,
packing). Cut: the hub download of smangrul/ultrachat-10k-chatml (4+2 rows of its ``messages``),
``push_to_hub``/``hub_*``, ``bf16``, 4-bit quantization, flash attention, unsloth, epochs
(``max_steps=2``), ``--lora_dropout 0.1`` becomes 0 (deltatune draws dropout masks differently from
peft; the comparison wants identical runs).

The example hands ``peft_config`` to TRL's ``SFTTrainer`` (deltatune's TRL integration, issue 14);
users who wrap the model themselves pass the ``PeftModel``: both are run against peft. The peft and
transformers parts of the same example (the model with added tokens, the config, ``get_peft_model``,
reentrant gradient checkpointing, saving and reloading) also run in transformers' ``Trainer``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

import tiny_hub
from port_harness import SameStart, adapter_files, assert_same, imports
from tolerances import assert_close

trl = pytest.importorskip("trl")

DEFAULT_CHATML_CHAT_TEMPLATE = "{% for message in messages %}\n{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% if loop.last and add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}{% endfor %}"  # noqa: E501

ULTRACHAT = DatasetDict({  # smangrul/ultrachat-10k-chatml: a "messages" column
    split: Dataset.from_list([{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                            {"role": "assistant", "content": f"It is {2 * i}."}]} for i in rows])
    for split, rows in (("train", range(4)), ("test", range(4, 6)))
})


class ChatmlSpecialTokens(str, Enum):
    user = "<|im_start|>user"
    assistant = "<|im_start|>assistant"
    system = "<|im_start|>system"
    eos_token = "<|im_end|>"
    bos_token = "<s>"
    pad_token = "<pad>"

    @classmethod
    def list(cls):
        return [c.value for c in cls]


@dataclass
class ModelArguments:  # train.py's, with run_peft.sh's values
    model_name_or_path: str
    chat_template_format: Optional[str] = field(default="chatml")
    lora_alpha: Optional[int] = field(default=16)
    lora_dropout: Optional[float] = field(default=0.0)
    lora_r: Optional[int] = field(default=8)
    lora_target_modules: Optional[str] = field(default="all-linear")
    use_peft_lora: Optional[bool] = field(default=True)
    use_reentrant: Optional[bool] = field(default=True)


def create_datasets(tokenizer, apply_chat_template=False):
    def preprocess(samples):
        batch = []
        for conversation in samples["messages"]:
            batch.append(tokenizer.apply_chat_template(conversation, tokenize=False))
        return {"content": batch}

    raw_datasets = ULTRACHAT  # cut: load_dataset(data_args.dataset_name, split=split) per split
    if apply_chat_template:
        raw_datasets = raw_datasets.map(preprocess, batched=True, remove_columns=raw_datasets["train"].column_names)
    return raw_datasets["train"], raw_datasets["test"]


def create_and_prepare_model(lib, args):
    LoraConfig = imports(lib, "LoraConfig")
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32)
    peft_config = None
    if args.use_peft_lora:
        peft_config = LoraConfig(
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            r=args.lora_r,
            bias="none",
            task_type="CAUSAL_LM",
            target_modules=args.lora_target_modules.split(",")
            if args.lora_target_modules != "all-linear"
            else args.lora_target_modules,
        )
    special_tokens = ChatmlSpecialTokens
    tokenizer = AutoTokenizer.from_pretrained(
        args.model_name_or_path,
        pad_token=special_tokens.pad_token.value,
        bos_token=special_tokens.bos_token.value,
        eos_token=special_tokens.eos_token.value,
        additional_special_tokens=special_tokens.list(),
    )
    tokenizer.chat_template = DEFAULT_CHATML_CHAT_TEMPLATE
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)
    return model, peft_config, tokenizer


def _sft_config(workdir):
    return trl.SFTConfig(output_dir=workdir, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                         max_length=64, packing=True, dataset_text_field="content", gradient_checkpointing=True,
                         report_to=[], use_cpu=True, bf16=False, seed=100, logging_steps=1,
                         eval_strategy="no", save_strategy="no")


def sft_main(lib: str, workdir: str, same_start: SameStart, pass_peft_model: bool = False) -> dict:
    """train.py's main(); ``pass_peft_model``: the variant users write when they wrap the model themselves."""
    model_args = ModelArguments(model_name_or_path=tiny_hub.path("mistralai/Mistral-7B-v0.1"))
    training_args = _sft_config(workdir)
    set_seed(training_args.seed)
    model, peft_config, tokenizer = create_and_prepare_model(lib, model_args)
    model.config.use_cache = not training_args.gradient_checkpointing
    if training_args.gradient_checkpointing:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": model_args.use_reentrant}
    training_args.dataset_kwargs = {"append_concat_token": False, "add_special_tokens": False}
    train_dataset, eval_dataset = create_datasets(tokenizer, apply_chat_template=True)
    if pass_peft_model:
        get_peft_model = imports(lib, "get_peft_model")
        model, peft_config = get_peft_model(model, peft_config), None
    trainer = trl.SFTTrainer(model=model, processing_class=tokenizer, args=training_args, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, peft_config=peft_config)
    same_start(lib, trainer.model)  # test harness: SFTTrainer wrapped the model
    if hasattr(trainer.model, "print_trainable_parameters"):
        trainer.model.print_trainable_parameters()
    trainer.train()
    trainer.save_model()
    return {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "saved": sorted(n for n in os.listdir(workdir) if n.startswith("adapter_"))}


def test_sft_train_py_as_written(tmp_path):
    start = SameStart()
    ours = sft_main("deltatune", str(tmp_path / "dt"), start)
    theirs = sft_main("peft", str(tmp_path / "peft"), start)
    assert ours["saved"] == theirs["saved"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert_same(ours["losses"], theirs["losses"])


def test_sft_train_py_with_the_model_wrapped_first(tmp_path):
    start = SameStart()
    ours = sft_main("deltatune", str(tmp_path / "dt"), start, pass_peft_model=True)
    theirs = sft_main("peft", str(tmp_path / "peft"), start, pass_peft_model=True)
    assert ours["saved"] == theirs["saved"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert_same(ours["losses"], theirs["losses"])


def sft_peft_parts_in_trainer(lib: str, workdir: str, same_start: SameStart) -> dict:
    """The same model, tokenizer, config and checkpointing, trained by transformers' Trainer.

    The glue that SFTTrainer would do (tokenize ``content``, LM labels) is written out here."""
    get_peft_model = imports(lib, "get_peft_model")
    model_args = ModelArguments(model_name_or_path=tiny_hub.path("mistralai/Mistral-7B-v0.1"))
    set_seed(100)  # train.py's main() starts so; the new token rows are drawn at random
    model, peft_config, tokenizer = create_and_prepare_model(lib, model_args)
    model = get_peft_model(model, peft_config)
    same_start(lib, model)  # test harness
    training_args = TrainingArguments(output_dir=workdir, max_steps=2, per_device_train_batch_size=2,
                                      learning_rate=1e-2, gradient_checkpointing=True, report_to=[], logging_steps=1,
                                      seed=100)
    model.config.use_cache = not training_args.gradient_checkpointing
    training_args.gradient_checkpointing_kwargs = {"use_reentrant": model_args.use_reentrant}
    train_dataset, _ = create_datasets(tokenizer, apply_chat_template=True)
    train_dataset = train_dataset.map(  # glue: SFTTrainer's tokenization, without packing
        lambda x: dict(tokenizer(x["content"], padding="max_length", max_length=48)),
        batched=True, remove_columns=["content"]).map(lambda x: {"labels": x["input_ids"]})
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset)
    trainer.train()
    trainer.save_model()
    # what a user does next: the base model with the same tokens added, and the adapter
    PeftModel = imports(lib, "PeftModel")
    base, _, _ = create_and_prepare_model(lib, model_args)
    reloaded = PeftModel.from_pretrained(base, workdir).eval()
    ids = tokenizer(tokenizer.apply_chat_template(ULTRACHAT["test"][0]["messages"], tokenize=False),
                    return_tensors="pt").input_ids
    with torch.no_grad():
        logits, reloaded_logits = model.eval()(input_ids=ids).logits, reloaded(input_ids=ids).logits
    return {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "saved": adapter_files(workdir),
            "checkpointing": model.get_base_model().is_gradient_checkpointing, "_logits": logits,
            "_reloaded_logits": reloaded_logits}


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft_trainer")
    start = SameStart()
    return (sft_peft_parts_in_trainer("deltatune", str(tmp / "dt"), start),
            sft_peft_parts_in_trainer("peft", str(tmp / "peft"), start))


def test_sft_peft_parts_in_trainer_match_peft(trainer_runs):
    ours, theirs = trainer_runs
    assert ours["checkpointing"] and len(ours["losses"]) == 2  # reentrant checkpointing through the wrapper
    # all-linear: every projection of both layers, not lm_head (the saved keys are compared below)
    assert len([k for k in ours["saved"] if k.endswith("lora_A.weight")]) == 14
    # the vocabulary was resized, so both also save embed_tokens and lm_head in full (peft's "auto" rule)
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= ours["saved"].keys()
    assert_same(ours, theirs)


def test_sft_adapter_with_added_tokens_reloads_to_the_trained_model(trainer_runs):
    """The added tokens' rows are drawn at random by ``resize_token_embeddings``: only the saved
    embedding matrices make the reloaded model the trained one."""
    ours, theirs = trainer_runs
    assert_close(theirs["_reloaded_logits"], theirs["_logits"])  # peft: the reload is the trained model
    assert_close(ours["_reloaded_logits"], ours["_logits"])
