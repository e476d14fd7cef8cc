"""`deltatune inspect --adapter DIR [MODEL]`: load check on the meta device, base-model check, serving rules."""
import pytest

import deltatune as dt
from deltatune.cli.main import main
from deltatune.inspect import base_model_verdict, load_problems, parse_config, read_adapter, server_findings
from deltatune.inspect.report import verdict
from tiny import input_ids, tiny_gpt2, tiny_llama

METHODS = {
    "lora": lambda: dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "dora_all_linear": lambda: dt.LoraConfig(r=4, target_modules="all-linear", use_dora=True),
    "ia3": lambda: dt.IA3Config(),
    "adalora": lambda: dt.AdaLoraConfig(total_step=10, target_modules=["q_proj", "v_proj"]),
    "prompt": lambda: dt.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    "prefix": lambda: dt.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    "bottleneck": lambda: dt.BottleneckConfig(),
}


def _save(folder, config, model=None):
    dt.get_peft_model(model or tiny_llama(), config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", sorted(METHODS))
def test_meta_check_agrees_with_a_real_load(tmp_path, method):
    adapter = _save(tmp_path / "a", METHODS[method]())
    files = read_adapter(adapter)
    config = parse_config(files)
    assert load_problems(files, config, tiny_llama().config) == []
    dt.PeftModel.from_pretrained(tiny_llama(), adapter)(input_ids())  # and it really loads
    other = tiny_llama(hidden=64) if method == "prompt" else tiny_llama(layers=3)  # prompts do not depend on depth
    problems = load_problems(files, config, other.config)
    assert problems
    if method in ("prefix", "prompt"):
        # The real load accepts these tables on a model of another size (as peft does) and fails only
        # at the first forward; the check catches it up front.
        assert ("num_layers=2" if method == "prefix" else "token_dim=32") in problems[0]
        return
    with pytest.raises(ValueError) as real:
        dt.PeftModel.from_pretrained(other, adapter)
    # Same verdict, same first line as the real loader's all-or-nothing error.
    assert problems[0].splitlines()[0] in str(real.value)


def test_adapter_saved_by_peft_is_checked_too(tmp_path):
    import peft

    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "p")
    files = read_adapter(tmp_path / "p")
    assert load_problems(files, parse_config(files), tiny_llama().config) == []
    wider = load_problems(files, parse_config(files), tiny_llama(hidden=64).config)
    assert "shape mismatch" in wider[0] and "(4, 32)" in wider[0] and "(4, 64)" in wider[0]


def test_cli_reports_config_ranks_and_a_successful_load(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "base")
    adapter = _save(tmp_path / "a", dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  base_model_name_or_path=str(tmp_path / "base")))
    assert main(["inspect", "--adapter", str(adapter)]) == 0  # MODEL defaults to the adapter's base model
    out = capsys.readouterr().out
    assert "type LORA" in out and "lora_alpha=8" in out and "r=4 on 4 modules" in out
    assert "model.layers.*.self_attn.q_proj  x2" in out
    assert f"Loads on {tmp_path / 'base'}: yes" in out and "Base model: matches" in out
    assert "vLLM       ok" in out
    assert "llama.cpp: yes: deltatune export --format gguf writes a GGUF LoRA" in out


def test_cli_says_why_an_adapter_is_no_gguf_lora(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "base")
    adapter = _save(tmp_path / "a", dt.LoraConfig(r=4, use_dora=True, target_modules=["q_proj"],
                                                  base_model_name_or_path=str(tmp_path / "base")))
    assert main(["inspect", "--adapter", str(adapter)]) == 0  # it loads; it just is no GGUF LoRA
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("llama.cpp:"))
    assert "no GGUF LoRA: DoRA rescales" in line and "--merged" in line


def test_cli_exits_1_when_the_adapter_does_not_fit_and_says_why(tmp_path, capsys):
    tiny_llama(layers=3).save_pretrained(tmp_path / "deep")
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    adapter = _save(tmp_path / "a", dt.LoraConfig(r=4, target_modules=["q_proj"], base_model_name_or_path="some/llama"))
    assert main(["inspect", "--adapter", str(adapter), str(tmp_path / "deep")]) == 1
    out = capsys.readouterr().out
    assert "NO" in out and "missing: base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight" in out
    assert "Base model: differs" in out
    assert main(["inspect", "--adapter", str(adapter), str(tmp_path / "gpt2")]) == 1
    assert "target_modules entry 'q_proj' matches no module in GPT2LMHeadModel" in capsys.readouterr().out


def test_cli_without_a_usable_model_asks_for_one(tmp_path, capsys):
    adapter = _save(tmp_path / "a", dt.LoraConfig(r=4, target_modules=["q_proj"]))  # tiny model: no name
    assert main(["inspect", "--adapter", str(adapter)]) == 2
    assert "pass MODEL" in capsys.readouterr().err
    assert main(["inspect", "--adapter", str(tmp_path / "nowhere")]) == 2


def test_base_model_verdict_compares_last_path_components():
    assert base_model_verdict("/root/.cache/deltatune/models/smollm2-135m-instruct", "smollm2-135m-instruct")[0] is True
    assert base_model_verdict("HuggingFaceTB/SmolLM2-135M", "smollm2-135m-instruct")[0] is False
    assert base_model_verdict(None, "x")[0] is None


def _lora(**fields):
    return {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], **fields}


KEYS = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]


def test_a_plain_lora_adapter_is_servable_everywhere():
    found = server_findings(_lora(), KEYS)
    assert {verdict(found, s) for s in ("peft", "vLLM", "TGI/LoRAX")} == {"yes"}


@pytest.mark.parametrize("fields, keys, server, level, phrase", [
    ({"use_dora": True}, ["x.lora_magnitude_vector"], "vLLM", "error", "does not yet support DoRA"),
    ({"use_dora": True}, ["x.lora_magnitude_vector"], "TGI/LoRAX", "error", "DoRA magnitudes"),
    ({"modules_to_save": ["lm_head"]}, ["base_model.model.lm_head.weight"], "vLLM", "error", "modules_to_save being None"),
    ({"modules_to_save": ["lm_head"]}, ["base_model.model.lm_head.weight"], "TGI/LoRAX", "error", "unused adapter weights"),
    ({"r": 24}, [], "vLLM", "warning", "--max-lora-rank 32"),
    ({"r": 8, "rank_pattern": {"q_proj": 320}}, [], "vLLM", "warning", "--max-lora-rank 320"),
    ({"r": 1024}, [], "vLLM", "error", "above vLLM's largest --max-lora-rank (512)"),
    ({"alpha_pattern": {"q_proj": 4}}, [], "vLLM", "error", "one scaling"),
    ({"bias": "lora_only"}, [], "vLLM", "warning", "--enable-lora-bias"),
    ({"target_modules": ["embed_tokens"]}, ["x.embed_tokens.lora_embedding_A"], "vLLM", "warning", "embedding modules"),
    ({"target_modules": ["embed_tokens"]}, ["x.embed_tokens.lora_embedding_A"], "TGI/LoRAX", "error", "embedding LoRA"),
    ({"init_lora_weights": "pissa"}, [], "all", "warning", "changed the base weights"),
])
def test_server_rules_give_the_reason(fields, keys, server, level, phrase):
    found = [f for f in server_findings(_lora(**fields), KEYS + keys) if f.server == server and f.level == level]
    assert any(phrase in f.reason for f in found), [f.reason for f in found]


@pytest.mark.parametrize("peft_type, peft_ok, hint", [
    ("IA3", True, "merge it"), ("PROMPT_TUNING", True, "cannot be merged"), ("BOTTLENECK", False, "merge it"),
])
def test_non_lora_adapters_are_not_served(peft_type, peft_ok, hint):
    found = server_findings({"peft_type": peft_type}, [])
    assert verdict(found, "vLLM") == verdict(found, "TGI/LoRAX") == "no"
    assert (verdict(found, "peft") == "yes") is peft_ok
    assert hint in next(f.reason for f in found if f.server == "vLLM")
