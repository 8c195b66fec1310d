"""Planning a sweep: `nanomarkov sweep GRID --dry-run` on grids of 1,000 to 100,000 runs.

    python benchmarks/dry_run.py [--record]

One grid shape (an MM-10 dataset, the default recipe and the seed's c6 ablation, N/2 seeds each),
planned with the checks the real sweep makes before it writes anything: wall and CPU seconds, and
the cost per run. Target (issue 22): a 100,000-run grid plans in seconds, with progress past a few.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

from nanomarkov.sweep import run_sweep

try:
    from record import machine, publish
except ImportError:
    from benchmarks.record import machine, publish

SIZES = (1_000, 10_000, 100_000)


def grid(n_runs):
    return {
        "defaults": {"device": "cpu", "max_iters": 100, "warmup_iters": 10},
        "datasets": [{"n_states": 10, "train": 1000, "val": 100}],
        "experiments": [{"presets": ["default", "c6"], "seeds": list(range(n_runs // 2))}],
    }


def plan(n_runs):
    """(wall s, CPU s, runs planned) of one dry run of an `n_runs` grid."""
    with tempfile.TemporaryDirectory() as scratch:
        wall, cpu = time.perf_counter(), time.process_time()
        manifest = run_sweep(grid(n_runs), Path(scratch) / "sweep", dry_run=True, progress=lambda line: None)
        return time.perf_counter() - wall, time.process_time() - cpu, len(manifest["runs"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()
    lines = [
        "## Sweep planning (`python benchmarks/dry_run.py --record`)",
        "",
        f"Machine: {machine()}. `sweep --dry-run` of one MM-10 dataset x 2 presets x N/2 seeds, every check "
        "the real sweep makes before writing; the machine's load average was "
        f"{os.getloadavg()[0]:.1f} at the start (wall time stretches with load, CPU time much less).",
        "",
        "| runs | wall | CPU | CPU per run |",
        "|---:|---:|---:|---:|",
    ]
    for n_runs in SIZES:
        wall, cpu, planned = plan(n_runs)
        lines.append(f"| {planned:,} | {wall:.2f} s | {cpu:.2f} s | {cpu / planned * 1e6:.0f} µs |")
        print(lines[-1], flush=True)
    publish("dry-run", "\n".join(lines), args.record)


if __name__ == "__main__":
    main()
