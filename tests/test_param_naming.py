"""In-memory parameter names (docs/api.md, "Parameter names"): deltatune's are
``<module>.adapters.<adapter>.lora_A`` where peft's are ``<module>.lora_A.<adapter>.weight``. The two
filters user code applies to ``named_parameters()``, ``"lora_" in name`` and ``adapter_name in name``,
must select exactly the LoRA parameters of the right adapter, and the same ones as on peft."""
import re

import peft
import pytest

import deltatune as dt
from deltatune.surgery.inject import adapted_layers
from tiny import tiny_llama

TARGETS = ["q_proj", "v_proj"]
CASES = {
    "lora": [("default", dict(use_dora=False))],
    "dora": [("default", dict(use_dora=True))],
    "two adapters": [("default", dict(use_dora=False)), ("other", dict(use_dora=True, r=2))],
}


def _build(lib, adapters):
    model = None
    for name, kw in adapters:
        config = lib.LoraConfig(target_modules=TARGETS, **{"r": 4, **kw})
        if model is None:
            model = lib.get_peft_model(tiny_llama(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model


def _by_type(model, adapter):
    """The names of ``adapter``'s parameters, found by walking the adapter layers (not by name)."""
    out = set()
    for path, host in adapted_layers(model):
        if adapter in host.adapters:
            prefix = f"{path}.adapters.{adapter}."
            out |= {prefix + n for n, _ in host.adapters[adapter].named_parameters()}
    return out


def _to_peft(name: str) -> str:
    """ours ``<module>.adapters.<adapter>.<param>`` -> peft's ``<module>.<param>.<adapter>.weight``."""
    return re.sub(r"\.adapters\.([^.]+)\.([^.]+)$", r".\2.\1.weight", name)


@pytest.mark.parametrize("case", CASES)
def test_lora_and_adapter_name_filters_select_exactly_that_adapters_parameters(case):
    adapters = CASES[case]
    mine, theirs = _build(dt, adapters), _build(peft, adapters)
    names_o = [n for n, _ in mine.named_parameters()]
    names_t = [n for n, _ in theirs.named_parameters()]
    everything = set().union(*(_by_type(mine, a) for a, _ in adapters))

    lora_o = {n for n in names_o if "lora_" in n}
    assert lora_o == everything  # nothing of the base model, nothing missing
    assert {_to_peft(n) for n in lora_o} == {n for n in names_t if "lora_" in n}
    if any(kw["use_dora"] for _, kw in adapters):
        assert any("lora_magnitude_vector" in n for n in lora_o)
    for adapter, kw in adapters:
        mine_a = {n for n in names_o if "lora_" in n and adapter in n}
        assert mine_a == _by_type(mine, adapter)
        assert {_to_peft(n) for n in mine_a} == {n for n in names_t if "lora_" in n and adapter in n}
        # A shape check, so the two filters cannot agree by selecting the wrong tensors.
        params_o, params_t = dict(mine.named_parameters()), dict(theirs.named_parameters())
        assert {_to_peft(n): tuple(params_o[n].shape) for n in mine_a} == {
            _to_peft(n): tuple(params_t[_to_peft(n)].shape) for n in mine_a}
        magnitudes = {n for n in mine_a if "lora_magnitude_vector" in n}
        assert bool(magnitudes) == kw["use_dora"]


def test_trainable_filter_and_requires_grad_agree():
    # The usual "train only LoRA" loop: after get_peft_model the filter and requires_grad pick the same set.
    mine = _build(dt, CASES["dora"])
    assert {n for n, p in mine.named_parameters() if p.requires_grad} == {n for n, _ in mine.named_parameters() if "lora_" in n}


def test_adapter_names_are_whole_path_components():
    # The adapter name is its own dotted component, so ".default." selects it as in peft's names.
    mine = _build(dt, CASES["two adapters"])
    for n, _ in mine.named_parameters():
        if "lora_" in n:
            assert (".default." in n) != (".other." in n), n
