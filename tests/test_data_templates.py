"""Rendering: the tokenizer's chat template split into trainable parts, and the built-in templates."""
import pytest
from support_data import tiny_tokenizer

from deltatune.data.templates import TemplateError, generation_prompt, render_segments, resolve_template

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao"},
]


def _example(messages):
    return {"messages": messages, "text": ""}


def test_tokenizer_template_segments_concatenate_to_the_full_render():
    tok = tiny_tokenizer()
    segs = render_segments(_example(CHAT), tok, "tokenizer")
    assert "".join(t for t, _ in segs) == tok.apply_chat_template(CHAT, tokenize=False)
    assert [t for t, trainable in segs if trainable] == ["Hello<|im_end|>\n", "Ciao<|im_end|>\n"]


def test_builtin_chatml_renders_the_same_text_as_the_chatml_chat_template():
    tok = tiny_tokenizer()
    builtin = render_segments(_example(CHAT), tok, "chatml")
    assert "".join(t for t, _ in builtin) == tok.apply_chat_template(CHAT, tokenize=False)
    assert [t for t, trainable in builtin if trainable] == ["Hello<|im_end|>", "Ciao<|im_end|>"]


def test_llama2_alpaca_and_plain_builtins():
    tok = tiny_tokenizer(chat_template=None)
    msgs = CHAT[:3]
    assert render_segments(_example(msgs), tok, "llama2") == [
        ("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]", False), (" Hello <|im_end|>", True),
    ]
    assert render_segments(_example(msgs), tok, "alpaca") == [
        ("Be brief.\n\n", False), ("### Instruction:\nHi\n\n### Response:\n", False), ("Hello<|im_end|>\n\n", True),
    ]
    assert render_segments(_example(msgs[1:]), tok, "plain") == [("Hi", False), ("Hello<|im_end|>", True)]


def test_text_rows_are_trained_in_full_and_end_in_eos():
    tok = tiny_tokenizer()
    assert render_segments({"messages": [], "text": "Doc."}, tok, "tokenizer") == [("Doc.<|im_end|>", True)]


def test_builtin_templates_add_bos_when_the_tokenizer_prepends_one():
    tok = tiny_tokenizer(chat_template=None)
    tok.add_bos_token = True
    segs = render_segments(_example(CHAT[1:3]), tok, "plain")
    assert segs[0] == ("<|im_start|>", False)


def test_resolve_template():
    assert resolve_template("auto", tiny_tokenizer()) == "tokenizer"
    assert resolve_template("auto", tiny_tokenizer(chat_template=None)) == "chatml"
    assert resolve_template("alpaca", tiny_tokenizer()) == "alpaca"
    with pytest.raises(TemplateError, match="has no chat template; pick a built-in one: chatml, llama2, alpaca, plain"):
        resolve_template("tokenizer", tiny_tokenizer(chat_template=None))
    with pytest.raises(TemplateError, match="Unknown template 'vicuna'"):
        resolve_template("vicuna", tiny_tokenizer())


def test_a_failing_chat_template_is_reported_with_the_roles():
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}" \
             "{{ m['content'] }}{% endfor %}"
    with pytest.raises(TemplateError, match=r"failed on roles \['system'.*no system role.*built-in template"):
        render_segments(_example(CHAT), tiny_tokenizer(chat_template=strict), "tokenizer")


def test_a_template_that_is_not_prefix_consistent_is_rejected():
    # Renders the last message differently from earlier ones, so a prefix render is no prefix.
    odd = "{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(TemplateError, match="prefix-consistently"):
        render_segments(_example(CHAT), tiny_tokenizer(chat_template=odd), "tokenizer")


@pytest.mark.parametrize("template", ["tokenizer", "chatml", "alpaca"])
def test_generation_prompt_is_the_text_before_the_answer(template):
    tok = tiny_tokenizer()
    prompt = generation_prompt(CHAT[:3], tok, template)
    full = "".join(t for t, _ in render_segments(_example(CHAT[:3]), tok, template))
    assert full.startswith(prompt) and full[len(prompt):].startswith("Hello")
