"""AdaLoRA through the whole life cycle: Trainer with AdaLoraCallback (ranks shrink on schedule),
save -> from_pretrained at the pruned ranks, disable, generate, merge, and next to a LoRA adapter."""
import warnings

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import deltatune as dt
from deltatune.methods.adalora import AdaLoraCallback, AdaLoraConfig, svd_adapters
from deltatune.methods.adalora_alloc import budget_schedule
from tiny import input_ids, tiny_bert_cls, tiny_gpt2, tiny_llama
from tolerances import assert_close

CASES = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")),
    "bert": (tiny_bert_cls, dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
}


class Rows(torch.utils.data.Dataset):
    """Eight rows of token ids with LM labels, or class labels for sequence classification."""

    def __init__(self, classify: bool = False):
        ids = input_ids(batch=8, seq=10, seed=3)
        self.rows = [
            dict(input_ids=i, attention_mask=torch.ones_like(i), labels=torch.tensor(k % 3) if classify else i.clone())
            for k, i in enumerate(ids)
        ]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def train(model, steps: int, tmp_path, classify=False, callbacks=()):
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=2, learning_rate=2e-2,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, logging_steps=1,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Rows(classify), callbacks=[AdaLoraCallback(), *callbacks])
    trainer.train()
    return trainer


def kept(model) -> dict[str, int]:
    return {k: sum(v) for k, v in (model.peft_config["default"].rank_pattern or {}).items()}


def load_quietly(make, folder, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "r is ignored" etc. are tested elsewhere
        return dt.PeftModel.from_pretrained(make(), folder, **kw)


class Recorder(TrainerCallback):
    """Runs after AdaLoraCallback in the same event: what the allocator left behind at each step."""

    def __init__(self):
        self.budgets, self.nonzero = [], []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.budgets.append(sum(kept(model).values()) if kept(model) else None)
        self.nonzero.append(sum(int(torch.count_nonzero(a.lora_E)) for _, a in svd_adapters(model.base_model.model, "default")))


def check_life_cycle(model, make, base_logits, tmp_path, classify=False):
    """After training: adapted != base, disabled == base, save -> from_pretrained gives the same logits at
    the pruned ranks, greedy generate runs, merge_and_unload keeps the logits."""
    x = input_ids()
    model.eval()
    logits = model(input_ids=x).logits
    assert not torch.allclose(logits, base_logits)
    with model.disable_adapter():
        assert_close(model(input_ids=x).logits, base_logits)
    model.save_pretrained(tmp_path / "saved")
    loaded = load_quietly(make, tmp_path / "saved")
    assert_close(loaded(input_ids=x).logits, logits)
    assert {p + ".lora_E": a.r for p, a in svd_adapters(loaded.base_model.model, "default")} == kept(model)
    assert loaded.peft_config["default"].rank_pattern == model.peft_config["default"].rank_pattern
    if not classify:
        out = loaded.generate(input_ids=x[:1], max_new_tokens=3, do_sample=False)
        assert out.shape == (1, x.shape[1] + 3)
    merged = loaded.merge_and_unload()
    assert_close(merged(input_ids=x).logits, logits, tier="reordered")  # merged weights: fp32 reassociation


def test_trainer_shrinks_ranks_on_schedule_llama(tmp_path):
    base = tiny_llama()
    base_logits = base(input_ids=input_ids()).logits
    cfg = AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=2, total_step=6, **CASES["llama"][1])
    model = dt.get_peft_model(base, cfg)
    rec = Recorder()
    train(model, 6, tmp_path, callbacks=[rec])
    # 4 layers: b0 = 16, bT = 8; steps 0-1 warm up, 2-3 shrink, 4 = total_step - tfinal fixes the ranks
    schedule = [budget_schedule(s, 16, 8, model.peft_config["default"]) for s in range(6)]
    assert [b for b, _ in schedule] == [16, 16, 10, 8, 8, 8]
    assert rec.budgets == [None, None, 10, 8, 8, 8]
    assert rec.nonzero == [16, 16, 10, 8, 8, 8]
    check_life_cycle(model, tiny_llama, base_logits, tmp_path)


def test_callback_checks_the_model_and_the_step_count():
    from transformers import TrainerControl, TrainerState

    model = dt.get_peft_model(tiny_llama(), AdaLoraConfig(init_r=2, target_r=1, total_step=50, **CASES["llama"][1]))
    state, control = TrainerState(max_steps=3), TrainerControl()
    with pytest.warns(UserWarning, match="total_step=50 but the Trainer will run 3"):
        AdaLoraCallback().on_train_begin(None, state, control, model=model)
    with pytest.raises(ValueError, match="trainable AdaLoRA adapter"):
        AdaLoraCallback().on_train_begin(None, state, control, model=tiny_llama())


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_life_cycle(kind, tmp_path):
    make, kw = CASES[kind]
    base = make()
    base_logits = base(input_ids=input_ids()).logits
    model = dt.get_peft_model(base, AdaLoraConfig(init_r=3, target_r=1, total_step=3, **kw))
    train(model, 3, tmp_path, classify=kind == "bert")
    assert 0 < sum(kept(model).values()) < 3 * len(kept(model))
    check_life_cycle(model, make, base_logits, tmp_path, classify=kind == "bert")


def test_next_to_a_lora_adapter(tmp_path):
    x = input_ids()
    model = dt.get_peft_model(tiny_llama(), AdaLoraConfig(init_r=3, target_r=1, total_step=3, init_lora_weights=False, **CASES["llama"][1]))
    model.add_adapter("other", dt.LoraConfig(r=2, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    model.eval()
    ada = model(input_ids=x, labels=x)
    model.set_adapter("other")
    lora = model(input_ids=x, labels=x)
    assert not torch.allclose(ada.logits, lora.logits)
    assert_close(lora.loss, model.base_model.model(input_ids=x, labels=x).loss)  # no AdaLoRA regulariser
    model.save_pretrained(tmp_path)
    loaded = load_quietly(tiny_llama, tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    assert_close(loaded(input_ids=x).logits, ada.logits)
    loaded.set_adapter("other")
    assert_close(loaded(input_ids=x).logits, lora.logits)
    model.delete_adapter("other")
    assert_close(model(input_ids=x).logits, ada.logits)
    model.delete_adapter("default")
    assert "update_and_allocate" not in model.base_model.__dict__
