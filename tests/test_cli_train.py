"""``deltatune train`` end to end on a tiny LLaMA, in-process: outputs, resume, Ctrl-C, NaN, data errors."""
import json
import signal

import pytest
import torch
from transformers import TrainerCallback

import deltatune.train.run as run_module
import deltatune.train.trainer as fused_trainer
from deltatune.cli.main import main
from deltatune.model import PeftModel
from deltatune.train.session import TrainingSession
from test_train_support import base_args, logged_losses, tiny_run_files, write_jsonl  # noqa: F401
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
    calls = {"n": 0}
    real = fused_trainer.causal_lm_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, n = real(*args, **kwargs)
        return (loss * float("nan"), n) if calls["n"] == 5 else (loss, n)

    monkeypatch.setattr(fused_trainer, "causal_lm_loss", poisoned)
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
    from test_train_support import save_tiny_model

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
