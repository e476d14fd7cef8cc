"""``deltatune train`` with QLoRA reads the base through the streaming loader (quant.load_quantized): the same
model as quantizing the whole loaded one, without ever holding the full-precision weights; a folder the
loader cannot stream (``.bin`` weights) and LoftQ (which needs the dense weights) load whole as before."""
import shutil

import torch
from support_train import tiny_run_files  # noqa: F401  (fixture)

from deltatune.models import load_model_and_tokenizer
from deltatune.quant import QuantConfig, quantize_model
from deltatune.train.config import load_train_config
from deltatune.train.loading import load_model


def _config(files, tmp_path, model, *extra):
    return load_train_config(None, [
        "method.name=qlora", f"model={model}", f"data.source={files['data']}", f"output_dir={tmp_path / 'run'}",
        *extra,
    ])


def test_qlora_streams_the_base_and_builds_the_model_quantizing_it_whole_would(tiny_run_files, tmp_path):
    lines = []
    model = load_model(_config(tiny_run_files, tmp_path, tiny_run_files["model"]), log=lines.append)
    assert any("one tensor at a time" in line for line in lines), lines
    whole, tokenizer = load_model_and_tokenizer(tiny_run_files["model"])
    quantize_model(whole, QuantConfig())
    got, want = model.state_dict(), whole.state_dict()
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    # load_model_and_tokenizer's token ids reach the streamed model too
    assert model.config.pad_token_id == whole.config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == whole.generation_config.eos_token_id


def test_a_folder_without_safetensors_loads_whole(tiny_run_files, tmp_path):
    folder = tmp_path / "bin_model"
    shutil.copytree(tiny_run_files["model"], folder)
    whole, _ = load_model_and_tokenizer(folder)
    (folder / "model.safetensors").unlink()
    torch.save(whole.state_dict(), folder / "pytorch_model.bin")  # transformers 5 writes only safetensors
    lines = []
    model = load_model(_config(tiny_run_files, tmp_path, folder), log=lines.append)
    assert any("quantized the linear layers" in line for line in lines), lines
    assert not any("one tensor at a time" in line for line in lines)
    quantize_model(whole, QuantConfig())
    assert all(torch.equal(v, whole.state_dict()[k]) for k, v in model.state_dict().items())
