"""Every method of ``deltatune train`` (each examples/*.yaml) trains a few steps on the tiny model and saves an adapter."""
from pathlib import Path

import pytest
import torch

from transformers import set_seed

from deltatune.model import PeftModel, get_peft_model
from deltatune.models import load_model_and_tokenizer
from deltatune.train.config import load_train_config
from deltatune.train.method_config import METHODS
from deltatune.train.run import adapter_config, run_training
from support_train import tiny_run_files  # noqa: F401  (fixture)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
METHOD_EXAMPLES = [EXAMPLES / f"{name}.yaml" for name in METHODS]  # other yaml files serve other commands


def _overrides(files, out, model):
    return [
        f"model={model}", f"data.source={files['data']}", "data.eval_size=0", "data.max_length=64",
        "train.max_steps=2", "train.batch_size=4", "train.logging_steps=1", "train.save_steps=0",
        "train.progress_bar=false", "train.tensorboard=false", "train.plot=false", f"output_dir={out}",
    ]


@pytest.mark.parametrize("example", METHOD_EXAMPLES, ids=lambda p: p.stem)
def test_example_config_trains_and_saves_a_loadable_adapter(example, tiny_run_files, tmp_path):
    # BitFit needs biases: the tiny GPT-2 has them, LLaMA has none (see test_bitfit_on_llama_...).
    model = tiny_run_files["gpt2" if example.stem == "bitfit" else "model"]
    overrides = _overrides(tiny_run_files, tmp_path / "run", model)
    if example.stem == "adalora":
        overrides += ["method.tinit=0", "method.tfinal=0", "method.deltaT=1"]
    if example.stem == "bitfit":
        overrides += ["method.target_modules=[c_attn,c_fc]"]
    config = load_train_config(example, overrides)
    result = run_training(config, log=lambda line: None)
    assert result.status == "completed"
    losses = [loss for _, loss in result.metrics["train"]["train_loss"]]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert result.metrics["trainable_params"] > 0
    # Training reached the adapter: its parameters moved away from the same-seed initialisation
    # (a loss path that skipped the method's forward, e.g. a soft prompt, would leave them unchanged).
    set_seed(config.train.seed)
    initial = get_peft_model(load_model_and_tokenizer(model)[0], adapter_config(config, 2))
    trained = dict(result.model.named_parameters())
    moved = [n for n, p in initial.named_parameters() if p.requires_grad and not torch.equal(p, trained[n])]
    assert moved, "no trainable parameter changed"
    # The saved adapter is peft-format and loads back onto a fresh base model.
    loaded = PeftModel.from_pretrained(load_model_and_tokenizer(model)[0], result.output_dir / "adapter")
    assert loaded.peft_config["default"].peft_type == adapter_config(config, 2).peft_type


def test_bitfit_on_a_model_without_biases_stops_with_a_clear_error(tiny_run_files, tmp_path):
    config = load_train_config(EXAMPLES / "bitfit.yaml", _overrides(tiny_run_files, tmp_path / "r", tiny_run_files["model"]))
    with pytest.raises(ValueError, match="no bias"):
        run_training(config, log=lambda line: None)


def test_loraplus_lr_ratio_trains_b_at_the_ratio(tiny_run_files, tmp_path, monkeypatch):
    """train.loraplus_lr_ratio builds peft's LoRA+ groups over train.optim's class: B at lr x ratio."""
    from deltatune.train import session as session_module

    built = []
    real = session_module.TrainingSession.optimizer
    monkeypatch.setattr(session_module.TrainingSession, "optimizer",
                        lambda self, model, args: built.append(real(self, model, args)) or built[-1])
    overrides = _overrides(tiny_run_files, tmp_path / "run", tiny_run_files["model"])
    config = load_train_config(EXAMPLES / "lora.yaml", overrides + ["train.loraplus_lr_ratio=16", "train.lr=1e-3"])
    result = run_training(config, log=lambda line: None)
    assert result.status == "completed"
    optimizer = built[0]
    assert type(optimizer).__name__ == "AdamW"  # train.optim's class (adamw_torch)
    peaks = [g["initial_lr"] for g in optimizer.param_groups]
    assert peaks == [1e-3, 1e-6, 16e-3, 16e-3]  # A, embedding, B, B without decay (peft's order)
    assert len(optimizer.param_groups[0]["params"]) == len(optimizer.param_groups[2]["params"]) > 0
    with pytest.raises(Exception, match="loraplus_lr_ratio"):
        load_train_config(EXAMPLES / "lora.yaml", overrides + ["train.loraplus_lr_ratio=0"])
