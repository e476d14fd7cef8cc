"""End to end on the real SmolLM2-135M-Instruct: convert once into a private cache, then check it.

Slow (~40 s on two CPU cores: ~20 s to convert, ~15 s to load the GGUF again as the reference).
"""
import pytest
import torch

from deltatune.data import DataConfig, prepare_datasets
from deltatune.models import DEFAULT_MODEL, MODEL_REGISTRY, load_model_and_tokenizer, model_config, resolve_model_path
from deltatune.models.cache import read_marker
from deltatune.models.tokenizer import prepends_bos

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DELTATUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
    model, tok = load_model_and_tokenizer(DEFAULT_MODEL)
    yield model, tok
    mp.undo()


def test_tokenizer_ends_turns_with_im_end_and_adds_no_bos(smollm2):
    _, tok = smollm2
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and tok.eos_token_id == 2
    assert not prepends_bos(tok)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_converted_model_is_tied_plain_and_equal_to_the_gguf_model(smollm2):
    from transformers import AutoModelForCausalLM

    model, tok = smollm2
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert getattr(model, "hf_quantizer", None) is None
    path = MODEL_REGISTRY[DEFAULT_MODEL].gguf_path()
    assert read_marker(resolve_model_path(DEFAULT_MODEL))["source_file"] == path.name
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)  # same dequantized tensors, same math


def test_greedy_answer_is_sensible_and_stops_at_im_end(smollm2):
    model, tok = smollm2
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    reply = tok.decode(out[0, prompt["input_ids"].shape[1]:])
    assert "Paris" in reply and reply.endswith("<|im_end|>")


def test_gradients_flow_into_the_converted_weights(smollm2):
    model, tok = smollm2
    ids = tok("Hello world, this is a test.", return_tensors="pt")["input_ids"]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_reload_uses_the_cache_and_config_needs_no_weights(smollm2):
    model, _ = smollm2
    again, _ = load_model_and_tokenizer(DEFAULT_MODEL)
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
    cfg = model_config(DEFAULT_MODEL)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.tie_word_embeddings) == (576, 30, 49152, True)


def test_bbc_examples_fit_the_budget_with_the_real_tokenizer(smollm2):
    _, tok = smollm2
    data = prepare_datasets(DataConfig(eval_size=100, max_train_examples=200), tok)
    assert data.train_stats.truncated == 0 and data.train_stats.dropped == 0
    assert data.train_stats.longest <= 112 + 64
    row = data.eval[0]
    answer = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    assert tok.decode(answer) == f"{row['label']}<|im_end|>\n"
