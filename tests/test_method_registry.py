"""A method is one class plus one registry entry: a toy method defined here (a learned per-channel scale on
a layer's output) is picked up by ``deltatune train``'s method table, by ``deltatune plan`` and by
``deltatune inspect``'s dry run, with nothing else edited."""
import enum
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from deltatune import get_peft_model
from deltatune.config import PeftConfig
from deltatune.inspect import meta_model
from deltatune.inspect.report import dry_run
from deltatune.methods.base import METHODS, Adapter, Method, dense_weight, method_names, register_method
from deltatune.plan import meta
from deltatune.plan.setup import METHODS as PLAN_METHODS, TrainSetup, peft_config_for
from deltatune.train.config import load_train_config
from deltatune.train.method_config import METHODS as TRAIN_METHODS
from tiny import tiny_llama


# --- the toy method: one class (config + adapter) and one registry entry -------------------------------
class ToyType(str, enum.Enum):
    TOY = "TOY"


@dataclass(frozen=True)
class ToyConfig(PeftConfig):
    peft_type = ToyType.TOY
    target_modules: Any = None
    exclude_modules: Any = None


class ToyScale(Adapter):
    """y = base(x) * (1 + s), one s per output channel; mergeable as diag(s) W."""

    peft_keys = {"toy_s": "toy_s"}

    def __init__(self, out_features: int):
        super().__init__()
        self.toy_s = nn.Parameter(torch.zeros(out_features))

    def forward(self, x, base_layer, base_out):
        return base_out * (1 + self.toy_s)

    def delta_weight(self, base_layer):
        return self.toy_s[:, None] * dense_weight(base_layer)


def make_toy(config: ToyConfig, layer: nn.Module, name: str) -> ToyScale:
    return ToyScale(layer.out_features)


TOY = Method(ToyType.TOY, ToyConfig, make_toy, layer_types=(nn.Linear,), name="toy",
             train_preset={"target_modules": ["q_proj", "v_proj"]}, merges=True, plannable=True)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def toy():
    register_method(TOY)
    yield TOY
    del METHODS[ToyType.TOY]


def test_registry_lists_every_name_with_its_facts():
    names = method_names()
    assert list(names)[:4] == ["lora", "dora", "rslora", "qlora"]
    assert dict(names["dora"][1].fixed) == {"use_dora": True} and names["qlora"][1].quantized
    assert names["prompt"][0].wraps_forward and not names["bottleneck"][0].merges and names["lora"][0].servable
    assert list(TRAIN_METHODS) == list(names)
    assert list(PLAN_METHODS) == ["lora", "dora", "rslora", "qlora", "ia3", "prompt", "prefix", "bottleneck", "full"]


def test_train_picks_up_the_toy_method(toy):
    assert "toy" in TRAIN_METHODS and TRAIN_METHODS["toy"].config_cls is ToyConfig
    train_config = load_train_config(None, ["method.name=toy"])  # the preset fills in the options
    assert train_config.method.to_dict() == {"name": "toy", "target_modules": ["q_proj", "v_proj"]}
    config = train_config.method.build(total_steps=None)
    assert isinstance(config, ToyConfig) and config.target_modules == ("q_proj", "v_proj")


def test_plan_picks_up_the_toy_method(toy):
    assert "toy" in PLAN_METHODS
    model = tiny_llama()
    config = peft_config_for(TrainSetup(method="toy", targets="qv"), model)
    assert isinstance(config, ToyConfig) and config.target_modules == ("q_proj", "v_proj")
    counted = meta.count_parameters(model.config, "toy", targets="qv")
    real = get_peft_model(tiny_llama(), ToyConfig(target_modules=["q_proj", "v_proj"]))
    assert counted.trainable == real.get_nb_trainable_parameters()[0] == 2 * (32 + 16)  # q_proj 32 outputs, v_proj 16 (2 kv heads of 8), 2 layers


def test_inspect_dry_run_picks_up_the_toy_method(toy):
    config = load_train_config(None, ["method.name=toy"]).method.build(total_steps=None)  # inspect --config's path
    result = dry_run(meta_model(tiny_llama().config), config)
    assert result.targets == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def test_the_toy_method_trains_and_merges(toy):
    model = get_peft_model(tiny_llama(), ToyConfig(target_modules=["q_proj"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    ids = torch.arange(8)[None]
    before = model(input_ids=ids).logits
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, before, rtol=1e-4, atol=1e-5)


def test_unregistered_toy_is_gone():
    assert "toy" not in TRAIN_METHODS and "toy" not in PLAN_METHODS


def test_the_command_line_picks_up_the_toy_method(toy, tmp_path, capsys):
    from deltatune.cli.main import main

    tiny_llama().save_pretrained(tmp_path / "llama")
    assert main(["plan", str(tmp_path / "llama"), "--method", "toy", "--targets", "qv"]) == 0
    assert "toy" in capsys.readouterr().out
    (tmp_path / "run.yaml").write_text(f"model: {tmp_path / 'llama'}\nmethod: {{name: toy}}\n")
    assert main(["inspect", "--config", str(tmp_path / "run.yaml")]) == 0
    out = capsys.readouterr().out
    assert "Dry run: TOY" in out and "wraps 4 modules; trainable parameters 96 " in out, out
