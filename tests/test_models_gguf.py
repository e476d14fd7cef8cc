"""GGUF conversion on a tiny LLaMA GGUF written by the test, plus the cache and tokenizer fixes.

The tiny file reproduces what transformers 4.x got wrong for SmolLM2 (eos = <|im_start|>, a BOS
prepended, no chat template), so the registry's fixes are exercised without the 98 MB model.
"""
import json
import sys

import gguf
import numpy as np
import pytest
import torch
from support_data import tiny_tokenizer
from tolerances import assert_close

from deltatune.models import MODEL_REGISTRY, ModelSpec, load_model_and_tokenizer, model_config, resolve_model_path
from deltatune.models import gguf as gguf_mod
from deltatune.models.cache import MARKER, gguf_cache_name, read_marker

H, LAYERS, HEADS, KV, FFN = 32, 2, 4, 2, 64


def write_tiny_gguf(path):
    """A float32 LLaMA GGUF with the tiny BPE vocabulary and 4.x-style wrong special tokens."""
    state = json.loads(tiny_tokenizer().backend_tokenizer.to_str())["model"]
    tokens = sorted(state["vocab"], key=state["vocab"].get)
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(H // HEADS)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges([" ".join(m) for m in state["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(1)  # <|im_start|>: the wrong eos SmolLM2 got from transformers 4.x
    w.add_pad_token_id(2)
    w.add_add_bos_token(True)

    def rand(name, shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    rand("token_embd.weight", (len(tokens), H))
    w.add_tensor("output_norm.weight", np.ones(H, np.float32))
    kv_dim = KV * H // HEADS
    for i in range(LAYERS):
        for name, shape in [("attn_q", (H, H)), ("attn_k", (kv_dim, H)), ("attn_v", (kv_dim, H)),
                            ("attn_output", (H, H)), ("ffn_gate", (FFN, H)), ("ffn_up", (FFN, H)), ("ffn_down", (H, FFN))]:
            rand(f"blk.{i}.{name}.weight", shape)
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{name}.weight", np.ones(H, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


TINY_SPEC = ModelSpec(
    name="tiny-gguf-test", package="tiny_gguf_pkg", distribution="tiny-gguf-pkg", filename="tiny.gguf",
    description="test model", eos_token="<|im_end|>", pad_token="<|im_end|>", add_bos_token=False, chat_template="chatml",
)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A fake installed package holding tiny.gguf, registered as 'tiny-gguf-test', with a private cache."""
    root = tmp_path_factory.mktemp("site")
    pkg = root / "tiny_gguf_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('deltatune must find this package, never import it')\n")
    write_tiny_gguf(pkg / "tiny.gguf")
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(root))
    mp.setenv("DELTATUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.setitem(MODEL_REGISTRY, TINY_SPEC.name, TINY_SPEC)
    yield pkg / "tiny.gguf"
    mp.undo()
    sys.modules.pop("tiny_gguf_pkg", None)


@pytest.fixture(scope="module")
def converted(registered):
    model, tok = load_model_and_tokenizer(TINY_SPEC.name)
    return model, tok, resolve_model_path(TINY_SPEC.name)


def test_conversion_fixes_the_tokenizer(converted):
    _, tok, _ = converted
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert tok("hello world")["input_ids"][0] != tok.bos_token_id  # BOS no longer prepended
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                              add_generation_prompt=True)
    assert tok.model_max_length == 128


def test_converted_model_is_plain_trainable_and_matches_the_gguf_model(converted, registered):
    from transformers import AutoModelForCausalLM

    model, tok, folder = converted
    assert getattr(model, "hf_quantizer", None) is None and "quantization_config" not in model.config.to_dict()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert model.generation_config.eos_token_id == tok.eos_token_id
    reference = AutoModelForCausalLM.from_pretrained(str(registered.parent), gguf_file=registered.name)
    ids = torch.tensor([[5, 40, 77, 120, 9]])
    with torch.no_grad():
        assert_close(model(ids).logits, reference(ids).logits, scale=0)  # same tensors: bit-identical


def test_cached_folder_is_reused_and_stale_ones_are_redone(converted, monkeypatch):
    _, _, folder = converted
    assert read_marker(folder)["model_name"] == TINY_SPEC.name
    assert not list(folder.parent.glob(".*tmp-*"))  # no temporary folder left behind

    def fail(*args, **kwargs):
        raise AssertionError("converted again although the cache is current")

    monkeypatch.setattr(gguf_mod, "convert_gguf", fail)
    assert resolve_model_path(TINY_SPEC.name) == folder
    monkeypatch.setattr(gguf_mod, "CONVERSION_VERSION", gguf_mod.CONVERSION_VERSION + 1)
    with pytest.raises(AssertionError, match="converted again"):
        resolve_model_path(TINY_SPEC.name)


def test_unregistered_gguf_path_converts_into_a_hashed_folder(registered):
    name = gguf_cache_name(registered)
    config = model_config(registered)  # read from the file's metadata, nothing converted yet
    assert config.num_hidden_layers == LAYERS and not hasattr(config, "quantization_config")
    folder = resolve_model_path(registered)
    assert folder.name == name and (folder / MARKER).is_file() and read_marker(folder)["model_name"] is None
    assert model_config(registered).hidden_size == H


def test_model_config_of_a_converted_registered_model(converted):
    assert model_config(TINY_SPEC.name).num_attention_heads == HEADS


@pytest.mark.parametrize("damage", ["truncated", "crafted"])
def test_a_damaged_gguf_is_an_error_naming_the_file(damage, tmp_path, monkeypatch):
    from deltatune.cli.main import main

    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    good = tmp_path / "good.gguf"
    write_tiny_gguf(good)
    bad = tmp_path / "bad.gguf"
    if damage == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    else:  # a valid magic and version, then nonsense counts
        bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (2**40).to_bytes(8, "little") + b"\xff" * 16)
    for call in (model_config, load_model_and_tokenizer):
        with pytest.raises(ValueError, match="bad.gguf could not be read as a GGUF model"):
            call(str(bad))
    assert not any((tmp_path / "cache").rglob("*.safetensors")), "nothing half-converted is left"
    assert main(["inspect", str(bad)]) == 2
