"""GGUF export refusals: each names what was wrong and what to do, and leaves no file behind; plus the
``deltatune inspect --adapter`` "llama.cpp" line and the CLI flags."""
from __future__ import annotations

import os

import gguf
import pytest
from support_cli_export import write_adapter
from test_export_gguf import write_base

import deltatune as dt
from deltatune.cli.main import main
from deltatune.export.gguf_lora import export_gguf_lora, gguf_lora_problems
from deltatune.export.gguf_merged import export_gguf_merged
from deltatune.export.gguf_write import check_quant
from deltatune.inspect.adapter_check import llama_cpp_verdict, read_adapter

LORA = dict(r=2, target_modules=["q_proj", "k_proj", "v_proj"])


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Two tiny base GGUFs of different widths, and a LoRA adapter for the first."""
    root = tmp_path_factory.mktemp("bases")
    mp = pytest.MonkeyPatch()
    mp.setenv("DELTATUNE_CACHE", str(root / "cache"))
    base, other = write_base(root / "base.gguf"), write_base(root / "other.gguf", hidden=32)
    lora = write_adapter(base, root / "lora", dt.LoraConfig(**LORA))
    yield base, other, lora
    mp.undo()


def only(folder, *names):
    assert sorted(os.listdir(folder)) == sorted(names), "a partial or temporary file was left behind"


@pytest.mark.parametrize("config,match", [
    (dt.LoraConfig(use_dora=True, **LORA), "DoRA rescales"),
    (dt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), "IA³ multiplies"),
    (dt.LoraConfig(modules_to_save=["lm_head"], **LORA), "whole trained copies"),
], ids=["dora", "ia3", "modules_to_save"])
def test_adapters_a_gguf_lora_cannot_carry_point_to_merged(bases, tmp_path, config, match):
    base, _, _ = bases
    adapter = write_adapter(base, tmp_path / "adapter", config)
    with pytest.raises(ValueError, match=match) as err:
        export_gguf_lora(adapter, tmp_path / "out.gguf", model=str(base))
    assert "--merged" in str(err.value)
    only(tmp_path, "adapter")
    ok, sentence = llama_cpp_verdict(read_adapter(adapter))
    assert not ok and match in sentence
    export_gguf_merged(adapter, tmp_path / "merged.gguf", model=str(base), quant="f16")  # what the error offers works
    assert gguf.GGUFReader(str(tmp_path / "merged.gguf")).fields["general.architecture"].contents() == "llama"


def test_prompt_tuning_cannot_reach_llama_cpp_at_all(bases, tmp_path):
    base, _, _ = bases
    adapter = write_adapter(base, tmp_path / "adapter", dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="virtual tokens"):
        export_gguf_lora(adapter, tmp_path / "a.gguf", model=str(base))
    with pytest.raises(ValueError, match="cannot be merged"):
        export_gguf_merged(adapter, tmp_path / "m.gguf", model=str(base))
    only(tmp_path, "adapter")


@pytest.mark.parametrize("merged", [False, True], ids=["lora", "merged"])
@pytest.mark.filterwarnings("ignore:adapter was trained on")
def test_an_adapter_for_another_base_is_refused(bases, tmp_path, merged):
    _, other, lora = bases
    export = export_gguf_merged if merged else export_gguf_lora
    with pytest.raises(ValueError, match="(?s)does not fit the base model .*shape mismatch.*trained on another model"):
        export(lora, tmp_path / "x.gguf", model=str(other))
    only(tmp_path)


def test_an_unsupported_architecture_is_refused(tmp_path):
    from support_cli_export import write_model  # a LLaMA folder; turned into GPT-2 below
    from tiny import tiny_gpt2

    folder = write_model(tmp_path / "llama")
    tiny_gpt2().save_pretrained(tmp_path / "llama")  # same tokenizer, GPT-2 weights and config
    adapter = write_adapter(folder, tmp_path / "adapter", dt.LoraConfig(r=2, target_modules=["c_attn"]))
    for export in (export_gguf_lora, export_gguf_merged):
        with pytest.raises(ValueError, match="supports the LLaMA family .*'gpt2'.*convert_hf_to_gguf"):
            export(adapter, tmp_path / "x.gguf", model=str(folder))
    only(tmp_path, "llama", "adapter")
    _, sentence = llama_cpp_verdict(read_adapter(adapter), tiny_gpt2().config)
    assert "not 'gpt2'" in sentence


def test_quant_types(bases, tmp_path):
    base, _, lora = bases
    with pytest.raises(ValueError, match="llama-quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M"):
        check_quant("Q4_K_M")
    with pytest.raises(ValueError, match="93.5% -> 65%.*--allow-lossy"):
        check_quant("q4_1")
    with pytest.raises(ValueError, match="expected one of f32, f16"):
        export_gguf_lora(lora, tmp_path / "a.gguf", model=str(base), quant="q8_0")
    only(tmp_path)
    export_gguf_merged(lora, tmp_path / "q4.gguf", model=str(base), quant="q4_0", allow_lossy=True)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "q4.gguf")).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.0.attn_norm.weight"] == "F32"


def test_cli_writes_lora_and_refuses_an_existing_file(bases, tmp_path, capsys):
    base, _, lora = bases
    out = tmp_path / "lora.gguf"
    args = ["export", "--adapter", str(lora), "--model", str(base), "--format", "gguf", "--out", str(out)]
    assert main(args) == 0
    assert f"--lora {out}" in capsys.readouterr().out
    fields = gguf.GGUFReader(str(out)).fields
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    assert fields["adapter.lora.alpha"].contents() == 2.0  # = r: every scale is folded into B
    assert main(args) == 2 and "--force" in capsys.readouterr().err
    assert main(args + ["--allow-lossy"]) == 2 and "applies to --merged" in capsys.readouterr().err
    assert main(["export", "--adapter", str(lora), "--out", str(tmp_path / "t"), "--quant", "f16"]) == 2
    assert "applies to --format gguf" in capsys.readouterr().err


def test_gguf_lora_problems_read_the_config_alone():
    assert gguf_lora_problems({"peft_type": "LORA", "r": 8, "bias": "none"}) == []
    assert "trains biases" in gguf_lora_problems({"peft_type": "LORA", "bias": "all"})[0]
    assert "merged or not" in gguf_lora_problems({"peft_type": "PREFIX_TUNING"})[0]
    assert "token embedding" in gguf_lora_problems({"peft_type": "LORA"}, ["x.embed_tokens.lora_embedding_A"])[0]
