"""peft docs, ported: ``docs/source/developer_guides/checkpoint.md`` ("PEFT checkpoint format"; huggingface/peft
main, 5d602fdb).

What the page states about the files, checked on what deltatune writes and reads: the three files of
``save_pretrained``; the IA³-on-BERT ``adapter_config.json``; the LoRA-on-BERT state-dict keys (the
page's first five, no embedding entries, the ``base_model.model.`` prefix, the adapter name stripped,
non-default adapters in a subfolder, DoRA's extra ``lora_magnitude_vector``); the LoRA-on-BERT
``adapter_config.json`` and the minimal one ("Convert to PEFT format"); in-memory names with
``.default.``; "Merge the weights"; and "Convert to a Transformers model". ``bert-base-uncased`` is a
tiny random ``BertModel`` saved in a local folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, BertConfig, BertModel

from docs_support import oracle, ours, perturb, same_start
from tolerances import assert_close

X = torch.tensor([[2, 7, 11, 5, 9, 3]])


def local_bert(folder: Path) -> str:
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    return str(folder)


def bert(model_id: str) -> BertModel:
    return AutoModel.from_pretrained(model_id).eval()


def save_ia3(lib, model_id, out):
    model = lib.get_peft_model(bert(model_id), lib.IA3Config())  # IA³ "with standard settings" on BERT
    model.save_pretrained(out)
    return model


def save_lora(lib, model_id, out, **kw):
    model = lib.get_peft_model(bert(model_id), lib.LoraConfig(**kw))  # "using the default LoRA settings"
    model.save_pretrained(out)
    return model


def test_save_pretrained_writes_the_three_files(tmp_path):
    model_id = local_bert(tmp_path / "bert")
    oracle(save_lora, model_id, tmp_path / "peft")
    ours(save_lora, model_id, tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == sorted(p.name for p in (tmp_path / "peft").iterdir())


def test_safetensors_and_bin_store_the_same_state_dict(tmp_path):
    # "By default, the model is saved in the safetensors format ... Both formats store the same state_dict."
    model_id = local_bert(tmp_path / "bert")
    model = perturb(ours(save_lora, model_id, tmp_path / "st"))
    model.save_pretrained(tmp_path / "st")
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    from_bin = torch.load(tmp_path / "bin/adapter_model.bin", weights_only=True)
    from_st = load_file(tmp_path / "st/adapter_model.safetensors")
    assert from_bin.keys() == from_st.keys() and all(torch.equal(from_bin[k], from_st[k]) for k in from_st)
    for folder in ("st", "bin"):  # and peft reads either
        loaded = oracle(lambda lib: lib.PeftModel.from_pretrained(bert(model_id), str(tmp_path / folder)))
        assert_close(loaded(X).last_hidden_state, model(X).last_hidden_state)


IA3_PAGE_CONFIG = {  # the page's adapter_config.json for IA³ on bert-base-uncased, less the base model's name
    "auto_mapping": {"base_model_class": "BertModel", "parent_library": "transformers.models.bert.modeling_bert"},
    "fan_in_fan_out": False, "feedforward_modules": ["output.dense"], "inference_mode": True,
    "init_ia3_weights": True, "modules_to_save": None, "peft_type": "IA3", "revision": None,
    "target_modules": ["key", "value", "output.dense"], "task_type": None,
}


def _config(folder) -> dict:
    return json.loads((Path(folder) / "adapter_config.json").read_text())


def _same_values(ours_cfg: dict, page_cfg: dict, skip=("auto_mapping",)) -> None:
    for key, value in page_cfg.items():
        if key in skip:
            continue
        assert key in ours_cfg, key
        got = ours_cfg[key]
        if key in ("target_modules", "feedforward_modules"):
            got, value = sorted(got), sorted(value)
        assert got == value, (key, got, value)


def test_ia3_adapter_config_json_has_the_pages_entries(tmp_path):
    model_id = local_bert(tmp_path / "bert")
    oracle(save_ia3, model_id, tmp_path / "peft")
    ours(save_ia3, model_id, tmp_path / "ours")
    _same_values(_config(tmp_path / "ours"), IA3_PAGE_CONFIG)
    _same_values(_config(tmp_path / "peft"), IA3_PAGE_CONFIG, skip=())
    # every key we write has peft's value (the base model's name is the local folder in both)
    theirs = _config(tmp_path / "peft")
    for key, value in _config(tmp_path / "ours").items():
        assert theirs[key] == value or sorted(theirs[key]) == sorted(value), key


def test_ia3_adapter_config_json_auto_mapping_lets_peft_auto_class_load_it(tmp_path):
    model_id = local_bert(tmp_path / "bert")
    mine = ours(save_ia3, model_id, tmp_path / "ours")
    assert _config(tmp_path / "ours").get("auto_mapping") == IA3_PAGE_CONFIG["auto_mapping"]
    loaded = oracle(lambda lib: lib.AutoPeftModel.from_pretrained(str(tmp_path / "ours")))
    assert_close(loaded(X).last_hidden_state, mine(X).last_hidden_state)


PAGE_FIRST_FIVE_KEYS = [
    "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight",
    "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight",
    "base_model.model.encoder.layer.0.attention.self.value.lora_A.weight",
    "base_model.model.encoder.layer.0.attention.self.value.lora_B.weight",
    "base_model.model.encoder.layer.1.attention.self.query.lora_A.weight",
]


def test_lora_state_dict_keys_are_the_pages(tmp_path):
    model_id = local_bert(tmp_path / "bert")
    oracle(save_lora, model_id, tmp_path / "peft")
    mine = ours(save_lora, model_id, tmp_path / "ours")
    keys = sorted(load_file(tmp_path / "ours/adapter_model.safetensors"))
    assert keys[:5] == PAGE_FIRST_FIVE_KEYS
    assert keys == sorted(load_file(tmp_path / "peft/adapter_model.safetensors"))
    assert not any("embedding" in k for k in keys)  # "no entries for lora_A_embedding and lora_B_embedding"
    import deltatune

    assert sorted(deltatune.get_peft_model_state_dict(mine)) == keys


def test_in_memory_parameter_names_carry_the_adapter_name(tmp_path):
    # The page's in-memory name is peft's layout (``query.lora_A.default.weight``). deltatune's differs by
    # design, as docs/api.md ("Parameter names") documents: ``query.adapters.default.lora_A``. What the page
    # relies on holds in both: the name carries the adapter name and ``lora_``, and the file drops the adapter name.
    model_id = local_bert(tmp_path / "bert")
    theirs = oracle(save_lora, model_id, tmp_path / "peft")
    mine = ours(save_lora, model_id, tmp_path / "ours")
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.default.weight" in dict(theirs.named_parameters())
    assert "base_model.model.encoder.layer.0.attention.self.query.adapters.default.lora_A" in dict(mine.named_parameters())
    for model in (theirs, mine):  # the filters documented to keep working select the same parameters
        lora = sorted(n.replace(".adapters.default.lora_A", ".lora_A.default.weight").replace(
            ".adapters.default.lora_B", ".lora_B.default.weight") for n, _ in model.named_parameters() if "lora_" in n)
        assert lora == sorted(n for n, _ in theirs.named_parameters() if "lora_" in n)
        assert {n for n, _ in model.named_parameters() if "default" in n} == {n for n, _ in model.named_parameters() if "lora_" in n}
    on_disk = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in on_disk


def save_two_adapters(lib, model_id, out):
    model = lib.get_peft_model(bert(model_id), lib.LoraConfig())
    model.add_adapter("other", lib.LoraConfig(r=4))
    model.save_pretrained(out)  # "If ... the adapter name is not "default", ... stored inside of some/path/other"
    return model


def test_non_default_adapter_goes_to_a_subfolder_and_names_are_stripped(tmp_path):
    model_id = local_bert(tmp_path / "bert")
    oracle(save_two_adapters, model_id, tmp_path / "peft")
    ours(save_two_adapters, model_id, tmp_path / "ours")
    for sub in (".", "other"):
        files = {p.name for p in (tmp_path / "ours" / sub).iterdir() if p.is_file()}
        assert files == {p.name for p in (tmp_path / "peft" / sub).iterdir() if p.is_file()}  # README.md at the root only
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
        keys_o = load_file(tmp_path / "ours" / sub / "adapter_model.safetensors")
        keys_t = load_file(tmp_path / "peft" / sub / "adapter_model.safetensors")
        assert keys_o.keys() == keys_t.keys()
        assert {k: v.shape for k, v in keys_o.items()} == {k: v.shape for k, v in keys_t.items()}
        assert not any(".default." in k or ".other." in k for k in keys_o)


def test_dora_adds_lora_magnitude_vector(tmp_path):
    model_id = local_bert(tmp_path / "bert")
    oracle(save_lora, model_id, tmp_path / "peft", use_dora=True)
    ours(save_lora, model_id, tmp_path / "ours", use_dora=True)
    keys = load_file(tmp_path / "ours/adapter_model.safetensors").keys()
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_magnitude_vector" in keys
    assert keys == load_file(tmp_path / "peft/adapter_model.safetensors").keys()


PAGE_LORA_CONFIG = {  # the page's adapter_config.json for LoRA on bert-base-uncased
    "alpha_pattern": {}, "auto_mapping": {"base_model_class": "BertModel", "parent_library": "transformers.models.bert.modeling_bert"},
    "base_model_name_or_path": None, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
    "loftq_config": {}, "lora_alpha": 8, "lora_dropout": 0.0, "megatron_config": None, "megatron_core": "megatron.core",
    "modules_to_save": None, "peft_type": "LORA", "r": 8, "rank_pattern": {}, "revision": None,
    "target_modules": ["query", "value"], "task_type": None, "use_dora": False, "use_rslora": False,
}
PAGE_MINIMAL_CONFIG = {"target_modules": ["query", "value"], "peft_type": "LORA"}


@pytest.mark.parametrize("page_config", [PAGE_LORA_CONFIG, PAGE_MINIMAL_CONFIG], ids=["full", "minimal"])
def test_converted_checkpoint_with_the_pages_config_loads(tmp_path, page_config):
    # "Convert to PEFT format": a state dict under the documented keys plus the page's adapter_config.json.
    model_id = local_bert(tmp_path / "bert")
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(2):
        for proj in ("query", "value"):
            prefix = f"base_model.model.encoder.layer.{i}.attention.self.{proj}"
            sd[f"{prefix}.lora_A.weight"] = torch.randn(8, 32, generator=g) * 0.1
            sd[f"{prefix}.lora_B.weight"] = torch.randn(32, 8, generator=g) * 0.1
    folder = tmp_path / "converted"
    folder.mkdir()
    save_file(sd, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(page_config))
    theirs = oracle(lambda lib: lib.PeftModel.from_pretrained(bert(model_id), str(folder)))
    mine = ours(lambda lib: lib.PeftModel.from_pretrained(bert(model_id), str(folder)))
    assert_close(mine(X).last_hidden_state, theirs(X).last_hidden_state)
    # and by hand for one layer: W x + (alpha / r) B A x, alpha = r = 8
    q = bert(model_id).encoder.layer[0].attention.self.query
    h = torch.randn(3, 32, generator=g)
    A, B = sd["base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"], sd["base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"]
    assert_close(mine.base_model.model.encoder.layer[0].attention.self.query(h), q(h) + h @ A.T @ B.T)


def merge_and_save(lib, model_id, out, adapter_dir):
    model = lib.PeftModel.from_pretrained(bert(model_id), adapter_dir)
    unmerged = model(X).last_hidden_state
    merged_model = model.merge_and_unload()
    merged_model.save_pretrained(out)
    return unmerged


def test_merge_the_weights_and_save_the_whole_model(tmp_path):
    model_id = local_bert(tmp_path / "bert")
    perturb(oracle(save_lora, model_id, tmp_path / "adapter")).save_pretrained(tmp_path / "adapter")
    unmerged_t = oracle(merge_and_save, model_id, tmp_path / "merged_peft", str(tmp_path / "adapter"))
    unmerged_o = ours(merge_and_save, model_id, tmp_path / "merged_ours", str(tmp_path / "adapter"))
    assert_close(unmerged_o, unmerged_t)
    full_o, full_t = bert(str(tmp_path / "merged_ours")), bert(str(tmp_path / "merged_peft"))
    assert_close(full_o(X).last_hidden_state, unmerged_o)
    assert_close(full_o(X).last_hidden_state, full_t(X).last_hidden_state)
    assert load_file(tmp_path / "merged_ours/model.safetensors").keys() == load_file(tmp_path / "merged_peft/model.safetensors").keys()


def test_convert_to_a_transformers_model_with_the_hacky_approach(tmp_path):
    # transformers' own adapter loading (its peft integration) reads what deltatune saved.
    model_id = local_bert(tmp_path / "bert")
    model = perturb(ours(save_lora, model_id, tmp_path / "temp_location"))
    model.save_pretrained(tmp_path / "temp_location")
    with torch.no_grad():
        expected = model(X).last_hidden_state

    def snippet(lib):
        model_loaded = AutoModel.from_pretrained(str(tmp_path / "temp_location")).eval()
        out = model_loaded(X).last_hidden_state
        model_loaded._hf_peft_config_loaded = False
        model_loaded.save_pretrained(tmp_path / "final_location")
        return out

    assert_close(oracle(snippet), expected)
    keys = load_file(tmp_path / "final_location/model.safetensors").keys()
    assert any("lora_A" in k for k in keys) and any("embeddings.word_embeddings" in k for k in keys)


def test_same_start_helper_round_trips(tmp_path):
    # the helper other tests rely on: peft's tensors copied into ours give peft's outputs
    model_id = local_bert(tmp_path / "bert")
    theirs = perturb(oracle(save_lora, model_id, tmp_path / "peft"))
    mine = same_start(theirs, ours(save_lora, model_id, tmp_path / "ours"))
    assert_close(mine(X).last_hidden_state, theirs(X).last_hidden_state)
