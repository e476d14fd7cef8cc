"""Damaged or refused weight files are errors that name the file, in every command that reads adapters."""
import pytest
import torch

from deltatune import LoraConfig, get_peft_model
from deltatune.cli.main import main
from deltatune.models import load_model_and_tokenizer
from support_train import tiny_run_files  # noqa: F401


class _Evil:
    def __reduce__(self):  # what a malicious checkpoint does: run code when unpickled
        return (print, ("this must never run",))


@pytest.fixture
def adapter(tiny_run_files, tmp_path):
    model, _ = load_model_and_tokenizer(tiny_run_files["model"])
    folder = tmp_path / "adapter"
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(folder)
    return folder


def _damage(folder, how):
    st = folder / "adapter_model.safetensors"
    if how == "truncated":
        st.write_bytes(st.read_bytes()[:200])
    else:  # a pickle with code in place of the weights
        st.unlink()
        torch.save({"w": _Evil()}, folder / "adapter_model.bin")
    return "cannot be read as a safetensors file" if how == "truncated" else "unpickling those can run arbitrary code"


@pytest.mark.parametrize("how", ["truncated", "malicious"])
def test_every_command_names_the_damaged_file(how, adapter, tiny_run_files, tmp_path, capsys):
    expected = _damage(adapter, how)
    model, data = str(tiny_run_files["model"]), str(tiny_run_files["data"])
    commands = {
        "inspect": ["inspect", "--adapter", str(adapter), model],
        "eval": ["eval", "--adapter", str(adapter), f"model={model}", f"data.source={data}", "data.eval_size=4",
                 "eval.accuracy=false", "--max-examples", "4"],
        "generate": ["generate", "--adapter", str(adapter), "--model", model, "--greedy", "--max-new-tokens", "2", "hi"],
        "export": ["export", "--adapter", str(adapter), "--model", model, "--out", str(tmp_path / "exported")],
        "merge": ["merge", str(adapter), str(adapter), "--method", "linear", "--model", model,
                  "--out", str(tmp_path / "merged")],
    }
    for name, argv in commands.items():
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and expected in err and "adapter_model" in err, (name, code, err[-500:])
        assert "Traceback" not in err and "this must never run" not in err
    assert not (tmp_path / "exported").exists() and not (tmp_path / "merged").exists()


@pytest.mark.parametrize("out", [".", ".."])
def test_export_refuses_to_replace_the_current_folder_or_a_parent(out, adapter, tiny_run_files, tmp_path, monkeypatch,
                                                                  capsys):
    work = tmp_path / "work" / "inner"
    work.mkdir(parents=True)
    (work / "precious.txt").write_text("mine")
    monkeypatch.chdir(work)
    argv = ["export", "--adapter", str(adapter), "--model", str(tiny_run_files["model"]), "--out", out, "--force"]
    assert main(argv) == 2
    assert "current folder" in capsys.readouterr().err
    assert (work / "precious.txt").read_text() == "mine"
