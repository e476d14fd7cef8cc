"""peft docs, ported: ``docs/source/developer_guides/lora.md`` (huggingface/peft daf335f5^, the last version of the
LoRA guide; its content now lives in ``package_reference/lora.md``). The mixed-batch section is in
``test_docs_mixed_models.py``.

Snippets: initialisation (default, "gaussian", False, "pissa", "pissa_niter_[n]", "olora", EVA), rsLoRA,
DoRA (+ ``LoraRuntimeConfig(ephemeral_gpu_offload=True)``, ``from_pretrained(..., ephemeral_gpu_offload=True)``,
``DoraCaching``), QLoRA-style ``"all-linear"``, ``layer_replication``, ``rank_pattern`` with the page's
Outer/Middle/Inner model and its six bullet points, ``target_parameters``, ``trainable_token_indices``,
``ensure_weight_tying``, the LoRA-FA and LoRA+ optimizers, ``merge_and_unload``, ``merge_adapter`` /
``unmerge_adapter``, ``add_weighted_adapter`` (fp16 base, then inference), ``load_adapter`` /
``set_adapter``, ``unload`` / ``delete_adapter``, and aLoRA's config. Not ported: CorDA (the page's
``CordaConfig`` import is not exported by peft 0.21.2), LoftQ and LoRA-GA (only links), KappaTune, MonteCLoRA,
VeLoRA, intruder-dimension reduction, tensor parallelism, Arrow / GenKnowSub (all need a hub, a GPU or
several processes). Model ids -> a tiny random Llama (and tokenizer) in a local folder; the zephyr
adapters -> random LoRA adapters saved by peft; the ``...`` in configs -> ``target_modules=["q_proj", "v_proj"]``.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer, LlamaForCausalLM

from docs_support import bug, imp, llama_config, load_causal_lm, local_llama, oracle, ours, perturb, same_start
from support_data import tiny_tokenizer
from tolerances import assert_close

X = torch.tensor([[5, 6, 7, 8, 9, 10]])
TARGETS = dict(target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    import peft

    root = tmp_path_factory.mktemp("lora_guide")
    model_id = local_llama(root / "Mistral-7B-v0.1")
    for seed, name in enumerate(["zephyr-7b-sft-lora", "zephyr-7b-dpo-lora"]):
        torch.manual_seed(seed)
        model = peft.get_peft_model(load_causal_lm(model_id), peft.LoraConfig(r=4, init_lora_weights=False, **TARGETS))
        model.save_pretrained(root / name)
    return {"model_id": model_id, "sft": str(root / "zephyr-7b-sft-lora"), "dpo": str(root / "zephyr-7b-dpo-lora")}


def base_logits(model_id):
    with torch.no_grad():
        return load_causal_lm(model_id)(input_ids=X).logits


# ---- Initialization ------------------------------------------------------------------------------------
def with_init(lib, model_id, init):
    LoraConfig = lib.LoraConfig  # from peft import LoraConfig

    config = LoraConfig(init_lora_weights=init, **TARGETS)
    torch.manual_seed(0)
    return lib.get_peft_model(load_causal_lm(model_id), config)


def _factors(model, lib):
    return {k: v for k, v in lib.get_peft_model_state_dict(model).items()}


@pytest.mark.parametrize("init", [True, "gaussian", False, "pissa", "pissa_niter_4", "olora"])
def test_initialization_options(hub, init):
    import deltatune
    import peft

    theirs = oracle(with_init, hub["model_id"], init)
    mine = ours(with_init, hub["model_id"], init)
    f_o, f_t = _factors(mine, deltatune), _factors(theirs, peft)
    assert {k: v.shape for k, v in f_o.items()} == {k: v.shape for k, v in f_t.items()}
    with torch.no_grad():
        out_o, out_t, base = mine(input_ids=X).logits, theirs(input_ids=X).logits, base_logits(hub["model_id"])
    if init is False:  # "initialized such that they do *not* result in an identity transform"
        assert not torch.allclose(out_o, base, atol=1e-4) and not torch.allclose(out_t, base, atol=1e-4)
        return
    # every other option starts as the base model (PiSSA/OLoRA by moving the base weight)
    assert_close(out_o, base, scale=10)
    assert_close(out_t, base, scale=10)
    b_keys = [k for k in f_o if k.endswith("lora_B.weight")]
    if init in (True, "gaussian"):  # A random (Kaiming-uniform / N(0, 1/r)), B zero
        assert all(not f_o[k].any() for k in b_keys)
        a_o = torch.cat([f_o[k].flatten() for k in f_o if k.endswith("lora_A.weight")])
        a_t = torch.cat([f_t[k].flatten() for k in f_t if k.endswith("lora_A.weight")])
        assert 0.8 < a_o.std() / a_t.std() < 1.25
    elif init in ("pissa", "olora"):  # deterministic: the same factors and the same residual base weights
        for k in f_o:
            assert_close(f_o[k], f_t[k], scale=10)
        q_o = mine.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
        q_t = theirs.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
        assert_close(q_o, q_t, scale=10)
    else:  # pissa_niter_4: randomised SVD; B A (scaling 1) captures about the top-r energy of W in both
        k = "base_model.model.model.layers.0.self_attn.q_proj"
        ba_o = f_o[f"{k}.lora_B.weight"] @ f_o[f"{k}.lora_A.weight"]
        ba_t = f_t[f"{k}.lora_B.weight"] @ f_t[f"{k}.lora_A.weight"]
        top = torch.linalg.svdvals(load_causal_lm(hub["model_id"]).model.layers[0].self_attn.q_proj.weight)[:8].norm()
        assert torch.linalg.matrix_rank(ba_o) == 8
        assert 0.9 < ba_o.norm() / top <= 1.0 + 1e-4 and 0.9 < ba_t.norm() / top <= 1.0 + 1e-4


def eva(lib, model_id):
    LoraConfig, EvaConfig = lib.LoraConfig, lib.EvaConfig  # from peft import LoraConfig, EvaConfig
    get_peft_model, initialize_lora_eva_weights = lib.get_peft_model, lib.initialize_lora_eva_weights

    peft_config = LoraConfig(
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=2.0),
        r=4, **TARGETS,
    )
    model = load_causal_lm(model_id)
    peft_model = get_peft_model(model, peft_config, low_cpu_mem_usage=True)
    g = torch.Generator().manual_seed(0)
    dataloader = [{"input_ids": torch.randint(3, 300, (4, 16), generator=g), "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(4)]
    initialize_lora_eva_weights(peft_model, dataloader, show_progress_bar=False)
    return peft_model


@bug("EVA initialisation (init_lora_weights='eva', EvaConfig, initialize_lora_eva_weights) is not implemented",
     raises=AttributeError)
def test_eva_initialization(hub):
    import deltatune
    import peft

    theirs = oracle(eva, hub["model_id"])
    mine = ours(eva, hub["model_id"])
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    # "uses the right-singular vectors to initialize LoRA weights": orthonormal rows of A
    k = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    for A in (peft.get_peft_model_state_dict(theirs)[k], deltatune.get_peft_model_state_dict(mine)[k]):
        assert_close(A @ A.T, torch.eye(A.shape[0]), scale=100)


# ---- rsLoRA and DoRA --------------------------------------------------------------------------------------
def variant(lib, model_id, **kw):
    LoraConfig = lib.LoraConfig  # from peft import LoraConfig

    config = LoraConfig(**kw, **TARGETS)
    return lib.get_peft_model(load_causal_lm(model_id), config)


def test_rank_stabilized_lora(hub):
    import deltatune

    theirs = perturb(oracle(variant, hub["model_id"], use_rslora=True, r=16, lora_alpha=8))
    mine = same_start(theirs, ours(variant, hub["model_id"], use_rslora=True, r=16, lora_alpha=8))
    with torch.no_grad():
        assert_close(mine(input_ids=X).logits, theirs(input_ids=X).logits)
        # the scale is lora_alpha / sqrt(r) = 2, not lora_alpha / r = 0.5
        q = mine.get_base_model().model.layers[0].self_attn.q_proj
        h = torch.randn(3, 32)
        sd = imp(deltatune, "", "get_peft_model_state_dict")(mine)  # from deltatune import get_peft_model_state_dict
        k = "base_model.model.model.layers.0.self_attn.q_proj"
        A, B = sd[f"{k}.lora_A.weight"], sd[f"{k}.lora_B.weight"]
        assert_close(q(h), q.base_layer(h) + 8 / math.sqrt(16) * h @ A.T @ B.T)


def test_dora_matches_peft_and_merges(hub):
    theirs = perturb(oracle(variant, hub["model_id"], use_dora=True))
    mine = same_start(theirs, ours(variant, hub["model_id"], use_dora=True))
    mine.eval()
    theirs.eval()
    with torch.no_grad():
        unmerged = mine(input_ids=X).logits
        assert_close(unmerged, theirs(input_ids=X).logits)
        # "it is recommended to merge weights for inference, see merge_and_unload"
        assert_close(mine.merge_and_unload()(input_ids=X).logits, unmerged, scale=10)


def dora_runtime_config(lib, model_id, build=True):
    LoraConfig, LoraRuntimeConfig = lib.LoraConfig, lib.LoraRuntimeConfig  # from peft import LoraConfig, LoraRuntimeConfig

    config = LoraConfig(use_dora=True, runtime_config=LoraRuntimeConfig(ephemeral_gpu_offload=True), **TARGETS)
    return lib.get_peft_model(load_causal_lm(model_id), config) if build else config


@bug("LoraRuntimeConfig / LoraConfig(runtime_config=...) is not implemented", raises=AttributeError)
def test_dora_runtime_config_ephemeral_gpu_offload(hub):
    # peft 0.21.2 needs CUDA for ephemeral_gpu_offload=True (CPU-only torch: "Torch not compiled with CUDA
    # enabled" from get_peft_model), so without a GPU only the config is built.
    build = torch.cuda.is_available()
    theirs = oracle(dora_runtime_config, hub["model_id"], build)
    mine = ours(dora_runtime_config, hub["model_id"], build)
    if build:
        assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    else:
        assert mine.runtime_config.ephemeral_gpu_offload is theirs.runtime_config.ephemeral_gpu_offload is True


def test_dora_from_pretrained_with_ephemeral_gpu_offload(hub, tmp_path):
    import peft

    theirs = perturb(oracle(variant, hub["model_id"], use_dora=True))
    theirs.save_pretrained(tmp_path / "dora")

    def load(lib):
        PeftModel = lib.PeftModel  # from peft import PeftModel

        model = PeftModel.from_pretrained(load_causal_lm(hub["model_id"]), str(tmp_path / "dora"), ephemeral_gpu_offload=True)
        with torch.no_grad():
            return model(input_ids=X).logits

    if torch.cuda.is_available():
        assert_close(ours(load), oracle(load))
        return
    # Without CUDA peft 0.21.2 itself fails ("Torch not compiled with CUDA enabled"); deltatune accepts the
    # flag (it has no offloading) and loads the adapter as without it.
    with pytest.raises(AssertionError, match="CUDA"):
        load(peft)
    theirs.eval()
    with torch.no_grad():
        assert_close(ours(load), theirs(input_ids=X).logits)


def dora_caching(lib, model_id):
    DoraCaching = imp(lib, "helpers", "DoraCaching")  # from peft.helpers import DoraCaching

    model = perturb(variant(lib, model_id, use_dora=True))
    model.eval()
    with torch.no_grad():
        plain = model(X).logits
        with DoraCaching():
            output = model(X)
    return plain, output.logits


@bug("peft.helpers.DoraCaching has no deltatune counterpart (deltatune.helpers has cast_mixed_precision_params only)", raises=ImportError)
def test_dora_caching_helper(hub):
    plain_t, cached_t = oracle(dora_caching, hub["model_id"])
    assert_close(cached_t, plain_t)
    plain_o, cached_o = ours(dora_caching, hub["model_id"])
    assert_close(cached_o, plain_o)


# ---- Training --------------------------------------------------------------------------------------------
def test_qlora_style_all_linear(hub):
    import deltatune
    import peft

    theirs = oracle(lambda lib: lib.get_peft_model(load_causal_lm(hub["model_id"]), lib.LoraConfig(target_modules="all-linear")))
    mine = ours(lambda lib: lib.get_peft_model(load_causal_lm(hub["model_id"]), lib.LoraConfig(target_modules="all-linear")))
    keys = deltatune.get_peft_model_state_dict(mine).keys()
    assert keys == peft.get_peft_model_state_dict(theirs).keys()
    assert len(keys) == 2 * 2 * 7 and not any("lm_head" in k for k in keys)  # 7 linears per layer, not the head


def replication(lib, tmp_path):
    model_id = local_llama(tmp_path / "five_layers", layers=5)
    config = lib.LoraConfig(layer_replication=[[0, 4], [2, 5]], **TARGETS)
    return lib.get_peft_model(load_causal_lm(model_id), config)


@bug("LoraConfig(layer_replication=...) is not implemented (a ValueError giving the reason, deltatune/lora_options.py)", raises=ValueError)
def test_memory_efficient_layer_replication(tmp_path):
    theirs = oracle(replication, tmp_path)
    # "this would create a model with 7 layers arranged as [0, 1, 2, 3, 2, 3, 4]"
    assert len(theirs.get_base_model().model.layers) == 7
    mine = ours(replication, tmp_path)
    assert len(mine.get_base_model().model.layers) == 7
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.foo, self.barfoo = nn.Linear(4, 4), nn.Linear(4, 4)


class Middle(nn.Module):
    def __init__(self):
        super().__init__()
        self.foo, self.foobar, self.module = nn.Linear(4, 4), nn.Linear(4, 4), Inner()


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.foo, self.module = nn.Linear(4, 4), Middle()

    def forward(self, x):
        return self.module.module.barfoo(self.module.module.foo(self.module.foobar(self.module.foo(self.foo(x)))))


ALL = ["foo", "module.foo", "module.foobar", "module.module.foo", "module.module.barfoo"]
RANK_PATTERN_BULLETS = [  # (rank_pattern, the layers the page says get rank 42 / 55)
    ({"foo": 42}, {"foo": 42, "module.foo": 42, "module.module.foo": 42}),
    ({"^foo": 42}, {"foo": 42}),
    ({"^module.foo": 42}, {"module.foo": 42}),
    ({"module.foo": 42}, {"module.foo": 42, "module.module.foo": 42}),
    ({"^foo": 42, "^module.module.foo": 55}, {"foo": 42, "module.module.foo": 55}),
    ({"^module.module.barfoo": 42}, {"module.module.barfoo": 42}),  # "just pass the full name ... preceded by ^"
]


@pytest.mark.parametrize("rank_pattern,expected", RANK_PATTERN_BULLETS, ids=[str(p) for p, _ in RANK_PATTERN_BULLETS])
def test_rank_pattern_bullets_on_the_pages_model(rank_pattern, expected):
    def ranks(lib):
        model = lib.get_peft_model(Outer(), lib.LoraConfig(target_modules=ALL, r=2, rank_pattern=rank_pattern, alpha_pattern=rank_pattern))
        sd = lib.get_peft_model_state_dict(model)
        return {n: sd[f"base_model.model.{n}.lora_A.weight"].shape[0] for n in ALL}

    want = {n: expected.get(n, 2) for n in ALL}
    assert oracle(ranks) == want
    assert ours(ranks) == want


class TinyMoE(nn.Module):
    """Experts stored as one 3-d nn.Parameter (num_experts, out, in), as many MoE layers in transformers."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.experts = nn.Module()
        self.mlp.experts.down_proj = nn.Parameter(torch.randn(2, 8, 8) * 0.1)

    def forward(self, x):
        return torch.einsum("eoi,bi->bo", self.mlp.experts.down_proj, x)


def test_targeting_nn_parameter_directly():
    def snippet(lib):
        torch.manual_seed(0)
        config = lib.LoraConfig(r=2, target_modules=[], target_parameters=["mlp.experts.down_proj"])
        return lib.get_peft_model(TinyMoE(), config)

    theirs = oracle(snippet)
    assert theirs.get_nb_trainable_parameters()[0] > 0
    mine = ours(snippet)
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def new_tokens(lib, model_id):
    LoraConfig, get_peft_model = lib.LoraConfig, lib.get_peft_model  # from peft import get_peft_model, LoraConfig

    base_model = load_causal_lm(model_id)
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    # we define our new tokens and add them to the tokenizer as special tokens
    special_tokens = ['<|start_think|>', '<|stop_think|>']
    tokenizer.add_special_tokens({'additional_special_tokens': special_tokens})
    # make room for new tokens in the embedding matrix if it isn't big enough already
    torch.manual_seed(0)
    base_model.resize_token_embeddings(max(len(tokenizer), base_model.model.embed_tokens.num_embeddings))
    lora_config = LoraConfig(
        target_modules='all-linear',
        trainable_token_indices={'embed_tokens': tokenizer.convert_tokens_to_ids(special_tokens)},
    )
    return get_peft_model(base_model, lora_config)


def test_efficiently_train_tokens_alongside_lora(hub):
    theirs = oracle(new_tokens, hub["model_id"])
    mine = ours(new_tokens, hub["model_id"])
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@bug("LoraConfig(ensure_weight_tying=True) is not implemented (a ValueError giving the reason)", raises=ValueError)
def test_weight_tying_keeps_lora_adapters_tied(tmp_path):
    def snippet(lib):
        torch.manual_seed(0)
        cfg = llama_config(tiny_tokenizer())
        cfg.tie_word_embeddings = True
        model = LlamaForCausalLM(cfg)
        config = lib.LoraConfig(target_modules=["embed_tokens"], ensure_weight_tying=True)
        return lib.get_peft_model(model, config)

    theirs = oracle(snippet)
    mine = ours(snippet)
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


# ---- Optimizers ------------------------------------------------------------------------------------------
def lorafa(lib, model_id):
    LoraConfig, get_peft_model = lib.LoraConfig, lib.get_peft_model
    create_lorafa_optimizer = imp(lib, "optimizers", "create_lorafa_optimizer")  # from peft.optimizers import ...

    config = LoraConfig(r=128, lora_alpha=32, **TARGETS)
    model = get_peft_model(load_causal_lm(model_id), config)
    optimizer = create_lorafa_optimizer(model=model, r=128, lora_alpha=32, lr=7e-5)
    return model, optimizer


@bug("create_lorafa_optimizer (LoRA-FA) is not implemented (deltatune.optimizers has LoRA+ only)", raises=ImportError)
def test_lora_fa_optimizer(hub):
    model_t, opt_t = oracle(lorafa, hub["model_id"])
    assert not any(p.requires_grad for n, p in model_t.named_parameters() if "lora_A" in n)  # A is frozen
    model_o, opt_o = ours(lorafa, hub["model_id"])
    assert sum(p.numel() for g in opt_o.param_groups for p in g["params"]) == sum(p.numel() for g in opt_t.param_groups for p in g["params"])


def loraplus(lib, model_id):
    LoraConfig, get_peft_model = lib.LoraConfig, lib.get_peft_model
    create_loraplus_optimizer = imp(lib, "optimizers", "create_loraplus_optimizer")  # from peft.optimizers import ...

    base_model = load_causal_lm(model_id)
    config = LoraConfig(**TARGETS)
    model = get_peft_model(base_model, config)
    optimizer = create_loraplus_optimizer(
        model=model,
        optimizer_cls=torch.optim.Adam,  # bnb.optim.Adam8bit in the page (a CUDA optimizer)
        lr=5e-5,
        loraplus_lr_ratio=16,
    )
    return optimizer


def test_lora_plus_optimizer(hub):
    def groups(opt):
        return sorted((g["lr"], sum(p.numel() for p in g["params"])) for g in opt.param_groups if g["params"])

    expected = groups(oracle(loraplus, hub["model_id"]))
    assert {lr for lr, _ in expected} == {5e-5, 5e-5 * 16}
    assert groups(ours(loraplus, hub["model_id"])) == expected


# ---- Post-training: merging -----------------------------------------------------------------------------
def merge_and_unload(lib, hub):
    PeftModel = lib.PeftModel  # from peft import PeftModel

    base_model = load_causal_lm(hub["model_id"])
    peft_model_id = hub["sft"]  # "alignment-handbook/zephyr-7b-sft-lora"
    model = PeftModel.from_pretrained(base_model, peft_model_id)
    with torch.no_grad():
        unmerged = model(input_ids=X).logits
    model = model.merge_and_unload()
    return unmerged, model


def test_merge_and_unload(hub):
    unmerged_t, merged_t = oracle(merge_and_unload, hub)
    unmerged_o, merged_o = ours(merge_and_unload, hub)
    assert type(merged_o) is type(merged_t) is LlamaForCausalLM  # "a basic model without any PEFT-specific functionality"
    assert all(type(m) is nn.Linear for m in merged_o.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        assert_close(unmerged_o, unmerged_t)
        assert_close(merged_o(input_ids=X).logits, unmerged_o, scale=10)
        assert_close(merged_o(input_ids=X).logits, merged_t(input_ids=X).logits, scale=10)


def merge_unmerge(lib, hub):
    PeftModel = lib.PeftModel  # from peft import PeftModel

    base_model = load_causal_lm(hub["model_id"])
    model = PeftModel.from_pretrained(base_model, hub["sft"])
    with torch.no_grad():
        before = model(input_ids=X).logits
        model.merge_adapter()
        merged = model(input_ids=X).logits
        q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.clone()
        # unmerge the LoRA layers from the base model
        model.unmerge_adapter()
        after = model(input_ids=X).logits
        restored = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    return before, merged, after, q, restored


def test_merge_adapter_then_unmerge_adapter(hub):
    before_t, merged_t, after_t, q_t, _ = oracle(merge_unmerge, hub)
    before_o, merged_o, after_o, q_o, restored = ours(merge_unmerge, hub)
    assert_close(before_o, before_t)
    assert_close(merged_o, before_o, scale=10)
    assert_close(after_o, before_o, scale=10)
    assert_close(q_o, q_t)  # the merged base weight itself
    assert not torch.allclose(q_o, restored)
    assert_close(restored, load_causal_lm(hub["model_id"]).model.layers[0].self_attn.q_proj.weight)


def weighted(lib, hub):
    PeftModel = lib.PeftModel  # from peft import PeftModel

    base_model = load_causal_lm(hub["model_id"], dtype=torch.float16)  # device_map="auto" dropped
    peft_model_id = hub["sft"]  # "alignment-handbook/zephyr-7b-sft-lora"
    model = PeftModel.from_pretrained(base_model, peft_model_id, adapter_name="sft")
    weighted_adapter_name = "sft-dpo"
    model.load_adapter(hub["dpo"], adapter_name="dpo")
    model.add_weighted_adapter(
        adapters=["sft", "dpo"],
        weights=[0.7, 0.3],
        adapter_name=weighted_adapter_name,
        combination_type="linear"
    )
    model.set_adapter(weighted_adapter_name)

    device = "cpu"
    tokenizer = AutoTokenizer.from_pretrained(hub["model_id"])
    prompt = "Hey, are you conscious? Can you talk to me?"
    inputs = tokenizer(prompt, return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with torch.no_grad():
        logits = model(**inputs).logits
        generate_ids = model.generate(**inputs, max_length=30)
    outputs = tokenizer.batch_decode(generate_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
    return logits, outputs, model


def test_add_weighted_adapter_linear_on_fp16_then_generate(hub):
    import deltatune
    import peft

    logits_t, text_t, theirs = oracle(weighted, hub)
    logits_o, text_o, mine = ours(weighted, hub)
    assert logits_o.dtype == torch.float16
    assert_close(logits_o, logits_t)
    assert text_o == text_t
    shapes = {k: v.shape for k, v in deltatune.get_peft_model_state_dict(mine, adapter_name="sft-dpo").items()}
    assert shapes == {k: v.shape for k, v in peft.get_peft_model_state_dict(theirs, adapter_name="sft-dpo").items()}


# ---- Load adapters ---------------------------------------------------------------------------------------
def load_and_set(lib, hub):
    PeftModel = lib.PeftModel  # from peft import PeftModel

    base_model = load_causal_lm(hub["model_id"])
    peft_model_id = hub["sft"]
    model = PeftModel.from_pretrained(base_model, peft_model_id)

    # load different adapter
    model.load_adapter(hub["dpo"], adapter_name="dpo")

    # set adapter as active
    model.set_adapter("dpo")
    return model


def test_load_adapter_and_set_adapter(hub):
    theirs, mine = oracle(load_and_set, hub), ours(load_and_set, hub)
    assert mine.active_adapter == theirs.active_adapter == "dpo"
    with torch.no_grad():
        assert_close(mine(input_ids=X).logits, theirs(input_ids=X).logits)
        mine.set_adapter("default")
        theirs.set_adapter("default")
        assert_close(mine(input_ids=X).logits, theirs(input_ids=X).logits)


def test_unload_or_delete_adapter(hub):
    # the page shows both one after the other; they are alternatives (after unload() there is no PeftModel)
    def unload(lib):
        model = load_and_set(lib, hub)
        # unload adapter
        model = model.unload()
        with torch.no_grad():
            return type(model), model(input_ids=X).logits

    def delete(lib):
        model = load_and_set(lib, hub)
        # delete adapter
        model.delete_adapter("dpo")
        with torch.no_grad():
            return sorted(model.peft_config), model.active_adapter, model(input_ids=X).logits

    kind_t, out_t = oracle(unload)
    kind_o, out_o = ours(unload)
    assert kind_o is kind_t is LlamaForCausalLM
    assert_close(out_o, base_logits(hub["model_id"]))
    names_t, active_t, logits_t = oracle(delete)
    names_o, active_o, logits_o = ours(delete)
    assert names_o == names_t == ["default"]
    assert_close(logits_o, logits_t)


# ---- Inference: aLoRA -------------------------------------------------------------------------------------
@bug("LoraConfig(alora_invocation_tokens=...) (Activated LoRA) is not implemented (a ValueError giving the reason)",
     raises=ValueError)
def test_activated_lora_config(hub):
    def snippet(lib):
        LoraConfig = lib.LoraConfig  # from peft import LoraConfig

        tokenizer = AutoTokenizer.from_pretrained(hub["model_id"])
        invocation_string = "<|im_start|>assistant"
        alora_invocation_tokens = tokenizer.encode(invocation_string, add_special_tokens=False)
        config = LoraConfig(alora_invocation_tokens=alora_invocation_tokens, task_type="CAUSAL_LM", **TARGETS)
        model = lib.get_peft_model(load_causal_lm(hub["model_id"]), config)
        perturb(model).eval()
        ids = tokenizer("Hello there<|im_start|>assistant hi", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return model(input_ids=ids).logits, ids

    logits_t, ids = oracle(snippet)
    base = load_causal_lm(hub["model_id"])(input_ids=ids).logits
    n = 2  # "Weights on prior tokens are left un-adapted": the tokens before the invocation match the base
    assert_close(logits_t[:, :n], base[:, :n])
    logits_o, _ = ours(snippet)
    assert_close(logits_o[:, :n], base[:, :n])
