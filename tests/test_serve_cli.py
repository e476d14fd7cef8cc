"""`deltatune serve` on the command line: lazy imports, the missing-extra message, flag checks, and a real
process that announces its URL, answers, and drains an in-flight request on SIGTERM."""
from __future__ import annotations

import ast
import contextlib
import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from deltatune.cli.main import main
from test_serve_support import make_model_and_adapters

SRC = os.path.join(os.path.dirname(__file__), "..", "src")
PACKAGE = Path(SRC) / "deltatune"
SERVER_STACK = ("fastapi", "uvicorn", "starlette", "pydantic", "openai")


def _module_level_imports(path: Path) -> set[str]:
    """Top-level package names a module imports when it is imported (not inside functions)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_import_and_help_never_load_the_server_stack():
    """Read from the source (a fresh interpreter would spend seconds importing torch to say the same): only
    serve/ imports the server stack, app.py and runner.py only inside functions, and nothing imports
    serve/ but its own modules (the CLI names its entry point as a string)."""
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        text = path.read_text()
        imported = _module_level_imports(path)
        if not rel.startswith("serve/"):
            assert not re.search(r"^\s*(from|import) (fastapi|uvicorn|starlette)\b", text, re.M), rel
            assert "deltatune.serve." not in text.replace('"deltatune.serve.runner"', ""), rel
        else:  # pydantic (fastapi's own dependency) defines the request bodies in protocol.py
            assert not imported & (set(SERVER_STACK) - {"pydantic"}), f"{rel} imports the server stack at load time"
            assert "pydantic" not in imported or rel == "serve/protocol.py", rel
    assert _module_level_imports(PACKAGE / "cli" / "serve.py") == {"__future__", "argparse", "importlib"}
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
        main(["serve", "--help"])
    assert "--max-adapters" in out.getvalue() and "NAME=DIR" in out.getvalue()


def test_missing_extra_names_the_install_command(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["serve", str(tmp_path)]) == 2
    assert "pip install 'deltatune[serve]'" in capsys.readouterr().err


@pytest.mark.parametrize("flags, words", [
    (["--max-batch-size", "0"], "--max-batch-size 0"),
    (["--max-adapters", "-1"], "--max-adapters -1"),
    (["--port", "70000"], "--port 70000"),
    (["--adapter", "a=x", "--adapter", "a=y"], "unique"),
    (["--adapter-root", "/no/such/folder"], "--adapter-root"),
])
def test_bad_flags_are_reported_before_loading_anything(flags, words, capsys, tmp_path):
    assert main(["serve", str(tmp_path / "not-loaded"), *flags]) == 2
    assert words in capsys.readouterr().err


def test_adapter_flag_needs_name_equals_dir(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "m", "--adapter", "no-equals-sign"])
    assert "expected NAME=DIR" in capsys.readouterr().err


def test_stopping_drains_in_flight_requests(tmp_path):
    """What Ctrl-C / SIGTERM do (uvicorn's signal handler sets ``should_exit``, as ``ServerThread.stop`` does)."""
    from deltatune.serve.runner import ServeOptions, ServerThread, build

    model_dir, folders = make_model_and_adapters(tmp_path, ("sql",))
    app, engine = build(ServeOptions(str(model_dir), adapters=(("sql", str(folders["sql"])),), port=0, dtype="float32"))
    server = ServerThread(app)
    port = int(server.start().rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = {"model": "sql", "prompt": "hello", "max_tokens": 60, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200 and reply.read(6) == b"data: "  # in flight
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    rest = reply.read().decode()
    stopper.join(30)
    assert rest.endswith("data: [DONE]\n\n") and '"finish_reason": "length"' in rest
    assert not server.thread.is_alive() and not engine._thread.is_alive()
    with pytest.raises(ConnectionRefusedError):
        http.client.HTTPConnection("127.0.0.1", port, timeout=5).request("GET", "/health")


def test_bfloat16_serves_in_bfloat16(tmp_path):
    """bf16 weights (not autocast: the banks take the model's dtype) through mixed batches. Answers are not compared:
    in bf16 a batch's padding and shape move logits by a rounding step, enough to flip a random model's argmax."""
    from concurrent.futures import ThreadPoolExecutor

    from test_serve_errors import Client
    from test_serve_support import running_server

    model_dir, folders = make_model_and_adapters(tmp_path, ("sql", "chat"))
    with running_server(model_dir, folders, dtype="bfloat16") as (url, engine):
        assert engine.model.dtype == torch.bfloat16
        body = {"prompt": "hello", "max_tokens": 6, "temperature": 0}
        with ThreadPoolExecutor(4) as pool:
            mixed = list(pool.map(lambda n: Client(url, None).call("POST", "/v1/completions", {**body, "model": n})[1],
                                  ["sql", "chat", "sql", "chat"]))
        for answer in mixed:
            assert 1 <= answer["usage"]["completion_tokens"] <= 6 and answer["choices"][0]["finish_reason"] in ("length", "stop")
        total = sum(a["usage"]["completion_tokens"] for a in mixed)
        assert engine.metrics.get("deltatune_generation_tokens_total") == total


# A real process imports torch, transformers and FastAPI afresh: 6 s on a quiet machine, 25 s on a busy one.
@pytest.mark.slow
def test_the_command_serves_and_drains_on_sigterm(tmp_path):
    model_dir, folders = make_model_and_adapters(tmp_path, ("sql",))
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(
        [sys.executable, "-m", "deltatune.cli.main", "serve", str(model_dir), "--adapter", f"sql={folders['sql']}",
         "--port", "0", "--dtype", "float32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        match = re.search(r"ready at http://127\.0\.0\.1:(\d+)/v1 serving (.*) \(", line)
        assert match, line + proc.stderr.read() if proc.poll() is not None else line
        assert match.group(2) == f"{model_dir}, sql"
        conn = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=60)
        body = {"model": "sql", "prompt": "hello", "max_tokens": 40, "temperature": 0, "stream": True}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        reply = conn.getresponse()
        assert reply.status == 200 and reply.read(6) == b"data: "  # in flight
        proc.send_signal(signal.SIGTERM)
        rest = reply.read().decode()  # the server finishes it before exiting
        assert rest.endswith("data: [DONE]\n\n") and '"finish_reason": "length"' in rest
        # uvicorn re-raises the signal once it has shut down, so the exit status is the conventional SIGTERM one
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
