"""TrainConfig: layering (defaults, YAML, dotted overrides), did-you-mean errors per section, type checks."""
from pathlib import Path

import pytest
import yaml

from deltatune import IA3Config, LoraConfig
from deltatune.train.config import TrainConfig, load_train_config
from deltatune.train.config_check import ConfigError
from deltatune.train.method_config import METHODS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TRAIN_EXAMPLES = [EXAMPLES / f"{name}.yaml" for name in (*METHODS, "custom_data", "new_tokens")]  # tune.yaml is deltatune tune's


def test_defaults_are_the_default_job():
    cfg = load_train_config(None, [])
    assert cfg.model == "smollm2-135m-instruct" and cfg.output_dir is None
    assert cfg.method.name == "lora" and cfg.method.options["r"] == 8
    assert cfg.data.source == "bbc-news" and cfg.data.article_tokens == 64
    assert cfg.train.bf16 == "auto" and cfg.eval.scoring == "auto"
    peft = cfg.method.build(total_steps=10, num_layers=30)  # SmolLM2-135M's 30 blocks
    assert isinstance(peft, LoraConfig) and peft.task_type.value == "CAUSAL_LM"
    assert cfg.method.options["layers_to_transform"] == "upper_half" and list(peft.layers_to_transform) == list(range(15, 30))


def test_yaml_then_overrides_with_numbers_lists_and_null(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  r: 4\ntrain:\n  lr: 2e-4\n  max_steps: 10\n")
    cfg = load_train_config(path, ["method.r=16", "method.target_modules=[q_proj,v_proj]", "train.max_steps=null",
                                   "data.max_length=512", "output_dir=runs/x"])
    assert cfg.method.options["r"] == 16 and cfg.method.options["target_modules"] == ["q_proj", "v_proj"]
    assert cfg.train.lr == pytest.approx(2e-4)  # YAML reads 2e-4 as a string; the float field parses it
    assert cfg.train.max_steps is None and cfg.data.max_length == 512 and cfg.output_dir == "runs/x"


@pytest.mark.parametrize("override, suggestion", [
    ("train.lrr=1", "'lr'"), ("data.max_lenght=9", "'max_length'"), ("method.lora_alfa=4", "'lora_alpha'"),
    ("eval.scorng=greedy", "'scoring'"), ("modle=x", "'model'"), ("trian.lr=1", "'train'"),
    ("method.name=qlora quant.blocksiz=64", "'blocksize'"),
])
def test_unknown_keys_in_every_section_suggest_the_closest(override, suggestion):
    with pytest.raises(ConfigError, match=f"Did you mean {suggestion}"):
        load_train_config(None, override.split())


def test_unknown_method_name_suggests_one():
    with pytest.raises(ConfigError, match="Did you mean 'dora'"):
        load_train_config(None, ["method.name=droa"])


@pytest.mark.parametrize("override, expected", [
    ("train.lr=fast", "'train.lr' must be float"), ("train.batch_size=2.5", "'train.batch_size' must be int"),
    ("method.r=[1]", "'method.r' must be int"), ("train.gradient_checkpointing=maybe", "must be bool"),
    ("data.packing=3", "'data.packing' must be bool"), ("method.target_modules=5", "list of str"),
])
def test_wrong_types_name_the_key_and_the_expected_type(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_train_config(None, [override])


def test_invalid_values_are_reported_with_their_section():
    with pytest.raises(ConfigError, match="train.lr"):
        load_train_config(None, ["train.lr=-1"])
    with pytest.raises(ConfigError, match="data"):
        load_train_config(None, ["data.format=xml"])
    with pytest.raises(ConfigError, match="method options for 'lora'"):
        load_train_config(None, ["method.bias=some"])


def test_switching_method_class_drops_lora_options_but_lora_variants_keep_them():
    cfg = load_train_config(None, ["method.r=4", "method.name=ia3"])
    assert cfg.method.options == {} and isinstance(cfg.method.build(5), IA3Config)
    cfg = load_train_config(None, ["method.r=4", "method.name=dora"])
    peft = cfg.method.build(5, num_layers=2)
    assert peft.r == 4 and peft.use_dora
    with pytest.raises(ConfigError, match="contradicts method.name='dora'"):
        load_train_config(None, ["method.name=dora", "method.use_dora=false"])


def test_changing_the_data_source_drops_the_bbc_defaults(tmp_path):
    cfg = load_train_config(None, [f"data.source={tmp_path / 'x.jsonl'}"])
    assert cfg.data.max_length == 256 and cfg.data.eval_size == 200  # DataConfig's own defaults


def test_quant_section_only_with_qlora_and_adalora_total_step_from_the_run():
    with pytest.raises(ConfigError, match="qlora only"):
        load_train_config(None, ["quant.blocksize=128"])
    cfg = load_train_config(None, ["method.name=qlora", "quant.blocksize=128"])
    assert cfg.quant.blocksize == 128 and cfg.method.spec.quantized
    ada = load_train_config(None, ["method.name=adalora"]).method.build(total_steps=50)
    assert ada.total_step == 50 and ada.init_r == 12


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_train_config(None, ["method.name=qlora", "train.lr=3e-4", "output_dir=o"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    again = load_train_config(None, [], base=yaml.safe_load(path.read_text()))
    assert again == cfg
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_train_config(tmp_path / "missing.yaml", [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_train_config(bad, [])
    with pytest.raises(ConfigError, match="key=value"):
        load_train_config(None, ["train.lr"])


@pytest.mark.parametrize("path", TRAIN_EXAMPLES, ids=lambda p: p.stem)
def test_every_example_config_is_valid(path):
    cfg = load_train_config(path, [])
    assert cfg.method.build(total_steps=cfg.train.max_steps or 100, num_layers=30) is not None  # written for SmolLM2


def test_each_method_example_runs_its_method():
    for name in METHODS:
        assert load_train_config(EXAMPLES / f"{name}.yaml", []).method.name == name


def test_cli_print_config_loads_nothing(capsys, monkeypatch):
    import deltatune.train.loading as run  # where the run loads the model
    from deltatune.cli.main import main

    monkeypatch.setattr(run, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["train", "--print-config", "method.name=dora", "train.lr=5e-4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["method"]["name"] == "dora" and printed["train"]["lr"] == pytest.approx(5e-4)
    assert main(["train", "train.lrr=1"]) == 2
    assert "Did you mean 'lr'" in capsys.readouterr().err


def test_a_later_data_source_keeps_the_data_settings_the_user_gave(tmp_path):
    # The usage line of examples/custom_data.yaml: its max_length, packing and eval_size must survive.
    cfg = load_train_config("examples/custom_data.yaml", [f"data.source={tmp_path / 'my.jsonl'}"])
    assert (cfg.data.max_length, cfg.data.packing, cfg.data.eval_size) == (512, True, 100)
    assert cfg.data.source == str(tmp_path / "my.jsonl")
    # ... and so must earlier data.* overrides; keys nobody set still take DataConfig's defaults.
    cfg = load_train_config(None, ["data.max_length=300", f"data.source={tmp_path / 'x.jsonl'}"])
    assert (cfg.data.max_length, cfg.data.eval_size) == (300, 200)
    assert cfg.data.article_tokens == 112  # DataConfig's default, not the default job's 64


@pytest.mark.parametrize("overrides", [["method.exclude_modules=("], ["method.name=adalora", "method.exclude_modules=a)"],
                                       ["method.rank_pattern={'q(': 4}"], ["method.alpha_pattern={'*x': 4}"]])
def test_a_bad_regex_is_a_config_error_naming_the_field(overrides):
    # checked when the config is built, not as re.error from deep inside injection
    with pytest.raises(ConfigError, match="does not compile"):
        load_train_config(None, overrides).method.build(10)


def test_relative_layers_resolve_against_the_models_depth(tmp_path):
    # method.layers_to_transform=upper_half: one config for models of any depth. The run's config.yaml keeps the
    # name (a resume resolves it again); the adapter gets peft's index list; only those layers get adapters.
    import json

    from deltatune.cli.main import main
    from deltatune.train.loading import adapter_config
    from support_cli_generate import write_tiny_model
    from support_train import base_args, topic_rows, write_jsonl

    cfg = load_train_config(None, ["method.layers_to_transform=upper_half"])
    assert cfg.method.options["layers_to_transform"] == "upper_half" and cfg.method.relative_layers
    assert list(cfg.method.build(10, num_layers=30).layers_to_transform) == list(range(15, 30))
    assert list(cfg.method.build(10, num_layers=5).layers_to_transform) == [2, 3, 4]
    with pytest.raises(ConfigError, match="needs the model's number of decoder layers"):
        cfg.method.build(10)
    with pytest.raises(ConfigError, match="'method.layers_to_transform' is 'upper'; expected a layer index, a list of "
                                          "them, or one of upper_half"):
        load_train_config(None, ["method.layers_to_transform=upper"])
    assert list(load_train_config(None, ["method.layers_to_transform=[1,2]"]).method.build(10).layers_to_transform) == [1, 2]

    write_tiny_model(tmp_path / "tiny4", layers=4)
    files = {"model": tmp_path / "tiny4", "data": write_jsonl(tmp_path / "topics.jsonl", topic_rows())}
    resolved = adapter_config(load_train_config(None, [f"model={files['model']}", "method.layers_to_transform=upper_half"]), 2)
    assert list(resolved.layers_to_transform) == [2, 3]
    assert main(base_args(files, tmp_path / "run", "method.layers_to_transform=upper_half", "train.max_steps=2")) == 0
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["layers_to_transform"] == [2, 3]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["method"]["layers_to_transform"] == "upper_half"
    from safetensors.torch import load_file

    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")}
    assert layers == {2, 3}
