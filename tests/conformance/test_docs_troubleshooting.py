"""peft docs, ported: ``docs/source/developer_guides/troubleshooting.md`` (huggingface/peft main, 5d602fdb).

Snippets, in the page's order: casting trainable weights to fp32 by hand and with
``cast_mixed_precision_params``, ``autocast_adapter_dtype``, "weights updated" after three optimizer
steps, loading with ``PeftConfig``/``PeftModel.from_pretrained`` (not ``get_peft_model``), a classifier
head and DeBERTa's ``["classifier", "pooler"]`` in ``modules_to_save``, extending the vocabulary (trainable
tokens, LoRA on the embeddings, full fine-tuning of them), ``task_type=SEQ_CLS``, ``get_layer_status`` /
``get_model_status`` (+ the pandas DataFrame), ``low_cpu_mem_usage=True``, the ResNet with batch norm in
``modules_to_save``, an unknown config key from a newer peft, and several adapters active (and trained)
at once via ``model.base_model.set_adapter``. Hub models -> tiny random ones (Mistral, Llama, T5, DeBERTa,
ResNet); ``Trainer(fp16=True)`` is not run (it needs a GPU), the diffusers example is skipped.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import (DebertaConfig, DebertaForSequenceClassification, LlamaForSequenceClassification,
                          MistralConfig, MistralForCausalLM, ResNetConfig, ResNetForImageClassification, T5Config,
                          T5Model)

from docs_support import llama_config, load_causal_lm, local_llama, oracle, ours, perturb, same_start
from support_data import tiny_tokenizer
from tolerances import assert_close

X = torch.tensor([[5, 6, 7, 8, 9]])


def fp16_model(lib, autocast=False):
    torch.manual_seed(0)
    model = MistralForCausalLM(_mistral_config()).to(torch.float16)
    peft_model = lib.get_peft_model(model, lib.LoraConfig(target_modules=["q_proj", "v_proj"]), autocast_adapter_dtype=autocast)
    return model, peft_model


def _mistral_config(vocab=64):
    return MistralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def cast_by_hand(lib):
    model, peft_model = fp16_model(lib)  # peft_model = get_peft_model(...), adapters kept in fp16
    assert {p.dtype for p in peft_model.parameters() if p.requires_grad} == {torch.float16}

    # add this:
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return peft_model


def _dtypes(peft_model):
    return sorted((p.numel(), str(p.dtype)) for p in peft_model.parameters() if p.requires_grad), \
        {p.dtype for p in peft_model.parameters() if not p.requires_grad}


def test_unscale_fp16_gradients_fix_by_hand():
    theirs, mine = oracle(cast_by_hand), ours(cast_by_hand)
    assert _dtypes(mine) == _dtypes(theirs)
    assert _dtypes(mine)[1] == {torch.float16} and {d for _, d in _dtypes(mine)[0]} == {"torch.float32"}


def cast_with_helper(lib):
    cast_mixed_precision_params = lib.cast_mixed_precision_params  # from peft import cast_mixed_precision_params

    _, peft_model = fp16_model(lib)
    cast_mixed_precision_params(peft_model, dtype=torch.float16)
    return peft_model


def test_unscale_fp16_gradients_fix_with_cast_mixed_precision_params():
    theirs = oracle(cast_with_helper)
    mine = ours(cast_with_helper)
    assert _dtypes(mine) == _dtypes(theirs)


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
def test_selecting_the_dtype_of_the_adapter(autocast):
    # "by default, those weights are stored in float32 ... pass autocast_adapter_dtype=False" to keep fp16
    _, theirs = oracle(fp16_model, autocast)
    _, mine = ours(fp16_model, autocast)
    assert _dtypes(mine) == _dtypes(theirs)
    same_start(theirs, mine)
    with torch.no_grad():
        assert_close(mine(input_ids=X).logits, theirs(input_ids=X).logits)


def weights_updated(lib):
    torch.manual_seed(0)
    model = lib.get_peft_model(MistralForCausalLM(_mistral_config()), lib.LoraConfig(target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # before training
    sample_param = next(p for p in model.parameters() if p.requires_grad)
    before = sample_param.detach().clone()

    # ... train for at least three optimizer steps ...
    for _ in range(3):
        model(input_ids=X, labels=X).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    after = next(p for p in model.parameters() if p.requires_grad)
    print("weights updated:", not torch.allclose(before, after.detach().cpu()))
    return not torch.allclose(before, after.detach().cpu()), tuple(sample_param.shape)


def test_training_runs_check_that_weights_updated(capsys):
    assert oracle(weights_updated)[0]
    capsys.readouterr()
    updated, shape = ours(weights_updated)
    assert capsys.readouterr().out == "weights updated: True\n"
    assert updated and shape == (8, 32)  # the first trainable parameter is the first lora_A, as in peft


@pytest.fixture
def trained(tmp_path):
    """A trained adapter saved by peft (the thing a user loads for inference) and its base model id."""
    import peft

    model_id = local_llama(tmp_path / "base")
    model = perturb(peft.get_peft_model(load_causal_lm(model_id), peft.LoraConfig(target_modules=["q_proj", "v_proj"])))
    model.save_pretrained(tmp_path / "peft_model_id")
    model.add_adapter("other", peft.LoraConfig(target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "two", selected_adapters=["other"])
    with torch.no_grad():
        expected = model(input_ids=X).logits
    return model_id, str(tmp_path / "peft_model_id"), str(tmp_path / "two/other"), expected


def load_correctly(lib, model_id, peft_model_id, **kw):
    PeftModel, PeftConfig = lib.PeftModel, lib.PeftConfig  # from peft import PeftModel, PeftConfig

    base_model = load_causal_lm(model_id)  # to load the base model, use the same code as when you trained it
    config = PeftConfig.from_pretrained(peft_model_id)
    peft_model = PeftModel.from_pretrained(base_model, peft_model_id, **kw)
    return config, peft_model


def test_incorrectly_loaded_model_vs_the_right_way(trained):
    model_id, peft_model_id, _, expected = trained
    config, mine = ours(load_correctly, model_id, peft_model_id)
    assert config.peft_type == "LORA" and sorted(config.target_modules) == ["q_proj", "v_proj"]
    with torch.no_grad():
        assert_close(mine(input_ids=X).logits, expected)
        # "A common error is trying to load a trained model with get_peft_model": a fresh, untrained adapter
        wrong = ours(lambda lib: lib.get_peft_model(load_causal_lm(model_id), config))
        assert not torch.allclose(wrong(input_ids=X).logits, expected)


def test_speed_low_cpu_mem_usage_loading(trained):
    model_id, peft_model_id, other_id, expected = trained
    _, mine = ours(load_correctly, model_id, peft_model_id, low_cpu_mem_usage=True)
    mine.load_adapter(other_id, adapter_name="other", low_cpu_mem_usage=True)
    _, theirs = oracle(load_correctly, model_id, peft_model_id, low_cpu_mem_usage=True)
    theirs.load_adapter(other_id, adapter_name="other", low_cpu_mem_usage=True)
    with torch.no_grad():
        assert_close(mine(input_ids=X).logits, expected)
        mine.set_adapter("other")
        theirs.set_adapter("other")
        assert_close(mine(input_ids=X).logits, theirs(input_ids=X).logits)


def seq_cls(lib, out, seed, **kw):
    tok = tiny_tokenizer()
    cfg = llama_config(tok)
    cfg.num_labels = 3
    torch.manual_seed(seed)  # a different seed gives a different random head, as a fresh download would
    model = LlamaForSequenceClassification(cfg).eval()
    LoraConfig, TaskType = lib.LoraConfig, lib.TaskType  # from peft import LoraConfig, TaskType

    lora_config = LoraConfig(target_modules=["q_proj", "v_proj"], task_type=TaskType.SEQ_CLS, **kw)
    return lib.get_peft_model(model, lora_config)


def test_randomly_initialized_head_is_trained_and_saved_with_task_type(tmp_path):
    theirs = oracle(seq_cls, tmp_path, 0)
    mine = perturb(ours(seq_cls, tmp_path, 0))
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert any(n.startswith("base_model.model.score") and p.requires_grad for n, p in mine.named_parameters())
    mine.save_pretrained(tmp_path / "cls")
    keys = load_file(tmp_path / "cls/adapter_model.safetensors").keys()
    assert "base_model.model.score.weight" in keys
    # "The next time you load the model, you'll get a different randomly initialized classification head"
    # unless it was saved: loading onto a base with another random head gives the trained outputs.
    tok = tiny_tokenizer()
    cfg = llama_config(tok)
    cfg.num_labels = 3
    torch.manual_seed(0)
    fresh = LlamaForSequenceClassification(cfg).eval()
    torch.nn.init.normal_(fresh.score.weight, generator=torch.Generator().manual_seed(1))  # another random head
    loaded = oracle(lambda lib: lib.PeftModel.from_pretrained(fresh, str(tmp_path / "cls")))
    with torch.no_grad():
        assert_close(loaded(input_ids=X).logits, mine.eval()(input_ids=X).logits)


def deberta(lib):
    torch.manual_seed(0)
    model = DebertaForSequenceClassification(DebertaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=2))
    config = lib.LoraConfig(target_modules=["in_proj"], modules_to_save=["classifier", "pooler"])
    return lib.get_peft_model(model, config)


def test_deberta_classifier_and_pooler_in_modules_to_save(tmp_path):
    import deltatune
    import peft

    theirs, mine = oracle(deberta), ours(deberta)
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert deltatune.get_peft_model_state_dict(mine).keys() == peft.get_peft_model_state_dict(theirs).keys()


def add_tokens_and_resize(model_id):
    tokenizer = tiny_tokenizer()
    base_model = load_causal_lm(model_id)
    new_tokens = ['<think>', '</think>']
    tokenizer.add_tokens(new_tokens)
    torch.manual_seed(0)
    base_model.resize_token_embeddings(len(tokenizer))
    return tokenizer, base_model, new_tokens


def trainable_tokens(lib, model_id):
    LoraConfig = lib.LoraConfig
    tokenizer, base_model, new_tokens = add_tokens_and_resize(model_id)

    lora_config = LoraConfig(
        target_modules=["q_proj", "v_proj"],
        trainable_token_indices={'embed_tokens': tokenizer.convert_tokens_to_ids(new_tokens)},
    )
    return lib.get_peft_model(base_model, lora_config)


def test_extending_the_vocabulary_with_trainable_tokens(tmp_path):
    model_id = local_llama(tmp_path / "base")
    theirs = oracle(trainable_tokens, model_id)
    mine = ours(trainable_tokens, model_id)
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def lora_on_embeddings(lib, model_id, out, **config_kw):
    tokenizer, base_model, _ = add_tokens_and_resize(model_id)
    config = lib.LoraConfig(**config_kw)
    model = lib.get_peft_model(base_model, config)
    perturb(model)  # train the model
    model.save_pretrained(out)
    return model


@pytest.mark.parametrize("how", ["lora", "full"])
def test_extending_the_vocabulary_with_lora_or_full_fine_tuning(tmp_path, how):
    import peft

    config_kw = {  # "Using an adapter, e.g. LoRA" and "Full fine-tuning"
        "lora": dict(target_modules=["embed_tokens", "lm_head", "q_proj", "v_proj"]),
        "full": dict(modules_to_save=["embed_tokens", "lm_head"], target_modules=["q_proj", "v_proj"]),
    }[how]
    model_id = local_llama(tmp_path / "base")
    theirs = oracle(lora_on_embeddings, model_id, tmp_path / "peft", **config_kw)
    mine = ours(lora_on_embeddings, model_id, tmp_path / "ours", **config_kw)
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    keys = load_file(tmp_path / "ours/adapter_model.safetensors")
    keys_t = load_file(tmp_path / "peft/adapter_model.safetensors").keys()
    if how == "lora":
        assert keys.keys() == keys_t
        assert keys["base_model.model.model.embed_tokens.base_layer.weight"].shape[0] == len(tiny_tokenizer()) + 2
    else:
        # peft also writes the wrappers' insides (embed_tokens.original_module.weight, .modules_to_save.weight)
        # because the vocabulary was resized; see the save_embedding_layers bug in test_docs_model_merging.
        assert keys.keys() <= keys_t
        assert keys["base_model.model.model.embed_tokens.weight"].shape[0] == len(tiny_tokenizer()) + 2
    # "For inference, load the base model first and resize it the same way ... then load the PEFT checkpoint."
    _, base_model, _ = add_tokens_and_resize(model_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(base_model, str(tmp_path / "ours"))
    mine.eval()
    with torch.no_grad():
        assert_close(loaded(input_ids=X).logits, mine(input_ids=X).logits)


def test_save_embedding_layers_true_by_hand(tmp_path):
    model_id = local_llama(tmp_path / "base")

    def snippet(lib, out):
        model = lib.get_peft_model(load_causal_lm(model_id), lib.LoraConfig(target_modules=["q_proj"]))
        # train the model
        model.save_pretrained(out, save_embedding_layers=True)

    oracle(snippet, tmp_path / "peft")
    ours(snippet, tmp_path / "ours")
    keys = load_file(tmp_path / "ours/adapter_model.safetensors").keys()
    assert keys == load_file(tmp_path / "peft/adapter_model.safetensors").keys()
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= keys


def layer_status(lib):
    get_peft_model, LoraConfig = lib.get_peft_model, lib.LoraConfig  # from peft import get_peft_model, LoraConfig

    torch.manual_seed(0)
    model = T5Model(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                             decoder_start_token_id=0))  # AutoModel.from_pretrained("google/flan-t5-small")
    model = get_peft_model(model, LoraConfig())
    layers = model.get_layer_status()
    status = model.get_model_status()

    from dataclasses import asdict

    import pandas as pd

    df = pd.DataFrame(asdict(layer) for layer in model.get_layer_status())
    get_model_status, get_layer_status = lib.get_model_status, lib.get_layer_status  # from peft import ...
    return layers, status, df, get_layer_status(model), get_model_status(model)


def test_check_layer_and_model_status():
    layers_t, status_t, df_t, _, _ = oracle(layer_status)
    assert layers_t[0].name == "model.encoder.block.0.layer.0.SelfAttention.q"
    assert status_t.active_adapters == ["default"] and status_t.merged_adapters == []
    layers_o, status_o, df_o, by_fn_layers, by_fn_model = ours(layer_status)
    assert [(s.name, s.active_adapters, s.available_adapters) for s in layers_o] == \
        [(s.name, s.active_adapters, s.available_adapters) for s in layers_t]
    assert (status_o.trainable_params, status_o.total_params, status_o.num_adapter_layers) == \
        (status_t.trainable_params, status_t.total_params, status_t.num_adapter_layers)
    assert list(df_o.columns)[:3] == list(df_t.columns)[:3] and len(df_o) == len(df_t)
    assert by_fn_model.num_adapter_layers == status_o.num_adapter_layers and len(by_fn_layers) == len(layers_o)


def resnet_with_batch_norm(lib):
    AutoModelForImageClassification = ResNetForImageClassification
    LoraConfig, get_peft_model = lib.LoraConfig, lib.get_peft_model  # from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base_model = AutoModelForImageClassification(ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3))
    # (the page's snippet ends with a stray "," that makes config a tuple, and reads self.model_id)
    config = LoraConfig(
        target_modules=["convolution"],
        modules_to_save=["classifier", "normalization"],
    )
    return get_peft_model(base_model, config)


def test_models_using_batch_norm_save_their_running_stats(tmp_path):
    import peft

    def train_and_save(lib, out):
        model = resnet_with_batch_norm(lib)
        model.train()
        torch.manual_seed(1)
        model(pixel_values=torch.randn(4, 3, 16, 16))  # updates the batch-norm running stats
        model.eval()
        model.save_pretrained(out)
        return model

    theirs = oracle(train_and_save, tmp_path / "peft")
    # peft itself: the running stats travel with the adapter, so a fresh base reproduces the outputs
    pixels = torch.randn(2, 3, 16, 16)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(ResNetForImageClassification(theirs.base_model.model.config), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert_close(again(pixel_values=pixels).logits, theirs(pixel_values=pixels).logits)
    mine = ours(train_and_save, tmp_path / "ours")
    pixels = torch.randn(2, 3, 16, 16)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = ResNetForImageClassification(theirs.base_model.model.config)
        loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert_close(loaded(pixel_values=pixels).logits, mine(pixel_values=pixels).logits)


def test_version_mismatch_unknown_config_key(trained, tmp_path):
    model_id, peft_model_id, _, expected = trained
    cfg = json.loads((tmp_path / "peft_model_id/adapter_config.json").read_text())
    cfg["foobar"] = 42  # written by a newer peft
    (tmp_path / "peft_model_id/adapter_config.json").write_text(json.dumps(cfg))
    _, theirs = oracle(load_correctly, model_id, peft_model_id)  # peft 0.21.2 ignores it with a warning too
    with pytest.warns(UserWarning, match="foobar"):
        _, mine = ours(load_correctly, model_id, peft_model_id)
    with torch.no_grad():
        assert_close(mine(input_ids=X).logits, expected)
    # the page's workaround: delete the entry from adapter_config.json and load again
    del cfg["foobar"]
    (tmp_path / "peft_model_id/adapter_config.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(load_correctly, model_id, peft_model_id)


def two_adapters_active(lib, model_id, lora_path_0, lora_path_1):
    PeftModel = lib.PeftModel  # from peft import PeftModel

    base_model = load_causal_lm(model_id)
    model = PeftModel.from_pretrained(base_model, lora_path_0)  # default adapter_name is 'default'
    model.load_adapter(lora_path_1, adapter_name="other")
    # the 'other' adapter was loaded but it's not active yet, so to activate both adapters:
    model.base_model.set_adapter(["default", "other"])
    return model


def test_using_multiple_adapters_at_the_same_time(trained):
    model_id, lora_path_0, lora_path_1, _ = trained
    theirs = oracle(two_adapters_active, model_id, lora_path_0, lora_path_1)
    mine = ours(two_adapters_active, model_id, lora_path_0, lora_path_1)
    assert mine.active_adapters == theirs.active_adapters == ["default", "other"]
    with torch.no_grad():
        assert_close(mine(input_ids=X).logits, theirs(input_ids=X).logits)


def two_adapters_training(lib, model_id, activate):
    LoraConfig, get_peft_model = lib.LoraConfig, lib.get_peft_model  # from peft import LoraConfig, get_peft_model

    base_model = load_causal_lm(model_id)
    lora_config_0 = LoraConfig(target_modules=["q_proj"])
    lora_config_1 = LoraConfig(target_modules=["v_proj"])
    model = get_peft_model(base_model, lora_config_0)
    model.add_adapter(adapter_name="other", peft_config=lora_config_1)
    if activate:
        # activate all adapters
        model.base_model.set_adapter(["default", "other"])
    optimizer = torch.optim.AdamW([param for param in model.parameters() if param.requires_grad], lr=1e-3)
    return sum(p.numel() for group in optimizer.param_groups for p in group["params"])


def test_training_two_adapters_only_the_active_one_reaches_the_optimizer(tmp_path):
    model_id = local_llama(tmp_path / "base")
    n = ours(two_adapters_training, model_id, False)
    assert n == oracle(two_adapters_training, model_id, False) == 2 * 8 * (32 + 32)  # q_proj of 2 layers


def test_training_two_adapters_after_activating_both(tmp_path):
    model_id = local_llama(tmp_path / "base")
    expected = oracle(two_adapters_training, model_id, True)
    assert ours(two_adapters_training, model_id, True) == expected == 2 * 8 * (32 + 32) + 2 * 8 * (32 + 16)
