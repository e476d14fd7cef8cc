"""The save guard (deltatune.io.adapter_guard): a sharded, empty, flattened, mis-shaped or meta adapter is
refused on save with nothing written, and ``deltatune inspect --adapter`` reports such a folder as broken.

The bad states are what the engines leave in a process (issue 21): ZeRO-3's empty parameters, FSDP1's
flat 1-D shards under ``_fsdp_wrapped_module`` paths, FSDP2's DTensors, a model left on the meta device;
they are made directly on a tiny model (no distributed launch needed to produce them).
"""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
from deltatune.cli.main import main
from deltatune.io.adapter_guard import AdapterNotWholeError, expected_shapes, live_adapter_tensors
from tiny import tiny_gpt2, tiny_llama

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"  # (r, in) = (4, 32)
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"  # (out, r) = (32, 4)


def _q_adapter(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj.adapters["default"]


def _folder_digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _empty(model):  # ZeRO-3: outside a gather every parameter is a (0,) placeholder
    _q_adapter(model).lora_A = nn.Parameter(torch.empty(0))


def _flattened(model):  # FSDP1: a flat 1-D shard in place of the matrix
    a = _q_adapter(model)
    a.lora_A = nn.Parameter(a.lora_A.detach().reshape(-1)[:64].clone())


def _wrong_shape(model):  # a shard along one dimension: right rank of tensor, wrong size
    a = _q_adapter(model)
    a.lora_B = nn.Parameter(a.lora_B.detach()[:16].clone())


def _meta(model):  # built under torch.device("meta") and never materialised
    _q_adapter(model).lora_A = nn.Parameter(torch.empty(4, 32, device="meta"))


class _FakeFSDP1(nn.Module):
    """What FSDP1 puts around each wrapped module: the original under ``_fsdp_wrapped_module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._fsdp_wrapped_module = module

    def forward(self, *args, **kwargs):
        return self._fsdp_wrapped_module(*args, **kwargs)


def _fsdp_keys(model):
    layers = model.base_model.model.model.layers
    layers[0] = _FakeFSDP1(layers[0])


BAD = {
    "empty": (_empty, Q_A, ["(0,)", "(4, 32)", "empty (numel 0)"]),
    "flattened": (_flattened, Q_A, ["(64,)", "(4, 32)", "flattened to 1-D"]),
    "wrong_shape": (_wrong_shape, Q_B, ["(16, 4)", "(32, 4)", "wrong shape for its base layer"]),
    "meta": (_meta, Q_A, ["on the meta device", "to_empty"]),
    "fsdp_keys": (_fsdp_keys, "layers.0._fsdp_wrapped_module.self_attn.q_proj.lora_A.weight", ["FSDP1 wrapper key"]),
}


def _trained(seed=0):
    torch.manual_seed(seed)
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(init_lora_weights=False, **LORA))
    return model


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter_is_refused_and_the_folder_is_untouched(tmp_path, case):
    spoil, key, words = BAD[case]
    folder = tmp_path / "adapter"
    _trained(seed=1).save_pretrained(folder)  # a previous good save the refused one must not damage
    before = _folder_digest(folder)
    model = _trained()
    spoil(model)
    with pytest.raises(AdapterNotWholeError) as err:
        model.save_pretrained(folder)
    text = str(err.value)
    assert key in text and all(w in text for w in words), text
    assert "nothing was written" in text and "'default'" in text
    if case != "meta":  # the cause and the fix for sharded state
        assert "ZeRO-3" in text and "FSDP" in text and "full_state_dict=True" in text and "Trainer" in text
    assert _folder_digest(folder) == before


def test_nothing_is_written_when_a_second_adapter_is_bad(tmp_path):
    model = _trained()
    model.add_adapter("other", dt.LoraConfig(**LORA))
    model.base_model.model.model.layers[1].self_attn.v_proj.adapters["other"].lora_B = nn.Parameter(torch.empty(0))
    with pytest.raises(AdapterNotWholeError, match="'other'"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.safetensors"))


def test_dtensor_shard_is_refused(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    model = _trained()
    created = not dist.is_initialized()  # a one-process group, unless this process already has one
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        a = _q_adapter(model)
        a.lora_A = nn.Parameter(distribute_tensor(a.lora_A.detach(), mesh, [Shard(0)]))
        with pytest.raises(AdapterNotWholeError, match="a DTensor") as err:
            model.save_pretrained(tmp_path / "out")
        assert Q_A in str(err.value) and "full_state_dict=True" in str(err.value)
    finally:
        if created:
            dist.destroy_process_group()
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_good_adapter_saves_bit_identically_with_peft_keys(tmp_path):
    import peft

    model = _trained()
    live = {k: v.detach().clone() for k, v in live_adapter_tensors(model.base_model.model, "default").items()}
    model.save_pretrained(tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert saved.keys() == live.keys()
    assert all(torch.equal(saved[k], live[k]) and saved[k].dtype == live[k].dtype for k in live)
    reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**LORA))
    assert set(peft.get_peft_model_state_dict(reference)) == set(saved)  # peft's own keys, and no more


def _conv_model():
    return nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 1))


SHAPE_CASES = {
    "lora_linear": (tiny_llama, dict(peft="lora", r=4, target_modules=["q_proj", "down_proj"])),
    "dora": (tiny_llama, dict(peft="lora", r=4, target_modules=["v_proj"], use_dora=True)),
    "lora_embedding": (tiny_llama, dict(peft="lora", r=4, target_modules=["embed_tokens"])),
    "lora_conv1d_gpt2": (tiny_gpt2, dict(peft="lora", r=4, target_modules=["c_attn"], fan_in_fan_out=True)),
    "lora_conv_groups": (_conv_model, dict(peft="lora", r=4, target_modules=["0", "2"], use_dora=True)),
    "ia3": (tiny_llama, dict(peft="ia3", target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "ia3_conv": (_conv_model, dict(peft="ia3", target_modules=["0"], feedforward_modules=["0"])),
    "adalora": (tiny_llama, dict(peft="adalora", total_step=10, target_modules=["q_proj"])),
    "bottleneck": (tiny_llama, dict(peft="bottleneck")),
}
CONFIGS = {"lora": dt.LoraConfig, "ia3": dt.IA3Config, "adalora": dt.AdaLoraConfig, "bottleneck": dt.BottleneckConfig}


@pytest.mark.parametrize("case", sorted(SHAPE_CASES))
def test_declared_shapes_are_what_each_method_builds(tmp_path, case):
    # The guard's shapes come from the layers' declared dims; they must be exactly what the method builds,
    # so a whole adapter of every method saves (and a rule that drifted from its method fails here).
    build, kwargs = SHAPE_CASES[case]
    kwargs = dict(kwargs)
    model = dt.get_peft_model(build(), CONFIGS[kwargs.pop("peft")](**kwargs))
    user_model = model.base_model.model
    expected, live = expected_shapes(user_model, "default"), live_adapter_tensors(user_model, "default")
    assert expected.keys() == live.keys() and expected
    assert all(expected[k] is not None for k in expected)
    for k, t in live.items():
        assert len(expected[k]) == t.dim() and all(e in (-1, d) for e, d in zip(expected[k], t.shape)), k
    model.save_pretrained(tmp_path / case)


# ---- deltatune inspect --adapter on folders written by sharded runs ------------------------------------------
def _write_folder(folder, tensors, base=None):
    _trained().save_pretrained(folder)  # the config as a real save writes it; the tensors replaced below
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base) if base else None
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def _disk_cases():
    good = {k: v.detach().clone() for k, v in live_adapter_tensors(_trained().base_model.model, "default").items()}
    zero3 = {k: torch.empty(0) for k in good}  # ZeRO-3's save: every tensor empty, exit code 0
    flat = dict(good, **{Q_A: good[Q_A].reshape(-1)})
    fsdp1 = {k.replace("model.layers.0.", "_fsdp_wrapped_module.model.layers.0._fsdp_wrapped_module."): v.reshape(-1)
             for k, v in good.items()}
    rank = dict(good, **{Q_B: torch.zeros(32, 3)})
    return {"zero3_empty": (zero3, "empty (numel 0)"), "flattened": (flat, "flattened to 1-D"),
            "fsdp1_keys": (fsdp1, "FSDP1 wrapper key"), "inconsistent_r": (rank, "rank 4 but")}


@pytest.mark.parametrize("with_base", [True, False])
def test_inspect_reports_each_broken_folder(tmp_path, capsys, with_base):
    base = tiny_llama().save_pretrained(tmp_path / "base") or (tmp_path / "base") if with_base else None
    for name, (tensors, words) in _disk_cases().items():
        folder = _write_folder(tmp_path / name, tensors, base)
        assert main(["inspect", "--adapter", str(folder)]) == 1, name
        out = capsys.readouterr().out
        assert "Saved whole: NO" in out and words in out, (name, out)
        assert "ZeRO-3" in out and "full_state_dict=True" in out
        if with_base:
            assert f"Loads on {base}: NO" in out
    good = tmp_path / "good"
    _trained().save_pretrained(good)
    if with_base:
        assert main(["inspect", "--adapter", str(good), str(base)]) == 0
        assert "Saved whole: yes" in capsys.readouterr().out
