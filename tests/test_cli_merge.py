"""``deltatune merge``: a new adapter folder, equal to add_weighted_adapter in memory, written atomically."""
import os
import warnings

import peft
import pytest
import torch

import deltatune as dt
from deltatune.cli.merge import adapter_names
from deltatune.cli.main import main
from deltatune.models import load_model_and_tokenizer
from support_cli_export import ids, write_adapter, write_model
from tolerances import assert_close


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    model = write_model(root / "model")
    a = write_adapter(model, root / "a", dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), seed=1)
    b = write_adapter(model, root / "b", dt.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"]), seed=2)
    c = write_adapter(model, root / "c", dt.LoraConfig(r=2, target_modules=["k_proj"]), seed=3)
    return model, a, b, c


def _in_memory(model_folder, adapters, weights, **kw):
    """The same combination done through the Python API."""
    model, _ = load_model_and_tokenizer(model_folder)
    pm = dt.PeftModel.from_pretrained(model, adapters[0], adapter_name="x0")
    for i, folder in enumerate(adapters[1:], 1):
        pm.load_adapter(folder, f"x{i}")
    pm.add_weighted_adapter([f"x{i}" for i in range(len(adapters))], weights, "new", **kw)
    pm.set_adapter("new")
    with torch.no_grad():
        return pm(ids()).logits


def _loaded_logits(model_folder, adapter):
    model, _ = load_model_and_tokenizer(model_folder)
    with torch.no_grad():
        return dt.PeftModel.from_pretrained(model, adapter)(ids()).logits


def test_ties_merge_writes_what_the_api_computes_and_peft_loads_it(setup, tmp_path):
    model, a, b, _ = setup
    out = tmp_path / "merged"
    argv = ["merge", str(a), str(b), "--weights", "0.7", "0.3", "--method", "ties", "--density", "0.5", "--out", str(out)]
    assert main(argv) == 0
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    expected = _in_memory(model, [a, b], [0.7, 0.3], combination_type="ties", density=0.5)
    assert_close(_loaded_logits(model, out), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(load_model_and_tokenizer(model)[0], out).eval()
    with torch.no_grad():
        assert_close(theirs(ids()).logits, expected)


def test_svd_merge_of_mixed_ranks_with_svd_rank(setup, tmp_path, capsys):
    model, a, _, c = setup
    out = tmp_path / "merged"
    assert main(["merge", str(a), str(c), "--method", "svd", "--svd-rank", "3", "--out", str(out)]) == 0
    assert "rank 3" in capsys.readouterr().out
    config = dt.LoraConfig.from_pretrained(str(out))
    assert (config.r, config.lora_alpha) == (3, 3)
    expected = _in_memory(model, [a, c], [0.5, 0.5], combination_type="svd", svd_rank=3)  # default 1/n weights
    assert_close(_loaded_logits(model, out), expected)


def test_seeded_dare_is_reproducible(setup, tmp_path):
    _, a, b, _ = setup
    files = []
    for name in ("one", "two"):
        argv = ["merge", str(a), str(b), "--method", "dare_ties", "--density", "0.5", "--seed", "0", "--out",
                str(tmp_path / name)]
        assert main(argv) == 0
        files.append((tmp_path / name / "adapter_model.safetensors").read_bytes())
    assert files[0] == files[1]


def test_failure_leaves_nothing_behind(setup, tmp_path, capsys):
    _, a, _, c = setup
    out = tmp_path / "merged"
    assert main(["merge", str(a), str(c), "--method", "linear", "--out", str(out)]) == 2
    assert "equal rank" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_existing_output_needs_force(setup, tmp_path, capsys):
    _, a, b, _ = setup
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["merge", str(a), str(b), "--method", "cat", "--out", str(out)]
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err and os.listdir(out) == ["keep.txt"]
    assert main(argv + ["--force"]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert os.listdir(tmp_path) == ["merged"]


def test_bad_arguments_are_explained(setup, tmp_path, capsys):
    model, a, b, _ = setup
    out = str(tmp_path / "merged")
    assert main(["merge", str(a), str(b), "--weights", "1", "--out", out]) == 2
    assert "one weight per adapter" in capsys.readouterr().err
    ia3 = write_adapter(model, tmp_path / "ia3", dt.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    assert main(["merge", str(a), str(ia3), "--out", out]) == 2
    assert "IA3 adapter; only LoRA and rsLoRA" in capsys.readouterr().err
    assert main(["merge", str(a), str(tmp_path / "nothing"), "--out", out]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_model_overrides_and_is_needed_when_the_adapters_disagree(setup, tmp_path, capsys):
    model, a, b, _ = setup
    moved = tmp_path / "b"
    moved.mkdir()
    for f in os.listdir(b):
        (moved / f).write_bytes((b / f).read_bytes())
    cfg = (moved / "adapter_config.json").read_text().replace(str(model), "elsewhere/model")
    (moved / "adapter_config.json").write_text(cfg)
    argv = ["merge", str(a), str(moved), "--method", "cat", "--out", str(tmp_path / "m")]
    assert main(argv) == 2
    assert "pass --model" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'trained on elsewhere/model'
        assert main(argv + ["--model", str(model)]) == 0


def test_adapter_names_are_distinct_and_never_default():
    assert adapter_names(["x/default", "y/a.b", "z/a.b", "a_b"]) == ["default_in", "a_b", "a_b_2", "a_b_3"]


def test_a_failed_write_removes_the_temporary_folder(setup, tmp_path, monkeypatch, capsys):
    _, a, b, _ = setup

    def broken_save(self, folder, **_):
        (folder / "adapter_config.json").write_text("{}")  # half-written
        raise ValueError("disk full")

    monkeypatch.setattr(dt.PeftModel, "save_pretrained", broken_save)
    assert main(["merge", str(a), str(b), "--method", "cat", "--out", str(tmp_path / "merged")]) == 2
    assert "disk full" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
