"""`deltatune serve` through the real ``openai`` client: models, completions, chat, streaming, and
continuous batching over 3 adapters + the base model, each answer equal to that adapter alone."""
from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from test_serve_support import metric, reference, running_server

openai = pytest.importorskip("openai")

SERVED = ("sql", "chat", "tone")
PROMPTS = ["What is LoRA?", "hello there", "a", "Summarise this article about the markets in one line please"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from test_serve_support import make_model_and_adapters

    model_dir, folders = make_model_and_adapters(tmp_path_factory.mktemp("serve_api"), SERVED)
    with running_server(model_dir, folders, max_batch_size=32) as (url, engine):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        yield url, client, model_dir, folders


def scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics") as r:
        return r.read().decode()


def test_models_list_names_base_and_adapters(server):
    url, client, model_dir, _ = server
    ids = [m.id for m in client.models.list().data]
    assert ids == [str(model_dir), "chat", "sql", "tone"]


def test_completion_and_chat_equal_generate_and_stream_equals_whole(server):
    _, client, model_dir, folders = server
    whole = client.completions.create(model="sql", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert whole.choices[0].text == reference(model_dir, folders["sql"], PROMPTS[0], 12)
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(client.completions.create(model="sql", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[1]}]
    chat = client.chat.completions.create(model="chat", messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    plain = client.chat.completions.create(model="chat", messages=messages[1:], max_tokens=10, temperature=0)
    assert plain.choices[0].message.content == reference(model_dir, folders["chat"], PROMPTS[1], 10, chat=True)
    stream = client.chat.completions.create(model="chat", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    parts = list(stream)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == chat.choices[0].message.content
    assert parts[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_base_model_by_its_name(server):
    _, client, model_dir, _ = server
    out = client.completions.create(model=str(model_dir), prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert out.choices[0].text == reference(model_dir, None, PROMPTS[1], 8)


def test_16_concurrent_requests_over_3_adapters_and_base_run_in_mixed_batches(server):
    url, client, model_dir, folders = server
    before = metric(scrape(url), "deltatune_mixed_adapter_steps_total")
    names = [str(model_dir), *SERVED]
    jobs = [(names[(5 * i) % 4], PROMPTS[(3 * i) % 4], 6 + i % 5) for i in range(16)]  # mixed order and lengths

    def ask(job):
        name, prompt, n = job
        return client.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    refs = {}
    for (name, prompt, n), answer in zip(jobs, answers):
        key = (name, prompt, n)
        if key not in refs:
            refs[key] = reference(model_dir, folders.get(name), prompt, n)
        assert answer == refs[key], f"{name} on {prompt!r}"
    text = scrape(url)
    assert metric(text, "deltatune_mixed_adapter_steps_total") > before  # rows of different adapters, one forward
    assert metric(text, "deltatune_batch_size_max") >= 4


def test_sampling_seed_stop_and_logprobs(server):
    _, client, _, _ = server
    ask = dict(model="tone", prompt=PROMPTS[3], max_tokens=12, temperature=0.9, top_p=0.9)
    a = client.completions.create(seed=7, **ask).choices[0].text
    assert client.completions.create(seed=7, **ask).choices[0].text == a  # own generator per request
    greedy = client.completions.create(model="tone", prompt=PROMPTS[3], max_tokens=12, temperature=0, logprobs=3)
    text, lp = greedy.choices[0].text, greedy.choices[0].logprobs
    assert len(lp.token_logprobs) == greedy.usage.completion_tokens
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(chosen)  # greedy took the most likely
    stop = text[3:5]
    assert stop.strip("\ufffd")
    cut = client.completions.create(model="tone", prompt=PROMPTS[3], max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tone", prompt=PROMPTS[3], max_tokens=12, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def test_health_and_metrics_text(server):
    url, *_ = server
    with urllib.request.urlopen(url + "/health") as r:
        assert r.status == 200
    text = scrape(url)
    assert "# TYPE deltatune_requests_total counter" in text
    assert metric(text, "deltatune_adapters_loaded") == 3
    assert metric(text, "deltatune_requests_total", '{outcome="ok"}') >= 1
    for name in ("deltatune_queue_length", "deltatune_batch_size", "deltatune_evictions_total",
                 "deltatune_generation_tokens_total", "deltatune_prompt_tokens_total"):
        metric(text, name)
    request = urllib.request.Request(url + "/v1/models")
    with urllib.request.urlopen(request) as r:
        assert json.loads(r.read())["object"] == "list"
