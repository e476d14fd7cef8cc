"""IA³ through the whole life cycle: Trainer, save/load, disable, generate, and next to a LoRA adapter.

``check_life_cycle`` is shared with the bottleneck tests (tests/test_bottleneck_lifecycle.py).
"""
import copy

import pytest
import torch
from transformers import Trainer, TrainingArguments

from deltatune import IA3Config, LoraConfig, PeftModel, TaskType, get_peft_model
from tiny import input_ids, tiny_bert_cls, tiny_gpt2, tiny_llama
from tolerances import assert_close


class Rows(torch.utils.data.Dataset):
    """Eight rows for causal LM (labels = inputs) or sequence classification (labels = class ids)."""

    def __init__(self, seq_cls: bool):
        ids = input_ids(batch=8, seq=10, seed=5)
        self.rows = [
            dict(input_ids=ids[i], attention_mask=torch.ones_like(ids[i]), labels=torch.tensor(i % 3) if seq_cls else ids[i])
            for i in range(8)
        ]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def train_briefly(model, tmp_path, seq_cls: bool) -> None:
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=3, per_device_train_batch_size=2, learning_rate=5e-2,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
    )
    Trainer(model=model, args=args, train_dataset=Rows(seq_cls)).train()


def check_life_cycle(make, config, tmp_path):
    """get_peft_model -> Trainer -> training changed the output -> save/load gives the same output ->
    disable_adapter gives the base model -> greedy generate runs (causal LMs)."""
    seq_cls = config.task_type == TaskType.SEQ_CLS
    base = make()
    reference = copy.deepcopy(base)
    pm = get_peft_model(base, config)
    x = input_ids()
    before = pm(x).logits.detach()
    train_briefly(pm, tmp_path, seq_cls)
    pm.eval()
    after = pm(x).logits.detach()
    assert (after - before).abs().max() > 1e-4, "three training steps should change the output"
    pm.save_pretrained(tmp_path / "saved")
    loaded = PeftModel.from_pretrained(make(), tmp_path / "saved")
    assert_close(loaded(x).logits, after)
    with pm.disable_adapter():
        assert_close(pm(x).logits, reference(x).logits)
    if not seq_cls:
        out = loaded.generate(input_ids=x[:1], max_new_tokens=4, do_sample=False)
        assert out.shape == (1, x.shape[1] + 4)
        assert torch.equal(out[0, : x.shape[1]], x[0])
    return pm


CASES = {
    "llama": (tiny_llama, dict(task_type="CAUSAL_LM")),
    "gpt2": (tiny_gpt2, dict(task_type="CAUSAL_LM")),
    "bert-cls": (tiny_bert_cls, dict(task_type="SEQ_CLS")),
}


@pytest.mark.parametrize("case", CASES)
def test_life_cycle(case, tmp_path):
    make, kw = CASES[case]
    pm = check_life_cycle(make, IA3Config(**kw), tmp_path)
    if case == "bert-cls":  # the classifier head trained in full and was saved with the adapter
        assert any("classifier" in k for k in pm.get_adapter_state_dict("default"))


def test_ia3_next_to_lora(tmp_path):
    """Two methods on one model: switching, training only the active one, stacking, saving both."""
    x = input_ids()
    pm = get_peft_model(tiny_llama(), IA3Config(init_ia3_weights=False))
    pm.add_adapter("lora", LoraConfig(r=2, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    pm.eval()
    ia3_out = pm(x).logits
    pm.set_adapter("lora")
    lora_out = pm(x).logits
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n for n in trainable)
    assert (lora_out - ia3_out).abs().max() > 1e-3
    pm.set_adapter("default")
    assert_close(pm(x).logits, ia3_out)
    # Both active at once: they sit on different layers here, so merging both is exact.
    pm.set_adapter(["default", "lora"])
    stacked = pm(x).logits
    assert (stacked - ia3_out).abs().max() > 1e-3 and (stacked - lora_out).abs().max() > 1e-3
    pm.merge_adapter()
    assert_close(pm(x).logits, stacked, tier="reordered")  # fp32 rounding through two merged layers
    pm.unmerge_adapter()
    pm.save_pretrained(tmp_path)  # "default" at the root, "lora" in a subfolder
    fresh = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    fresh.load_adapter(tmp_path / "lora", "lora")
    fresh.set_adapter(["default", "lora"])
    assert_close(fresh(x).logits, stacked)
    fresh.delete_adapter("default")
    assert_close(fresh(x).logits, lora_out)
