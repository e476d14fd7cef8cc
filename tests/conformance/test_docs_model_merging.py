"""peft docs, ported: ``docs/source/developer_guides/model_merging.md`` (huggingface/peft main, 5d602fdb).

Snippets: loading three LoRA adapters by name (``PeftConfig.from_pretrained`` -> base model ->
``resize_token_embeddings`` -> ``PeftModel.from_pretrained`` + ``load_adapter``), ``add_weighted_adapter``
with TIES and with DARE, ``set_adapter("merge")``, the three generation prompts (instruct chat, ad copy
chat, SQL), and merging (IA)³ adapters. TinyLlama and the smangrul/tinyllama_lora_* adapters -> a tiny
Llama in a local folder and three random LoRA adapters saved by peft; ``load_in_4bit=True,
device_map="auto"`` dropped (CPU); the vocabulary 32005 -> ours + 5; ``max_new_tokens`` -> 6.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from docs_support import load_causal_lm, local_llama, oracle, ours
from tolerances import assert_close

INSTRUCT = [{"role": "user", "content": "Write an essay about Generative AI."}]
AD_COPY = [
    {"role": "system", "content": "Create a text ad given the following product and description."},
    {"role": "user", "content": "Product: Sony PS5 PlayStation Console\nDescription: The PS5 console unleashes new gaming possibilities that you never anticipated."},
]
SQL = """Table: 2-11365528-2
Columns: ['Team', 'Head Coach', 'President', 'Home Ground', 'Location']
Natural Query: Who is the Head Coach of the team whose President is Mario Volarevic?
SQL Query:"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The base model and three LoRA adapters (trained elsewhere, by peft), as local folders."""
    import peft

    root = tmp_path_factory.mktemp("merging")
    model_id = local_llama(root / "TinyLlama")
    for seed, name in enumerate(["tinyllama_lora_norobots", "tinyllama_lora_sql", "tinyllama_lora_adcopy"]):
        torch.manual_seed(seed)
        model = peft.get_peft_model(load_causal_lm(model_id), peft.LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=4, init_lora_weights=False))
        model.save_pretrained(root / name)
    return {name: str(root / name) for name in ("tinyllama_lora_norobots", "tinyllama_lora_sql", "tinyllama_lora_adcopy")}


def load_three(lib, hub):
    PeftConfig, PeftModel = lib.PeftConfig, lib.PeftModel  # from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(hub["tinyllama_lora_norobots"])
    model = load_causal_lm(config.base_model_name_or_path)  # load_in_4bit=True, device_map="auto"
    tokenizer = AutoTokenizer.from_pretrained(config.base_model_name_or_path)  # the adapter repo's tokenizer

    model.config.vocab_size = len(tokenizer) + 5  # 32005
    torch.manual_seed(0)  # not in the page: the new rows are random, and both runs must get the same ones
    model.resize_token_embeddings(len(tokenizer) + 5, mean_resizing=False)

    model = PeftModel.from_pretrained(model, hub["tinyllama_lora_norobots"], adapter_name="norobots")
    _ = model.load_adapter(hub["tinyllama_lora_sql"], adapter_name="sql")
    _ = model.load_adapter(hub["tinyllama_lora_adcopy"], adapter_name="adcopy")
    return model, tokenizer


def ties(lib, hub):
    model, tokenizer = load_three(lib, hub)
    adapters = ["norobots", "adcopy", "sql"]
    weights = [2.0, 1.0, 1.0]
    adapter_name = "merge"
    density = 0.2
    model.add_weighted_adapter(adapters, weights, adapter_name, combination_type="ties", density=density)
    model.set_adapter("merge")
    return model, tokenizer


def dare(lib, hub):
    model, tokenizer = load_three(lib, hub)
    adapters = ["norobots", "adcopy", "sql"]
    weights = [2.0, 0.3, 0.7]
    adapter_name = "merge"
    density = 0.2
    model.add_weighted_adapter(adapters, weights, adapter_name, combination_type="dare_ties", density=density)
    model.set_adapter("merge")
    return model, tokenizer


def generate_all(model, tokenizer):
    """The page's three prompts; sampling is seeded so the two libraries can be compared."""
    device = "cpu"
    outs = []
    for messages, new in ((INSTRUCT, 6), (AD_COPY, 6)):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = tokenizer(text, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        torch.manual_seed(0)
        outputs = model.generate(**inputs, max_new_tokens=new, do_sample=True, top_p=0.95, temperature=0.2, repetition_penalty=1.2, eos_token_id=tokenizer.eos_token_id)
        outs.append(tokenizer.decode(outputs[0]))
    inputs = tokenizer(SQL, return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    outputs = model.generate(**inputs, max_new_tokens=6, repetition_penalty=1.1, eos_token_id=tokenizer("</s>").input_ids[-1])
    outs.append(tokenizer.decode(outputs[0]))
    return outs


def _lora_shapes(model, lib, name="merge"):
    sd = lib.get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_ties_merge_matches_peft_and_generates_the_same_text(hub):
    import deltatune
    import peft

    theirs, tok = oracle(ties, hub)
    mine, _ = ours(ties, hub)
    assert mine.active_adapter == theirs.active_adapter == "merge"
    assert _lora_shapes(mine, deltatune) == _lora_shapes(theirs, peft)
    x = tok(SQL, return_tensors="pt")
    with torch.no_grad():
        assert_close(mine(**x).logits, theirs(**x).logits)
    assert generate_all(mine, tok) == oracle(lambda lib: generate_all(theirs, tok))


def test_dare_ties_merge_has_peft_shapes_and_drops_most_entries(hub):
    import deltatune
    import peft

    theirs, tok = oracle(dare, hub)
    mine, _ = ours(dare, hub)
    # DARE's drops are random and the two libraries draw them differently (deltatune's seed= argument
    # reproduces peft's draws; the page passes none), so compare what does not depend on the draw.
    assert mine.active_adapter == "merge"
    assert _lora_shapes(mine, deltatune) == _lora_shapes(theirs, peft)
    assert all(shape[0] == 4 for k, shape in _lora_shapes(mine, deltatune).items() if k.endswith("lora_A.weight"))
    x = tok(SQL, return_tensors="pt")
    with torch.no_grad():
        logits = mine(**x).logits
        with mine.disable_adapter():
            base = mine(**x).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, base)
    assert len(generate_all(mine, tok)) == 3


def ia3_merge(lib, model_id, root):
    model = lib.get_peft_model(load_causal_lm(model_id), lib.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), adapter_name="adapter1")
    for name in ("adapter2", "adapter3"):
        model.add_adapter(name, lib.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # three different "trained" adapters, the same in both libraries
        for name in ("adapter1", "adapter2", "adapter3"):
            for module_name, module in sorted(model.base_model.model.named_modules()):
                vec = _ia3_vector(module, name)
                if vec is not None:
                    vec.copy_(1 + 0.2 * torch.randn(vec.shape, generator=g))

    adapters = ["adapter1", "adapter2", "adapter3"]
    weights = [0.4, 0.3, 0.3]
    adapter_name = "merge"
    model.add_weighted_adapter(adapters, weights, adapter_name)
    model.set_adapter("merge")
    return model


def _ia3_vector(module, name):
    ia3 = getattr(module, "ia3_l", None)  # peft
    if isinstance(ia3, torch.nn.ParameterDict) and name in ia3:
        return ia3[name]
    adapters = getattr(module, "adapters", None)  # deltatune
    if adapters is not None and name in adapters:
        return next(iter(adapters[name].parameters()))
    return None


def test_merging_ia3_adapters(tmp_path):
    model_id = local_llama(tmp_path / "llama")
    theirs = oracle(ia3_merge, model_id, tmp_path)
    mine = ours(ia3_merge, model_id, tmp_path)
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert_close(mine(input_ids=x).logits, theirs(input_ids=x).logits)


def save_merged(lib, hub, out):
    model, _ = ties(lib, hub)
    model.save_pretrained(out, selected_adapters=["merge"])
    return model


def test_saving_the_merged_adapter_of_the_resized_model_keeps_the_embeddings(hub, tmp_path):
    # Beyond the page's last line: saving the merged adapter. The page resized the embeddings to 32005
    # rows; peft's save_embedding_layers="auto" then stores both matrices, so the adapter loads on a
    # fresh base model with the new rows.
    from safetensors.torch import load_file

    oracle(save_merged, hub, tmp_path / "peft")
    ours(save_merged, hub, tmp_path / "ours")
    keys_t = load_file(tmp_path / "peft/merge/adapter_model.safetensors").keys()
    assert "base_model.model.model.embed_tokens.weight" in keys_t
    assert load_file(tmp_path / "ours/merge/adapter_model.safetensors").keys() == keys_t
