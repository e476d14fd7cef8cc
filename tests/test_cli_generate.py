"""`deltatune generate`: chat template, sampling options, streaming, adapters; on a tiny offline model."""
import io

import pytest
import torch

import deltatune as dt
from deltatune.cli.generate import SamplingOptions, build_prompt, generate_text, load_for_generation
from deltatune.cli.main import main
from support_cli_generate import write_tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("gen") / "tiny")


@pytest.fixture(scope="module")
def adapter(tiny_folder, tmp_path_factory):
    """A LoRA adapter with random (non-zero) factors, so it changes the outputs."""
    from deltatune.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(tiny_folder)
    torch.manual_seed(0)
    config = dt.LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    folder = tmp_path_factory.mktemp("gen") / "adapter"
    dt.get_peft_model(model, config).save_pretrained(folder)
    return folder


def _reference(folder, adapter, prompt, n):
    model, tok = load_for_generation(str(folder), str(adapter) if adapter else None, device="cpu")
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_sampling_options_validate_and_map_to_generate_kwargs():
    assert SamplingOptions(greedy=True).generate_kwargs()["do_sample"] is False
    assert SamplingOptions(temperature=0).generate_kwargs()["do_sample"] is False
    sample = SamplingOptions(temperature=0.5, top_p=0.8, top_k=0).generate_kwargs()
    assert sample == {"max_new_tokens": 128, "do_sample": True, "temperature": 0.5, "top_p": 0.8, "top_k": None}
    for bad in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-1)):
        with pytest.raises(ValueError, match="expected"):
            SamplingOptions(**bad)


def test_build_prompt_applies_the_chat_template_unless_raw():
    from support_data import tiny_tokenizer

    tok = tiny_tokenizer()
    assert build_prompt(tok, "Hi", system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert build_prompt(tok, "Hi", raw=True) == "Hi"
    assert build_prompt(tiny_tokenizer(chat_template=None), "Hi") == "Hi"


@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "adapter"])
def test_cli_greedy_output_equals_generate_and_streams_the_same_text(tiny_folder, adapter, with_adapter, capsys):
    extra = ["--adapter", str(adapter)] if with_adapter else []
    args = ["generate", "--model", str(tiny_folder), *extra, "--greedy", "--max-new-tokens", "6", "Hello there"]
    assert main([*args, "--no-stream"]) == 0
    whole = capsys.readouterr()
    assert main(args) == 0
    streamed = capsys.readouterr()
    expected = _reference(tiny_folder, adapter if with_adapter else None, "Hello there", 6)
    assert whole.out == expected + "\n" and streamed.out == expected + "\n"  # TextStreamer ends with a newline
    assert "tokens/s]" in whole.err


def test_the_adapter_changes_the_reply_and_its_base_model_is_the_default(tiny_folder, adapter, capsys):
    base = _reference(tiny_folder, None, "Tell me a story", 8)
    tuned = _reference(tiny_folder, adapter, "Tell me a story", 8)
    assert base != tuned
    # No --model: the adapter names its base model folder, which exists, so that is what loads.
    assert main(["generate", "--adapter", str(adapter), "--greedy", "--max-new-tokens", "8", "--no-stream",
                 "Tell me a story"]) == 0
    assert capsys.readouterr().out == tuned + "\n"


def test_seeded_sampling_is_reproducible_and_stdin_works(tiny_folder, capsys, monkeypatch):
    args = ["generate", "--model", str(tiny_folder), "--temperature", "1.5", "--seed", "3", "--max-new-tokens", "12",
            "--no-stream"]
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi from stdin"))
    assert main([*args, "-"]) == 0
    first = capsys.readouterr().out
    assert main([*args, "Hi from stdin"]) == 0
    assert capsys.readouterr().out == first


def test_errors_are_for_people(tiny_folder, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_folder), "   "]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["generate", "--adapter", str(tmp_path), "Hi"]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_folder), "--top-p", "2", "Hi"]) == 2
    assert "--top-p 2.0: expected a probability" in capsys.readouterr().err


def test_generate_text_counts_new_tokens(tiny_folder):
    model, tok = load_for_generation(str(tiny_folder), None, device="cpu")
    reply, n = generate_text(model, tok, build_prompt(tok, "Hi"), SamplingOptions(greedy=True, max_new_tokens=4))
    assert 1 <= n <= 4 and isinstance(reply, str)


def test_dtype_auto_loads_bf16_weights_where_bf16_is_native(monkeypatch):
    from deltatune.cli import generate
    from deltatune.train import precision

    asked = []
    monkeypatch.setattr(generate, "load_model_and_tokenizer",
                        lambda name, dtype, device: asked.append(dtype) or (torch.nn.Linear(2, 2), None))
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(precision, "_cpu_bf16_feature", lambda: "avx512_bf16" if native else None)
        generate.load_for_generation("some-model", None, "auto", "cpu")
        assert asked[-1] == expected
