"""`deltatune serve` end to end on the real SmolLM2-135M-Instruct: chat through its template, with an adapter
and the base model in one batch, each greedy answer equal to ``deltatune generate``'s (the adapter alone).

Slow: converts / loads the real model (cached after the first run) and decodes 3 x 16 tokens on the CPU.
The adapter is a random LoRA, not a trained one: what is checked is the serving path, not the adapter.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import deltatune as dt
from deltatune.cli.generate import SamplingOptions, build_prompt, generate_text
from deltatune.models import DEFAULT_MODEL, load_model_and_tokenizer
from test_serve_support import running_server
from tiny import perturb

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the real model gains from them (conftest sets 1 for the tiny ones)
    yield
    torch.set_num_threads(before)


def test_smollm2_chat_with_an_adapter_and_the_base_in_one_batch(tmp_path, two_threads):
    base, tok = load_model_and_tokenizer(DEFAULT_MODEL)
    adapter = tmp_path / "adapter"
    peft = perturb(dt.get_peft_model(base, dt.LoraConfig(r=8, target_modules="all-linear",
                                                         init_lora_weights=False)), std=0.1)
    peft.save_pretrained(adapter)
    refs = {}
    for name, path in (("qa", adapter), (DEFAULT_MODEL, None)):
        model, _ = load_model_and_tokenizer(DEFAULT_MODEL)
        model = dt.PeftModel.from_pretrained(model, path) if path else model
        with torch.no_grad():
            refs[name], _ = generate_text(model.eval(), tok, build_prompt(tok, QUESTION),
                                          SamplingOptions(max_new_tokens=16, greedy=True))
    assert refs["qa"] != refs[DEFAULT_MODEL]  # the adapter changes the answer, so a mix-up would show
    with running_server(DEFAULT_MODEL, {"qa": adapter}) as (url, engine):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)

        def ask(name):
            reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": QUESTION}],
                                                   max_tokens=16, temperature=0)
            return reply.choices[0].message.content

        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(ask, ["qa", DEFAULT_MODEL, "qa"]))
        assert answers == [refs["qa"], refs[DEFAULT_MODEL], refs["qa"]]
