"""`deltatune serve` errors: OpenAI's error shape and status for each, each followed by a request that
still succeeds; a full queue; a client that disconnects; 1,000 malformed requests with bounded RSS."""
from __future__ import annotations

import http.client
import json
import threading
import time
from urllib.parse import urlparse

import pytest

from test_serve_support import make_model_and_adapters, metric, running_server

KEY = "s3cret"
MAX_LEN = 64


class Client:
    """One keep-alive HTTP connection (1,000 requests need no new socket each)."""

    def __init__(self, url: str, key: str | None = KEY) -> None:
        u = urlparse(url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        self.key = key

    def call(self, method: str, path: str, body=None, key: str | None = "default", raw: bytes | None = None):
        headers = {"Content-Type": "application/json"}
        key = self.key if key == "default" else key
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        self.conn.request(method, path, body=data, headers=headers)
        r = self.conn.getresponse()
        text = r.read().decode()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir, folders = make_model_and_adapters(tmp_path_factory.mktemp("serve_errors"), ("sql",))
    with running_server(model_dir, folders, api_key=KEY, max_queue=2, max_batch_size=4,
                        max_model_len=MAX_LEN) as (url, engine):
        yield url, engine


GOOD = {"model": "sql", "prompt": "hello", "max_tokens": 3, "temperature": 0}


def assert_error(status_body, status: int, *words: str) -> None:
    got, body = status_body
    assert got == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for w in words:
        assert w in error["message"], error["message"]


def assert_good(client: Client) -> None:
    status, body = client.call("POST", "/v1/completions", GOOD)
    assert status == 200 and body["usage"]["completion_tokens"] >= 1, body


@pytest.mark.parametrize("case", [
    ("no key", 401, "Bearer", dict(path="/v1/models", method="GET", key=None)),
    ("wrong key", 401, "API key", dict(path="/v1/completions", body=GOOD, key="nope")),
    ("unknown model", 404, "Available", dict(body={**GOOD, "model": "nope"})),
    ("malformed JSON", 400, "not valid JSON", dict(raw=b'{"model": "sql", "prompt": ')),
    ("not an object", 400, "JSON object", dict(raw=b"[1, 2]")),
    ("bad temperature", 400, "temperature", dict(body={**GOOD, "temperature": -1})),
    ("bad max_tokens", 400, "max_tokens", dict(body={**GOOD, "max_tokens": 0})),
    ("unknown field", 400, "unrecognized", dict(body={**GOOD, "frobnicate": 1})),
    ("n > 1", 400, "n=2", dict(body={**GOOD, "n": 2})),
    ("prompt too long", 400, f"{MAX_LEN} tokens", dict(body={**GOOD, "prompt": list(range(3, 3 + MAX_LEN + 1))})),
    ("completion too long", 400, f"{MAX_LEN} tokens", dict(body={**GOOD, "max_tokens": MAX_LEN})),
    ("chat logprobs", 400, "logprobs", dict(path="/v1/chat/completions",
                                             body={"model": "sql", "messages": [{"role": "user", "content": "x"}],
                                                   "logprobs": True})),
    ("empty messages", 400, "messages", dict(path="/v1/chat/completions", body={"model": "sql", "messages": []})),
    ("no such route", 404, "/v1/nothing", dict(path="/v1/nothing", method="GET")),
], ids=lambda c: c[0])
def test_error_then_good_request(server, case):
    url, _ = server
    _, status, words, call = case
    client = Client(url)
    kwargs = {"method": "POST", "path": "/v1/completions", **call}
    assert_error(client.call(kwargs.pop("method"), kwargs.pop("path"), **kwargs), status, words)
    assert_good(client)


def test_full_queue_is_429_and_the_queued_requests_finish(server):
    url, engine = server
    results = []

    def ask():
        results.append(Client(url).call("POST", "/v1/completions", GOOD))

    with engine.hold():  # the scheduler admits nothing: requests stay queued
        threads = [threading.Thread(target=ask) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while engine.metrics.get("deltatune_queue_length") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert_error(Client(url).call("POST", "/v1/completions", GOOD), 429, "--max-queue 2")
    for t in threads:
        t.join(30)
    assert [s for s, _ in results] == [200, 200]
    assert_good(Client(url))


def test_client_disconnect_cancels_its_sequence(server):
    url, engine = server
    before = engine.metrics.get("deltatune_requests_total", outcome="cancelled")
    u = urlparse(url)
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {**GOOD, "max_tokens": MAX_LEN // 2}
    waiting = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    with engine.hold():  # queued, not started: the handler sees its client leave while it waits
        waiting.request("POST", "/v1/completions", json.dumps(body), headers)
        time.sleep(0.1)
        waiting.sock.close()
        _wait_for(lambda: engine.metrics.get("deltatune_requests_total", outcome="cancelled") >= before + 1)
    streaming = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    streaming.request("POST", "/v1/completions", json.dumps({**body, "max_tokens": MAX_LEN - 8, "stream": True}), headers)
    reply = streaming.getresponse()
    # The first chunk is read before the hold: the headers come before any token, so a hold taken first
    # could pause the engine before it made one, and the read would wait forever (seen once in CI).
    assert reply.status == 200 and reply.read(6) == b"data: "
    with engine.hold():  # it is running (a chunk came) and cannot finish before the client leaves
        streaming.sock.close()
        reply.close()
        _wait_for(lambda: engine.metrics.get("deltatune_requests_total", outcome="cancelled") >= before + 2)
    assert_good(Client(url))


def _wait_for(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the disconnected request was not cancelled"
        time.sleep(0.02)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_1000_malformed_requests_neither_crash_nor_leak(server):
    url, engine = server
    client = Client(url)
    bad = [
        ("POST", "/v1/completions", dict(raw=b"{" * 50)),
        ("POST", "/v1/completions", dict(raw=b'{"model": "sql", "prompt": 5}')),
        ("POST", "/v1/chat/completions", dict(raw=b'{"model": "sql", "messages": [{"role": "robot"}]}')),
        ("POST", "/v1/completions", dict(raw=json.dumps({**GOOD, "top_p": 7}).encode())),
        ("POST", "/v1/completions", dict(raw=json.dumps({**GOOD, "model": "x" * 500}).encode())),
        ("POST", "/v1/load_lora_adapter", dict(raw=b'{"lora_name": ""}')),
        ("GET", "/v1/models", dict(key="wrong")),
        ("POST", "/v1/completions", dict(raw=b"\xff\xfe\x00garbage")),
    ]

    def burst(n: int) -> None:
        for i in range(n):
            method, path, kwargs = bad[i % len(bad)]
            status, _ = client.call(method, path, **kwargs)
            assert 400 <= status < 500

    burst(200)  # warm up: allocator pools, caches of the first requests
    start = _rss_kib()
    burst(1000)
    grown = _rss_kib() - start
    assert grown < 16 * 1024, f"RSS grew by {grown} KiB over 1,000 malformed requests"
    assert_good(client)
    text = Client(url).call("GET", "/metrics")[1]
    assert metric(text, "deltatune_requests_total", '{outcome="ok"}') >= 1
