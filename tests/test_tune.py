"""deltatune tune: search-space parsing, real short trials with pruning, and resuming a killed study."""
from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deltatune.tune.space import parse_space, to_layer
from support_tune import write_tune_file

optuna = pytest.importorskip("optuna")
TESTS = Path(__file__).parent


def test_space_parsing_and_mapping_onto_train_config_keys():
    space = parse_space({"r": {"choices": [4, 8]}, "alpha_over_r": {"choices": [2]},
                         "lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
                         "train.weight_decay": 0.01, "targets": {"choices": ["qv"]}})
    assert [p.type for p in space] == ["categorical", "categorical", "float", "fixed", "categorical"]
    layer = to_layer({"r": 8, "alpha_over_r": 2, "lr": 3e-4, "train.weight_decay": 0.01, "targets": "qv"}, {},
                     resolve_targets=lambda preset: ["q_proj", "v_proj"])
    assert layer == {"method": {"r": 8, "lora_alpha": 16.0, "target_modules": ["q_proj", "v_proj"]},
                     "train": {"lr": 3e-4, "weight_decay": 0.01}}
    for bad, match in [({"rank": {"choices": [1]}}, "unknown parameter"), ({"lr": {"type": "float", "low": 0,
                       "high": 1, "log": True}}, "positive"), ({"r": {"choices": []}}, "non-empty"), ({}, "search")]:
        with pytest.raises(ValueError, match=match):
            parse_space(bad)


def test_missing_optuna_names_the_extra(monkeypatch, tmp_path, capsys):
    from deltatune.cli.main import main

    monkeypatch.setitem(sys.modules, "optuna", None)
    assert main(["tune", str(tmp_path / "t.yaml"), "--trials", "1"]) == 2
    assert "deltatune[tune]" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory):
    from support_data import write_jsonl
    from support_train import save_tiny_model, topic_rows

    root = tmp_path_factory.mktemp("tune")
    base = {"model": str(save_tiny_model(root / "model")),
            "method": {"name": "lora", "r": 4},
            "data": {"source": str(write_jsonl(root / "train.jsonl", topic_rows(30))), "eval_size": 6},
            "train": {"max_steps": 4, "eval_steps": 2, "batch_size": 4, "logging_steps": 2, "progress_bar": False,
                      "tensorboard": False, "plot": False},
            "eval": {"accuracy": False}}
    search = {"r": {"choices": [2, 4]}, "alpha_over_r": {"choices": [1, 2]},
              "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
              "dropout": {"type": "float", "low": 0.0, "high": 0.1}, "targets": {"choices": ["qv", "attention"]}}
    return root, write_tune_file(root / "tune.yaml", base, search, {"pruner": "none"})


def test_real_trials_complete_then_a_forced_prune_is_recorded(tiny_job, capsys):
    """Short real training runs: the first completes (best.yaml, history.png); resumed with a pruner
    that must prune, the second stops at its first evaluation and is stored as pruned."""
    import dataclasses

    from deltatune.train.config import load_train_config
    from deltatune.tune import load_tune_file, run_study

    root, path = tiny_job
    job = load_tune_file(path)
    first = run_study(job, 1, root / "out", study_name="tiny")
    trial = first.study.trials[0]
    assert trial.state.name == "COMPLETE" and sorted(trial.intermediate_values) == [2, 4]
    best = load_train_config(first.best_config)
    assert best.method.options["r"] == trial.params["r"] and best.train.lr == pytest.approx(trial.params["lr"], rel=1e-5)
    assert first.history_png.stat().st_size > 1000

    job.settings = dataclasses.replace(job.settings, pruner="threshold", prune_above=0.0)
    second = run_study(job, 2, root / "out", study_name="tiny")
    states = [t.state.name for t in second.study.trials]
    assert states == ["COMPLETE", "PRUNED"] and second.ran == 1
    assert list(second.study.trials[1].intermediate_values) == [2]  # pruned at the first evaluation
    out = capsys.readouterr().out
    assert "1 trial(s) finished, running 1 more" in out and "pruned" in out and "<- best" in out


def _any_finished(db: Path, name: str) -> bool:
    """Whether the running child has finished a trial, read without writing: opening the file through
    optuna's storage would create its tables and stamp their version, racing the child doing the same
    (a CI run's child died of "UNIQUE constraint failed: alembic_version")."""
    if not db.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as con:
            row = con.execute("SELECT COUNT(*) FROM trials JOIN studies USING (study_id) "
                              "WHERE studies.study_name = ? AND trials.state = 'COMPLETE'", (name,)).fetchone()
    except sqlite3.Error:  # no tables yet, or the child holds a write lock
        return False
    return row[0] > 0


def _finished(db: Path, name: str) -> list:
    if not db.is_file():
        return []
    try:
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    except Exception:  # the child has not created the study (or its tables) yet
        return []
    return [t for t in study.trials if t.state.name == "COMPLETE"]


def test_killed_study_resumes_without_repeating_finished_trials(tmp_path):
    path = write_tune_file(tmp_path / "quick.yaml", {"method": {"name": "lora", "r": 8}},
                           {"r": {"choices": [4, 8, 16]}, "lr": {"type": "float", "low": 1e-4, "high": 1e-2,
                                                                 "log": True}},
                           {"pruner": "none", "runner": "support_tune:quick_runner"})
    out, db = tmp_path / "out", tmp_path / "out" / "study.db"
    cmd = [sys.executable, "-m", "deltatune.cli.main", "tune", str(path), "--trials", "4", "--output-dir", str(out),
           "--study", "quick"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               TUNE_TEST_SLEEP="0.5")
    log = tmp_path / "first-run.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        start = time.time()
        while time.time() < start + 120 and not _any_finished(db, "quick") and proc.poll() is None:
            time.sleep(0.2)
        waited, exited = time.time() - start, proc.poll()
        time.sleep(0.6)  # into the second trial
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = {t.number: (t.params, t.value) for t in _finished(db, "quick")}
    assert 1 <= len(before) < 4, (
        f"{len(before)} finished trials after {waited:.1f} s (child exit code before the kill: {exited}); "
        f"its output ends:\n{log.read_text()[-3000:]}"
    )

    env["TUNE_TEST_SLEEP"] = "0"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="quick", storage=f"sqlite:///{db}")
    complete = {t.number: (t.params, t.value) for t in study.trials if t.state.name == "COMPLETE"}
    assert len(complete) == 4
    assert all(complete[n] == before[n] for n in before)  # nothing that had finished was run again
    interrupted = [t for t in study.trials if t.user_attrs.get("interrupted")]
    assert len(interrupted) <= 1 and len(study.trials) == 4 + len(interrupted)
    for t in interrupted:  # a trial cut off mid-run is marked failed and its parameters are retried
        assert t.state.name == "FAIL" and any(c[0] == t.params for c in complete.values())
    assert f"{len(before)} trial(s) finished, running {4 - len(before)} more" in done.stdout
    assert (out / "best.yaml").is_file() and (out / "history.png").is_file()
