"""Bottleneck adapters through the whole life cycle, and next to LoRA and IA³ adapters on one model."""
import pytest

from deltatune import BottleneckConfig, IA3Config, LoraConfig, PeftModel, get_peft_model
from test_ia3_lifecycle import check_life_cycle
from tiny import input_ids, tiny_bert_cls, tiny_gpt2, tiny_llama
from tolerances import assert_close

CASES = {
    "llama-houlsby": (tiny_llama, dict(task_type="CAUSAL_LM")),
    "gpt2-pfeiffer-gelu": (tiny_gpt2, dict(task_type="CAUSAL_LM", placement="pfeiffer", non_linearity="gelu")),
    "bert-cls-houlsby": (tiny_bert_cls, dict(task_type="SEQ_CLS", bottleneck_size=4)),
}


@pytest.mark.parametrize("case", CASES)
def test_life_cycle(case, tmp_path):
    make, kw = CASES[case]
    check_life_cycle(make, BottleneckConfig(**kw), tmp_path)


def test_bottleneck_next_to_lora_and_ia3(tmp_path):
    x = input_ids()
    pm = get_peft_model(tiny_gpt2(), BottleneckConfig(init_weights=False)).eval()
    pm.add_adapter("lora", LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    pm.add_adapter("ia3", IA3Config(init_ia3_weights=False))
    outs = {}
    for name in ("default", "lora", "ia3"):
        pm.set_adapter(name)
        outs[name] = pm(x).logits
        trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
        assert trainable and all(f".{name}." in n for n in trainable), name
    assert (outs["default"] - outs["lora"]).abs().max() > 1e-3 and (outs["default"] - outs["ia3"]).abs().max() > 1e-3
    pm.set_adapter("default")
    assert_close(pm(x).logits, outs["default"])
    # LoRA and the bottleneck active together; merging only LoRA (first in the order) is exact.
    pm.set_adapter(["lora", "default"])
    stacked = pm(x).logits
    pm.merge_adapter(["lora"])
    assert_close(pm(x).logits, stacked, tier="reordered")
    with pytest.raises(ValueError, match="nonlinearity"):
        pm.merge_adapter(["default"])
    pm.unmerge_adapter()
    pm.save_pretrained(tmp_path)
    fresh = PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    fresh.load_adapter(tmp_path / "lora", "lora")
    fresh.set_adapter(["lora", "default"])
    assert_close(fresh(x).logits, stacked)
    pm.delete_adapter("default")
    pm.set_adapter("ia3")
    assert_close(pm(x).logits, outs["ia3"])
