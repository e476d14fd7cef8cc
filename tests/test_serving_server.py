"""AdapterServer: saved adapters (ours and peft's) served per row from an LRU bank on a plain model."""
import json
import warnings

import peft
import pytest
import torch

import deltatune as dt
from deltatune.serving import AdapterServer
from tiny import input_ids, tiny_llama
from tolerances import assert_close

CONFIGS = {
    "a": dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "b": dt.LoraConfig(r=6, lora_alpha=12, use_rslora=True, target_modules="all-linear", init_lora_weights=False),
    "c": dt.LoraConfig(r=3, use_dora=True, target_modules=["o_proj", "gate_proj"], init_lora_weights=False),
    "d": dt.IA3Config(init_ia3_weights=False),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each adapter saved in its own folder, plus its logits from PeftModel.from_pretrained as the reference."""
    root = tmp_path_factory.mktemp("adapters")
    x = input_ids(batch=1, seq=6, seed=2)
    refs = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        model = dt.get_peft_model(tiny_llama(), cfg)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)
        model.save_pretrained(root / name)
        loaded = dt.PeftModel.from_pretrained(tiny_llama(), root / name)
        refs[name] = loaded
    with torch.no_grad():
        logits = {n: m(input_ids=x).logits for n, m in refs.items()}
    return root, refs, logits, x


@torch.no_grad()
def test_rows_equal_each_adapter_loaded_alone(saved):
    root, _, logits, x = saved
    server = AdapterServer(tiny_llama(), max_slots=4)
    for name in CONFIGS:
        server.load(name, root / name)
    names = ["d", "__base__", "a", "c", "b", "a"]
    out = server(input_ids=x.expand(len(names), -1), adapter_names=names).logits
    base = tiny_llama()(input_ids=x).logits
    for i, n in enumerate(names):
        assert_close(out[i : i + 1], base if n == "__base__" else logits[n])


@torch.no_grad()
def test_lru_eviction_and_reload_from_path(saved):
    root, _, logits, x = saved
    server = AdapterServer(tiny_llama(), max_slots=2)
    server.load("a", root / "a")
    server.load("b", root / "b")
    server(input_ids=x, adapter_names=["a"])  # "a" is now the most recently used
    server.load("c", root / "c")  # full: evicts "b", the least recently used
    assert server.resident == ["a", "c"]
    loads = server.bank.loads
    out = server(input_ids=x.expand(2, -1), adapter_names=["b", "c"]).logits  # "b" comes back from its folder
    assert server.bank.loads == loads + 1 and server.resident == ["b", "c"]  # "a" was the least recent
    assert_close(out[0:1], logits["b"])
    assert_close(out[1:2], logits["c"])
    with pytest.raises(ValueError, match="max_slots=2"):
        server(input_ids=x.expand(3, -1), adapter_names=["a", "b", "c"])
    server.unload("b")
    with pytest.raises(ValueError, match="no adapter named 'b'"):
        server(input_ids=x, adapter_names=["b"])


@torch.no_grad()
def test_generate_per_row(saved):
    root, refs, _, x = saved
    server = AdapterServer(tiny_llama(), max_slots=3)
    for name in ("a", "c", "d"):
        server.load(name, root / name)
    names = ["c", "d", "a"]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    batch = input_ids(batch=3, seq=4, seed=6)
    out = server.generate(input_ids=batch, adapter_names=names, **kw)
    for i, n in enumerate(names):
        assert torch.equal(out[i : i + 1], refs[n].generate(input_ids=batch[i : i + 1], **kw)), n


@torch.no_grad()
def test_serves_an_adapter_saved_by_peft(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.LoraConfig(r=4, target_modules=["k_proj", "up_proj"], init_lora_weights=False)
        theirs = peft.get_peft_model(tiny_llama(), cfg)
        theirs.save_pretrained(tmp_path)
    server = AdapterServer(tiny_llama())
    server.load("p", tmp_path)
    x = input_ids(batch=2, seq=5)
    assert_close(server(input_ids=x, adapter_names=["p", "p"]).logits, theirs.eval()(input_ids=x).logits)


def test_bad_folders_are_refused_before_anything_changes(saved, tmp_path):
    root, _, _, _ = saved
    server = AdapterServer(tiny_llama(seed=0, hidden=48), max_slots=2)
    with pytest.raises(ValueError, match="does not fit this model"):
        server.load("a", root / "a")
    assert server.resident == [] and server.bank.registered == []
    cfg = json.loads((root / "a" / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["lm_head"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="trains whole modules"):
        AdapterServer(tiny_llama()).load("m", tmp_path)
    with pytest.raises(ValueError, match="plain base model"):
        AdapterServer(dt.get_peft_model(tiny_llama(), CONFIGS["a"]))
