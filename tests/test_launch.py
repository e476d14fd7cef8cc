"""Rank detection from every launcher (deltatune.train.launch), the launches it refuses, and the shipped
accelerate configs (a real ``accelerate launch`` with the CPU config is in tests/test_fsdp.py).

The environments are the variables each launcher documents (torchrun, OpenMPI, MPICH/Intel MPI, SLURM's
srun); accelerate's own are produced by accelerate's launcher code, not typed in here.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from deltatune.train.launch import LaunchError, check_launch, export_launch_env, is_main_process, world_info

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "29400"}
OPENMPI = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
MPICH = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}
SRUN = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        "SLURM_NTASKS": "8"}


@pytest.mark.parametrize("env, expected", [
    ({}, (0, 0, 1, 1, "none")),
    (TORCHRUN, (3, 1, 4, 2, "torchrun/accelerate")),
    (OPENMPI, (1, 1, 2, 2, "OpenMPI")),
    (MPICH, (2, 0, 4, 2, "MPICH/Intel MPI")),
    (SRUN, (5, 1, 8, 4, "SLURM")),
], ids=["single", "torchrun", "openmpi", "mpich", "srun"])
def test_world_info_from_each_launcher(env, expected):
    info = world_info(env)
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size, info.launcher) == expected
    assert info.is_main == (expected[0] == 0)


def test_precedence_innermost_launcher_wins():
    # torchrun inside srun / mpirun: torchrun's RANK describes the training processes
    assert world_info({**SRUN, **TORCHRUN}).launcher == "torchrun/accelerate"
    assert world_info({**OPENMPI, **TORCHRUN, "WORLD_SIZE": "4"}).rank == 3
    # mpirun inside a SLURM allocation inherits the allocation's SLURM_* variables; MPI's are this process's
    assert world_info({**SRUN, **OPENMPI}).launcher == "OpenMPI"
    # a batch script without srun: SLURM_NTASKS is the allocation, one process runs, so it is not a launch
    assert world_info({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0"}).world_size == 1


def test_hand_set_rank_without_local_rank_fills_one_machine():
    assert world_info({"RANK": "1", "WORLD_SIZE": "2"}).local_rank == 1


@pytest.mark.parametrize("env, words", [
    ({"RANK": "1"}, "WORLD_SIZE is not"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "does not fit a world of 2"),
    ({"OMPI_COMM_WORLD_RANK": "x", "OMPI_COMM_WORLD_SIZE": "2"}, "is not an integer"),
    # RANK/WORLD_SIZE left over from a shell while mpirun started 2: both would train as rank 0
    ({**OPENMPI, "RANK": "0", "WORLD_SIZE": "1"}, "OpenMPI started 2 processes"),
], ids=["rank_without_size", "rank_outside", "not_an_integer", "stale_rank_under_mpirun"])
def test_misconfigured_launches_are_errors(env, words):
    with pytest.raises(LaunchError, match=words):
        check_launch(env)


def _accelerate_simple_env(*flags: str) -> dict:
    """The child environment accelerate's own launcher code builds for ``accelerate launch FLAGS script``."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args([*flags, "train.py"]))
    _, env = prepare_simple_launcher_cmd_env(args)
    return {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK") and not k.startswith(("OMPI_", "PMI_", "SLURM_"))}


def test_accelerate_cpu_launch_of_two_processes_that_starts_one_is_refused():
    env = _accelerate_simple_env("--cpu", "--num_processes", "2")
    with pytest.raises(LaunchError) as err:
        check_launch(env)
    text = str(err.value)
    assert "started only this one" in text and "configs/accelerate/cpu_2proc.yaml" in text
    assert "torchrun --nproc_per_node N" in text
    # one process asked for, one started: fine
    assert check_launch(_accelerate_simple_env("--cpu", "--num_processes", "1")).world_size == 1


def test_mpirun_env_is_exported_for_torch_and_transformers():
    env = dict(OPENMPI)
    info = export_launch_env(env)
    assert info.rank == 1 and env["RANK"] == "1" and env["WORLD_SIZE"] == "2" and env["LOCAL_RANK"] == "1"
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == "29500"  # one machine
    env = dict(MPICH)  # 4 processes, 2 per machine: rank 0's address cannot be guessed
    with pytest.raises(LaunchError, match="MASTER_ADDR is not set"):
        export_launch_env(env)
    env = {**MPICH, "MASTER_ADDR": "node0"}
    export_launch_env(env)
    assert env["MASTER_ADDR"] == "node0" and env["RANK"] == "2"
    plain, launched = {}, dict(TORCHRUN)
    export_launch_env(plain), export_launch_env(launched)
    assert plain == {} and launched == TORCHRUN  # nothing to add for one process or torchrun


def test_is_main_process_under_mpirun():
    # what session.is_main_process() returns: it used to read only RANK, so mpirun's rank 1 thought it was rank 0
    assert is_main_process({}) and is_main_process({**OPENMPI, "OMPI_COMM_WORLD_RANK": "0"})
    assert not is_main_process(OPENMPI) and not is_main_process(SRUN)


# The real `accelerate launch --config_file configs/accelerate/cpu_2proc.yaml ... train` (2 processes
# recorded in metrics.json) is run by tests/test_fsdp.py, with train.distributed=fsdp, to pay for one launch.


@pytest.mark.parametrize("name, expected", [
    ("cpu_2proc", {}),
    ("multi_gpu", {}),
])
def test_shipped_configs_take_accelerates_multi_process_launcher(name, expected):
    # accelerate's own code reads each config: it must choose the launcher that starts num_processes
    # processes (torchrun's), not the single-process one.
    from accelerate.commands import launch as accelerate_launch
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = accelerate_launch._validate_launch_command(accelerate_launch.launch_command_parser().parse_args(
        ["--config_file", str(CPU_CONFIG.with_name(f"{name}.yaml")), "train.py"]))
    assert args.num_processes == 2 and args.multi_gpu and not args.cpu
    env = prepare_multi_gpu_env(args)
    assert args.nproc_per_node == "2"
    assert {k: env.get(k) for k in expected} == expected
