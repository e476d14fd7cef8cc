"""`deltatune serve` adapters: load / unload over HTTP while requests run, --adapter-root, refused folders,
LRU eviction with --max-adapters 2 and 4 adapters, and a failing request that fails alone."""
from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from test_serve_errors import Client, assert_error
from test_serve_support import make_model_and_adapters, metric, reference, running_server

PROMPTS = ["What is LoRA?", "hello there", "Summarise the article", "a b c"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_adapters")
    model_dir, folders = make_model_and_adapters(root)  # sql, chat, tone (DoRA), news (IA³)
    refs = {(n, p): reference(model_dir, folders[n], p, 8) for n in folders for p in PROMPTS[:2]}
    return root, model_dir, folders, refs


def complete(client: Client, model: str, prompt: str, n: int = 8):
    return client.call("POST", "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0})


def test_load_and_unload_while_requests_run(made):
    root, model_dir, folders, refs = made
    with running_server(model_dir, {"sql": folders["sql"]}, adapter_root=str(root / "adapters")) as (url, engine):
        client = Client(url, key=None)
        with ThreadPoolExecutor(8) as pool:
            busy = [pool.submit(complete, Client(url, key=None), "sql", PROMPTS[i % 2], 30) for i in range(8)]
            status, text = client.call("POST", "/v1/load_lora_adapter", {"lora_name": "chat", "lora_path": "chat"})
            assert status == 200 and "chat" in text
            status, body = complete(client, "chat", PROMPTS[0])
            assert status == 200 and body["choices"][0]["text"] == refs[("chat", PROMPTS[0])]
            status, _ = client.call("POST", "/v1/unload_lora_adapter", {"lora_name": "sql"})
            assert status == 200
            assert_error(complete(client, "sql", PROMPTS[0]), 404, "Available", "chat")
            answers = [f.result() for f in busy]  # admitted before the unload: they finish on their adapter
        long_refs = {p: reference(model_dir, folders["sql"], p, 30) for p in PROMPTS[:2]}
        for i, (status, body) in enumerate(answers):
            assert status == 200 and body["choices"][0]["text"] == long_refs[PROMPTS[i % 2]]
        ids = [m["id"] for m in client.call("GET", "/v1/models")[1]["data"]]
        assert ids == [str(model_dir), "chat"]
        assert engine.bank.registered == ["chat"]  # sql left the bank once its requests were done
        # the same name may be loaded again, from another folder
        assert client.call("POST", "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(folders["news"])})[0] == 200
        assert complete(client, "sql", PROMPTS[1])[1]["choices"][0]["text"] == refs[("news", PROMPTS[1])]


def test_load_refuses_paths_outside_the_root_and_corrupt_folders(made, tmp_path):
    root, model_dir, folders, refs = made
    corrupt = root / "adapters" / "corrupt"
    shutil.copytree(folders["tone"], corrupt, dirs_exist_ok=True)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    outside = tmp_path / "elsewhere"
    shutil.copytree(folders["chat"], outside)
    with running_server(model_dir, {"sql": folders["sql"]}, adapter_root=str(root / "adapters")) as (url, engine):
        client = Client(url, key=None)
        for path in (str(outside), "../../elsewhere", "/etc"):
            assert_error(client.call("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path}),
                         403, "outside --adapter-root")
            assert complete(client, "sql", PROMPTS[0])[1]["choices"][0]["text"] == refs[("sql", PROMPTS[0])]
        assert_error(client.call("POST", "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": "corrupt"}),
                     400, "could not load adapter 'bad'", "nothing was loaded")
        assert_error(client.call("POST", "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": "missing"}),
                     400, "could not load adapter 'bad'")
        assert_error(client.call("POST", "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": "chat"}),
                     400, "already loaded")
        assert_error(client.call("POST", "/v1/unload_lora_adapter", {"lora_name": "nope"}), 404, "'nope'")
        assert [m["id"] for m in client.call("GET", "/v1/models")[1]["data"]] == [str(model_dir), "sql"]
        assert_error(complete(client, "bad", PROMPTS[0]), 404, "Available")
        assert complete(client, "sql", PROMPTS[1])[1]["choices"][0]["text"] == refs[("sql", PROMPTS[1])]
    with running_server(model_dir, {"sql": folders["sql"]}) as (url, engine):  # no --adapter-root: loading is off
        assert_error(Client(url, key=None).call("POST", "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "chat"}),
                     403, "--adapter-root")


def test_eviction_with_max_adapters_2_and_4_adapters(made):
    root, model_dir, folders, refs = made
    with running_server(model_dir, folders, max_adapters=2) as (url, engine):
        jobs = [(name, PROMPTS[i % 2]) for i in range(3) for name in ("sql", "chat", "tone", "news")]

        def ask(job):
            return complete(Client(url, key=None), *job)

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(ask, jobs))
        for (name, prompt), (status, body) in zip(jobs, answers):
            assert status == 200 and body["choices"][0]["text"] == refs[(name, prompt)], name
        assert len(engine.bank.resident) <= 2
        text = Client(url, key=None).call("GET", "/metrics")[1]
        assert metric(text, "deltatune_evictions_total") >= 2
        assert metric(text, "deltatune_adapter_loads_total") >= 4


def test_a_failing_request_fails_alone(made, tmp_path):
    """An evicted adapter whose folder has gone cannot be reloaded: its request gets a 500, the rest are served."""
    root, model_dir, folders, refs = made
    doomed = tmp_path / "doomed"
    shutil.copytree(folders["news"], doomed)
    with running_server(model_dir, {"doomed": doomed, "sql": folders["sql"], "chat": folders["chat"]},
                        max_adapters=1) as (url, engine):
        client = Client(url, key=None)
        assert complete(client, "doomed", PROMPTS[0])[0] == 200
        assert complete(client, "sql", PROMPTS[0])[0] == 200  # evicts "doomed"
        shutil.rmtree(doomed)
        jobs = ["chat", "doomed", "sql", "doomed", "chat"]
        with ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(lambda n: complete(Client(url, key=None), n, PROMPTS[1]), jobs))
        for name, (status, body) in zip(jobs, answers):
            if name == "doomed":
                assert status == 500 and "generation failed" in body["error"]["message"]
            else:
                assert status == 200 and body["choices"][0]["text"] == refs[(name, PROMPTS[1])]
        assert complete(client, "chat", PROMPTS[0])[1]["choices"][0]["text"] == refs[("chat", PROMPTS[0])]
