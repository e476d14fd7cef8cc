"""FSDP2 through ``deltatune train`` and the fused loss under DDP and FSDP2, on 2 CPU processes (gloo).

``train.distributed=fsdp`` loads the model sharded by transformers' ``DistributedConfig`` (FSDP2's
``fully_shard``) and trains the replicated adapter in transformers' Trainer. Tolerances:

- 2 ranks x 2 rows against 1 x 4 rows, fp32, SGD, no dropout: the gradient is the same sum in another
  order (reduce-scatter/all-reduce of 2 partial sums), so the adapters agree to fp32 rounding of the
  few steps (tolerances.py's "reordered" tier; measured 7.5e-9).
- the fused loss against the model's own (full-logits) loss on the same batch and model: the same
  log-softmax computed in chunks, fp32: 1e-5 on the loss and the adapter's gradients (measured ~1e-7).

This file is also the fused-loss worker: ``torchrun --nproc_per_node 2 tests/test_fsdp.py OUT MODEL``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from deltatune.train.distributed import trainer_supports_sharded_loading

HERE = Path(__file__).resolve().parent


def fused_loss_worker(out: str, model_dir: str) -> None:
    """On each rank: the fused loss and its gradients against the model's own loss, under DDP and under FSDP2."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    import deltatune as dt
    from deltatune.train.loss import causal_lm_loss
    from support_fused import batch, count_kernel_calls, lora_config

    calls = count_kernel_calls()
    config = lora_config()
    results = {}
    for engine in ("fsdp", "ddp"):
        kwargs = {"distributed_config": DistributedConfig(fsdp_size=2)} if engine == "fsdp" else {}
        torch.manual_seed(0)
        model = dt.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, **kwargs), config)
        if engine == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
        rank = dist.get_rank()
        ids, labels = batch(seed=rank)
        lora = [p for p in model.parameters() if p.requires_grad]
        calls.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fused, _ = causal_lm_loss(model, input_ids=ids, labels=labels)
        fused.backward()
        fused_grads = [p.grad.clone() for p in lora]
        for p in lora:
            p.grad = None
        own = model(input_ids=ids, labels=labels).loss  # transformers' loss on the full logits
        own.backward()
        results[engine] = {
            "fallbacks": [str(w.message) for w in caught if "model's own loss" in str(w.message)],
            "kernel_calls": len(calls),
            "loss_diff": abs(fused.item() - own.item()),
            "grad_diff": max((f - p.grad).abs().max().item() for f, p in zip(fused_grads, lora)),
            "grad_norm": sum(float(p.grad.norm()) for p in lora),
        }
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()


def test_fused_loss_runs_under_ddp_and_fsdp2_and_equals_the_models_own_loss(tmp_path):
    from support_cli_generate import write_tiny_model
    from test_distributed import torchrun

    write_tiny_model(tmp_path / "tiny")
    torchrun([str(HERE / "test_fsdp.py"), str(tmp_path / "fused.json"), str(tmp_path / "tiny")], tmp_path)
    results = json.loads((tmp_path / "fused.json").read_text())
    for engine in ("fsdp", "ddp"):
        got = results[engine]
        assert got["fallbacks"] == [], f"{engine}: the fused loss fell back to full logits: {got['fallbacks']}"
        assert got["kernel_calls"] == 1, f"{engine}: the chunked kernel did not run (the head's forward did)"
        assert got["loss_diff"] < 1e-5, (engine, got)
        assert got["grad_norm"] > 1e-3 and got["grad_diff"] < 1e-5, (engine, got)


@pytest.mark.skipif(not trainer_supports_sharded_loading(), reason="train.distributed=fsdp needs transformers >= 5.19 "
                    "(an older one is refused with that message: test_train_distributed_config_and_its_refusals)")
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_train_distributed_fsdp_matches_one_process_and_resumes_on_one_process(method, tmp_path):
    # 4 steps, a checkpoint every 2: FSDP over 2 ranks x 2 rows, one process x 4 rows, then the FSDP run's
    # checkpoint-2 resumed by one process x 4 rows (the same global batch) must land on the same adapter.
    # QLoRA: the packed 4-bit weights are sharded too (deltatune.quant.prepare_for_fsdp).
    from deltatune.cli.main import main
    from support_cli_generate import write_tiny_model
    from support_data import chat_rows, write_jsonl
    from test_distributed import CLI_CONFIG, _adapter, _assert_same_adapter, torchrun

    write_tiny_model(tmp_path / "tiny")
    write_jsonl(tmp_path / "data.jsonl", chat_rows(24))
    config = CLI_CONFIG.format(model=tmp_path / "tiny", data=tmp_path / "data.jsonl")
    (tmp_path / "run.yaml").write_text(config.replace("name: lora,", f"name: {method},"))
    steps = ["train.max_steps=4", "train.save_steps=2"]
    fsdp = ["-m", "deltatune.cli.main", "train", "run.yaml", "output_dir=fsdp", "train.batch_size=2",
            "train.distributed=fsdp", *steps]
    if method == "lora":  # also the launch with the shipped accelerate config, which must start 2 processes
        accelerate_launch(fsdp, tmp_path)
    else:
        torchrun(fsdp, tmp_path)
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert main(["train", "run.yaml", "output_dir=single", "train.batch_size=4", *steps]) == 0
        shutil.copytree("fsdp", "resumed")
        shutil.rmtree("resumed/checkpoint-4")
        shutil.rmtree("resumed/adapter")
        assert main(["train", "--resume", "output_dir=resumed", "train.batch_size=4"]) == 0
    finally:
        os.chdir(cwd)
    metrics = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["status"] == "completed"
    assert (tmp_path / "fsdp" / "checkpoint-2" / "optimizer.pt").is_file()  # resumable, not model-only
    single = _adapter(tmp_path / "single" / "adapter")
    _assert_same_adapter(_adapter(tmp_path / "fsdp" / "adapter"), single)
    _assert_same_adapter(_adapter(tmp_path / "resumed" / "adapter"), single)
    losses = [json.loads((tmp_path / run / "metrics.json").read_text())["train"]["train_loss"] for run in ("fsdp", "single")]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-5, rtol=1e-5)
    if method == "lora":  # (a QLoRA adapter's logits depend on the 4-bit base, which peft would build with bitsandbytes)
        _assert_peft_logits_match(tmp_path / "tiny", tmp_path / "fsdp" / "adapter")


def test_train_distributed_config_and_its_refusals(monkeypatch, tmp_path):
    from deltatune.train import distributed
    from deltatune.train.config import load_train_config
    from deltatune.train.config_check import ConfigError
    from deltatune.train.distributed import check_distributed, engine

    monkeypatch.setattr(distributed, "trainer_supports_sharded_loading", lambda: True)  # (tested below on its own)

    config = load_train_config(None, ["train.distributed=fsdp", "train.fsdp.reshard_after_forward=false"])
    assert config.train.distributed == "fsdp" and config.train.fsdp.reshard_after_forward is False
    assert engine("fsdp", 2) == "fsdp" and engine("auto", 2) == engine("ddp", 2) == "ddp"
    assert engine("fsdp", 1) == "single"  # an FSDP run's checkpoint resumes in one process
    with pytest.raises(ConfigError, match="expected one of auto, ddp, fsdp"):
        load_train_config(None, ["train.distributed=zero3"])
    with pytest.raises(ConfigError, match="Valid keys in 'train.fsdp': cpu_offload, reshard_after_forward"):
        load_train_config(None, ["train.fsdp.offload=true"])
    with pytest.raises(ConfigError, match="copies of base modules"):
        check_distributed("fsdp", "partial", env={})
    # accelerate's FSDP plugin and DeepSpeed ZeRO-3 would shard the adapter; ZeRO-1/2 keep it whole on each rank
    with pytest.raises(ConfigError, match="accelerate's FSDP plugin.*set train.distributed=fsdp"):
        check_distributed("auto", "lora", env={"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(ConfigError, match="DeepSpeed ZeRO-3 plugin"):
        check_distributed("auto", "lora", env={"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    ds_json = tmp_path / "ds.json"
    ds_json.write_text('{"zero_optimization": {"stage": 3}}')
    with pytest.raises(ConfigError, match="DeepSpeed ZeRO-3 plugin"):
        check_distributed("auto", "lora", env={"ACCELERATE_USE_DEEPSPEED": "true",
                                               "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds_json)})
    check_distributed("auto", "lora", env={"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"})
    check_distributed("auto", "lora", env={"ACCELERATE_USE_FSDP": "false"})


def test_fsdp_with_a_trainer_too_old_for_sharded_models_is_refused(monkeypatch):
    from deltatune.train import distributed
    from deltatune.train.config_check import ConfigError

    monkeypatch.setattr(distributed, "trainer_supports_sharded_loading", lambda: False)  # transformers < 5.19
    with pytest.raises(ConfigError, match=r"needs transformers >= 5.19.*or use train.distributed=ddp"):
        distributed.check_distributed("fsdp", "lora", env={})
    distributed.check_distributed("ddp", "lora", env={})


def accelerate_launch(args: list[str], cwd: Path) -> None:
    """``accelerate launch --config_file configs/accelerate/cpu_2proc.yaml ARGS`` on the CPU; fails with its output."""
    config = HERE.parent / "configs" / "accelerate" / "cpu_2proc.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _assert_peft_logits_match(model_dir: Path, adapter: Path) -> None:
    """HF peft loads the adapter FSDP wrote and gives deltatune's logits."""
    import peft
    from transformers import AutoModelForCausalLM

    import deltatune as dt

    ids = torch.tensor([[5, 9, 17, 33, 2, 8]])
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)(ids).logits
        ours = dt.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(model_dir)(ids).logits
    assert (ours - base).abs().max() > 1e-4  # the adapter changes the output
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


if __name__ == "__main__":  # the fused-loss worker
    sys.path.insert(0, str(HERE))
    fused_loss_worker(sys.argv[1], sys.argv[2])


def test_resume_on_nodes_that_do_not_share_the_output_folder_stops_every_node(tmp_path):
    # Two launchers as two nodes (1 process each) in two folders: node A has the run, node B does not (no shared
    # filesystem). Before, node B failed and node A waited for it until its collective timeout (30 min); now
    # both stop, each with the same message naming both ranks' findings.
    from deltatune.train.config import load_train_config
    from test_distributed import _free_port

    (tmp_path / "A" / "run").mkdir(parents=True)
    (tmp_path / "B").mkdir()
    (tmp_path / "A" / "run" / "config.yaml").write_text(load_train_config(None, ["output_dir=run"]).to_yaml())
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(i),
         "--master_addr", "127.0.0.1", "--master_port", port, "-m", "deltatune.cli.main", "train", "--resume",
         "output_dir=run"], cwd=tmp_path / node, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i, node in enumerate("AB")]
    outputs = [node.communicate(timeout=180)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode != 0
        assert "do not agree on the output folder (rank 0: read the run's config; rank 1: error: --resume" in output
        assert "a filesystem all nodes share" in output


def test_fsdp_refuses_what_changes_the_base_after_loading(monkeypatch):
    from deltatune.train import distributed
    from deltatune.train.config import load_train_config
    from deltatune.train.config_check import ConfigError
    from deltatune.train.run import check_before_loading

    # as on transformers >= 5.19: an older one is refused first, for its version (test above)
    monkeypatch.setattr(distributed, "trainer_supports_sharded_loading", lambda: True)

    loftq = ["method.name=qlora", "method.init_lora_weights=loftq", "method.loftq_config={loftq_bits: 4, loftq_iter: 1}"]
    for extra in (["data.add_special_tokens=[<tool>]"], loftq):
        config = load_train_config(None, ["train.distributed=fsdp", *extra])
        with pytest.raises(ConfigError, match="cannot be combined with data.add_special_tokens or method.init_lora"):
            check_before_loading(config, config.method.build(total_steps=10, num_layers=30))


def test_an_error_every_process_hits_is_reported_as_itself(tmp_path):
    # A bad config fails alike on every rank: the message is that error, not "the processes do not agree".
    from test_distributed import _free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "deltatune.cli.main", "train", "output_dir=run", "train.learning_rate=1e-4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Unknown config key 'train.learning_rate'. Valid keys in 'train'" in out, out[-2000:]
    assert "do not agree" not in out and not (tmp_path / "run").exists()
