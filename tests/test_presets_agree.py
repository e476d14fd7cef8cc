"""`deltatune inspect --targets PRESET` and `deltatune plan --targets PRESET` read one preset table, so they
pick the same modules (they used to differ for BERT, Phi and GPT-2)."""
import pytest
from transformers import AutoConfig

from deltatune.inspect import meta_model
from deltatune.inspect.presets import expand_preset, targets_config
from deltatune.plan.setup import TrainSetup, peft_config_for
from deltatune.surgery.targets import resolve_targets

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=96)
CONFIGS = {"llama": dict(SMALL, num_key_value_heads=2), "phi": SMALL, "gpt2": dict(n_embd=32, n_layer=2, n_head=4,
           vocab_size=96), "bert": SMALL}


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("preset", ["qv", "attention", "attention+mlp", "all-linear"])
def test_inspect_and_plan_pick_the_same_modules(family, preset):
    model = meta_model(AutoConfig.for_model(family, **CONFIGS[family]))
    by_inspect = resolve_targets(model, targets_config(expand_preset(preset, family), r=4))
    by_plan = resolve_targets(model, peft_config_for(TrainSetup(method="lora", r=4, targets=preset), model))
    assert by_inspect == by_plan and by_inspect


def test_attention_includes_the_attention_output_projection():
    """The cases that used to disagree: plan's name lists missed BERT's, Phi's and GPT-2's output projection."""
    for family, suffix in [("bert", "attention.output.dense"), ("phi", "self_attn.dense"), ("gpt2", "attn.c_proj")]:
        model = meta_model(AutoConfig.for_model(family, **CONFIGS[family]))
        chosen = resolve_targets(model, peft_config_for(TrainSetup(method="lora", targets="attention"), model))
        assert any(name.endswith(suffix) for name in chosen), (family, chosen)
