"""DeepSpeed ZeRO-2 and ZeRO-3 through ``deltatune train`` and the fused loss under ZeRO-3, on 2 CPU processes.

``train.distributed=deepspeed`` hands the Trainer a DeepSpeed config (train/zero.py). Tolerances:

- 2 ranks x 2 rows against 1 x 4 rows, fp32, AdamW (the default optimizer), no dropout: the gradient
  is the same sum in another order (ZeRO's reduce-scatter of 2 partial sums), so the adapters agree
  to fp32 rounding of a few steps (tolerances.py's "reordered" tier; measured 7.5e-8);
- a run resumed from a ZeRO-3 checkpoint on 2 processes against the same run uninterrupted: the
  same operations in the same order ("exact");
- the fused loss against the model's own (full-logits) loss under ZeRO-3: the same log-softmax
  computed in chunks, fp32: 1e-5 on the loss and the adapter's gradients (as in test_fsdp.py).

This file is also the fused-loss worker: ``torchrun --nproc_per_node 2 tests/test_deepspeed.py OUT MODEL``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
# ZeRO-3 keeps parameters under 1e5 elements whole on every rank (stage3_param_persistence_threshold):
# all of a tiny model's. Partitioning every one is what a real model's large weights go through.
EVERY_PARAMETER_PARTITIONED = {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                               "stage3_gather_16bit_weights_on_model_save": False, "stage3_param_persistence_threshold": 0}
# Not imported here: DeepSpeed runs only in the launched processes (importing it sets up its accelerator).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="DeepSpeed is in the test lock; without it train.distributed=deepspeed is refused")


def fused_loss_worker(out: str, model_dir: str) -> None:
    """On each rank: under ZeRO-3, the fused loss and the adapter's gradients against the model's own loss."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad
    from transformers import AutoModelForCausalLM

    import deltatune as dt
    from deltatune.train.loss import causal_lm_loss
    from deltatune.train.zero import SHIPPED
    from support_fused import batch, count_kernel_calls, lora_config

    calls = count_kernel_calls()
    config = lora_config()
    ds_config = {**SHIPPED["zero3"], "train_micro_batch_size_per_gpu": 2, "train_batch_size": 4,
                 "zero_optimization": EVERY_PARAMETER_PARTITIONED,
                 "gradient_accumulation_steps": 1, "gradient_clipping": 0.0, "bf16": {"enabled": False},
                 "zero_allow_untested_optimizer": True}
    deepspeed.init_distributed("gloo")
    torch.manual_seed(0)
    # an untied head: the fused loss must gather it itself (a tied one is gathered with the embedding)
    base = AutoModelForCausalLM.from_pretrained(model_dir, tie_word_embeddings=False)
    assert base.lm_head.weight is not base.get_input_embeddings().weight
    model = dt.get_peft_model(base, config)
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([p for _, p in lora], lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    # the same rows on both ranks: the averaged gradient is then each rank's own
    ids, labels = batch(seed=7)
    results = {}
    for name, compute in (("fused", lambda: causal_lm_loss(engine, input_ids=ids, labels=labels)[0]),
                          ("own", lambda: engine(input_ids=ids, labels=labels).loss)):
        calls.clear()
        loss = compute()
        engine.backward(loss)
        grads = {n: safe_get_full_grad(p).clone() for n, p in lora}  # gathered from the ranks' partitions
        engine.step()  # lr 0: clears ZeRO's gradient buffers, changes nothing
        results[name] = {"loss": loss.item(), "kernel_calls": len(calls), "grads": grads,
                         "partitioned": all(p.numel() == 0 for _, p in lora)}
    fused, own = results["fused"], results["own"]
    report = {"kernel_calls": fused["kernel_calls"], "partitioned": fused["partitioned"],
              "loss_diff": abs(fused["loss"] - own["loss"]),
              "grad_diff": max((fused["grads"][n] - own["grads"][n]).abs().max().item() for n, _ in lora),
              "grad_norm": sum(float(g.norm()) for g in own["grads"].values())}
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(report))
    dist.barrier()


def test_fused_loss_runs_under_zero3_and_equals_the_models_own_loss(tmp_path):
    from support_cli_generate import write_tiny_model
    from test_distributed import torchrun

    write_tiny_model(tmp_path / "tiny")
    torchrun([str(HERE / "test_deepspeed.py"), str(tmp_path / "fused.json"), str(tmp_path / "tiny")], tmp_path)
    got = json.loads((tmp_path / "fused.json").read_text())
    assert got["partitioned"], "ZeRO-3 did not partition the adapter: the test would prove nothing"
    assert got["kernel_calls"] == 1, "the chunked kernel did not run (the head's forward did)"
    assert got["loss_diff"] < 1e-5, got
    assert got["grad_norm"] > 1e-3 and got["grad_diff"] < 1e-5, got


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_train_deepspeed_matches_one_process_and_saves_the_adapter_whole(stage, tmp_path, capsys):
    # 4 steps, a checkpoint every 2: DeepSpeed over 2 ranks x 2 rows against one process x 4 rows. ZeRO-2 is
    # launched with the shipped accelerate config, ZeRO-3 with torchrun; ZeRO-3's checkpoint-2 is resumed on
    # 2 processes and must land on the uninterrupted run's adapter, and refuses to resume on 1.
    from deltatune.cli.main import main
    from support_cli_generate import write_tiny_model
    from support_data import chat_rows, write_jsonl
    from test_distributed import CLI_CONFIG, _adapter, _assert_same_adapter, torchrun
    from deltatune.train.zero import SHIPPED
    from test_fsdp import _assert_peft_logits_match, accelerate_launch

    write_tiny_model(tmp_path / "tiny")
    write_jsonl(tmp_path / "data.jsonl", chat_rows(24))
    (tmp_path / "run.yaml").write_text(CLI_CONFIG.format(model=tmp_path / "tiny", data=tmp_path / "data.jsonl"))
    steps = ["train.max_steps=4", "train.save_steps=2", "train.optim=adamw_torch", "train.lr=0.01"]
    setting = stage  # ZeRO-2: the shipped config by name; ZeRO-3: a user's JSON (the shipped one, every weight split)
    if stage == "zero3":
        (tmp_path / "ds.json").write_text(json.dumps({**SHIPPED["zero3"], "zero_optimization": EVERY_PARAMETER_PARTITIONED}))
        setting = str(tmp_path / "ds.json")
    deepspeed = ["-m", "deltatune.cli.main", "train", "run.yaml", f"output_dir={stage}", "train.batch_size=2",
                 "train.distributed=deepspeed", f"train.deepspeed={setting}", *steps]
    (accelerate_launch if stage == "zero2" else torchrun)(deepspeed, tmp_path)
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert main(["train", "run.yaml", "output_dir=single", "train.batch_size=4", *steps]) == 0
    finally:
        os.chdir(cwd)
    run = tmp_path / stage
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["status"] == "completed"
    checkpoint = run / "checkpoint-2"
    assert (checkpoint / "latest").is_file() and len(list(checkpoint.glob("global_step2/*optim_states.pt"))) == 2
    single = _adapter(tmp_path / "single" / "adapter")
    for folder in (run / "adapter", run / "checkpoint-4"):  # whole tensors, not ZeRO-3's empty partitions
        _assert_same_adapter(_adapter(folder), single)
    losses = [json.loads((tmp_path / r / "metrics.json").read_text())["train"]["train_loss"] for r in (stage, "single")]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-5, rtol=1e-5)
    _assert_peft_logits_match(tmp_path / "tiny", run / "adapter")
    if stage == "zero2":
        return
    shutil.copytree(run, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoint-4")
    shutil.rmtree(tmp_path / "resumed" / "adapter")
    torchrun(["-m", "deltatune.cli.main", "train", "--resume", "output_dir=resumed"], tmp_path)
    resumed = _adapter(tmp_path / "resumed" / "adapter")
    for k, v in _adapter(run / "adapter").items():
        torch.testing.assert_close(resumed[k], v, atol=1e-6, rtol=1e-6)  # "exact": the same ops in the same order
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        shutil.rmtree("resumed/checkpoint-4")
        code = main(["train", "--resume", "output_dir=resumed"])  # one process: DeepSpeed's files are per rank
    finally:
        os.chdir(cwd)
    assert code != 0
    err = capsys.readouterr().err
    assert "is a DeepSpeed checkpoint written by 2 processes" in err and "on 2 processes" in err, err


def test_zero3_scores_accuracy_after_training_on_every_rank(tmp_path):
    # Under ZeRO-3 each forward gathers weights from every rank, so every rank scores (rank 0 reports); a rank
    # left out would hang the others. The scores must be one process's (same global batch, same adapter).
    from deltatune.cli.main import main
    from deltatune.train.zero import SHIPPED
    from support_train import base_args, save_tiny_model, topic_rows, write_jsonl
    from test_distributed import torchrun

    files = {"model": save_tiny_model(tmp_path / "model"), "data": write_jsonl(tmp_path / "topics.jsonl", topic_rows())}
    (tmp_path / "ds.json").write_text(json.dumps({**SHIPPED["zero3"], "zero_optimization": EVERY_PARAMETER_PARTITIONED}))
    common = ["eval.accuracy=true", "train.max_steps=4", "train.bf16=false", "train.num_threads=1"]
    torchrun(["-m", "deltatune.cli.main", *base_args(files, tmp_path / "zero3", *common), "train.batch_size=2",
              "train.distributed=deepspeed", f"train.deepspeed={tmp_path / 'ds.json'}"], tmp_path)
    assert main(base_args(files, tmp_path / "single", *common)) == 0
    scores = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("zero3", "single")]
    assert scores[0]["world_size"] == 2
    for when in ("zero_shot", "final"):
        ours, one = ({k: v for k, v in s[when].items() if k != "seconds"} for s in scores)
        assert ours == one and ours["total"] == 6, when


def test_shipped_configs_are_the_files_in_configs_deepspeed():
    from deltatune.train.zero import SHIPPED, deepspeed_config

    for name, config in SHIPPED.items():
        assert json.loads((HERE.parent / "configs" / "deepspeed" / f"{name}.json").read_text()) == config
        assert deepspeed_config(name) == config and deepspeed_config(name) is not config  # a copy the Trainer may fill
    assert SHIPPED["zero2"]["zero_optimization"]["stage"] == 2 and SHIPPED["zero3"]["zero_optimization"]["stage"] == 3


def test_train_deepspeed_settings_and_their_refusals(tmp_path, monkeypatch):
    from deltatune.train.config import load_train_config
    from deltatune.train.config_check import ConfigError
    from deltatune.train.distributed import check_distributed, engine
    from deltatune.train.zero import deepspeed_config

    config = load_train_config(None, ["train.distributed=deepspeed", "train.deepspeed=zero3"])
    assert config.train.distributed == "deepspeed" and config.train.deepspeed == "zero3"
    assert load_train_config(None, []).train.deepspeed == "zero2"  # read only with train.distributed=deepspeed
    assert engine("deepspeed", 1) == engine("deepspeed", 2) == "deepspeed"  # its checkpoints need DeepSpeed to resume
    with pytest.raises(ConfigError, match=r"'train.deepspeed' is 'zero4'; expected zero2 or zero3 .* JSON config file"):
        load_train_config(None, ["train.distributed=deepspeed", "train.deepspeed=zero4"])
    with pytest.raises(ConfigError, match="'train.deepspeed' is .*missing.json"):
        load_train_config(None, ["train.distributed=deepspeed", f"train.deepspeed={tmp_path / 'missing.json'}"])
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="holds a JSON list, not a DeepSpeed config object"):
        deepspeed_config(str(tmp_path / "list.json"))
    (tmp_path / "mine.json").write_text('{"zero_optimization": {"stage": 1}}')
    assert deepspeed_config(str(tmp_path / "mine.json")) == {"zero_optimization": {"stage": 1}}
    check_distributed("deepspeed", "lora", env={})
    check_distributed("deepspeed", "lora", env={"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    with pytest.raises(ConfigError, match="does not support method.name=qlora: DeepSpeed cannot partition"):
        check_distributed("deepspeed", "qlora", env={})
    with pytest.raises(ConfigError, match="does not support method.name=adalora: its rank allocator reads"):
        check_distributed("deepspeed", "adalora", env={})
    with pytest.raises(ConfigError, match="train.distributed=deepspeed train.deepspeed=zero3"):
        check_distributed("auto", "lora", env={"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs DeepSpeed, which is not installed: pip install 'deltatune\[deepspeed\]'"):
        check_distributed("deepspeed", "lora", env={})


def test_deepspeed_checkpoints_resume_only_under_deepspeed_on_as_many_processes(tmp_path):
    from deltatune.train.outputs import is_complete_checkpoint
    from deltatune.train.zero import check_resume, checkpoint_ranks

    ds = tmp_path / "checkpoint-2"
    (ds / "global_step2").mkdir(parents=True)
    for name in ("adapter_config.json", "trainer_state.json", "scheduler.pt"):
        (ds / name).write_text("{}")
    assert not is_complete_checkpoint(ds)  # neither the Trainer's optimizer.pt nor DeepSpeed's latest
    (ds / "latest").write_text("global_step2")
    for rank in (0, 1):
        (ds / "global_step2" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert is_complete_checkpoint(ds) and checkpoint_ranks(ds) == 2
    check_resume(ds, "deepspeed", 2)
    for mode, world in (("deepspeed", 1), ("ddp", 2), ("auto", 1)):
        with pytest.raises(ValueError, match="DeepSpeed checkpoint written by 2 processes.*train.distributed=deepspeed on 2"):
            check_resume(ds, mode, world)
    plain = tmp_path / "checkpoint-4"
    plain.mkdir()
    assert checkpoint_ranks(plain) is None
    check_resume(plain, "ddp", 2)
    with pytest.raises(ValueError, match="was not written by DeepSpeed"):
        check_resume(plain, "deepspeed", 2)


def test_gathered_leaves_plain_parameters_alone():
    from deltatune.surgery.partitioned import gathered, is_partitioned, trainable_partitioned, zero3_plain_linear

    layer = torch.nn.Linear(4, 3)
    before = layer.weight.detach().clone()
    with gathered([layer.weight, None, layer.bias]):
        assert torch.equal(layer.weight, before)
    assert not is_partitioned(layer.weight) and not trainable_partitioned(layer) and not zero3_plain_linear(layer)


if __name__ == "__main__":  # the fused-loss worker
    sys.path.insert(0, str(HERE))
    fused_loss_worker(sys.argv[1], sys.argv[2])
