"""``deltatune export``: a plain transformers folder whose logits equal base model + adapter."""
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import deltatune as dt
from deltatune.cli.main import main
from support_cli_export import adapter_logits, ids, write_adapter, write_model
from tolerances import assert_close


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("untied") / "model", tied=False)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("tied") / "model", tied=True)


def _export(adapter, out, *extra):
    return main(["export", "--adapter", str(adapter), "--out", str(out), *extra])


def _exported_logits(out, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    with torch.no_grad():
        return model(ids()).logits, model


@pytest.mark.parametrize(
    "config",
    [
        dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
        dt.LoraConfig(r=4, lora_alpha=16, use_rslora=True, use_dora=True, target_modules=["q_proj", "up_proj"]),
        dt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    ],
    ids=["lora", "dora", "ia3"],
)
def test_export_loads_in_transformers_with_adapter_logits(untied, tmp_path, config):
    adapter = write_adapter(untied, tmp_path / "adapter", config)
    assert _export(adapter, tmp_path / "out") == 0
    files = sorted(os.listdir(tmp_path / "out"))
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    assert not any(f.startswith("adapter_") for f in files)
    logits, _ = _exported_logits(tmp_path / "out")
    assert_close(logits, adapter_logits(untied, adapter))
    assert AutoTokenizer.from_pretrained(tmp_path / "out").eos_token == "<|im_end|>"


@pytest.mark.parametrize(
    "config",
    [
        dt.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]),
        dt.LoraConfig(r=4, target_modules=["lm_head"]),
        dt.PartialConfig(modules=["embed_tokens"]),  # a trained full copy of the embedding
    ],
    ids=["lora-embed_tokens", "lora-lm_head", "partial-embed_tokens"],
)
def test_tied_embeddings_are_untied_when_the_adapter_changes_one(tied, tmp_path, config):
    adapter = write_adapter(tied, tmp_path / "adapter", config)
    assert _export(adapter, tmp_path / "out") == 0
    logits, model = _exported_logits(tmp_path / "out")
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert_close(logits, adapter_logits(tied, adapter))


def test_tied_embeddings_stay_tied_when_the_adapter_leaves_them(tied, tmp_path):
    adapter = write_adapter(tied, tmp_path / "adapter", dt.LoraConfig(r=4, target_modules=["q_proj"]))
    assert _export(adapter, tmp_path / "out") == 0
    logits, model = _exported_logits(tmp_path / "out")
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_close(logits, adapter_logits(tied, adapter))


def test_bfloat16_export(untied, tmp_path):
    adapter = write_adapter(untied, tmp_path / "adapter", dt.LoraConfig(r=4, target_modules=["q_proj"]))
    assert _export(adapter, tmp_path / "out", "--dtype", "bfloat16") == 0
    logits, model = _exported_logits(tmp_path / "out", dtype=None)
    assert model.dtype == torch.bfloat16
    assert_close(logits.float(), adapter_logits(untied, adapter), dtype=torch.bfloat16, scale=5)  # deep bf16 forward


@pytest.mark.parametrize(
    "config,match",
    [
        (dt.BottleneckConfig(bottleneck_size=4), "BOTTLENECK adapter and cannot be merged"),
        (dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), "virtual tokens"),
    ],
    ids=["bottleneck", "prompt"],
)
def test_unmergeable_adapters_are_refused_and_nothing_is_written(untied, tmp_path, capsys, config, match):
    adapter = write_adapter(untied, tmp_path / "adapter", config)
    assert _export(adapter, tmp_path / "out") == 2
    assert match in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_existing_output_is_refused_without_force(untied, tmp_path, capsys):
    adapter = write_adapter(untied, tmp_path / "adapter", dt.LoraConfig(r=2, target_modules=["q_proj"]))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert _export(adapter, tmp_path / "out") == 2
    assert "--force" in capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    assert _export(adapter, tmp_path / "out", "--force") == 0
    assert "keep.txt" not in os.listdir(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["adapter", "out"]  # no temporary folder left behind


def test_missing_base_model_asks_for_model(untied, tmp_path, capsys):
    adapter = write_adapter(untied, tmp_path / "adapter", dt.LoraConfig(r=2, target_modules=["q_proj"]))
    config = (adapter / "adapter_config.json").read_text().replace(str(untied), str(tmp_path / "gone"))
    (adapter / "adapter_config.json").write_text(config)
    assert _export(adapter, tmp_path / "out") == 2
    assert "gone" in capsys.readouterr().err
    assert _export(adapter, tmp_path / "out", "--model", str(untied)) == 0
