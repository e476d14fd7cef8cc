"""Default ``target_modules`` (deltatune.methods.default_targets) against peft's, the test-only oracle.

(a) every row of peft's LoRA, IA³ (targets and feed-forward) and AdaLoRA tables is deltatune's row;
(b) every architecture of those tables that transformers builds from a tiny config is wrapped by both libraries
without ``target_modules``, and the adapted module paths (and IA³'s feed-forward ones) are the same.
"""
from __future__ import annotations

import copy
import time
import warnings

import pytest
import torch
from peft.utils import constants as peft_constants
from transformers import AutoConfig, AutoModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import deltatune as dt
from deltatune.config import PeftType
from deltatune.methods import adalora as dt_adalora
from deltatune.methods import ia3 as dt_ia3
from deltatune.methods import lora as dt_lora
from deltatune.methods.default_targets import ADALORA_DEFAULT_TARGETS, IA3_DEFAULT_TARGETS, LORA_DEFAULT_TARGETS
from deltatune.registry import get_method
from deltatune.surgery.layer import AdaptedLayer

PEFT_LORA = peft_constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
PEFT_IA3 = peft_constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
PEFT_IA3_FF = peft_constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
PEFT_ADALORA = peft_constants.TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING


def _same(ours, theirs) -> bool:
    if isinstance(theirs, str) or isinstance(ours, str):
        return ours == theirs
    return set(ours) == set(theirs)


# ---- (a) the tables ----------------------------------------------------------------------------------
def test_lora_table_is_peft_s():
    wrong = {k: (LORA_DEFAULT_TARGETS.get(k), v) for k, v in PEFT_LORA.items() if not _same(LORA_DEFAULT_TARGETS.get(k, ()), v)}
    assert not wrong


def test_ia3_table_is_peft_s_both_parts():
    assert set(PEFT_IA3) == set(PEFT_IA3_FF)
    for kind, targets in PEFT_IA3.items():
        ours = IA3_DEFAULT_TARGETS.get(kind)
        assert ours is not None, kind
        assert _same(ours[0], targets), kind
        assert _same(ours[1], PEFT_IA3_FF[kind]), kind


def test_adalora_table_is_peft_s():
    wrong = {k: (ADALORA_DEFAULT_TARGETS.get(k), v) for k, v in PEFT_ADALORA.items()
             if not _same(ADALORA_DEFAULT_TARGETS.get(k, ()), v)}
    assert not wrong


def test_method_modules_and_registry_expose_the_one_table():
    assert dt_lora.LORA_DEFAULT_TARGETS is LORA_DEFAULT_TARGETS
    assert dt_ia3.IA3_DEFAULTS is IA3_DEFAULT_TARGETS
    assert dt_adalora.ADALORA_DEFAULT_TARGETS is ADALORA_DEFAULT_TARGETS
    assert dict(get_method(PeftType.LORA).default_targets) == LORA_DEFAULT_TARGETS
    assert dict(get_method(PeftType.IA3).default_targets) == IA3_DEFAULT_TARGETS
    assert dict(get_method(PeftType.ADALORA).default_targets) == ADALORA_DEFAULT_TARGETS


def test_a_model_type_in_no_table_needs_target_modules_except_for_lora():
    model = copy.deepcopy(_build("bert"))
    model.config.model_type = "no-such-family"
    for config in (dt.IA3Config(), dt.AdaLoraConfig(total_step=10)):
        with pytest.raises(ValueError, match="target_modules"):
            dt.get_peft_model(copy.deepcopy(model), config)
    # LoRA derives its defaults from the attention modules (tests/test_default_targets_derived.py)
    derived = dt.get_peft_model(copy.deepcopy(model), dt.LoraConfig()).peft_config["default"].target_modules
    assert set(derived) == {"query", "value"}


# ---- (b) the architectures ----------------------------------------------------------------------------
SMALL = dict(
    vocab_size=128, hidden_size=32, d_model=32, n_embd=32, num_hidden_layers=2, num_layers=2, n_layer=2,
    num_attention_heads=4, n_head=4, num_heads=4, num_key_value_heads=2, intermediate_size=64, d_ff=64, n_inner=64,
    ffn_dim=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=64, decoder_ffn_dim=64, head_dim=8, d_kv=8, max_position_embeddings=64, num_decoder_layers=1,
)
PER_TYPE = {"gpt_neo": dict(attention_types=[[["global", "local"], 1]])}
KINDS = list(dict.fromkeys([*PEFT_LORA, *PEFT_IA3, *PEFT_ADALORA]))
_BUILT: dict[str, torch.nn.Module | None] = {}


def _build(kind: str):
    """A tiny random base model of ``kind``, or None when transformers cannot build one small and fast."""
    if kind not in _BUILT:
        _BUILT[kind] = None
        if kind in CONFIG_MAPPING:
            cls = CONFIG_MAPPING[kind]
            kwargs = {k: v for k, v in {**SMALL, **PER_TYPE.get(kind, {})}.items()
                      if not isinstance(getattr(cls, k, None), property)}
            try:
                config = AutoConfig.for_model(kind, **kwargs)
                # composite (vision-language) configs keep full-size sub-models: too slow to build here
                if "text_config" not in getattr(config, "sub_configs", {}):
                    start = time.perf_counter()
                    torch.manual_seed(0)
                    model = AutoModel.from_config(config)
                    if time.perf_counter() - start < 2.0:
                        _BUILT[kind] = model.eval()
            except Exception:  # noqa: BLE001 - a missing extra dependency or an unbuildable tiny config: skipped
                pass
    return _BUILT[kind]


def _peft_paths(config, model):
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(model, config)
    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def _ours_paths(config, model):
    wrapped = dt.get_peft_model(model, config)
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}, wrapped.peft_config["default"]


def _configs(kind):
    import peft

    out = [("lora", peft.LoraConfig(), dt.LoraConfig())]
    if kind in PEFT_IA3:
        out.append(("ia3", peft.IA3Config(), dt.IA3Config()))
    if kind in PEFT_ADALORA:
        out.append(("adalora", peft.AdaLoraConfig(total_step=10), dt.AdaLoraConfig(total_step=10)))
    return out


EXERCISED: set[str] = set()
PEFT_REFUSES = {("mixtral", "lora")}


@pytest.mark.parametrize("kind", KINDS)
def test_default_targets_adapt_the_same_modules_as_peft(kind):
    base = _build(kind)
    if base is None:
        pytest.skip(f"transformers builds no tiny {kind!r} quickly here")
    for method, theirs_config, ours_config in _configs(kind):
        try:
            theirs = _peft_paths(theirs_config, copy.deepcopy(base))
        except ValueError:
            # peft 0.21.2 refuses LoRA on transformers 5's Mixtral (its MoE config conversion empties the
            # targets); deltatune adapts the default q_proj/v_proj there: nothing to compare
            assert (kind, method) in PEFT_REFUSES, (kind, method)
            continue
        ours, saved = _ours_paths(ours_config, copy.deepcopy(base))
        assert sorted(ours) == sorted(theirs), (kind, method)
        if method == "ia3":
            ff_theirs = {n for n, m in theirs.items() if m.is_feedforward}
            ff_ours = {n for n in ours if dt_ia3.is_feedforward(saved.feedforward_modules, n)}
            assert ff_ours == ff_theirs, (kind, method)
    EXERCISED.add(kind)


def test_enough_architectures_were_exercised():
    for kind in KINDS:
        if kind not in EXERCISED and _build(kind) is not None:
            test_default_targets_adapt_the_same_modules_as_peft(kind)
    assert len(EXERCISED) >= 15, sorted(EXERCISED)
