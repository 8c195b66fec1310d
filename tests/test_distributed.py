"""Training in several processes under the launchers users have, against one process with the same
global batch: torchrun on one node, torchrun on two "nodes" (two launchers meeting through a c10d
rendezvous over loopback) and srun (its environment, made by hand: no SLURM needed). Then the
reading of those environments and of SLURM's host lists, where no process is started.

Each multi-process run is the tiny run of test_train.py for 20 steps with batch 4 per process;
the reference is one process with batch 8. Every launch is bounded: a hang fails within a minute.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import (
    BATCH,
    WORKER,
    ckpt,
    config,
    data,  # noqa: F401  (the module's dataset, a fixture)
    read_log,
    run_in_one_thread,
)

from nanomarkov import NanoMarkovError
from nanomarkov.config import AUTO_THREADS_MAX, TrainConfig
from nanomarkov.distributed import (
    SLURM_PORTS,
    Launch,
    expand_counts,
    expand_hostlist,
    launch_from_env,
    slurm_port,
    torch_threads,
)
from nanomarkov.train import resolve_device

ITERS = 20
LAUNCH_TIMEOUT_S = 60
# Two processes with batch 4 compute the same mean gradient as one with batch 8, but float32 sums
# it in another order (per-rank means averaged by all-reduce, not one mean of 8): the weights differ
# by rounding that 20 Adam steps carry along. Measured on CPU: 1.5e-7 to 1.6e-7 for each launcher
# here, and 1.5e-7 for one process that splits its batch into 2 accumulated halves (the same
# reordering, no second process). A real fault is far larger: ranks that all read the first half of
# each batch leave the weights 0.15 away. 1e-5 sits 60x above the rounding and 10^4x below that fault.
TOLERANCE = 1e-5
# Launcher variables the test's own environment may hold (a CI job under SLURM or torchrun).
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    """The reference: one process, batch 8."""
    out = tmp_path_factory.mktemp("single") / "run"
    run_in_one_thread(config(data, out, max_iters=ITERS))
    return out


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    return dict(env, OMP_NUM_THREADS="1", **extra)


def free_port(candidates=(0,)):
    """A TCP port nobody listens on now: the first free one of `candidates` (0: the kernel picks)."""
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise AssertionError(f"no free port in {candidates}")


def start_all(commands, envs, log_dir):
    """Start every command at once, each writing to a log file in log_dir; (processes, log paths)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    for i, (command, env) in enumerate(zip(commands, envs)):
        logs.append(log_dir / f"launcher{i}.log")
        with open(logs[-1], "w") as log:
            # A session of its own, so that a hang is killed with every process the launcher started.
            procs.append(
                subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )
    return procs, logs


def wait_all(procs, logs, started):
    """Wait for every process to succeed; LAUNCH_TIMEOUT_S after `started`, kill them all and fail."""
    try:
        for proc in procs:
            proc.wait(timeout=max(0.1, started + LAUNCH_TIMEOUT_S - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):  # already gone
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in procs:
            proc.wait()
        pytest.fail(f"not done in {LAUNCH_TIMEOUT_S}s:\n" + "\n".join(p.read_text()[-2000:] for p in logs))
    outputs = [p.read_text() for p in logs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
    return outputs


def launch_all(commands, envs, log_dir):
    started = time.monotonic()
    return wait_all(*start_all(commands, envs, log_dir), started)


def torchrun():
    executable = Path(sys.executable).with_name("torchrun")
    return [str(executable)] if executable.exists() else [sys.executable, "-m", "torch.distributed.run"]


def assert_matches_single(single, ddp_dir, world_size=2):
    assert json.loads((ddp_dir / "config.json").read_text())["world_size"] == world_size
    a, b = ckpt(single), ckpt(ddp_dir)
    assert a["iter"] == b["iter"] == ITERS and a["tokens"] == b["tokens"]
    worst = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    print(f"{ddp_dir.name}: max |weight difference| from one process {worst:.2e}")
    assert worst < TOLERANCE, f"max |weight difference| {worst}"

    def evals(d):
        return {r["iter"]: r["val_loss"] for r in read_log(d) if r["kind"] == "eval"}

    scheduled = {i: loss for i, loss in evals(ddp_dir).items() if i % 10 == 0}  # not the eval of a stop
    assert list(evals(single)) == list(scheduled) == [0, 10, 20]
    assert list(evals(single).values()) == pytest.approx(list(scheduled.values()), abs=TOLERANCE)

    def trains(d):
        return [r["loss"] for r in read_log(d) if r["kind"] == "train"]

    assert trains(single) == pytest.approx(trains(ddp_dir), abs=TOLERANCE)


def ddp_values(data, out, **overrides):
    return json.dumps(config(data, out, max_iters=ITERS, batch_size=BATCH // 2, **overrides))


# ------------------------------------------------------------------ launches


def test_torchrun_on_one_node(data, single, tmp_path):
    out = tmp_path / "torchrun"
    launch_all(
        [[*torchrun(), "--standalone", "--nproc_per_node=2", str(WORKER), ddp_values(data, out)]],
        [clean_env()],
        tmp_path / "logs",
    )
    assert_matches_single(single, out)


def test_torchrun_on_two_nodes_through_a_c10d_rendezvous(data, single, tmp_path):
    """Two launchers, as on two machines; here both on loopback, one of them hosting the rendezvous."""
    out = tmp_path / "two-nodes"
    port = free_port()
    cores = sorted(os.sched_getaffinity(0))
    # Each "node" gets a core of its own, as each machine has its own.
    commands = [
        [
            "taskset",
            "-c",
            str(cores[node % len(cores)]),
            *torchrun(),
            "--nnodes=2",
            "--nproc_per_node=1",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}",
            "--rdzv_id=test-two-nodes",
            f"--rdzv_conf=is_host={int(node == 0)},join_timeout={LAUNCH_TIMEOUT_S // 2}",
            "--local_addr=127.0.0.1",
            "--max_restarts=0",
            str(WORKER),
            ddp_values(data, out),
        ]
        for node in range(2)
    ]
    # gloo finds its peers through the host name; loopback stands for the network between nodes.
    launch_all(commands, [clean_env(GLOO_SOCKET_IFNAME="lo")] * 2, tmp_path / "logs")
    assert_matches_single(single, out)


def srun_task_envs(tasks=2):
    """What srun gives each of `srun --ntasks=2` tasks on one node, without MASTER_PORT: the port
    comes from the job id (one whose port is free now)."""
    low, high = SLURM_PORTS
    port = free_port(range(low + int(time.time() * 1000) % 10000, high))
    job_id = 7 * (high - low) + port - low
    assert slurm_port(job_id) == port
    step = dict(
        SLURM_JOB_ID=str(job_id),
        SLURM_STEP_ID="0",
        SLURM_NTASKS=str(tasks),
        SLURM_STEP_NUM_TASKS=str(tasks),
        SLURM_JOB_NODELIST="localhost",
        SLURM_STEP_NODELIST="localhost",
        SLURM_NODEID="0",
        SLURM_STEP_TASKS_PER_NODE=str(tasks),
    )
    return [clean_env(**step, SLURM_PROCID=str(task), SLURM_LOCALID=str(task)) for task in range(tasks)]


def test_srun_tasks_train_as_one_job_stop_together_and_resume(data, single, tmp_path):
    """Two tasks as `srun --ntasks=2` starts them. SLURM signals every task before a time limit, but
    not at the same instant; here only task 1, the one that does not write the log, so every task
    must learn it from the others. Resumed, the job ends where one process ends."""
    out = tmp_path / "stopped"
    started = time.monotonic()
    # 0.1 s before each step leaves 1.5 s between the log's iter 5 and the end.
    procs, logs = start_all(
        [[sys.executable, str(WORKER), ddp_values(data, out), "0.1"]] * 2, srun_task_envs(), tmp_path / "logs"
    )
    log = out / "log.jsonl"
    while (
        not log.exists()
        or max([json.loads(line)["iter"] for line in log.read_text().splitlines() if line.endswith("}")], default=0) < 5
    ):  # a line being written is not read
        assert time.monotonic() < started + LAUNCH_TIMEOUT_S and all(p.poll() is None for p in procs), "\n".join(
            p.read_text()[-2000:] for p in logs
        )
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGTERM)
    outputs = wait_all(procs, logs, started)
    assert "RESULT" in outputs[0] and "RESULT" not in outputs[1]  # task 0 is rank 0
    result = json.loads(outputs[0].split("RESULT ", 1)[1])
    stopped = ckpt(out)["iter"]
    assert result["status"] == "interrupted" and result["iters"] == stopped and 5 <= stopped < ITERS
    last = (out / "training.log").read_text().splitlines()[-1]
    assert last.startswith(f"stopped by a signal to another process at iter {stopped};")

    resume = ddp_values(data, out, init_from="resume")
    launch_all([[sys.executable, str(WORKER), resume]] * 2, srun_task_envs(), tmp_path / "logs2")
    assert_matches_single(single, out)


# ------------------------------------------------------------------ reading the launchers' variables

SRUN_TASK = dict(
    SLURM_JOB_ID="4242",
    SLURM_STEP_ID="0",
    SLURM_NTASKS="8",
    SLURM_STEP_NUM_TASKS="8",
    SLURM_STEP_NODELIST="gpu[07-08]",
    SLURM_STEP_TASKS_PER_NODE="4(x2)",
    SLURM_NODEID="1",
    SLURM_PROCID="5",
    SLURM_LOCALID="1",
)


def test_srun_task_joins_the_first_node_of_its_step():
    launch = launch_from_env(SRUN_TASK)
    assert launch == Launch(
        rank=5, local_rank=1, world_size=8, local_world_size=4, init_method=f"tcp://gpu07:{slurm_port(4242)}"
    )
    given = launch_from_env(dict(SRUN_TASK, MASTER_ADDR="10.0.0.1", MASTER_PORT="29500"))
    assert given.init_method == "tcp://10.0.0.1:29500"
    uneven = launch_from_env(
        dict(SRUN_TASK, SLURM_STEP_NUM_TASKS="7", SLURM_STEP_TASKS_PER_NODE="4,3", SLURM_PROCID="6", SLURM_LOCALID="2")
    )
    assert (uneven.world_size, uneven.local_world_size) == (7, 3)


def test_slurm_port_is_shared_by_a_jobs_tasks_and_stays_in_its_range():
    ports = [slurm_port(job) for job in range(1, 100_000, 7)]
    low, high = SLURM_PORTS
    assert all(low <= p < high for p in ports) and high <= 32768  # below the kernel's ephemeral ports
    assert len(set(ports)) == len(ports)  # 100k job ids, 7 apart: no two collide in a 20000-port range
    assert slurm_port(123) != slurm_port(124)


@pytest.mark.parametrize(
    "env",
    [
        {},
        # A batch script: sbatch --ntasks=4 sets these, but only srun starts the other three tasks.
        dict(
            SLURM_JOB_ID="1",
            SLURM_NTASKS="4",
            SLURM_PROCID="0",
            SLURM_LOCALID="0",
            SLURM_NODEID="0",
            SLURM_JOB_NODELIST="n[1-2]",
            SLURM_TASKS_PER_NODE="2(x2)",
        ),
        # A step of one task, as submitit starts each job.
        dict(
            SRUN_TASK,
            SLURM_STEP_NUM_TASKS="1",
            SLURM_STEP_TASKS_PER_NODE="1",
            SLURM_NODEID="0",
            SLURM_PROCID="0",
            SLURM_LOCALID="0",
        ),
        dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"),
    ],
    ids=["nothing", "sbatch-script", "one-task-step", "torchrun-one-process"],
)
def test_a_single_process_stays_single(env):
    assert launch_from_env(env) is None


def test_torchrun_variables_win_over_srun_ones():
    """torchrun started by srun on each node: the workers are torchrun's, the srun task is the launcher."""
    env = dict(SRUN_TASK, RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")
    assert launch_from_env(env) == Launch(3, 1, 4, 2, "env://")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(SLURM_PROCID="8"), "rank 8"),
        (dict(SLURM_LOCALID="4"), "local rank 4"),
        (dict(SLURM_STEP_NODELIST=""), "SLURM_STEP_NODELIST is not set"),
        (dict(SLURM_NODEID="2"), "names only 2 nodes"),
        (dict(SLURM_STEP_NUM_TASKS="eight"), "SLURM_STEP_NUM_TASKS='eight'"),
        (dict(MASTER_PORT="port"), "MASTER_PORT='port'"),
        (dict(SLURM_STEP_TASKS_PER_NODE="4(2)"), "task counts"),
        (dict(SLURM_STEP_NODELIST="gpu[a-b]"), "range 'a-b'"),
        (dict(RANK="0", LOCAL_RANK="0"), "WORLD_SIZE is not set"),
        (dict(RANK="2", WORLD_SIZE="2", LOCAL_RANK="0"), "rank 2"),
    ],
)
def test_an_inconsistent_environment_is_one_clear_error(change, message):
    with pytest.raises(NanoMarkovError, match=message.replace("(", r"\(").replace("[", r"\[")):
        launch_from_env(dict(SRUN_TASK, **change))


@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("localhost", ["localhost"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("gpu[9-11]", ["gpu9", "gpu10", "gpu11"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
        ("rack[1-2]-n[8,10].ib", ["rack1-n8.ib", "rack1-n10.ib", "rack2-n8.ib", "rack2-n10.ib"]),
    ],
)
def test_hostlists_expand_as_slurm_writes_them(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="no scontrol here to compare with")
def test_hostlists_expand_as_scontrol_expands_them():
    for hostlist in ("node[01-03,07]", "gpu[9-11],n[098-101]", "rack[1-2]-n[8,10]"):
        shown = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True, timeout=30)
        if shown.returncode != 0:
            pytest.skip(f"scontrol cannot expand host lists here: {shown.stderr.strip()}")
        assert expand_hostlist(hostlist) == shown.stdout.split()


def test_task_counts_expand():
    assert expand_counts("2(x3),1") == [2, 2, 2, 1]
    assert expand_counts("4") == [4]


def test_the_multinode_template_is_valid_bash():
    template = Path(__file__).resolve().parents[1] / "scripts" / "train_multinode.sbatch"
    checked = subprocess.run(["bash", "-n", str(template)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert "srun --kill-on-bad-exit=1 python -m nanomarkov train" in template.read_text()


@pytest.mark.parametrize("visible, local_rank, expected", [(4, 3, "cuda:3"), (1, 3, "cuda:0")])
def test_each_process_takes_the_gpu_of_its_local_rank_among_those_it_sees(monkeypatch, visible, local_rank, expected):
    """All the node's GPUs visible: the local rank's. One per task (srun --gpus-per-task=1): its own."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    for device in ("auto", "cuda"):
        cfg = TrainConfig(device=device, dtype="float32", compile=False)
        assert resolve_device(cfg, local_rank)[0] == expected


@pytest.mark.parametrize(
    ("device", "gpus", "named"),
    [("mps", 0, "device is mps (an Apple GPU) but this torch cannot use one here; use --device=cpu"),
     ("cuda", 0, "device is cuda but torch sees no CUDA GPU"),
     ("cuda:3", 0, "device is cuda but torch sees no CUDA GPU"),
     ("cuda:2", 2, "device is cuda:2 but torch sees 2 CUDA GPUs (cuda:0 to cuda:1)"),
     ("cuda:²", 4, "device must be auto, cpu, cuda, cuda:N or mps, got 'cuda:²'")],
)  # fmt: skip
def test_a_device_this_machine_lacks_is_refused_in_words(monkeypatch, device, gpus, named):
    """Before torch's traceback (mps on Linux: 'PyTorch is not linked with support for mps devices')."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(NanoMarkovError) as refused:
        resolve_device(TrainConfig(device=device, dtype="float32", compile=False))
    assert named in str(refused.value)


def test_threads_are_set_inside_the_block_and_restored_after():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch_threads(3) as threads:
            assert threads == torch.get_num_threads() == 3
        assert torch.get_num_threads() == 2
        with torch_threads("auto") as threads:  # torch's own count (here 2), at most AUTO_THREADS_MAX
            assert threads == torch.get_num_threads() == min(2, AUTO_THREADS_MAX)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
