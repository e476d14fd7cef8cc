"""`deltatune inspect MODEL`: meta-device architecture, layer groups, presets with exact LoRA counts, dry run."""
import pytest
import torch
from transformers import AutoConfig

from deltatune import LoraConfig, get_peft_model
from deltatune.cli.main import main
from deltatune.inspect import FAMILY_PRESETS, describe, layer_groups, lora_parameter_count, meta_model, preset_table
from deltatune.inspect.presets import expand_preset
from deltatune.methods.base import get_method
from tiny import tiny_bert_cls, tiny_gpt2, tiny_llama

LORA_TYPES = get_method("LORA").layer_types
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=96)
# One tiny config per family the presets know, built on the meta device only.
FAMILY_CONFIGS = {
    "llama": dict(SMALL, num_key_value_heads=2), "mistral": dict(SMALL, num_key_value_heads=2),
    "qwen2": dict(SMALL, num_key_value_heads=2), "phi": SMALL, "phi3": dict(SMALL, pad_token_id=0, eos_token_id=1),
    "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=96),
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=96), "gpt_neox": SMALL,
    "opt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, vocab_size=96, word_embed_proj_dim=32),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=96, bos_token_id=1, eos_token_id=2), "bert": SMALL,
}


def _trainable(model, targets, r=4) -> int:
    return get_peft_model(model, LoraConfig(r=r, target_modules=targets)).get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_every_preset_resolves_and_its_count_equals_get_peft_model_on_meta(family):
    config = AutoConfig.for_model(family, **FAMILY_CONFIGS[family])
    rows = preset_table(meta_model(config), family, r=4)
    assert [r.name for r in rows] == ["qv", "attention", "attention+mlp", "all-linear"]
    for row in rows:
        assert row.error is None, row.error
        with torch.device("meta"):
            assert row.trainable == _trainable(meta_model(config), row.target_modules), (family, row.name)
    # Strictly growing: q/v < attention < attention+mlp <= all-linear.
    sizes = [r.trainable for r in rows]
    assert sizes[0] < sizes[1] < sizes[2] <= sizes[3]


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bert_cls], ids=["llama", "gpt2", "bert"])
def test_preset_counts_match_real_models_in_deltatune_and_peft(build):
    import peft

    model = build()
    family = model.config.model_type
    task = "SEQ_CLS" if family == "bert" else None  # built from a config, so no `architectures` to go by
    on_meta = {r.name: r.trainable for r in preset_table(meta_model(model.config, task), family, r=4)}
    for name, targets in [*FAMILY_PRESETS[family].items(), ("all-linear", "all-linear")]:
        ours = get_peft_model(build(), LoraConfig(r=4, target_modules=targets)).get_nb_trainable_parameters()[0]
        theirs = peft.get_peft_model(build(), peft.LoraConfig(r=4, target_modules=list(targets) if name != "all-linear"
                                                              else targets)).get_nb_trainable_parameters()[0]
        assert on_meta[name] == ours == theirs, (family, name, on_meta[name], ours, theirs)


@pytest.mark.parametrize("config", [
    LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"layers.1.self_attn.q_proj": 8}, use_dora=True),
    LoraConfig(r=4, target_modules=["embed_tokens", "lm_head"]),
], ids=["rank_pattern+dora", "embeddings"])
def test_count_formula_handles_rank_pattern_dora_and_embeddings(config):
    expected = get_peft_model(tiny_llama(), config).get_nb_trainable_parameters()[0]
    assert lora_parameter_count(meta_model(tiny_llama().config), config) == expected


def test_meta_model_matches_the_real_model_and_picks_the_task_head():
    real = tiny_bert_cls()
    real.config.architectures = ["BertForSequenceClassification"]  # what save_pretrained writes
    meta = meta_model(real.config)
    assert type(meta) is type(real) and all(p.is_meta for p in meta.parameters())
    assert describe(real.config, meta).parameters == sum(p.numel() for p in real.parameters())
    assert type(meta_model(tiny_llama().config, "SEQ_CLS")).__name__ == "LlamaForSequenceClassification"


def test_layer_groups_collapse_block_indices_and_flag_the_head():
    groups = {g.pattern: g for g in layer_groups(tiny_llama(), LORA_TYPES)}
    q = groups["model.layers.*.self_attn.q_proj"]
    assert (q.kind, q.in_features, q.out_features, q.count) == ("Linear", 32, 32, 2)
    assert groups["model.layers.*.self_attn.k_proj"].out_features == 16  # 2 kv heads of 8
    assert groups["lm_head"].is_output_head and not q.is_output_head
    gpt2 = {g.pattern: g for g in layer_groups(tiny_gpt2(), LORA_TYPES)}
    c_attn = gpt2["transformer.h.*.attn.c_attn"]  # Conv1D stores (in, out); shown as in->out
    assert (c_attn.kind, c_attn.in_features, c_attn.out_features) == ("Conv1D", 32, 96)
    assert gpt2["transformer.wte"].kind == "Embedding"


def test_expand_preset_errors_for_unknown_family():
    assert expand_preset("attention", "llama") == "q_proj,k_proj,v_proj,o_proj"
    assert expand_preset("q_proj", "anything") == "q_proj"
    with pytest.raises(ValueError, match="not defined for model type 'mamba'"):
        expand_preset("qv", "mamba")


def test_cli_prints_architecture_layers_presets_and_the_dry_run(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "llama")
    code = main(["inspect", str(tmp_path / "llama"), "--r", "4", "--targets", "q_proj,v_proj", "--layers", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "LlamaForCausalLM (model_type llama)" in out and "layers 2, hidden 32" in out
    assert "model.layers.*.self_attn.q_proj  Linear     32->32  x2" in out
    assert "output head, left out of all-linear" in out
    assert "qv             q_proj, v_proj" in out and "4 modules" in out
    # Dry run: only block 1, exactly the resolved names, with the exact count 4*(32+32) + 4*(32+16).
    assert "wraps 2 modules; trainable parameters 448" in out
    assert out.rstrip().endswith("  model.layers.1.self_attn.q_proj\n  model.layers.1.self_attn.v_proj")


def test_cli_dry_run_of_a_preset_and_a_misspelt_target(tmp_path, capsys):
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    assert main(["inspect", str(tmp_path / "gpt2"), "--targets", "attention"]) == 0
    assert "transformer.h.1.attn.c_proj" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "gpt2"), "--targets", "c_atn"]) == 2
    assert "Did you mean 'c_attn'?" in capsys.readouterr().err


def test_cli_dry_run_of_a_train_config_uses_its_model_and_method(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "llama")
    (tmp_path / "run.yaml").write_text(
        f"model: {tmp_path / 'llama'}\nmethod: {{name: dora, r: 4, target_modules: [q_proj]}}\n")
    assert main(["inspect", "--config", str(tmp_path / "run.yaml")]) == 0
    out = capsys.readouterr().out
    # DoRA on q_proj (32->32) in the upper of the 2 blocks (deltatune train's preset, layers_to_transform:
    # upper_half, resolved for this model): r*(in+out) + a magnitude per output feature.
    assert "wraps 1 modules; trainable parameters 288 " in out
    assert out.rstrip().endswith("trainable parameters 288 (1.16% of the base model)\n  model.layers.1.self_attn.q_proj")
