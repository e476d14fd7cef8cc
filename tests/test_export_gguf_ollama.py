"""The Ollama Modelfile: its Go TEMPLATE, rendered here by a small interpreter of the Go-template subset it
uses, must produce exactly what the tokenizer's Jinja chat template produces, for ChatML (with and without
a default system prompt, as SmolLM2 has) and LLaMA-3 templates; anything else is refused."""
from __future__ import annotations

import re

import pytest
from support_data import tiny_tokenizer
from test_export_gguf import write_base

import deltatune as dt
from deltatune.export.gguf_lora import export_gguf_lora
from deltatune.export.gguf_merged import export_gguf_merged
from deltatune.export.ollama import modelfile
from support_cli_export import write_adapter, write_model

LLAMA3 = (  # Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SMOLLM2 = (  # the chat template in SmolLM2-135M-Instruct.Q4_1.gguf (tokenizer.chat_template): a default system prompt
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou "
    "are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ALPACA = "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}### Response:\n"
CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}],
]


def go_render(template: str, messages: list[dict]) -> str:
    """Ollama's Go template engine for the subset a translated TEMPLATE uses: ``{{ range .Messages }}``,
    ``{{ end }}``, ``{{ .Role }}``, ``{{ .Content }}`` and the ``{{-``/``-}}`` whitespace trims."""
    pieces = re.split(r"({{-?\s*.*?\s*-?}})", template)
    for i, p in enumerate(pieces):  # trims act on the neighbouring text, as in text/template
        if p.startswith("{{-") and i > 0:
            pieces[i - 1] = pieces[i - 1].rstrip()
        if p.endswith("-}}") and i + 1 < len(pieces):
            pieces[i + 1] = pieces[i + 1].lstrip()

    def run(start: int, scope: dict | None) -> tuple[str, int]:
        out, i = "", start
        while i < len(pieces):
            p = pieces[i]
            action = p.strip("{}-").strip() if p.startswith("{{") else None
            if action is None:
                out += p
            elif action == "end":
                return out, i
            elif action == "range .Messages":
                end = i
                for m in messages:
                    body, end = run(i + 1, m)
                    out += body
                i = end if messages else run(i + 1, {"Role": "", "Content": ""})[1]
            elif action in (".Role", ".Content"):
                out += scope[action[1:]]
            else:
                raise AssertionError(f"the interpreter does not know {{{{ {action} }}}}")
            i += 1
        return out, i

    return run(0, None)[0]


def ollama_prompt(text: str, messages: list[dict]) -> str:
    """What Ollama renders from a Modelfile for a chat request: SYSTEM is prepended when the request's
    first message is not a system message (server/routes.go, ChatHandler), then TEMPLATE runs."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system.group(1)}] + messages
    return go_render(template, [{"Role": m["role"], "Content": m["content"]} for m in messages])


@pytest.mark.parametrize("template,bos,stops", [
    ("chatml", None, ["<|im_end|>"]),
    ("smollm2", None, ["<|im_end|>"]),
    ("llama3", "<|begin_of_text|>", ["<|eot_id|>"]),
])
def test_template_renders_like_the_chat_template(tmp_path, template, bos, stops):
    tokenizer = tiny_tokenizer({"chatml": tiny_tokenizer().chat_template, "smollm2": SMOLLM2, "llama3": LLAMA3}[template])
    if bos:
        tokenizer.bos_token = bos
    text = modelfile(tmp_path / "m.gguf", tokenizer)
    assert text.startswith(f"FROM {(tmp_path / 'm.gguf').resolve()}\n") and "ADAPTER" not in text
    for stop in stops:
        assert f'PARAMETER stop "{stop}"' in text
    assert ("SYSTEM" in text) == (template == "smollm2")  # SmolLM2's template has a default system prompt
    for messages in CONVERSATIONS:
        jinja = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ollama_prompt(text, messages) == jinja.removeprefix(bos or ""), messages


def test_the_interpreter_sees_a_wrong_template():
    good = '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n'
    text = f'FROM x\nTEMPLATE """{good}"""\n'
    assert ollama_prompt(text, CONVERSATIONS[0]) == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert ollama_prompt(text.replace("<|im_end|>\n{{ end }}", "<|im_end|>{{- end }}"), CONVERSATIONS[0]) != (
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")


def test_an_untranslatable_template_is_refused(tmp_path):
    with pytest.raises(ValueError, match="neither ChatML nor LLaMA-3.*by hand"):
        modelfile(tmp_path / "m.gguf", tiny_tokenizer(ALPACA))
    with pytest.raises(ValueError, match="no chat template"):
        modelfile(tmp_path / "m.gguf", tiny_tokenizer(None))


def test_exports_write_the_modelfile_next_to_the_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    base = write_base(tmp_path / "base.gguf")
    adapter = write_adapter(base, tmp_path / "adapter", dt.LoraConfig(r=2, target_modules=["q_proj"]))
    result = export_gguf_lora(adapter, tmp_path / "out" / "lora.gguf", model=str(base), ollama=True)
    text = result["modelfile"].read_text()
    assert result["modelfile"] == tmp_path / "out" / "lora.Modelfile"
    assert f"FROM {base.resolve()}\nADAPTER {(tmp_path / 'out' / 'lora.gguf').resolve()}\n" in text
    result = export_gguf_merged(adapter, tmp_path / "out" / "merged.gguf", model=str(base), quant="f16", ollama=True)
    assert result["modelfile"].read_text().startswith(f"FROM {(tmp_path / 'out' / 'merged.gguf').resolve()}\nTEMPLATE")
    folder = write_model(tmp_path / "hf")  # a transformers-folder base has no GGUF for Ollama's FROM
    folder_adapter = write_adapter(folder, tmp_path / "a2", dt.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="ADAPTER needs the base model as a GGUF file.*--merged"):
        export_gguf_lora(folder_adapter, tmp_path / "x.gguf", ollama=True)
