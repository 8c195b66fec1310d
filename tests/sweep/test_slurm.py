"""The SLURM launcher: submitit's local executor (no cluster), then a real one-node cluster
(scripts/slurm_local.sh) running grids/tiny.toml with a job cancelled mid-run and resumed."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from nanomarkov import NanoMarkovError
from nanomarkov.data import generate_dataset
from nanomarkov.sweep import expand_grid, run_one, run_sweep
from nanomarkov.sweep import run as sweep_run
from nanomarkov.sweep.slurm import require_submitit, run_jobs, slurm_executor
from nanomarkov.sweep.status import sweep_status

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "grids" / "tiny.toml"
ITERS = 300  # the SLURM test's runs


def no_report(monkeypatch):
    monkeypatch.setattr(sweep_run, "write_sweep_report", lambda root, progress: None)


def wait_until(condition, timeout_s, what):
    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"gave up after {timeout_s}s waiting for {what}")
        time.sleep(0.005)


def freeze_mid_run(find_pid, run_dir):
    """Stop the run's process once training has begun, and let it go on in 10 ms slices until its
    first checkpoint is written: the signal that follows then lands mid-run, whatever the machine's load.
    find_pid returns the process, or None until it exists (found before training starts: a tiny run
    trains in a fraction of a second)."""
    pids = []
    wait_until(lambda: pids.append(find_pid()) or pids[-1] is not None, 120, f"the process of {run_dir}")
    pid = pids[-1]
    wait_until(lambda: (run_dir / "log.jsonl").exists(), 120, f"{run_dir} to start training")
    os.kill(pid, signal.SIGSTOP)
    while not (run_dir / "ckpt.pt").exists():
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.01)
        os.kill(pid, signal.SIGSTOP)
    assert not (run_dir / "done.json").exists(), "the run finished before it could be stopped"
    return pid


def model_state(run_dir):
    return torch.load(run_dir / "ckpt.pt", weights_only=True)["model"]


def assert_same_models(a, b, names):
    for name in names:
        x, y = model_state(a / "runs" / name), model_state(b / "runs" / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def resumed_at(run_dir):
    """The iteration a run was resumed at, from its log (which a resume cuts back to its checkpoint)."""
    lines = [line for line in (run_dir / "training.log").read_text().splitlines() if "resuming at iter" in line]
    assert len(lines) == 1, lines
    return int(lines[0].split("resuming at iter ")[1].split(";")[0])


# ------------------------------------------------------------------ no cluster


def test_slurm_launcher_errors_without_sbatch_or_submitit(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    with pytest.raises(NanoMarkovError, match="needs SLURM's sbatch on PATH: .*scripts/slurm_local.sh up"):
        run_sweep(TINY, tmp_path / "out", launcher="slurm")
    assert not (tmp_path / "out").exists()
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if the [cluster] extra were not installed
    with pytest.raises(NanoMarkovError, match=r'pip install -e "\.\[cluster\]"'):
        require_submitit()


@pytest.mark.parametrize(
    "grid, args, message",
    [
        ("[defaults]\nn_emdb = 4\n", [], "grid.toml: [defaults]: unknown key 'n_emdb'"),
        ("[[datasets]]\nn_states = 5\ntrain = 9\nval = 9\n", [], "expands to no run"),
        (None, ["--time", "5"], "--time is a SLURM option: add --launcher slurm"),
        (
            None,
            ["--launcher", "slurm"],
            "needs SLURM's sbatch on PATH: on this machine start a one-node cluster with scripts/slurm_local.sh up",
        ),
        (None, ["--launcher", "slurm", "--jobs", "2"], "use --array_parallelism"),
    ],
)
def test_sweep_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, grid, args, message):
    from nanomarkov.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    path = TINY
    if grid is not None:
        path = tmp_path / "grid.toml"
        path.write_text(grid)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()
    assert main(["sweep", "status", str(tmp_path)]) == 2  # a folder that is not a sweep
    assert "holds no readable sweep.json" in capsys.readouterr().err


def test_status_tells_a_killed_local_sweep_from_a_running_one(tmp_path):
    specs = expand_grid(TINY, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    manifest = {
        "launcher": "local",
        "host": os.uname().nodename,
        "pid": dead.pid,
        "runs": {s.name: {"spec": {}, "state": "running", "action": "train"} for s in specs},
    }
    (tmp_path / "sweep.json").write_text(json.dumps(manifest))
    rows = sweep_status(tmp_path)
    assert {r["state"] for r in rows} == {"pending"} and f"pid {dead.pid}) is gone" in rows[0]["error"]
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a sweep that is alive: still running, and a second sweep in its folder is refused
        manifest["pid"] = alive.pid
        (tmp_path / "sweep.json").write_text(json.dumps(manifest))
        assert {r["state"] for r in sweep_status(tmp_path)} == {"running"}
        with pytest.raises(NanoMarkovError, match=f"is in use: its sweep \\(pid {alive.pid}\\) is running"):
            run_sweep(TINY, tmp_path)
    finally:
        alive.kill()
        alive.wait()


def test_submitit_local_executor_preempted_run_resumes_and_matches(tmp_path):
    """submitit's local executor runs the same job code as SLURM; the preemption signal reaches a run mid-training."""
    submitit = pytest.importorskip("submitit", reason='needs the [cluster] extra: pip install -e ".[cluster]"')
    from nanomarkov.data import generate_dataset

    grid = {
        "defaults": {
            "n_embd": 8,
            "batch_size": 8,
            "max_iters": 60,
            "eval_interval": 20,
            "log_interval": 20,
            "device": "cpu",
        },
        "datasets": [{"n_states": 5, "train": 100, "val": 20, "seq_len": 12}],
        "experiments": [{"seeds": [7]}],
    }
    [spec] = expand_grid(grid, tmp_path / "job")
    [alone] = expand_grid(grid, tmp_path / "alone")
    for s in (spec, alone):
        generate_dataset(s.data_dir, 5, 100, 20, seq_len=12, seed=42)
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=10)
    events, run_dir = [], Path(spec.out_dir)

    def preempt(job_ids):
        controller = int(next(iter(job_ids.values())))

        def task():  # the local executor's controller starts the job as its child
            children = []
            for proc in Path("/proc").iterdir():
                try:
                    if (
                        proc.name.isdigit()
                        and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == controller
                    ):
                        children.append(int(proc.name))
                except OSError:  # a process that ended while we looked
                    pass
            return children[0] if children else None

        def signal_it():
            pid = freeze_mid_run(task, run_dir)
            os.kill(pid, signal.SIGUSR2)  # what SLURM sends before a time limit (submitit's --signal)
            os.kill(pid, signal.SIGCONT)

        threading.Thread(target=signal_it, daemon=True).start()

    run_jobs(
        executor,
        run_one,
        [spec],
        1,
        preempt,
        lambda s: events.append("start"),
        lambda s, result: events.append(result),
        poll_s=0.05,
    )
    result = events[-1]
    assert result["state"] == "done" and result["action"] == "resume" and result["iters"] == 60, result
    assert 20 <= resumed_at(run_dir) < 60  # after the first checkpoint, before the end: not from zero
    assert run_one(alone, threads=1)["state"] == "done"
    assert_same_models(tmp_path / "job", tmp_path / "alone", [spec.name])


# ------------------------------------------------------------------ a real cluster


def _can_run_slurm():
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (scripts/slurm_local.sh installs packages and starts daemons)"
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        return "no SLURM here and no apt-get to install it"
    return None


@pytest.fixture(scope="module")
def cluster():
    if _can_run_slurm():
        pytest.skip(_can_run_slurm())
    pytest.importorskip("submitit", reason='needs the [cluster] extra: pip install -e ".[cluster]"')
    script = REPO / "scripts" / "slurm_local.sh"
    up = subprocess.run([str(script), "up"], capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield up.stdout
    finally:
        down = subprocess.run([str(script), "down"], capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr


def sweep_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "nanomarkov", "sweep", *map(str, args)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=600,
    )


def test_tiny_grid_on_slurm_cancelled_run_resumes_and_matches_local(cluster, tmp_path, monkeypatch):
    no_report(monkeypatch)
    # grids/tiny.toml with runs of 300 steps: once scancel lets the frozen run go on (SIGCONT), SLURM's
    # SIGTERM must land before the run ends, and 10 steps after the first checkpoint (tiny's 20) take
    # less than that on an idle machine.
    grid = tmp_path / "tiny300.toml"
    grid.write_text(TINY.read_text().replace("max_iters = 20", f"max_iters = {ITERS}"))
    assert f"max_iters = {ITERS}" in grid.read_text()
    out, victim = tmp_path / "slurm", "MM-5/MM-5-42"
    run_dir = out / "runs" / victim
    first = threading.Thread(
        target=run_sweep,
        args=(grid, out),
        daemon=True,
        kwargs={"launcher": "slurm", "slurm": {"cpus_per_task": 1, "time": 10}, "progress": lambda _: None},
    )
    first.start()
    wait_until(
        lambda: (
            "job_id"
            in (json.loads((out / "sweep.json").read_text())["runs"][victim] if (out / "sweep.json").exists() else {})
        ),
        120,
        "the jobs' submission",
    )
    job = json.loads((out / "sweep.json").read_text())["runs"][victim]["job_id"]
    with pytest.raises(NanoMarkovError, match="is in use: SLURM still has"):  # its jobs are queued or running
        run_sweep(grid, out, launcher="slurm")

    def job_pid():  # the job's Python process, once SLURM has started it
        raw = subprocess.run(["squeue", "-h", "-j", job, "-o", "%A"], capture_output=True, text=True).stdout.split()
        listed = subprocess.run(["scontrol", "listpids", *raw[:1]], capture_output=True, text=True).stdout.split("\n")
        for pid in [line.split()[0] for line in listed[1:] if raw and line.strip()]:
            try:
                if b"submitit.core._submit" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return int(pid)
            except OSError:
                pass
        return None

    freeze_mid_run(job_pid, run_dir)
    subprocess.run(["scancel", job], check=True)  # SLURM sends SIGCONT, then SIGTERM
    first.join(timeout=300)
    manifest = json.loads((out / "sweep.json").read_text())
    states = {name: run["state"] for name, run in manifest["runs"].items()}
    assert states == {**{name: "done" for name in states}, victim: "cancelled"}, states
    assert {r["name"]: r["state"] for r in sweep_status(out)}[victim] == "cancelled"
    assert "stopped by SIGTERM at iter" in (run_dir / "training.log").read_text()
    k = torch.load(run_dir / "ckpt.pt", weights_only=True)["iter"]
    assert 10 <= k < ITERS  # its first checkpoint is at iter 10

    again = sweep_cli(grid, "--out", out, "--launcher", "slurm", "--cpus_per_task", 1, "--time", 10)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.rstrip().endswith("4 runs: 4 done")  # the status table the sweep ends with
    rerun = json.loads((out / "sweep.json").read_text())["runs"]
    assert {name: run["action"] for name, run in rerun.items()} == {**{n: "skip" for n in rerun}, victim: "resume"}
    assert {run["state"] for run in rerun.values()} == {"done"} and rerun[victim]["iters"] == ITERS
    assert resumed_at(run_dir) == k

    accounting = subprocess.run(
        [
            "sacct",
            "-n",
            "-P",
            "-X",
            "-o",
            "JobID,State",
            "-j",
            f"{job.split('_')[0]},{rerun[victim]['job_id'].split('_')[0]}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sacct = dict(line.split("|") for line in accounting.splitlines())
    assert sacct[job].startswith("CANCELLED") and sacct[rerun[victim]["job_id"]] == "COMPLETED", sacct
    assert sum(state == "COMPLETED" for state in sacct.values()) == 4, sacct

    local = run_sweep(grid, tmp_path / "local", jobs=1, threads=1, progress=lambda _: None)
    assert {run["state"] for run in local["runs"].values()} == {"done"}
    assert_same_models(out, tmp_path / "local", list(local["runs"]))


def test_tune_workers_run_as_slurm_jobs_and_share_the_study(cluster, tmp_path):
    optuna = pytest.importorskip("optuna", reason='needs the [tune] extra: pip install -e ".[tune]"')
    from nanomarkov.tune import TuneSettings, open_study, parse_space, tune  # optuna: the optional [tune] extra

    data = tmp_path / "mm3"
    generate_dataset(data, n_states=3, train_sequences=64, val_sequences=32, seq_len=16, seed=1)
    space = parse_space(["n_layer=1", "n_embd=16", "n_head=1", "batch_size=8", "mlp_only=True"])
    settings = TuneSettings(str(data), str(tmp_path / "study"), 2, 8 * 15 * 8, space, "", evals=2)
    executor_for = functools.partial(slurm_executor, cpus_per_task=1, time=10, mem="2G")
    code, best = tune(settings, jobs=2, executor_for=executor_for)
    assert code == 0, best
    trials = open_study(settings).get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) >= 2
    assert all(trial.user_attrs.get("slurm_job") for trial in trials)  # run inside SLURM jobs, not here
    assert (tmp_path / "study" / "best_recipe.py").exists()
