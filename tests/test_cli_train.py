"""``deltatune train`` end to end on a tiny LLaMA, in-process: outputs, resume, Ctrl-C, NaN, data errors."""
import json
import signal

import pytest
import torch
from transformers import TrainerCallback

import deltatune.train.loading as run_module  # where the run loads the model
import deltatune.train.trainer as fused_trainer
from deltatune.cli.main import main
from deltatune.model import PeftModel
from deltatune.train.session import TrainingSession
from support_train import base_args, logged_losses, tiny_run_files, write_jsonl  # noqa: F401
from tolerances import assert_close


def add_callback(monkeypatch, callback):
    """Make the next run's Trainer also call ``callback``."""
    original = TrainingSession.build_trainer

    def build(self, model):
        trainer, *rest = original(self, model)
        trainer.add_callback(callback)
        return (trainer, *rest)

    monkeypatch.setattr(TrainingSession, "build_trainer", build)


@pytest.fixture(scope="module")
def full_run(tiny_run_files, tmp_path_factory):
    """One uninterrupted 6-step run with every output switched on (shared by several tests)."""
    out = tmp_path_factory.mktemp("full") / "run"
    args = base_args(tiny_run_files, out, "eval.accuracy=true", "train.plot=true", "train.tensorboard=true",
                     "train.eval_steps=3", "train.save_steps=3", "train.save_total_limit=null")
    assert main(args) == 0
    return out


def test_run_writes_adapter_config_metrics_plot_and_tensorboard(full_run, tiny_run_files):
    names = {p.name for p in full_run.iterdir()}
    assert {"adapter", "config.yaml", "metrics.json", "loss.png", "tensorboard", "checkpoint-3", "checkpoint-6"} <= names
    assert any((full_run / "tensorboard").iterdir())
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert {"zero_shot", "final", "train", "timings"} <= set(metrics)
    assert metrics["final"]["scoring"] == "first_token" and metrics["final"]["total"] == 6
    assert len(metrics["train"]["train_loss"]) == 6 and len(metrics["train"]["eval_loss"]) == 2
    assert metrics["train"]["tokens_per_s"] > 0
    from deltatune.train.precision import choose_precision

    assert metrics["bf16"] is choose_precision("auto").bf16  # train.bf16=auto: what this machine supports
    # Checkpoints hold the adapter, not the base model's weights.
    ckpt = full_run / "checkpoint-3"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()


def test_saved_adapter_reloads_and_checkpoint_is_a_loadable_adapter(full_run, tiny_run_files):
    from deltatune.models import load_model_and_tokenizer

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    outs = []
    for folder in (full_run / "adapter", full_run / "checkpoint-6"):
        base, _ = load_model_and_tokenizer(tiny_run_files["model"])
        model = PeftModel.from_pretrained(base, folder)
        with torch.no_grad():
            outs.append(model(input_ids=ids).logits)
    assert_close(outs[0], outs[1])
    with torch.no_grad(), model.disable_adapter():
        assert not torch.allclose(model(input_ids=ids).logits, outs[0])  # training changed something


def test_fresh_run_refuses_a_used_output_dir(full_run, tiny_run_files, capsys):
    assert main(base_args(tiny_run_files, full_run)) == 2
    assert "--resume" in capsys.readouterr().err


class _SigintAt(TrainerCallback):
    """Sends this process a real SIGINT at the start of step ``step``."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            signal.raise_signal(signal.SIGINT)


class _KeyboardInterruptAt(TrainerCallback):
    """Raises KeyboardInterrupt after step ``step`` (a hard stop between steps)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("interrupt, saved", [(_SigintAt(4), 4), (_KeyboardInterruptAt(3), 3)],
                         ids=["sigint", "keyboard-interrupt"])
def test_interrupt_saves_a_checkpoint_and_resume_matches_the_uninterrupted_run(
    interrupt, saved, full_run, tiny_run_files, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    args = base_args(tiny_run_files, out, "train.save_steps=0")
    with monkeypatch.context() as m:
        add_callback(m, interrupt)
        assert main(args) == 130
    assert (out / f"checkpoint-{saved}").is_dir() and not (out / "adapter").exists()
    assert json.loads((out / "metrics.json").read_text())["status"] == "interrupted"
    assert main(["train", "--resume", f"output_dir={out}"]) == 0
    reference, resumed = logged_losses(full_run), logged_losses(out)
    # A hard stop inside on_step_end comes before that step's loss is logged; later steps are all there.
    assert set(range(1, saved)) | set(range(saved + 1, 7)) <= set(resumed)
    for step in range(saved + 1, 7):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_run_files, tmp_path, monkeypatch,
                                                                             capsys):
    _poison_loss_at(monkeypatch, 5)
    out = tmp_path / "run"
    assert main(base_args(tiny_run_files, out, "train.save_steps=2")) == 1
    err = capsys.readouterr().err
    assert "nan at step 5" in err and "checkpoint-4" in err
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-6").exists() and not (out / "adapter").exists()
    assert json.loads((out / "metrics.json").read_text())["status"] == "stopped: non-finite loss"


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(run_module, "load_model_and_tokenizer", refuse)


@pytest.mark.parametrize("case", ["missing_file", "missing_column", "empty", "template", "no_label"])
def test_data_errors_are_reported_before_the_model_is_loaded(case, tiny_run_files, tmp_path, no_model_load, capsys):
    from support_train import save_tiny_model

    data, extra, expected = tmp_path / "data.jsonl", [], None
    if case == "missing_file":
        data, expected = tmp_path / "nope.jsonl", "nope.jsonl"
    elif case == "missing_column":
        write_jsonl(data, [{"question": "q", "answer": "a"}] * 8)
        expected = "column"
    elif case == "empty":
        data.write_text("")
        expected = "empty"
    elif case == "template":
        write_jsonl(data, [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 8)
        model = save_tiny_model(tmp_path / "no_template", chat_template=False)
        extra, expected = [f"model={model}", "data.template=tokenizer"], "chat template"
    else:
        write_jsonl(data, [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 8)
        extra, expected = ["eval.accuracy=true", "data.eval_size=2"], "label"
    args = base_args(tiny_run_files, tmp_path / "out", f"data.source={data}", *extra)
    if case != "no_label":
        args.remove("data.eval_size=6")
        args.append("data.eval_size=0")
    assert main(args) == 2
    assert expected in capsys.readouterr().err.lower()


def test_resume_without_output_dir_picks_the_newest_run(tmp_path, monkeypatch):
    import os
    import time

    from deltatune.cli.train import resolve_config, split_args
    from deltatune.train.config import load_train_config

    monkeypatch.chdir(tmp_path)
    for i, name in enumerate(["old", "new"]):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(load_train_config(None, [f"train.lr={i + 1}e-4"]).to_yaml())
        os.utime(run, (time.time() - 100 + 50 * i,) * 2)
    config = resolve_config(None, ["train.max_steps=7"], resume=True)
    assert config.output_dir == "runs/new" and config.train.lr == pytest.approx(2e-4) and config.train.max_steps == 7
    assert split_args(["a.yaml", "train.lr=1"]) == ("a.yaml", ["train.lr=1"])
    with pytest.raises(ValueError, match="at most one config file"):
        split_args(["a.yaml", "b.yaml"])


class _LrRecorder(TrainerCallback):
    """{step: (optimizer lr, schedule factor at that step)} as each step begins."""

    def __init__(self):
        self.seen = {}

    def on_step_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        factor = lr_scheduler.lr_lambdas[0](state.global_step)
        self.seen[state.global_step + 1] = (optimizer.param_groups[0]["lr"], factor, lr_scheduler.base_lrs[0])


def test_resume_applies_a_changed_learning_rate_and_says_so(tiny_run_files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        add_callback(m, _KeyboardInterruptAt(3))
        assert main(base_args(tiny_run_files, out, "train.save_steps=0")) == 130
    recorder = _LrRecorder()
    with monkeypatch.context() as m:
        add_callback(m, recorder)
        assert main(["train", "--resume", f"output_dir={out}", "train.lr=7e-4"]) == 0
    printed = capsys.readouterr()
    assert "resume: learning rate" in printed.out + printed.err and "-> 0.0007" in printed.out + printed.err
    steps = sorted(recorder.seen)
    assert steps[0] == 4 and steps[-1] == 6
    for step in steps:
        lr, factor, base = recorder.seen[step]
        assert base == 7e-4 and lr == pytest.approx(7e-4 * factor, rel=1e-6), step


# ---- checks before anything is loaded or written (issue 15, items 7, 12 and 17) -----------------------
@pytest.mark.parametrize("typo, hint", [("method.target_modules=[q_proj,v_prj]", "'v_proj'"),
                                        ("train.optim=adamw_torh", "'adamw_torch'")], ids=["target", "optim"])
def test_a_typo_is_caught_before_loading_and_leaves_nothing_that_blocks_the_fix(
    typo, hint, tiny_run_files, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(run_module, "load_model_and_tokenizer", _refuse_model_load)
        assert main(base_args(tiny_run_files, out, typo)) == 2
    err = capsys.readouterr().err
    assert hint in err and typo.split("=")[0] in err
    assert not out.exists() or not any(out.iterdir())
    fixed = typo.replace("v_prj", "v_proj").replace("adamw_torh", "adamw_torch")
    assert main(base_args(tiny_run_files, out, fixed)) == 0  # no --overwrite needed


@pytest.mark.parametrize("case", ["under_a_file", "read_only"])
def test_an_unwritable_output_dir_is_refused_naming_the_path(case, tiny_run_files, tmp_path, no_model_load,
                                                              monkeypatch, capsys):
    import os

    if case == "under_a_file":
        blocker = tmp_path / "notes.txt"
        blocker.write_text("a file, not a folder")
        out, expected = blocker / "run", "is a file"
    else:
        blocker = tmp_path / "locked"
        blocker.mkdir()
        blocker.chmod(0o555)
        out, expected = blocker / "run", "not writable"
        real_access = os.access
        # Root may write into a 0555 folder; answer as the access check would for any other user.
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
            False if str(path) == str(blocker) and mode & os.W_OK else real_access(path, mode, **kw)))
    assert main(base_args(tiny_run_files, out)) == 2
    err = capsys.readouterr().err
    assert str(blocker) in err and expected in err and "Traceback" not in err
    assert not out.exists()


def _refuse_model_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the config was checked")


def _poison_loss_at(monkeypatch, step):
    """Make the training loss NaN at optimizer step ``step`` (one micro-batch per step)."""
    calls, real = {"n": 0}, fused_trainer.causal_lm_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, n = real(*args, **kwargs)
        return (loss * float("nan"), n) if calls["n"] == step else (loss, n)

    monkeypatch.setattr(fused_trainer, "causal_lm_loss", poisoned)


@pytest.fixture
def old_run(full_run, tmp_path):
    """A private copy of the completed ``full_run`` (adapter, checkpoint-3 and -6, loss.png, tensorboard)."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    return out


def _assert_is_the_old_run(out, config_text):
    assert (out / "config.yaml").read_text() == config_text
    assert json.loads((out / "metrics.json").read_text())["status"] == "completed"
    assert {"adapter", "checkpoint-3", "checkpoint-6", "loss.png", "tensorboard"} <= {p.name for p in out.iterdir()}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # nothing set aside is left over


def test_overwrite_keeps_the_old_run_when_the_new_one_fails_before_its_first_checkpoint(
    old_run, tiny_run_files, monkeypatch, capsys
):
    config_text = (old_run / "config.yaml").read_text()
    with monkeypatch.context() as m:
        m.setattr(run_module, "load_model_and_tokenizer", _refuse_model_load)
        assert main(["train", "--overwrite", *base_args(tiny_run_files, old_run, "method.target_modules=[qq]")[1:]]) == 2
    _assert_is_the_old_run(old_run, config_text)
    with monkeypatch.context() as m:
        _poison_loss_at(m, 1)
        assert main(["train", "--overwrite", *base_args(tiny_run_files, old_run, "train.save_steps=2")[1:]]) == 1
    printed = capsys.readouterr()
    assert "restored" in printed.out + printed.err
    _assert_is_the_old_run(old_run, config_text)


def test_overwrite_replaces_the_old_run_once_the_new_one_has_a_checkpoint(old_run, tiny_run_files, monkeypatch):
    with monkeypatch.context() as m:
        _poison_loss_at(m, 5)  # after checkpoint-4: the new run is worth keeping, the old one goes
        assert main(["train", "--overwrite", *base_args(tiny_run_files, old_run, "train.save_steps=2")[1:]]) == 1
    names = {p.name for p in old_run.iterdir()}
    assert "checkpoint-4" in names and not names & {"checkpoint-3", "checkpoint-6", "adapter", "loss.png", "tensorboard"}
    assert json.loads((old_run / "metrics.json").read_text())["status"] == "stopped: non-finite loss"
    assert not [n for n in names if n.startswith(".")]
    assert main(["train", "--overwrite", *base_args(tiny_run_files, old_run, "train.save_steps=0")[1:]]) == 0
    names = {p.name for p in old_run.iterdir()}
    assert {"adapter", "config.yaml", "metrics.json"} <= names and not [n for n in names if "checkpoint-" in n]


class _CrashAt(TrainerCallback):
    """Raises a RuntimeError at the end of step ``step`` (a bug or a lost device, not a NaN)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("device lost")


@pytest.mark.parametrize("step", [1, 3])
def test_a_crash_leaves_nothing_before_the_first_checkpoint_and_a_failed_run_after(step, tiny_run_files, tmp_path,
                                                                                  monkeypatch):
    out = tmp_path / "run"
    add_callback(monkeypatch, _CrashAt(step))
    with pytest.raises(RuntimeError, match="device lost"):
        main(base_args(tiny_run_files, out, "train.save_steps=2"))
    if step == 1:  # nothing to resume: the folder is gone, so the same command can simply be run again
        assert not out.exists()
    else:
        assert (out / "checkpoint-2").is_dir()
        assert json.loads((out / "metrics.json").read_text())["status"] == "failed: RuntimeError: device lost"


@pytest.fixture(scope="module")
def interrupted_run(tiny_run_files, tmp_path_factory):
    """A run stopped after step 5 with checkpoint-2, -4 and -5 (the last written at the interruption)."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.MonkeyPatch.context() as m:
        add_callback(m, _KeyboardInterruptAt(5))
        assert main(base_args(tiny_run_files, out, "train.save_steps=2", "train.save_total_limit=null")) == 130
    assert {"checkpoint-2", "checkpoint-4", "checkpoint-5"} <= {p.name for p in out.iterdir()}
    return out


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_resume_falls_back_from_a_corrupt_newest_checkpoint_and_says_so(
    damaged, interrupted_run, full_run, tmp_path, capsys
):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(interrupted_run, out)
    file = out / "checkpoint-5" / damaged
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # a save cut short
    assert main(["train", "--resume", f"output_dir={out}"]) == 0
    printed = capsys.readouterr()
    said = printed.out + printed.err
    assert "checkpoint-5" in said and damaged in said and "resuming from" in said and "checkpoint-4" in said
    reference, resumed = logged_losses(full_run), logged_losses(out)
    for step in (5, 6):  # recomputed from checkpoint-4, as in the uninterrupted run
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step


def test_resume_with_every_checkpoint_corrupt_names_them(interrupted_run, tmp_path, no_model_load, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(interrupted_run, out)
    for folder in out.glob("checkpoint-*"):
        (folder / "trainer_state.json").write_text("{not json")
    assert main(["train", "--resume", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert all(f"checkpoint-{n}" in err for n in (2, 4, 5)) and "trainer_state.json" in err


def test_an_overwrite_killed_before_its_first_checkpoint_keeps_the_previous_run(tmp_path):
    from deltatune.train import outputs

    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    (out / "config.yaml").write_text("old")
    (out / "metrics.json").write_text("{}")
    outputs.set_aside(out, ["adapter", "config.yaml"])  # killed halfway through setting the old run aside,
    (out / "config.yaml").write_text("killed")  # or after the killed run wrote its own config
    assert outputs.run_contents(out)  # a plain run is still refused; --overwrite merges what is set aside
    outputs.set_aside(out, outputs.run_outputs(out))
    assert outputs.restore_aside(out, []) and (out / "config.yaml").read_text() == "old"
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "config.yaml", "metrics.json"]


class _ExplodeAt(TrainerCallback):
    """Multiplies the trainable weights by 1e30 after step ``step``: finite, but diverged."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.mul_(1e30)


def test_after_a_nan_stop_the_last_good_checkpoint_has_sane_weights_and_is_the_one_resumed(
    tiny_run_files, tmp_path, monkeypatch, capsys
):
    from deltatune.train import outputs

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        add_callback(m, _ExplodeAt(4))  # checkpoint-4 is written from the exploded weights
        _poison_loss_at(m, 5)
        assert main(base_args(tiny_run_files, out, "train.save_steps=2")) == 1
    err = capsys.readouterr().err
    assert "The last good checkpoint is" in err and "checkpoint-2 (" in err.split("The last good checkpoint is")[1]
    assert "checkpoint-4 (its adapter weights reach" in err and "corrupt-checkpoint-4" in err
    assert outputs.resume_plan(out).checkpoint.name == "checkpoint-2"


def test_a_run_whose_loss_does_not_go_down_completes_with_a_warning(tiny_run_files, tmp_path, capsys):
    out = tmp_path / "run"
    # On this tiny model a huge learning rate ends in a NaN stop (tested above); a vanishing one flat-lines.
    assert main(base_args(tiny_run_files, out, "train.lr=1e-9", "train.max_steps=8")) == 0
    printed = capsys.readouterr()
    warnings = json.loads((out / "metrics.json").read_text())["train"]["warnings"]
    assert any("did not go down" in w and "train.lr=1e-09" in w for w in warnings), warnings
    assert "warning:" in printed.out + printed.err
