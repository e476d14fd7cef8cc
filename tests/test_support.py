"""Tests of the test-support helpers themselves (tests/support_*.py, which pytest does not collect)."""
import deltatune as dt
from support_cli_export import write_adapter, write_model
from support_cli_generate import write_tiny_model
from support_data import tiny_tokenizer
from support_train import tiny_run_files  # noqa: F401 (a fixture)
from support_tune import quick_runner


def test_adapter_records_its_base_folder(tmp_path):
    folder = write_model(tmp_path / "m")
    adapter = write_adapter(folder, tmp_path / "a", dt.LoraConfig(r=2, target_modules=["q_proj"]))
    assert dt.LoraConfig.from_pretrained(str(adapter)).base_model_name_or_path == str(folder)


def test_tiny_model_folder_loads_like_a_real_model(tmp_path):
    from deltatune.models import load_model_and_tokenizer

    folder = write_tiny_model(tmp_path / "tiny")
    model, tok = load_model_and_tokenizer(folder)
    assert model.config.vocab_size == len(tok) and tok.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tok.eos_token_id


def test_tiny_tokenizer_round_trips_text_and_keeps_specials_whole():
    tok = tiny_tokenizer()
    text = "<|im_start|>user\nHello, how are you?<|im_end|>\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert tok("hi")["input_ids"][0] != tok.bos_token_id  # no BOS prepended


def test_tiny_tokenizer_renders_chatml():
    tok = tiny_tokenizer()
    out = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert out == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_model_folder_loads_with_the_deltatune_loader(tiny_run_files):
    from deltatune.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_run_files["model"])
    assert model.config.vocab_size == len(tok) and tok.chat_template


def test_quick_runner_reports_every_step():
    seen = []
    value = quick_runner({"train": {"lr": 1e-3}, "method": {"r": 4}}, lambda step, v: seen.append(step))
    assert seen == [1, 2, 3] and value == 0.25
