"""Where this process stands in a multi-process job, read from the launcher that started it.

Two launchers are understood; we never start processes ourselves:
  torchrun        RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/MASTER_PORT (or its
                  rendezvous store); one node or many (--nnodes, c10d rendezvous)
  srun --ntasks=N SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID and the step's SLURM_STEP_NUM_TASKS,
                  SLURM_STEP_NODELIST, SLURM_STEP_TASKS_PER_NODE; the processes meet on the step's
                  first node at MASTER_PORT, or at slurm_port(SLURM_JOB_ID) when that is not set
Anything else is a single process: a plain command, a batch script (sbatch sets SLURM_NTASKS and
SLURM_PROCID=0 but no step variables: only srun starts the other tasks), a step of one task (a
submitit job), and torchrun inside srun (torchrun's variables win).
"""

import contextlib
import dataclasses
import os
import re

import torch
import torch.distributed as dist

from nanomarkov.config import AUTO_THREADS_MAX
from nanomarkov.errors import NanoMarkovError

SLURM_PORTS = (12000, 32000)  # below Linux's ephemeral range (32768+), where the kernel picks client ports


@dataclasses.dataclass
class Distributed:
    """Where this process stands in a torchrun/srun job (world_size 1 when alone)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0


@dataclasses.dataclass
class Launch:
    """What init_process_group needs, as one launcher's environment describes it."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    init_method: str


def init_distributed(device_type):
    """Join the process group when launched by torchrun or srun; a single process otherwise."""
    launch = launch_from_env(os.environ)
    if launch is None:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device_type == "cuda" else "gloo",
            init_method=launch.init_method,
            rank=launch.rank,
            world_size=launch.world_size,
        )
    if device_type == "cpu":
        # The processes on a node share the cores this one may run on (the node's, or what taskset
        # or a cgroup leaves); oversubscribing them is far slower than splitting.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // launch.local_world_size))
    return Distributed(launch.rank, launch.local_rank, launch.world_size)


def launch_from_env(env):
    """The Launch that torchrun's or srun's variables in `env` describe, or None for a single process."""
    if "RANK" in env:
        launch = _torchrun_launch(env)
    elif "SLURM_STEP_NUM_TASKS" in env and _int(env, "SLURM_STEP_NUM_TASKS", "srun sets it") > 1:
        launch = _srun_launch(env)
    else:
        return None
    if not (
        0 <= launch.rank < launch.world_size and 0 <= launch.local_rank < launch.local_world_size <= launch.world_size
    ):
        raise NanoMarkovError(
            f"inconsistent launcher environment: rank {launch.rank}, local rank "
            f"{launch.local_rank}, {launch.local_world_size} processes on this node, "
            f"{launch.world_size} in all"
        )
    return launch if launch.world_size > 1 else None


def _torchrun_launch(env):
    why = "RANK is set"
    world_size = _int(env, "WORLD_SIZE", why)
    local_world_size = _int(env, "LOCAL_WORLD_SIZE", why) if "LOCAL_WORLD_SIZE" in env else world_size
    # env:// reads MASTER_ADDR/MASTER_PORT, or the store torchrun's rendezvous left for its workers.
    return Launch(_int(env, "RANK", why), _int(env, "LOCAL_RANK", why), world_size, local_world_size, "env://")


def _srun_launch(env):
    why = "SLURM_STEP_NUM_TASKS > 1"
    tasks_per_node = expand_counts(_get(env, "SLURM_STEP_TASKS_PER_NODE", why))
    node = _int(env, "SLURM_NODEID", why)
    if node >= len(tasks_per_node):
        raise NanoMarkovError(
            f"SLURM_NODEID={node} but SLURM_STEP_TASKS_PER_NODE names only {len(tasks_per_node)} nodes"
        )
    addr = env.get("MASTER_ADDR") or expand_hostlist(_get(env, "SLURM_STEP_NODELIST", why))[0]
    port = _int(env, "MASTER_PORT", why) if "MASTER_PORT" in env else slurm_port(_int(env, "SLURM_JOB_ID", why))
    return Launch(
        _int(env, "SLURM_PROCID", why),
        _int(env, "SLURM_LOCALID", why),
        _int(env, "SLURM_STEP_NUM_TASKS", why),
        tasks_per_node[node],
        f"tcp://{addr}:{port}",
    )


def slurm_port(job_id):
    """The rendezvous port of a SLURM job: the same for all its tasks, different for consecutive jobs."""
    low, high = SLURM_PORTS
    return low + job_id % (high - low)


def expand_hostlist(hostlist):
    """SLURM's compressed host list as names: 'gpu[01-02,07],cpu3' -> gpu01 gpu02 gpu07 cpu3."""
    hosts = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", hostlist):
        hosts += _expand_brackets(item)
    if not hosts:
        raise NanoMarkovError(f"cannot read a host name in the SLURM node list {hostlist!r}")
    return hosts


def _expand_brackets(item):
    match = re.search(r"\[([^\]]*)\]", item)
    if match is None:
        return [item]
    head, tails = item[: match.start()], _expand_brackets(item[match.end() :])
    names = []
    for span in match.group(1).split(","):
        first, _, last = span.partition("-")
        if not first.isdigit() or not (last or first).isdigit():
            raise NanoMarkovError(f"cannot read the range {span!r} in the SLURM node list {item!r}")
        # The width of the first number is the padding of all: node[08-10] -> node08 node09 node10.
        names += [
            f"{head}{n:0{len(first)}d}{tail}" for n in range(int(first), int(last or first) + 1) for tail in tails
        ]
    return names


def expand_counts(counts):
    """SLURM's tasks per node, '2(x3),1' -> [2, 2, 2, 1]."""
    expanded = []
    for part in counts.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise NanoMarkovError(f"cannot read the SLURM task counts {counts!r}")
        expanded += [int(match.group(1))] * int(match.group(2) or 1)
    return expanded


def _get(env, name, why):
    if not env.get(name):
        raise NanoMarkovError(f"{why} but {name} is not set: launch with srun or torchrun, not by hand")
    return env[name]


def _int(env, name, why):
    value = _get(env, name, why)
    try:
        return int(value)
    except ValueError:
        raise NanoMarkovError(f"{name}={value!r} is not a whole number") from None


def intra_op_threads(setting) -> int:
    """The number of torch intra-op threads `setting` (an integer >= 1, or 'auto') asks for here."""
    return min(torch.get_num_threads(), AUTO_THREADS_MAX) if setting == "auto" else setting


@contextlib.contextmanager
def torch_threads(setting):
    """torch's intra-op threads set to `setting` (TrainConfig.threads, --threads) inside the block, the number
    given to it; what they were before, after."""
    before = torch.get_num_threads()
    threads = intra_op_threads(setting)
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)
