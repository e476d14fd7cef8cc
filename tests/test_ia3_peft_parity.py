"""Tier (c): IA³ adapters saved by deltatune load in peft with the same logits, and the reverse;
trainable-parameter counts, on-disk keys, shapes and configs match peft's."""
import json

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from tiny import input_ids, perturb, tiny_bert_cls, tiny_gpt2, tiny_llama
from tolerances import assert_close

peft = pytest.importorskip("peft")
# peft flips fan_in_fan_out for Conv1D with a warning; that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set:UserWarning")

CASES = {
    "llama-defaults": (tiny_llama, {}),
    "gpt2-defaults": (tiny_gpt2, {}),
    "bert-cls-defaults": (tiny_bert_cls, dict(task_type="SEQ_CLS")),
    "llama-regex-ff": (tiny_llama, dict(target_modules=r".*\.(v_proj|gate_proj)", feedforward_modules=r".*gate_proj")),
    "gpt2-mts": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"], modules_to_save=["ln_f"])),
}


@pytest.mark.parametrize("case", CASES)
def test_round_trip_both_ways(case, tmp_path):
    make, kw = CASES[case]
    x = input_ids()
    ours = dt.get_peft_model(make(), dt.IA3Config(init_ia3_weights=False, **kw))
    theirs = peft.get_peft_model(make(), peft.IA3Config(init_ia3_weights=False, **kw))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    for model, folder, loader in ((ours, "ours", peft.PeftModel), (theirs, "theirs", dt.PeftModel)):
        expected = perturb(model, seed=1).eval()(x).logits
        model.save_pretrained(tmp_path / folder)
        loaded = loader.from_pretrained(make(), str(tmp_path / folder)).eval()
        assert_close(loaded(x).logits, expected)
    # Same keys and shapes on disk, and the same config apart from the version stamp.
    ours_sd, theirs_sd = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "theirs"))
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in theirs_sd.items()}
    ours_cfg, theirs_cfg = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs"))
    for cfg in (ours_cfg, theirs_cfg):
        for key in ("peft_version", "auto_mapping", "base_model_name_or_path"):
            cfg.pop(key, None)
        for key in ("target_modules", "feedforward_modules", "modules_to_save"):
            if isinstance(cfg.get(key), list):
                cfg[key] = sorted(cfg[key])
    assert ours_cfg == theirs_cfg


def test_merged_model_matches_peft_merge():
    x = input_ids()
    ours = perturb(dt.get_peft_model(tiny_gpt2(), dt.IA3Config(init_ia3_weights=False)), seed=1).eval()
    theirs = peft.get_peft_model(tiny_gpt2(), peft.IA3Config(init_ia3_weights=False))
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:  # ours: ...c_attn.adapters.default.ia3_l; peft: ...c_attn.ia3_l.default
                theirs_params[name.replace("adapters.default.ia3_l", "ia3_l.default")].copy_(p)
    merged_ours = ours.merge_and_unload()
    merged_theirs = theirs.merge_and_unload()
    theirs_sd = merged_theirs.state_dict()
    for k, v in merged_ours.state_dict().items():
        assert_close(v, theirs_sd[k])
    assert_close(merged_ours(x).logits, merged_theirs(x).logits)
