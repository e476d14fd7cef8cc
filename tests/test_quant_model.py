"""quantize_model, load_quantized (streaming from safetensors) and save_quantized on tiny models."""
import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny import input_ids, tiny_gpt2, tiny_llama
from tolerances import assert_close
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from deltatune.quant import (
    Linear4bit, Linear8bit, QuantConfig, load_quantized, plan_quantization, quantize_model, quantized_layers,
    save_quantized,
)


@pytest.fixture(scope="module")
def fp_model():
    return tiny_llama()


@pytest.fixture(scope="module")
def fp_folder(fp_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp")
    fp_model.save_pretrained(folder, safe_serialization=True)
    return folder


def _logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids() if ids is None else ids).logits


def _tied_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**tiny_llama().config.to_dict(), "tie_word_embeddings": True})
    return LlamaForCausalLM(cfg).eval()


def test_plan_is_every_linear_but_the_head(fp_model):
    names = plan_quantization(fp_model, QuantConfig())
    assert "lm_head" not in names and len(names) == 2 * 7  # q k v o gate up down per layer
    assert all(type(fp_model.get_submodule(n)) is nn.Linear for n in names)


def test_quantize_model_replaces_linears_and_keeps_the_rest(fp_model):
    q = quantize_model(copy.deepcopy(fp_model))
    assert isinstance(q.model.layers[0].self_attn.q_proj, Linear4bit)
    assert type(q.lm_head) is nn.Linear and type(q.model.embed_tokens) is nn.Embedding
    # no full-precision copy of a quantized weight survives anywhere in the model
    shapes = {(m.out_features, m.in_features) for _, m in quantized_layers(q)}
    assert not [n for n, p in q.named_parameters() if tuple(p.shape) in shapes]


def test_quantized_logits_equal_fp_model_with_dequantized_weights(fp_model):
    q = quantize_model(copy.deepcopy(fp_model))
    ref = copy.deepcopy(fp_model)
    for name, layer in quantized_layers(q):
        ref.get_submodule(name).weight.data = layer.dequantize_weight()
    assert_close(_logits(q), _logits(ref))


@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(bits=8)], ids=["nf4", "int8"])
def test_quantized_logits_are_close_to_the_fp_model(fp_model, config):
    ref = _logits(fp_model)
    err = (_logits(quantize_model(copy.deepcopy(fp_model), config)) - ref).norm() / ref.norm()
    # Lossy: NF4 with 64-value blocks has ~10% relative RMS error per weight (QLoRA, Fig. 3 era
    # numbers; 20 dB SQNR), int8 row-wise ~1%; two blocks of 7 matmuls keep the logits within
    # the same order. A bug (wrong nibble order, scale) gives an error of order 1.
    assert err < (0.25 if config.bits == 4 else 0.03)


def test_load_quantized_streams_to_the_same_state_as_quantize_model(fp_model, fp_folder):
    expected = quantize_model(copy.deepcopy(fp_model)).state_dict()
    loaded = load_quantized(fp_folder, QuantConfig())
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert not loaded.training


def test_load_quantized_reads_sharded_checkpoints(fp_model, tmp_path):
    fp_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    loaded = load_quantized(tmp_path, QuantConfig(bits=8))
    assert isinstance(loaded.model.layers[1].mlp.down_proj, Linear8bit)
    assert_close(_logits(loaded), _logits(quantize_model(copy.deepcopy(fp_model), QuantConfig(bits=8))))


def test_tied_embeddings_stay_tied_after_streaming(tmp_path):
    model = _tied_llama()
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_quantized(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_close(_logits(loaded), _logits(quantize_model(copy.deepcopy(model))))


def test_quantizing_a_tied_head_is_refused_with_a_fix():
    with pytest.raises(ValueError, match="skip_modules"):
        quantize_model(_tied_llama(), QuantConfig(skip_modules=()))


def test_models_without_linear_layers_are_explained():
    with pytest.raises(ValueError, match="Conv1D"):
        quantize_model(tiny_gpt2())


@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(quant_type="fp4", double_quant=False, blocksize=32),
                                    QuantConfig(bits=8)], ids=["nf4", "fp4", "int8"])
def test_save_and_load_round_trip_gives_identical_logits(fp_model, tmp_path, config):
    q = quantize_model(copy.deepcopy(fp_model), config)
    save_quantized(q, tmp_path)
    meta = json.loads((tmp_path / "deltatune_quant.json").read_text())
    assert meta["modules"]["model.layers.0.self_attn.q_proj"]["bits"] == config.bits
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    loaded = load_quantized(tmp_path)
    assert torch.equal(_logits(loaded), _logits(q))
    with pytest.raises(ValueError, match="saved quantized differently"):
        load_quantized(tmp_path, QuantConfig(bits=12 - config.bits))


def test_save_of_tied_model_round_trips(tmp_path):
    q = quantize_model(_tied_llama())
    save_quantized(q, tmp_path)
    loaded = load_quantized(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(_logits(loaded), _logits(q))


def test_missing_folder_and_unquantized_save_are_explained(fp_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="local folder"):
        load_quantized(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="safe_serialization"):
        load_quantized(tmp_path)
    with pytest.raises(ValueError, match="quantize it first"):
        save_quantized(fp_model, tmp_path)


_RSS_SCRIPT = textwrap.dedent("""
    import sys, threading, time, torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from deltatune.quant import load_quantized, QuantConfig

    with torch.device("meta"):  # import the modeling code first: it is not what we measure
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1]))

    def anon_kb():  # private memory only: the mmap-ed checkpoint pages are file-backed
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

    def mapped_checkpoint_kb():  # pages of the checkpoint file mapped into this process
        total, ours = 0, False
        for line in open("/proc/self/smaps"):
            head = line.split()
            if "-" in head[0] and len(head) >= 5:
                ours = line.rstrip().endswith(".safetensors")
            elif ours and head[0] == "Rss:":
                total += int(head[1])
        return total

    peak, mapped, done = [0], [0], []
    def sample():
        while not done:
            peak[0] = max(peak[0], anon_kb())
            mapped[0] = max(mapped[0], mapped_checkpoint_kb())
            time.sleep(0.001)
    base = anon_kb()
    t = threading.Thread(target=sample); t.start()
    model = load_quantized(sys.argv[1], QuantConfig())
    done.append(1); t.join()
    print(mapped[0], peak[0] - base)
""")


def test_streaming_load_peak_memory_stays_near_the_4bit_size(tmp_path):
    # 4 layers of hidden 512: 12.6M Linear parameters = 50 MB in float32, 6.5 MB in NF4.
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path, safe_serialization=True)
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    mapped_mb, peak_mb = (int(v) / 1024 for v in out.stdout.split()[-2:])
    # one fp32 tensor at a time (largest 2.8 MB) plus quantization temporaries (~4 x 4 MB chunks)
    # and the 6.5 MB result; loading the fp32 model first would need > 50 MB.
    assert peak_mb < 35, f"peak private memory grew by {peak_mb:.1f} MB while loading"
    # The checkpoint's pages count in RSS while mapped: read through one map, all 50 MB did by the end.
    assert mapped_mb < 12, f"{mapped_mb:.1f} MB of the checkpoint were mapped at once"


def test_loaded_model_does_not_keep_the_checkpoint_mapped(fp_model, tmp_path):
    # safetensors hands out tensors that view its memory map of the file. Kept as parameters (norms,
    # embeddings), they held the whole map alive: SmolLM2's 538 MB file stayed in the process's RSS after
    # a 4-bit load, and rewriting the checkpoint in place changed (or, truncated, crashed) the loaded model.
    fp_model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_quantized(tmp_path)
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    path = tmp_path / "model.safetensors"
    with open(path, "r+b") as f:  # rewrite in place (same inode): what a mapped view would see
        f.seek(1024)
        f.write(b"\x00" * (path.stat().st_size - 1024))
    after = loaded.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    if sys.platform == "linux":
        assert str(path) not in open("/proc/self/maps").read()


def test_the_checkpoints_generation_config_comes_with_the_model(fp_model, tmp_path):
    # from_pretrained reads generation_config.json; a model built from config.json alone would not stop on
    # the second eos id here, nor sample at the checkpoint's temperature
    fp_model.save_pretrained(tmp_path, safe_serialization=True)
    from transformers import GenerationConfig

    GenerationConfig(eos_token_id=[2, 7], temperature=0.42, do_sample=True).save_pretrained(tmp_path)
    loaded = load_quantized(tmp_path)
    assert loaded.generation_config.eos_token_id == [2, 7] and loaded.generation_config.temperature == 0.42
