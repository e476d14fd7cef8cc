"""Prefix tuning (Li & Liang, 2021): closed form, cache layout (GQA), life cycle, peft parity, generate."""
import pytest
import torch
from transformers import DynamicCache

from deltatune import PeftModel, get_peft_model
from deltatune.methods.prefix import PrefixTuningConfig, prefix_key_values
from test_prompt_common import MODELS, check_generate_matches_reference, check_life_cycle, peft_round_trip
from tiny import input_ids, tiny_gpt2, tiny_llama
from tolerances import assert_close

TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert-cls": "SEQ_CLS"}


def _config(case="llama", **kw):
    return PrefixTuningConfig(num_virtual_tokens=3, task_type=TASK[case], **kw)


# ---- closed form, cache layout ------------------------------------------------------------------------------
def test_prefix_key_values_layout():
    # 2 virtual tokens, 2 layers, 1 head of width 2: row = [L0 keys, L0 values, L1 keys, L1 values]
    table = torch.arange(16.0).view(2, 8)
    kv = prefix_key_values(table, batch=3, num_layers=2, num_heads=1)
    assert len(kv) == 2 and kv[0][0].shape == (3, 1, 2, 2)
    assert kv[0][0][0, 0].tolist() == [[0, 1], [8, 9]]  # layer 0 keys, token 0 then token 1
    assert kv[0][1][0, 0].tolist() == [[2, 3], [10, 11]]  # layer 0 values
    assert kv[1][1][2, 0].tolist() == [[6, 7], [14, 15]]  # layer 1 values, any batch row


def test_grouped_query_llama_gets_key_value_head_shapes():
    # tiny LLaMA: 4 query heads, 2 key/value heads of width 8
    pm = get_peft_model(tiny_llama(), _config())
    cfg = pm.peft_config["default"]
    assert (cfg.token_dim, cfg.num_attention_heads, cfg.encoder_hidden_size, cfg.num_layers) == (16, 2, 16, 2)
    out = pm(input_ids=input_ids(batch=2, seq=5), use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 3 + 5
    table = pm.prompt_encoder["default"]()
    for i, layer in enumerate(cache.layers):
        assert layer.keys.shape == (2, 2, 8, 8)  # (batch, kv heads, prefix + tokens, head_dim)
        assert torch.equal(layer.keys[0, :, :3], table.view(3, 4, 2, 8)[:, 2 * i].transpose(0, 1))


def test_real_tokens_are_numbered_after_the_prefix():
    pm = get_peft_model(tiny_llama(), _config())
    x = input_ids()
    implicit = pm(input_ids=x).logits
    explicit = pm(input_ids=x, position_ids=torch.arange(x.shape[1]).unsqueeze(0)).logits
    assert_close(explicit, implicit)


def test_manual_decoding_with_the_returned_cache_matches_a_full_forward():
    pm = get_peft_model(tiny_llama(), _config()).eval()
    x = input_ids(batch=2, seq=7)
    with torch.no_grad():
        full = pm(input_ids=x).logits[:, -1]
        first = pm(input_ids=x[:, :-1], use_cache=True)
        step = pm(input_ids=x[:, -1:], past_key_values=first.past_key_values, attention_mask=torch.ones_like(x)).logits
    assert_close(step[:, -1], full, tier="reordered")  # cached attention sums in another order


# ---- life cycle, parity ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", MODELS)
def test_life_cycle(case, tmp_path):
    pm = check_life_cycle(MODELS[case], _config(case), tmp_path)
    width = {"llama": 2 * 2 * 16, "gpt2": 2 * 2 * 32, "bert-cls": 2 * 2 * 32}[case]
    assert pm.get_adapter_state_dict("default")["prompt_embeddings"].shape == (3, width)


@pytest.mark.parametrize(
    "case,kw", [("llama", {}), ("llama", dict(prefix_projection=True)), ("gpt2", {}), ("bert-cls", {})],
    ids=["llama", "llama-projection", "gpt2", "bert-cls"],
)
def test_peft_parity_both_directions(case, kw, tmp_path, monkeypatch):
    import peft

    if case == "bert-cls":
        _let_peft_find_the_cache_argument(monkeypatch)
    kw = dict(num_virtual_tokens=3, task_type=TASK[case], **kw)
    x = input_ids()
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    peft_round_trip(MODELS[case], PrefixTuningConfig(**kw), peft.PrefixTuningConfig(**kw), tmp_path, mask)


def _let_peft_find_the_cache_argument(monkeypatch):
    """peft 0.21.2 runs a sequence classifier's prefix through its backbone only if the backbone's forward
    declares ``past_key_values``; transformers 5.25 renamed it ``cache`` (the old name still works, with a
    warning), so peft refuses BERT with "Model does not support past key values". The oracle's own code
    is left as it is: its signature check is shown the old name, which the model still accepts."""
    import inspect

    from transformers import BertModel

    sig = inspect.signature(BertModel.forward)
    if "past_key_values" in sig.parameters or "cache" not in sig.parameters:
        return  # a transformers release peft reads correctly
    params = list(sig.parameters.values())
    extra = inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = len(params) - 1 if params[-1].kind is inspect.Parameter.VAR_KEYWORD else len(params)
    monkeypatch.setattr(BertModel.forward, "__signature__", sig.replace(parameters=params[:at] + [extra] + params[at:]), raising=False)


def test_projection_saves_the_final_table_and_loads_for_inference_only(tmp_path):
    pm = get_peft_model(tiny_llama(), _config(prefix_projection=True, encoder_hidden_size=24))
    enc = pm.prompt_encoder["default"]
    # embedding (3 x 16) + Linear(16 -> 24) + Linear(24 -> 2 layers * 2 * 16)
    assert pm.get_nb_trainable_parameters()[0] == 3 * 16 + (16 * 24 + 24) + (24 * 64 + 64)
    assert torch.equal(pm.get_adapter_state_dict("default")["prompt_embeddings"], enc().detach())
    pm.eval()
    pm.save_pretrained(tmp_path)
    x = input_ids()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert_close(loaded(input_ids=x).logits, pm(input_ids=x).logits)
    with pytest.raises(ValueError, match="is_trainable=False"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)


def test_gradient_checkpointing_is_refused_with_a_reason():
    model = tiny_llama()
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        get_peft_model(model, _config())
    pm = get_peft_model(tiny_llama(), _config())
    pm.base_model.model.gradient_checkpointing_enable()
    pm.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        pm(input_ids=input_ids())


# ---- generate ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,projection", [(tiny_llama, False), (tiny_gpt2, False), (tiny_llama, True)])
def test_generate_with_and_without_cache_matches_full_forwards(make, projection):
    pm = get_peft_model(make(), _config(prefix_projection=projection))
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.mul_(3.0)  # make the prefix matter
    check_generate_matches_reference(pm.eval(), positions=True)


def test_two_prefix_adapters_switch():
    pm = get_peft_model(tiny_gpt2(), _config())
    pm.add_adapter("other", PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"))
    x = input_ids()
    first = pm(input_ids=x, use_cache=True)
    pm.set_adapter("other")
    second = pm(input_ids=x, use_cache=True)
    assert second.past_key_values.get_seq_length() == 5 + x.shape[1]
    assert (first.logits - second.logits).abs().max() > 1e-4
    assert pm.get_nb_trainable_parameters()[0] == 5 * 2 * 2 * 32
