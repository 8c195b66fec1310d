"""A stopped command whose runs train in worker processes (sweep --jobs, tune --jobs): the stop reaches every
worker, each checkpoints after its step, the command waits for them and exits 143/130 with one line, no
worker outlives it, and the same command run again finishes the runs as an uninterrupted sweep does."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanomarkov.cli import main
from nanomarkov.data import generate_dataset
from nanomarkov.progress import STOP_GRACE_SECONDS, stopped_line
from nanomarkov.sweep import run as sweep_run
from nanomarkov.sweep import run_sweep

REPO = Path(__file__).resolve().parents[2]
SLOW_CLI = REPO / "tests" / "slow_cli.py"
# Two runs of 12 steps on 5 states, 8 wide; a step of 0.3 s leaves ~3 s of training to stop in the middle of.
GRID = """
[defaults]
n_embd = 8
batch_size = 8
max_iters = 12
warmup_iters = 2
eval_interval = 6
log_interval = 3
device = "cpu"

[[datasets]]
n_states = 5
train = 100
val = 20
seq_len = 12

[[experiments]]
seeds = [42, 123]
"""
RUNS = ("MM-5/MM-5-42", "MM-5/MM-5-123")


def start(args, step_s, **popen):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "NANOMARKOV_TEST_STEP_S": str(step_s)}
    return subprocess.Popen(
        [sys.executable, str(SLOW_CLI), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **popen,
    )


def wait_for(condition, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def children(pid):
    """The processes whose parent is pid (Linux's /proc)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue  # it ended while we looked
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


def running(pid):
    """Whether pid is a live process (a zombie, ended but not yet reaped, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def training(out):
    """Whether both runs have taken a few steps (their first log line after iter 0)."""
    logs = [out / "runs" / name / "training.log" for name in RUNS]
    return all(log.exists() and "iter 3:" in log.read_text() for log in logs)


def stop_mid_training(proc, out, stop):
    """stop(proc) once both workers train: (stderr, the seconds it took to end, the workers' pids still running
    2 s after the end)."""
    wait_for(lambda: training(out), proc)
    workers = children(proc.pid)
    stopped = time.monotonic()
    stop(proc)
    _, stderr = proc.communicate(timeout=30)
    seconds = time.monotonic() - stopped
    deadline = time.monotonic() + 2  # multiprocessing's resource tracker ends when it sees its parent gone
    while any(running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    return stderr, seconds, [pid for pid in workers if running(pid)]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads processes from /proc (Linux)")
def test_a_sweep_stopped_by_sigterm_stops_its_workers_and_resumes_to_the_uninterrupted_models(tmp_path, monkeypatch):
    grid, out = tmp_path / "grid.toml", tmp_path / "out"
    grid.write_text(GRID)
    command = ["sweep", str(grid), "--out", str(out), "--jobs", "2"]
    proc = start(command, 0.3)
    stderr, seconds, survivors = stop_mid_training(proc, out, lambda p: p.send_signal(signal.SIGTERM))
    assert proc.returncode == 143, stderr
    print(f"ended {seconds:.1f}s after SIGTERM")
    assert stderr.splitlines() == [stopped_line(signal.SIGTERM)]  # the parent's line; no worker's traceback
    assert survivors == []
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [(runs[name]["state"], runs[name]["error"]) for name in RUNS] == [
        ("pending", "interrupted; run the sweep again to resume")
    ] * 2
    for name in RUNS:  # each worker stopped as train does: after its step, with a checkpoint
        assert "stopped by SIGTERM at iter" in (out / "runs" / name / "training.log").read_text()
        assert 3 <= torch.load(out / "runs" / name / "ckpt.pt", weights_only=True)["iter"] < 12

    again = subprocess.run(
        [sys.executable, str(SLOW_CLI), *command],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    monkeypatch.setattr(sweep_run, "write_sweep_report", lambda root, progress: None)
    threads = max(1, (os.cpu_count() or 1) // 2)  # what each of the sweep's 2 workers had
    whole = run_sweep(grid, tmp_path / "whole", threads=threads, progress=lambda _: None)
    resumed = json.loads((out / "sweep.json").read_text())["runs"]
    for name in RUNS:
        assert (resumed[name]["state"], resumed[name]["action"]) == ("done", "resume")
        assert resumed[name]["excess"] == whole["runs"][name]["excess"]
        a = torch.load(out / "runs" / name / "ckpt.pt", weights_only=True)["model"]
        b = torch.load(tmp_path / "whole" / "runs" / name / "ckpt.pt", weights_only=True)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def ctrl_c_twice(proc):
    """A terminal's Ctrl-C reaches the whole process group; a second one, soon after, ends everything now."""
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads processes from /proc (Linux)")
@pytest.mark.parametrize("presses", [2])  # one press takes the SIGTERM test's path (the workers get SIGTERM either way)
def test_ctrl_c_stops_a_parallel_sweep_without_a_workers_traceback(tmp_path, presses):
    grid, out = tmp_path / "grid.toml", tmp_path / "out"
    grid.write_text(GRID)
    proc = start(["sweep", str(grid), "--out", str(out), "--jobs", "2"], 0.3, start_new_session=True)
    stop = ctrl_c_twice if presses == 2 else lambda p: os.killpg(p.pid, signal.SIGINT)
    stderr, seconds, survivors = stop_mid_training(proc, out, stop)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("stopped by SIGINT"), stderr
    assert survivors == []
    logs = [(out / "runs" / name / "training.log").read_text() for name in RUNS]
    if presses == 2:  # the second stop ends everything at once, without waiting for a step or a checkpoint
        assert not any("stopped by" in log for log in logs)
        assert seconds < STOP_GRACE_SECONDS, seconds
    else:  # each run stopped after its step, with a checkpoint
        assert all("stopped by SIGINT at iter" in log for log in logs)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads processes from /proc (Linux)")
def test_a_sweep_started_in_the_background_runs_on_through_the_terminals_ctrl_c(tmp_path):
    """A shell without job control starts `nanomarkov sweep ... &` with SIGINT ignored: the workers ignore the
    terminal's Ctrl-C as the sweep does, and every run finishes (a worker that took it ended mid-run, failed)."""
    grid, out = tmp_path / "grid.toml", tmp_path / "out"
    grid.write_text(GRID)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # what `&` does; an ignored signal stays so through exec
    try:
        proc = start(["sweep", str(grid), "--out", str(out), "--jobs", "2"], 0.1, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, before)
    wait_for(lambda: training(out), proc)
    ctrl_c_twice(proc)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [runs[name]["state"] for name in RUNS] == ["done", "done"]


def test_a_stopped_slurm_sweep_leaves_its_jobs_and_names_them_in_its_one_line(tmp_path, monkeypatch, capsys):
    def submitted_then_stopped(executor, run, specs, threads, on_submit, on_start, on_finish):
        on_submit({spec.name: f"77_{i}" for i, spec in enumerate(specs)})
        on_finish(specs[0], {"state": "done", "iters": 12, "excess": 0.1, "seconds": 1})
        raise KeyboardInterrupt  # Ctrl-C while the sweep waits for its jobs

    monkeypatch.setattr(sweep_run, "slurm_executor", lambda folder, **options: "an executor")
    monkeypatch.setattr(sweep_run, "run_jobs", submitted_then_stopped)
    grid, out = tmp_path / "grid.toml", tmp_path / "out"
    grid.write_text(GRID)
    assert main(["sweep", str(grid), "--out", str(out), "--launcher", "slurm"]) == 130
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"{stopped_line(signal.SIGINT)}; SLURM job(s) 77_1 go on (scancel them to stop them too); "
        f"`nanomarkov sweep status {out}` follows them, and the same command collects their results once they are over"
    ]
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [(runs[name]["state"], runs[name]["job_id"]) for name in RUNS] == [("done", "77_0"), ("pending", "77_1")]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads processes from /proc (Linux)")
def test_tune_stopped_by_sigterm_stops_its_workers_trials(tmp_path):
    data, out = tmp_path / "mm3", tmp_path / "study"
    generate_dataset(data, n_states=3, train_sequences=64, val_sequences=32, seq_len=16, seed=1)
    space = ["lr=1e-3:3e-2", "n_layer=1", "n_embd=16", "n_head=1", "batch_size=8", "mlp_only=True", "wd=0"]
    command = [
        "tune",
        str(data),
        "--out",
        str(out),
        "--trials",
        "4",
        "--jobs",
        "2",
        "--tokens",
        "960",
        "--space",
        *space,
    ]
    proc = start(command, 0.5)
    logs = [out / "trials" / f"{n:04d}" / "training.log" for n in (0, 1)]
    wait_for(lambda: all(log.exists() and "eval iter 0" in log.read_text() for log in logs), proc)
    workers = children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143, stderr
    said = [line for line in stderr.splitlines() if not line.startswith(("trial 0: ", "trial 1: "))]  # heartbeats
    assert said == [stopped_line(signal.SIGTERM)]
    time.sleep(0.5)
    assert [pid for pid in workers if running(pid)] == []
    assert all("stopped by SIGTERM at iter" in log.read_text() for log in logs)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads processes from /proc (Linux)")
def test_a_worker_ends_when_its_parent_is_killed_outright(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "orphan_parent.py")], stdout=subprocess.PIPE, env=env
    )
    worker = int(parent.stdout.readline())
    assert running(worker)
    parent.kill()  # SIGKILL: nothing of the parent runs, as when a second stop ends it with os._exit
    parent.wait()
    deadline = time.monotonic() + 10
    while running(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(worker)
