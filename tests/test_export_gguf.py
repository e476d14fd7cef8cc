"""GGUF export checked by the programs that read GGUF: transformers' GGUF loader and a real llama.cpp.

The tiny model is LLaMA-shaped (2 layers, hidden 64, 4 heads, 2 KV heads, tied embeddings like SmolLM2)
with random weights and the tests' tiny byte-level BPE tokenizer (320 tokens, ChatML), which llama.cpp
accepts and tokenizes exactly as transformers does. Its base GGUF is written by our merged path from a
transformers model (:func:`write_model_gguf`, tokenizer metadata built from tokenizer.json); deltatune
then loads that GGUF as a base like any user's .gguf, and the merged exports copy its metadata. The
adapters get random non-zero weights. Reference = deltatune's base model + adapter, unmerged.

llama.cpp runs with a float32 KV cache (``type_k=type_v=0``): its default f16 cache alone moves these
logits by ~1e-2 and would hide the export's own error.

Tolerances (max |logit difference| over every position and vocabulary entry; logits here have std ~0.8),
measured on this model:
- f32 LoRA GGUF on an f32 base in llama.cpp: the same float32 math summed in another order; measured
  <= 3.4e-6, bound 2e-5;
- merged f16: weights and (in llama.cpp's f16 matmul) activations rounded to 11 bits; measured <= 5.3e-3,
  bound 2e-2;
- merged q8_0: 8-bit blocks of 32 weights, and llama.cpp quantizes activations to 8 bits too; measured
  <= 0.17, bound 0.4.
A missing Q/K permutation of B moves these logits by ~2-3, rsLoRA scaled as alpha/r by ~2, and leaving
the adapter out by more than 1 (test_the_llama_cpp_check_can_fail), so every bound separates right from
wrong: by five orders of magnitude for f32, and by a factor of 2.5 or more for q8_0.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.export.gguf_lora import export_gguf_lora
from deltatune.export.gguf_merged import export_gguf_merged, write_model_gguf
from deltatune.models import load_model_and_tokenizer
from support_data import tiny_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "lora": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 2, "down_proj": 6}, alpha_pattern={"k_proj": 3}),
}
PROMPTS = ["The weather today is", "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
           "1 2 3 4 5"]
NEW_TOKENS = 16


def tiny_model(tokenizer, seed: int = 0, hidden: int = 64) -> LlamaForCausalLM:
    """Random LLaMA; initializer_range 0.1 gives logits of std ~0.8 (the default 0.02 gives near-ties everywhere)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, initializer_range=0.1, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).eval()


def write_base(path, seed: int = 0, hidden: int = 64):
    """A tiny f32 base GGUF written through the export's own model writer."""
    tokenizer = tiny_tokenizer()
    write_model_gguf(tiny_model(tokenizer, seed, hidden), tokenizer, path, "f32")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(base_gguf, adapters, tokenizer)``: a tiny f32 base GGUF, adapters on it, its tokenizer."""
    root = tmp_path_factory.mktemp("gguf")
    mp = pytest.MonkeyPatch()
    mp.setenv("DELTATUNE_CACHE", str(root / "cache"))
    base = write_base(root / "tiny-base.gguf")
    reference, tokenizer = load_model_and_tokenizer(str(base))
    adapters = {}
    for name, kwargs in ADAPTERS.items():
        peft_model = dt.get_peft_model(reference, dt.LoraConfig(target_modules=TARGETS, **kwargs))
        g = torch.Generator().manual_seed(len(name))
        with torch.no_grad():
            for p in peft_model.parameters():
                if p.requires_grad:  # B starts at zero: give every adapter term a visible effect
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        peft_model.save_pretrained(root / name)
        adapters[name] = root / name
        reference = peft_model.unload()
    yield base, adapters, tokenizer
    mp.undo()


def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def reference_run(base, adapter, ids: list[int]) -> tuple[list[int], np.ndarray]:
    """deltatune greedy continuation (NEW_TOKENS) and its logits at every position of prompt + continuation."""
    model, _ = load_model_and_tokenizer(str(base))
    peft_model = dt.PeftModel.from_pretrained(model, adapter) if adapter else model
    seq = list(ids)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            seq.append(int(peft_model(torch.tensor([seq])).logits[0, -1].argmax()))
        logits = peft_model(torch.tensor([seq])).logits[0].numpy()  # (T, vocab)
    return seq, logits


def llama_cpp_logits(model_path, seq: list[int], lora_path=None) -> np.ndarray:
    """llama.cpp's logits at every position of ``seq`` (``scores`` is filled only with logits_all=True)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is a test dependency (the lock pins it)")
    llm = llama_cpp.Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None, n_ctx=128,
                          logits_all=True, n_threads=2, verbose=False, type_k=0, type_v=0)
    try:
        llm.eval(seq)
        return np.array(llm.scores[: len(seq)])
    finally:
        llm.close()


def assert_same_run(got: np.ndarray, seq: list[int], n_prompt: int, expected: np.ndarray, bound: float,
                    strict: bool = True) -> None:
    """Logits within ``bound`` and, if ``strict``, the same 16 greedy tokens (teacher-forced: llama.cpp's
    argmax after every prefix is deltatune's next token, which is what free-running greedy decoding
    compares). q8_0 is not strict: on this random model a quarter of the steps have a top-2 margin
    below q8_0's error, where either choice is right; the real model's agreement is measured by
    benchmarks/gguf_agreement.py."""
    diff = float(np.abs(got - expected).max())
    assert diff < bound, f"max |logit difference| {diff:.2e} >= {bound:.1e}"
    if strict:
        greedy = got[n_prompt - 1: len(seq) - 1].argmax(-1).tolist()
        assert greedy == seq[n_prompt:], f"greedy tokens differ: {greedy} vs {seq[n_prompt:]}"


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_lora_gguf_in_llama_cpp_matches_deltatune(tiny, tmp_path, name):
    base, adapters, tokenizer = tiny
    out = tmp_path / f"{name}.gguf"
    export_gguf_lora(adapters[name], out, model=str(base))
    for ids in prompt_ids(tokenizer)[:2]:
        seq, expected = reference_run(base, adapters[name], ids)
        assert_same_run(llama_cpp_logits(base, seq, lora_path=out), seq, len(ids), expected, bound=2e-5)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_the_llama_cpp_check_can_fail(tiny, name):
    """The base alone, in llama.cpp, is far outside every bound: the comparisons see the adapters' terms
    (so a missing permutation or a wrong scale, which changes them by as much, fails)."""
    base, adapters, tokenizer = tiny
    ids = prompt_ids(tokenizer)[0]
    seq, expected = reference_run(base, adapters[name], ids)
    assert np.abs(llama_cpp_logits(base, seq) - expected).max() > 1.0


@pytest.mark.parametrize("quant,bound", [("f16", 2e-2), ("q8_0", 0.4)])
def test_merged_gguf_in_llama_cpp_matches_deltatune(tiny, tmp_path, quant, bound):
    base, adapters, tokenizer = tiny
    out = tmp_path / f"merged-{quant}.gguf"
    export_gguf_merged(adapters["patterns"], out, model=str(base), quant=quant)
    for ids in prompt_ids(tokenizer):
        seq, expected = reference_run(base, adapters["patterns"], ids)
        assert_same_run(llama_cpp_logits(out, seq), seq, len(ids), expected, bound, strict=quant != "q8_0")


def test_transformers_reloads_a_merged_f32_gguf(tiny, tmp_path):
    """The fast check, no llama.cpp: transformers' own GGUF reader (which undoes the Q/K permutation)
    gives deltatune's logits for the merged f32 file."""
    from transformers import AutoModelForCausalLM

    base, adapters, tokenizer = tiny
    out = tmp_path / "merged.gguf"
    export_gguf_merged(adapters["rslora"], out, model=str(base), quant="f32")
    ids = prompt_ids(tokenizer)[1]
    _, expected = reference_run(base, adapters["rslora"], ids)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        got = reloaded(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(got, expected[: len(ids)], atol=1e-4, rtol=0)


def test_a_transformers_folder_base_with_an_untied_head(tmp_path):
    """A base that is a transformers folder (tokenizer metadata built from tokenizer.json) with separate
    embedding and output matrices, and a LoRA on lm_head too: merged f32 and LoRA-on-base in llama.cpp."""
    from support_cli_export import write_adapter, write_model

    folder = write_model(tmp_path / "hf", tied=False)
    config = dt.LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "lm_head"])
    adapter = write_adapter(folder, tmp_path / "adapter", config)
    model, tokenizer = load_model_and_tokenizer(folder)
    write_model_gguf(model, tokenizer, tmp_path / "base.gguf", "f32")
    peft_model = dt.PeftModel.from_pretrained(model, adapter)
    ids = tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = peft_model(torch.tensor([ids])).logits[0].numpy()
    export_gguf_merged(adapter, tmp_path / "merged.gguf", quant="f32")
    export_gguf_lora(adapter, tmp_path / "lora.gguf")
    for got in (llama_cpp_logits(tmp_path / "merged.gguf", ids),
                llama_cpp_logits(tmp_path / "base.gguf", ids, lora_path=tmp_path / "lora.gguf")):
        assert float(np.abs(got - expected).max()) < 2e-5
