"""deltatune.plan: exact parameter counts, the memory model's structure, recommendations, the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from deltatune import BottleneckConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from deltatune.plan import TrainSetup, count_parameters, estimate_memory, parse_bytes, recommend
from deltatune.plan.meta import build_meta_model
from deltatune.plan.trace import trace_activations
from tiny import tiny_llama

LLAMA_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                tie_word_embeddings=False)


def tiny_config() -> LlamaConfig:
    return tiny_llama().config


REAL_CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, task_type="CAUSAL_LM"),
    "ia3": lambda: IA3Config(task_type="CAUSAL_LM"),
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM"),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM"),
    "bottleneck": lambda: BottleneckConfig(bottleneck_size=4, task_type="CAUSAL_LM"),
}


@pytest.mark.parametrize("method", sorted(REAL_CONFIGS))
def test_counts_equal_a_real_get_peft_model(method):
    real = get_peft_model(tiny_llama(), REAL_CONFIGS[method]())
    trainable, total = real.get_nb_trainable_parameters()
    counted = count_parameters(tiny_config(), method, r=4, lora_alpha=8)
    assert (counted.trainable, counted.total) == (trainable, total)
    assert counted.percent == pytest.approx(100 * trainable / total)


def test_full_and_qlora_counts():
    n = sum(p.numel() for p in tiny_llama().parameters())
    full = count_parameters(tiny_config(), "full")
    assert full.trainable == full.total == n
    assert count_parameters(tiny_config(), "qlora", r=4) == count_parameters(tiny_config(), "lora", r=4)


def test_smollm2_counts_on_the_meta_device_match_peft():
    """The default model, from its config alone, against the real peft on the same meta model."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from deltatune.models import model_config

    try:
        config = model_config("smollm2-135m-instruct")
    except FileNotFoundError as err:
        pytest.skip(f"SmolLM2 is not available here: {err}")
    ours = count_parameters(config, "lora", r=16, targets="all-linear")
    assert (ours.trainable, ours.total) == (4_884_480, 139_399_488)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        theirs = peft.get_peft_model(model, peft.LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert theirs.get_nb_trainable_parameters() == (ours.trainable, ours.total)


def test_target_presets_resolve_to_the_models_layer_names():
    attn = count_parameters(tiny_config(), "lora", r=4, targets="attention").trainable
    qv = count_parameters(tiny_config(), "lora", r=4, targets="qv").trainable
    named = count_parameters(tiny_config(), "lora", r=4, targets="q_proj,v_proj").trainable
    assert qv == named < attn < count_parameters(tiny_config(), "lora", r=4).trainable
    with pytest.raises(ValueError, match="matches no module|Did you mean"):
        count_parameters(tiny_config(), "lora", targets="q_prj")


def test_qlora_weights_use_4_bits_with_double_quantization():
    est = estimate_memory(LLAMA_8B, TrainSetup(method="qlora", batch_size=1, seq_len=256))
    linear = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    dense = 2 * 128256 * 4096 + 32 * 2 * 4096 + 4096  # embeddings, head and norms stay fp32
    bits = (est.component("frozen weights").bytes - 4 * dense) * 8 / linear
    assert bits == pytest.approx(4.127, abs=0.002)
    lora = estimate_memory(LLAMA_8B, TrainSetup(method="lora", batch_size=1, seq_len=256))
    assert lora.component("frozen weights").bytes == pytest.approx(2 * 8.03e9, rel=0.01)  # bf16


def test_memory_terms_respond_to_the_setup():
    cfg = tiny_config()
    base = TrainSetup(method="lora", batch_size=4, seq_len=64, device="cpu", dtype="float32")
    plain, ckpt = estimate_memory(cfg, base), estimate_memory(cfg, base.replace(grad_checkpointing=True))
    assert ckpt.activations == plain.activations
    assert ckpt.component("activations").bytes < plain.component("activations").bytes
    fused, standard = plain, estimate_memory(cfg, base.replace(loss="standard"))
    assert standard.component("logits / loss").bytes > fused.component("logits / loss").bytes
    full = estimate_memory(cfg, base.replace(method="full"))
    assert full.component("optimizer state").bytes == 8 * full.params.trainable
    assert estimate_memory(cfg, base.replace(method="full", optimizer="adamw8bit")).component(
        "optimizer state").bytes < full.component("optimizer state").bytes
    assert plain.peak_bytes == sum(c.at_peak for c in plain.components)
    assert "peak" in plain.table() and "activations" in plain.table()


def test_activation_trace_scales_with_the_batch_and_counts_no_weights():
    cfg = tiny_config()
    s1 = TrainSetup(method="lora", batch_size=1, seq_len=32, device="cpu", dtype="float32")
    t1 = trace_activations(build_meta_model(cfg, s1), s1)
    s4 = s1.replace(batch_size=4)
    t4 = trace_activations(build_meta_model(cfg, s4), s4)
    assert t1.scaled(4).total == 4 * t1.total
    assert t4.total == pytest.approx(4 * t1.total, rel=0.01)  # RoPE's cos/sin tables have no batch dim
    assert t1.layer_input == 32 * cfg.hidden_size * 4


def test_recommend_picks_qlora_when_bf16_weights_do_not_fit(tmp_path):
    from deltatune.train.config import load_train_config

    folder = tmp_path / "llama-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_8B))
    rec = recommend(str(folder), parse_bytes("12GiB"), dataset_size=5000, task="instruction", seq_len=512)
    assert rec.setup.method == "qlora"
    assert rec.reasons["method"].startswith("QLoRA because 8.0B bfloat16 weights")
    assert rec.estimate.peak_bytes <= parse_bytes("12GiB")
    assert rec.setup.r == 16 and rec.setup.alpha == 32 and rec.lr == pytest.approx(2e-4)
    assert rec.setup.batch_size * rec.grad_accum == 16
    assert set(rec.reasons) >= {"method", "r", "alpha", "targets", "lr", "batch_size", "grad_accum"}
    path = tmp_path / "train.yaml"
    rec.write_config(path)
    config = load_train_config(path)
    assert config.method.name == "qlora" and config.train.grad_accum == rec.grad_accum
    assert "# QLoRA because" in path.read_text()


def test_recommend_follows_the_data_and_task_rules():
    small = tiny_config()
    big_memory = parse_bytes("24GiB")
    lora = recommend(small, big_memory, dataset_size=20000, task="domain", quality="medium")
    assert (lora.setup.method, lora.setup.r, lora.target_modules) == ("lora", 32, "all-linear")
    few = recommend(small, big_memory, dataset_size=50, task="qa")
    assert few.setup.method == "lora" and few.setup.r == 4
    ia3 = recommend(small, big_memory, dataset_size=300, task="classification", quality="low")
    assert ia3.setup.method == "ia3" and ia3.lr == pytest.approx(3e-3)
    cls = recommend(small, big_memory, dataset_size=5000, task="classification")
    assert cls.setup.r == 8 and tuple(cls.target_modules) == ("q_proj", "v_proj")
    with pytest.raises(ValueError, match="nothing fits"):
        recommend(LLAMA_8B, parse_bytes("2GiB"), dataset_size=5000)
    with pytest.raises(ValueError, match="task"):
        recommend(small, big_memory, dataset_size=10, task="poetry")


def test_parse_bytes():
    assert parse_bytes("24GiB") == parse_bytes("24 GB") == 24 * 2**30
    assert parse_bytes("512MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes("lots")


def tiny_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    tiny_llama().config.save_pretrained(folder)  # config.json only: plan reads nothing else
    return folder


def test_cli_plan_prints_counts_and_breakdown(tmp_path, capsys):
    from deltatune.cli.main import main

    folder = tiny_folder(tmp_path)
    assert main(["plan", str(folder), "--method", "lora", "full", "--device", "cpu", "--batch", "2",
                 "--seq-len", "32", "--device-memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    lora = count_parameters(tiny_config(), "lora", r=16)
    assert f"{lora.trainable:,d}" in out and "fits in 1.00 GiB" in out
    assert "optimizer state" in out and "logits / loss" in out and "overhead" in out


def test_cli_plan_lora_dropout_reaches_the_estimate(tmp_path, capsys):
    from deltatune.cli.main import main

    folder = tiny_folder(tmp_path)
    peaks = {}
    for dropout in ("0.05", "0"):
        assert main(["plan", str(folder), "--method", "dora", "--device", "cpu", "--batch", "2", "--seq-len", "32",
                     "--lora-dropout", dropout, "--json"]) == 0
        peaks[dropout] = json.loads(capsys.readouterr().out)
    # DoRA with dropout runs its unfused path, which keeps more for backward than the fused kernel
    acts = {k: v[0]["activations"]["without checkpointing"] for k, v in peaks.items()}
    assert acts["0"] < acts["0.05"]
    assert main(["plan", str(folder), "--lora-dropout", "1.5"]) == 2
    assert "lora_dropout" in capsys.readouterr().err


def test_cli_recommend_writes_a_train_config(tmp_path, capsys):
    from deltatune.cli.main import main
    from deltatune.train.config import load_train_config

    folder, path = tiny_folder(tmp_path), tmp_path / "rec.yaml"
    assert main(["plan", str(folder), "--recommend", "--device-memory", "4GiB", "--dataset-size", "2000",
                 "--task", "qa", "--write-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "why" in out and "learning rate" in out and f"wrote {path}" in out
    assert load_train_config(path).method.name == "lora"
    assert main(["plan", str(folder), "--recommend"]) == 2  # needs --device-memory and --dataset-size
    assert "--recommend needs" in capsys.readouterr().err
