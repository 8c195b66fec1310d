"""How fast the command line answers: `nanomarkov --help` and the verbs that need no model.

    python benchmarks/startup.py [--record] [--repeats N]

Each command runs N times (default 15) as a new process, as a user types it; the table gives the median wall
time and the median CPU time (user + system of the child: less sensitive to a busy machine than the wall), beside
the floor every Python command pays here (`python -c pass`) and numpy's import, which the process classes need
for their flags. The commands run as a user's do: with Python's bytecode cache (PYTHONDONTWRITEBYTECODE, which some
shells and CI images set, is removed from their environment: without the cache every start compiles the package's
modules again, ~0.1 s here), after one warm-up run that writes it. Target (issue 24): `nanomarkov --help` in <= 0.3 s on this 2-core CPU; none of these loads torch
(the last column: whether `torch` was imported, read from `python -X importtime`).
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from record import machine, publish
except ImportError:
    from benchmarks.record import machine, publish

TARGET_HELP_S = 0.3


def commands(dataset):
    nanomarkov = [sys.executable, "-m", "nanomarkov"]
    return {
        "python -c pass (the floor)": [sys.executable, "-c", "pass"],
        "python -c 'import numpy'": [sys.executable, "-c", "import numpy"],
        "nanomarkov --help": [*nanomarkov, "--help"],
        "nanomarkov --version": [*nanomarkov, "--version"],
        "nanomarkov generate --help": [*nanomarkov, "generate", "--help"],
        "nanomarkov theory DATA (MM-3)": [*nanomarkov, "theory", str(dataset)],
    }


def users_environment():
    return {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}


def timed(command):
    """(wall s, child CPU s) of one run of `command`, its output discarded."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=users_environment())
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def loads_torch(command):
    trace = subprocess.run([command[0], "-X", "importtime", *command[1:]], capture_output=True, text=True).stderr
    return any(line.rstrip().endswith("| torch") for line in trace.splitlines())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        dataset = Path(scratch) / "mm3"
        subprocess.run(
            [sys.executable, "-m", "nanomarkov", "generate", "3", "--train", "20", "--val", "10", "--out", dataset],
            stdout=subprocess.DEVNULL,
            check=True,
        )
        rows = []
        for name, command in commands(dataset).items():
            timed(command)  # the warm-up: writes the bytecode cache a user's first run leaves behind
            runs = [timed(command) for _ in range(args.repeats)]
            wall = statistics.median(w for w, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            rows.append(f"| {name} | {wall:.3f} | {cpu:.3f} | {'yes' if loads_torch(command) else 'no'} |")
    load = Path("/proc/loadavg").read_text().split()[0]
    help_wall = float(rows[2].split("|")[2])
    text = "\n".join(
        [
            "## Start-up (`python benchmarks/startup.py --record`)",
            "",
            f"{machine()}; load average {load} when measured; median of {args.repeats} runs each.",
            "",
            "| command | wall s | CPU s | loads torch |",
            "|---|---|---|---|",
            *rows,
            "",
            f"`nanomarkov --help`: {help_wall:.3f} s against the target of {TARGET_HELP_S} s "
            f"({'met' if help_wall <= TARGET_HELP_S else 'not met'}).",
        ]
    )
    publish("startup", text, args.record)


if __name__ == "__main__":
    main()
