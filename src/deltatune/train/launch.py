"""Which process this is: rank, local rank and world size from whichever launcher started it.

``torchrun`` and ``accelerate launch`` (multi-GPU/FSDP/DeepSpeed, which run torchrun) export ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE``; ``mpirun`` exports its own names (OpenMPI ``OMPI_COMM_WORLD_*``,
MPICH and Intel MPI ``PMI_RANK``/``PMI_SIZE``/``MPI_LOCALRANKID``), and SLURM's ``srun`` exports
``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_STEP_NUM_TASKS``. Reading ``RANK`` alone makes every
``mpirun`` process believe it is rank 0, so they all write the same output folder at once.

:func:`world_info` reads them all, with this precedence (the first launcher found wins):

1. ``RANK``/``WORLD_SIZE`` (torchrun, accelerate, or set by hand): the innermost launcher. Under
   ``srun torchrun ...`` or ``mpirun torchrun ...`` the outer launcher's variables count one task per
   node, while torchrun's describe the processes that actually train.
2. OpenMPI, 3. MPICH / Intel MPI (PMI): inside a SLURM allocation ``mpirun`` processes inherit the
   allocation's ``SLURM_*`` variables, which describe the job, not this process.
4. SLURM, only inside an ``srun`` step (``SLURM_STEP_NUM_TASKS`` set): in a batch script without
   ``srun``, ``SLURM_NTASKS`` is the allocation's size while one process runs, and waiting for the
   others would hang.

:func:`check_launch` turns a launch that would silently train with fewer processes than asked into an
error, and :func:`export_launch_env` gives torch.distributed and transformers the ``RANK``/``WORLD_SIZE``
/``LOCAL_RANK`` names (and single-node ``MASTER_ADDR``/``MASTER_PORT``) when an MPI or SLURM launcher set
only its own.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

SHIPPED_CPU_CONFIG = "configs/accelerate/cpu_2proc.yaml"
"""The accelerate config (in the repository) that really starts 2 CPU processes."""

# (launcher, rank, local rank, world size, local world size), in precedence order (see the module docstring).
_LAUNCHERS = (
    ("torchrun/accelerate", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"),
    ("OpenMPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("MPICH/Intel MPI", "PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE", "MPI_LOCALNRANKS"),
    ("SLURM", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_TASKS_PER_NODE"),
)
# accelerate's single-process launcher (``--cpu``, MULTI_CPU without mpirun) sets these, and MASTER_ADDR
# / MASTER_PORT only when asked for more than one process; it never sets a rank.
_ACCELERATE_MARKERS = ("ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION")


class LaunchError(ValueError):
    """The launch would not run the processes it was asked for; the message says what to run instead."""


@dataclass(frozen=True)
class WorldInfo:
    """This process's place in the job."""

    rank: int
    """Global rank, 0 .. world_size - 1 (0 in a plain single process)."""
    local_rank: int
    """Rank on this machine (which GPU it uses)."""
    world_size: int
    """Number of processes in the job."""
    local_world_size: int
    """Number of processes on this machine."""
    launcher: str
    """Which launcher's variables were read: ``torchrun/accelerate``, ``OpenMPI``, ``MPICH/Intel MPI``, ``SLURM`` or ``none``."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the output folder."""
        return self.rank == 0


def _int(env: Mapping[str, str], name: str | None, default: int | None = None) -> int | None:
    value = env.get(name) if name else None
    if value is None or value == "":
        return default
    first = value.split("(")[0].split(",")[0]  # SLURM_STEP_TASKS_PER_NODE may read "2(x3)" or "2,1"
    try:
        return int(first)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer; the launcher that set it "
                          "is misconfigured (or unset it if you set it by hand)") from None


def _read(env: Mapping[str, str], launcher: str, rank_var: str, local_var: str, size_var: str,
          local_size_var: str) -> WorldInfo:
    rank, size = _int(env, rank_var), _int(env, size_var)
    if size is None:
        raise LaunchError(f"{rank_var}={rank} is set but {size_var} is not, so the number of processes is "
                          f"unknown; set both (torchrun and accelerate launch do), or neither for one process")
    local_size = _int(env, local_size_var, size)
    # Without a local rank (a hand-set RANK) every process would pick GPU 0; ranks fill machines in order.
    local = _int(env, local_var, rank % local_size if local_size else 0)
    if not (0 <= rank < size and 0 < local_size <= size and 0 <= local < local_size):
        raise LaunchError(f"{launcher}: rank {rank} (local {local} of {local_size}) does not fit a world of {size} "
                          f"processes ({rank_var}, {local_var}, {local_size_var}, {size_var}); the launch is misconfigured")
    return WorldInfo(rank, local, size, local_size, launcher)


def _found(env: Mapping[str, str]) -> list[tuple[str, ...]]:
    """The launchers whose variables are set, in precedence order."""
    return [row for row in _LAUNCHERS
            if env.get(row[1], "") != "" and (row[0] != "SLURM" or env.get(row[3], "") != "")]


def world_info(env: Mapping[str, str] | None = None) -> WorldInfo:
    """Rank, local rank and world size of this process, from the first launcher whose variables are set.

    Args:
        env: the environment to read (``os.environ`` by default).

    Raises:
        LaunchError: a rank without a world size, a rank outside the world, a value that is no integer.
    """
    env = os.environ if env is None else env
    found = _found(env)
    return _read(env, *found[0]) if found else WorldInfo(0, 0, 1, 1, "none")


def check_launch(env: Mapping[str, str] | None = None) -> WorldInfo:
    """:func:`world_info`, refusing a launch that silently runs fewer processes than asked.

    ``accelerate launch --cpu --num_processes N`` (and a MULTI_CPU config without an mpirun hostfile) use
    accelerate's single-process launcher: it starts one process, exports ``MASTER_ADDR``/``MASTER_PORT``
    because N > 1, and no rank, so training would run with 1/N of the asked global batch.

    Raises:
        LaunchError: that case (the message gives the command to use instead), or a bad rank/size.
    """
    env = os.environ if env is None else env
    info = world_info(env)
    for row in _found(env)[1:]:
        outer = _read(env, *row)
        if outer.world_size > info.world_size:
            # torchrun inside mpirun/srun counts at least as many processes as the outer launcher; fewer
            # means RANK/WORLD_SIZE were left in the environment (a shell profile, an earlier job).
            raise LaunchError(
                f"{outer.launcher} started {outer.world_size} processes but {info.launcher}'s variables say "
                f"{info.world_size} (RANK={env.get('RANK')}, WORLD_SIZE={env.get('WORLD_SIZE')}), so several "
                "processes would train as the same rank; unset RANK, WORLD_SIZE and LOCAL_RANK before mpirun/srun, "
                "or launch with torchrun --nproc_per_node N"
            )
    accelerate = any(k in env for k in _ACCELERATE_MARKERS)
    if info.launcher == "none" and accelerate and env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        raise LaunchError(
            "accelerate launch was asked for several processes but started only this one (its --cpu / MULTI_CPU "
            "launcher without mpirun runs a single process, and training would silently use 1/N of the global "
            f"batch). Use: accelerate launch --config_file {SHIPPED_CPU_CONFIG} -m deltatune.cli.main train ... "
            "(2 CPU processes; edit num_processes for more), or: torchrun --nproc_per_node N -m "
            "deltatune.cli.main train ... If you meant one process, unset MASTER_ADDR and MASTER_PORT."
        )
    return info


def export_launch_env(env: dict[str, str] | None = None) -> WorldInfo:
    """Give an MPI or SLURM launch the variables torch.distributed and transformers read.

    transformers (through accelerate) decides whether to start DDP from ``LOCAL_RANK``/``WORLD_SIZE``
    on GPUs and torch's ``env://`` rendezvous needs ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
    ``MASTER_PORT``. Under ``mpirun``/``srun`` only the launcher's own names are set, so each process
    would train alone as rank 0. This sets the torchrun names from them when missing, and on a single
    machine ``MASTER_ADDR=127.0.0.1``/``MASTER_PORT=29500`` (several machines need rank 0's address:
    the error says so). Nothing is changed for torchrun/accelerate or a single process.

    Raises:
        LaunchError: as :func:`check_launch`, or a multi-machine MPI/SLURM launch without ``MASTER_ADDR``.
    """
    env = os.environ if env is None else env
    info = check_launch(env)
    if info.launcher in ("none", "torchrun/accelerate"):
        return info
    env.setdefault("RANK", str(info.rank))
    env.setdefault("WORLD_SIZE", str(info.world_size))
    env.setdefault("LOCAL_RANK", str(info.local_rank))
    env.setdefault("LOCAL_WORLD_SIZE", str(info.local_world_size))
    if info.world_size > 1 and not env.get("MASTER_ADDR"):
        if info.local_world_size != info.world_size:
            raise LaunchError(
                f"{info.launcher} started {info.world_size} processes on several machines but MASTER_ADDR is not "
                "set, so they cannot find each other; export MASTER_ADDR=<rank 0's hostname> and MASTER_PORT=<a free "
                "port> for every process (e.g. mpirun -x MASTER_ADDR -x MASTER_PORT), or launch with torchrun "
                "--nnodes M --nproc_per_node N --rdzv-backend c10d --rdzv-endpoint HOST:PORT on each machine"
            )
        env["MASTER_ADDR"] = "127.0.0.1"
    if info.world_size > 1:
        env.setdefault("MASTER_PORT", "29500")
    return info


def is_main_process(env: Mapping[str, str] | None = None) -> bool:
    """True on rank 0 of any launcher and in a plain single process (checks the launch, see :func:`check_launch`)."""
    return check_launch(env).is_main


__all__ = ["LaunchError", "SHIPPED_CPU_CONFIG", "WorldInfo", "check_launch", "export_launch_env", "is_main_process",
           "world_info"]
