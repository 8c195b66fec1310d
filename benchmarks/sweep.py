"""Sweep wall time: one run at a time vs `--jobs 2`, and through SLURM (the local cluster).

    python benchmarks/sweep.py [--record] [--no-slurm]

Two grids: grids/tiny.toml (4 runs of a few seconds) and MM-10's default recipe with eight seeds.
Each is swept from scratch three ways, datasets and report included, as a user would:
locally with --jobs 1 (all cores to the one run), locally with --jobs 2 (a core each),
and with --launcher slurm --cpus_per_task 1 when sbatch is on PATH (start the cluster
first: scripts/slurm_local.sh up). From sacct, per SLURM job: the wait from submission
to start of the jobs that found a free CPU, and the job's time beyond the run's own
(Python, torch and submitit starting up in the job).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import time
from datetime import datetime
from pathlib import Path

from nanomarkov.sweep import run_sweep

try:
    from record import machine, publish
except ImportError:
    from benchmarks.record import machine, publish

REPO = Path(__file__).resolve().parent.parent
OUT = Path("runs/bench/sweep")
# The demo's run (MM-10, the default recipe: 600 iterations, about 4 s) with eight seeds.
MM10 = {
    "defaults": {"device": "cpu"},
    "datasets": [{"n_states": 10, "train": 10000, "val": 1000}],
    "experiments": [{"seeds": list(range(1, 9))}],
}
GRIDS = {"grids/tiny.toml (4 runs)": REPO / "grids" / "tiny.toml", "8 MM-10 runs, default recipe": MM10}


def timed_sweep(grid, out, **launch):
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    manifest = run_sweep(grid, out, progress=lambda _: None, **launch)
    assert {run["state"] for run in manifest["runs"].values()} == {"done"}, manifest["runs"]
    return time.perf_counter() - started, manifest


def slurm_overheads(manifest):
    """Median seconds from submission to start (jobs that started within 1 s of the first), and job time beyond run_one's."""
    runs = manifest["runs"].values()
    ids = ",".join(sorted({run["job_id"].split("_")[0] for run in runs}))
    lines = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-j", ids, "-o", "JobID,Submit,Start,End"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    times = {
        job: [datetime.fromisoformat(t).timestamp() for t in rest] for job, *rest in (line.split("|") for line in lines)
    }
    first_start = min(start for _, start, _ in times.values())
    waits = [start - submit for submit, start, _ in times.values() if start <= first_start + 1]
    beyond = [times[run["job_id"]][2] - times[run["job_id"]][1] - run["seconds"] for run in runs]
    return statistics.median(waits), statistics.median(beyond)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    parser.add_argument("--no-slurm", action="store_true", help="only the local launcher")
    args = parser.parse_args()
    slurm = not args.no_slurm and shutil.which("sbatch") is not None
    load = os.getloadavg()[0]  # other work on the machine slows every column, --jobs 1's two threads most
    lines = [
        "| grid | --jobs 1 | --jobs 2 | ratio | SLURM | submit→start | job beyond its run |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, grid in GRIDS.items():
        one, _ = timed_sweep(grid, OUT / "jobs1", jobs=1)
        two, _ = timed_sweep(grid, OUT / "jobs2", jobs=2)
        cells = ["-", "-", "-"]
        if slurm:
            wall, manifest = timed_sweep(grid, OUT / "slurm", launcher="slurm", slurm={"cpus_per_task": 1})
            wait, beyond = slurm_overheads(manifest)
            cells = [f"{wall:.1f} s", f"{wait:.1f} s", f"{beyond:.1f} s"]
        lines.append(f"| {label} | {one:.1f} s | {two:.1f} s | {one / two:.2f} | " + " | ".join(cells) + " |")
        print(lines[-1])
    text = "\n".join(
        [
            "## Sweeps (`python benchmarks/sweep.py --record`)",
            "",
            f"Machine: {machine()}. Wall time of a whole sweep from scratch (datasets, training, evaluation, "
            "agreement, report); ratio = --jobs 1 / --jobs 2. SLURM: the one-node cluster of "
            "`scripts/slurm_local.sh up`, `--launcher slurm --cpus_per_task 1`; from sacct (1 s resolution), the "
            "median wait from submission to start of the jobs that found a free CPU, and the median time a job "
            "takes beyond its run (Python, torch and submitit starting in the job, the result written back). "
            f"Load average when it started: {load:.1f}.",
            "",
            *lines,
            "",
            "Each parallel run starts in a fresh process (torch's import alone is 1-2 s), so --jobs 2 pays off "
            "once runs last longer than that start; a ratio below 1 on runs of a second or two is that cost.",
        ]
    )
    publish("sweep", text, args.record)


if __name__ == "__main__":
    main()
