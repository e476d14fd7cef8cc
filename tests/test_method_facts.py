"""The facts each built-in method declares (``Method.merges``, ``Method.servable``) hold: a method that says it
merges folds into the base weights with ``merge_and_unload`` and gives the same logits, one that does not is
refused with a reason; a servable method's adapters run in an ``adapter_names`` mixed batch, row for row the
same as alone, and any other method is refused before anything runs."""
import pytest
import torch

from deltatune import get_peft_model
from deltatune.registry import all_methods
from tiny import input_ids, perturb, tiny_gpt2, tiny_llama
from tolerances import assert_close

BUILTIN = [m for m in all_methods() if m.peft_type.value in {
    "LORA", "ADALORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING", "BOTTLENECK", "BITFIT", "PARTIAL"}]


def _model(method):
    config = method.config_cls(**{**dict(method.train_preset), **_fit(method)})
    base = tiny_gpt2() if method.name == "bitfit" else tiny_llama()  # BitFit needs biases; LLaMA has none
    return perturb(get_peft_model(base, config)).eval()  # every adapter changes the output


def _fit(method) -> dict:
    # presets written for SmolLM2; the tiny LLaMA needs fewer virtual tokens and the causal-LM task
    if method.wraps_forward:
        return {"num_virtual_tokens": 3, "task_type": "CAUSAL_LM"}
    if method.name == "adalora":
        return {"total_step": 10}
    if method.name == "partial":
        return {"layers_to_train": "last:1"}
    if "layers_to_transform" in method.train_preset:  # deltatune train resolves "upper_half" for the model: all layers here
        return {"layers_to_transform": None}
    return {}


@pytest.mark.parametrize("method", BUILTIN, ids=lambda m: m.name)
def test_merges_is_what_merge_and_unload_does(method):
    model, x = _model(method), input_ids()
    with torch.no_grad():
        before = model(input_ids=x).logits
    if method.merges:
        merged = model.merge_and_unload()
        with torch.no_grad():
            assert_close(merged(input_ids=x).logits, before, tier="reordered")
    else:
        with pytest.raises(ValueError, match="cannot be merged|not mergeable|cannot be folded|merge"):
            model.merge_and_unload()


@pytest.mark.parametrize("method", BUILTIN, ids=lambda m: m.name)
def test_servable_is_what_a_mixed_batch_does(method):
    model, x = _model(method), input_ids(batch=2)
    if method.servable:
        with torch.no_grad():
            mixed = model(input_ids=x, adapter_names=["default", "__base__"]).logits
            alone = model(input_ids=x[:1]).logits
            with model.disable_adapter():
                base = model(input_ids=x[1:]).logits
        assert_close(mixed[:1], alone, tier="reordered")
        assert_close(mixed[1:], base, tier="reordered")
    else:
        with pytest.raises(ValueError, match="mixed"):
            model(input_ids=x, adapter_names=["default", "__base__"])
