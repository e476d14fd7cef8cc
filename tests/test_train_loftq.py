"""``deltatune train`` with QLoRA + LoftQ (train/loftq.py): the config, a 2-step run, the refusals."""
import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import deltatune as dt
from deltatune.cli.main import main
from deltatune.quant import QuantConfig, quantize_model
from support_train import base_args, tiny_run_files  # noqa: F401

LOFTQ = ["method.name=qlora", "method.init_lora_weights=loftq", "method.loftq_config={loftq_bits: 4, loftq_iter: 1}",
         "method.target_modules=[q_proj, v_proj]", "method.r=4"]


def test_print_config_shows_loftq(capsys):
    assert main(["train", "--print-config", *LOFTQ]) == 0
    method = yaml.safe_load(capsys.readouterr().out)["method"]
    assert method["init_lora_weights"] == "loftq" and method["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}


def test_two_step_run_starts_from_loftq_and_saves_a_plain_lora(tiny_run_files, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert main(base_args(tiny_run_files, out, *LOFTQ, "train.max_steps=2")) == 0
    # q_proj and v_proj of the upper of the 2 blocks (deltatune train's layers_to_transform: upper_half)
    assert "LoftQ: initialised the adapter on 2 quantized layers" in capsys.readouterr().out
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["loftq_config"] == {}  # loading must not redo LoftQ
    # the trained adapter fits the base quantized as any later load quantizes it (one LoftQ step keeps Q(W))
    base = quantize_model(AutoModelForCausalLM.from_pretrained(tiny_run_files["model"]), QuantConfig())
    model = dt.PeftModel.from_pretrained(base, out / "adapter")
    B = model.get_base_model().model.layers[1].self_attn.q_proj.adapters["default"].lora_B
    lr = yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"]
    assert B.abs().max() > 10 * lr  # LoftQ's B (~0.05 here); QLoRA's starts at 0 and 2 Adam steps move it by ~2·lr
    assert torch.isfinite(model(torch.tensor([[1, 5, 7]])).logits).all()


@pytest.mark.parametrize("extra,message", [
    ("method.loftq_config={loftq_bits: 4, loftq_iter: 2}", "only 1 step is supported"),
    ("method.loftq_config={loftq_bits: 8, loftq_iter: 1}", "quant.bits=4"),
])
def test_refused_combinations(tiny_run_files, tmp_path, capsys, extra, message):  # noqa: F811
    code = main(base_args(tiny_run_files, tmp_path / "run", *LOFTQ, extra))
    assert code != 0 and message in capsys.readouterr().err
