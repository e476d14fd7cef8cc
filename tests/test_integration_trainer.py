"""transformers' Trainer with default arguments treats a deltatune model as it treats a peft model.

Each test is code a peft user runs, with only the import changed: nothing here sets
``remove_unused_columns`` or a custom save. peft itself is installed in the test environment,
as an oracle; transformers then knows peft's classes, and these tests prove it also knows ours.
"""
import json

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments
from transformers.trainer_pt_utils import LabelSmoother

from deltatune import LoraConfig, PeftModel, get_peft_model
from tiny import input_ids, tiny_bert_cls, tiny_gpt2, tiny_llama
from tolerances import assert_close


def _lm_rows(n: int = 8, seq: int = 10) -> Dataset:
    ids = input_ids(batch=n, seq=seq, seed=5)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq] * n, "labels": ids.tolist()})


def _args(tmp_path, **kw) -> TrainingArguments:
    # What a user sets for a short run; everything else is transformers' default.
    return TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2,
                             learning_rate=5e-2, report_to="none", **kw)


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def test_default_trainer_on_tied_embeddings_saves_a_peft_adapter_in_model_and_checkpoints(tmp_path):
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, task_type="CAUSAL_LM"))  # GPT-2 ties wte and lm_head
    trainer = Trainer(model=model, args=_args(tmp_path, save_steps=2), train_dataset=_lm_rows())
    trainer.train()  # ended in "Some tensors share memory" before the integration
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "final", tmp_path / "out" / "checkpoint-2", tmp_path / "out" / "checkpoint-4"):
        files = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "training_args.bin"} <= files, folder
        assert "model.safetensors" not in files, f"{folder} holds a whole model, not an adapter"
    model.eval()
    x = input_ids()
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "final")
    assert_close(_logits(loaded, x), _logits(model, x))


def test_resume_from_a_trainer_checkpoint_reloads_the_adapter(tmp_path):
    def run(resume):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, task_type="CAUSAL_LM"))
        args = _args(tmp_path, save_steps=2, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=_lm_rows())
        trainer.train(resume_from_checkpoint=resume)
        return model.eval(), trainer

    straight, _ = run(None)
    resumed, trainer = run(str(tmp_path / "out" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    x = input_ids()
    assert_close(_logits(resumed, x), _logits(straight, x))


def test_trainer_keeps_the_columns_of_a_model_without_task_type(tmp_path):
    # peft's quicktour pattern: no task_type, so the plain PeftModel whose forward takes *args, **kwargs
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = _logits(model, input_ids())
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_lm_rows())
    trainer.train()
    assert trainer.state.global_step == 4 and (_logits(model.eval(), input_ids()) - before).abs().max() > 1e-4


def test_trainer_keeps_token_type_ids_for_sentence_pairs(tmp_path):
    model = get_peft_model(tiny_bert_cls(), LoraConfig(r=4, task_type="SEQ_CLS"))
    ids = input_ids(batch=4, seq=8, seed=3)
    types = torch.tensor([[0] * 4 + [1] * 4] * 4)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "token_type_ids": types.tolist(),
                              "attention_mask": [[1] * 8] * 4, "labels": [0, 1, 2, 0]})
    trainer = Trainer(model=model, args=_args(tmp_path), eval_dataset=data)
    model.eval()
    predicted = torch.as_tensor(trainer.predict(data).predictions)
    with torch.no_grad():
        direct = model(input_ids=ids, token_type_ids=types, attention_mask=torch.ones_like(ids)).logits
        without = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert (direct - without).abs().max() > 1e-4, "token types must matter for this check to mean anything"
    assert_close(predicted, direct)


def test_label_smoothing_shifts_labels_for_a_causal_lm(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, task_type="CAUSAL_LM"))
    trainer = Trainer(model=model, args=_args(tmp_path, label_smoothing_factor=0.1), train_dataset=_lm_rows())
    batch = trainer.data_collator([_lm_rows()[i] for i in range(2)])
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    expected = LabelSmoother(epsilon=0.1)({"logits": outputs.logits}, batch["labels"], shift_labels=True)
    assert torch.allclose(loss, expected)


def test_default_lora_targets_are_written_to_the_saved_config(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"]  # peft's LLaMA default, as peft writes it


@pytest.mark.parametrize("first", ["deltatune", "trainer"])
def test_trainer_is_recognised_whichever_is_imported_first(first, tmp_path):
    """The patch applies whether transformers.trainer was imported before deltatune or after it."""
    import subprocess
    import sys

    order = ["import deltatune", "import transformers.trainer"]
    order = order if first == "deltatune" else order[::-1]
    code = "; ".join(order + [
        "from transformers.trainer_utils import _is_peft_model as a",
        "from transformers.trainer import _is_peft_model as b, Trainer",
        "from deltatune import get_peft_model, LoraConfig",
        "from transformers import LlamaConfig, LlamaForCausalLM",
        "m = get_peft_model(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, "
        "num_hidden_layers=1, num_attention_heads=2)), LoraConfig(r=2))",
        "print(a(m), b(m), getattr(Trainer._save, '__deltatune_patched__', False))",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "True"]


def test_trainer_without_peft_installed_saves_an_adapter(tmp_path):
    """The main job's environment has no peft: transformers then checks no peft class at all."""
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import sys
for name in ("peft", "bitsandbytes", "trl"):
    sys.modules[name] = None  # importlib.util.find_spec now says "not installed", as in .venv
sys.path.insert(0, {str(Path(__file__).parent)!r})
import transformers.utils
assert not transformers.utils.is_peft_available()
from datasets import Dataset
from transformers import Trainer, TrainingArguments
from deltatune import LoraConfig, get_peft_model
from tiny import input_ids, tiny_gpt2
ids = input_ids(batch=4, seq=6, seed=5).tolist()
data = Dataset.from_dict({{"input_ids": ids, "attention_mask": [[1] * 6] * 4, "labels": ids}})
model = get_peft_model(tiny_gpt2(), LoraConfig(r=4))  # tied embeddings, no task_type
args = TrainingArguments(output_dir={str(tmp_path / "out")!r}, max_steps=2, save_steps=1,
                         per_device_train_batch_size=2, report_to="none")
trainer = Trainer(model=model, args=args, train_dataset=data)
trainer.train()
trainer.save_model({str(tmp_path / "final")!r})
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for folder in (tmp_path / "final", tmp_path / "out" / "checkpoint-1"):
        files = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files


def _tiny_t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def test_seq2seq_lm_trains_in_seq2seq_trainer_and_matches_peft(tmp_path):
    import peft
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    from deltatune import PeftModelForSeq2SeqLM

    model = get_peft_model(_tiny_t5(), LoraConfig(r=4, task_type="SEQ_2_SEQ_LM"))
    assert isinstance(model, PeftModelForSeq2SeqLM)
    assert sorted(model.peft_config["default"].target_modules) == ["q", "v"]  # peft's T5 default
    src, tgt = input_ids(batch=8, seq=8, seed=5), input_ids(batch=8, seq=4, seed=6)
    data = Dataset.from_dict({"input_ids": src.tolist(), "attention_mask": [[1] * 8] * 8, "labels": tgt.tolist()})
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                                    learning_rate=5e-2, report_to="none")
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    model.eval()
    x, dec = src[:2], tgt[:2]
    with torch.no_grad():
        ours = model(input_ids=x, decoder_input_ids=dec).logits
        theirs = peft.PeftModel.from_pretrained(_tiny_t5(), str(tmp_path / "final")).eval()
        assert_close(theirs(input_ids=x, decoder_input_ids=dec).logits, ours)
        reloaded = PeftModel.from_pretrained(_tiny_t5(), tmp_path / "final")
        assert_close(reloaded(input_ids=x, decoder_input_ids=dec).logits, ours)
        assert reloaded.generate(input_ids=x, max_new_tokens=3, do_sample=False).shape[0] == 2


def test_mt5_gets_peft_default_targets():
    from transformers import MT5Config, MT5ForConditionalGeneration

    model = MT5ForConditionalGeneration(MT5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                  num_heads=4, decoder_start_token_id=0))
    pm = get_peft_model(model, LoraConfig(r=2, task_type="SEQ_2_SEQ_LM"))  # peft's quicktour: no target_modules
    assert sorted(pm.peft_config["default"].target_modules) == ["q", "v"]


def test_transformers_add_adapter_with_a_deltatune_config_names_the_deltatune_call():
    # transformers' own adapter API (PeftAdapterMixin) is built on peft's layer classes; we refuse clearly
    pytest.importorskip("peft")
    model = tiny_llama()
    with pytest.raises(TypeError, match=r"deltatune\.get_peft_model\(model, config\)"):
        model.add_adapter(LoraConfig(r=4, target_modules=["q_proj"]))
    assert not any("lora" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("task", [None, "CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM"])
def test_forward_shows_the_base_model_signature(task):
    # What Trainer (without peft installed), TRL and collators read to decide which columns to pass
    import inspect

    from transformers import T5Config, T5ForConditionalGeneration

    if task == "SEQ_2_SEQ_LM":
        base, targets = T5ForConditionalGeneration(T5Config(vocab_size=96, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)), ["q"]
    elif task == "SEQ_CLS":
        base, targets = tiny_bert_cls(), ["query"]
    else:
        base, targets = tiny_llama(), ["q_proj"]
    model = get_peft_model(base, LoraConfig(r=2, target_modules=targets, task_type=task))
    assert inspect.signature(model.forward) == inspect.signature(base.forward)
    assert "token_type_ids" in inspect.signature(model.forward).parameters or task != "SEQ_CLS"


@pytest.mark.parametrize("bits", [4, 8])
def test_trainer_accepts_a_bitsandbytes_model_with_a_deltatune_lora(bits, tmp_path):
    # transformers refuses "purely quantized models" unless it sees an adapter model (item 8)
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama().save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32) if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant)
    assert base.is_quantized
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.randint(3, 90, (8, 12), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4),
                      train_dataset=data)
    trainer.train()
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if n in before)
    assert len(before) == 8 and all("adapters.default.lora_" in n for n in before)
    saved = tmp_path / "out" / "checkpoint-2"
    assert (saved / "adapter_model.safetensors").exists() and not (saved / "model.safetensors").exists()


def test_a_model_whose_forward_accelerate_wrapped_still_copies_and_pickles():
    # accelerate keeps the bound forward as model._original_forward under mixed precision; Trainer and TRL
    # deep-copy such models (reference models, EMA) and users torch.save them
    import copy
    import io

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    model._original_forward = model.forward
    twin = copy.deepcopy(model)
    assert twin._original_forward.__self__ is twin
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert_close(loaded._original_forward(input_ids()).logits, model(input_ids()).logits)
