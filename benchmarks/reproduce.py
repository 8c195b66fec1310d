"""Wall time of each paper at `nanomarkov reproduce --scale cpu` (the issue's budget: 15 minutes on a 2-core CPU).

    python benchmarks/reproduce.py [--papers shai2024-mess3 ...] [--core N] [--from DIR] [--record]

Each paper runs from scratch into runs/bench/reproduce/NAME as a user runs it (`--threads 1`, the
machine being shared), with the load average before and after; `--core N` pins it to that one core (Linux),
so that a shared machine's other work keeps to the other cores and a paper that fits one core fits two.
`--from DIR` reads a reproduction that already ran (reproduce.json's seconds over every call that made it)
instead of running one; there `--core N` says the core it was pinned to. --record merges the rows into
BENCHMARKS.md: a paper not measured this time keeps its row.
"""

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

try:
    from record import BENCHMARKS_MD, machine, publish
except ImportError:
    from benchmarks.record import BENCHMARKS_MD, machine, publish

from nanomarkov.reproduce import paper_names

OUT = Path("runs/bench/reproduce")
SECTION = "reproduce"


def load():
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def cpu_time():
    """User + system seconds of the finished child processes (the reproductions run so far)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_paper(name, core):
    """Run the paper at cpu scale from scratch, on core `core` alone (None: any); its folder."""
    out = OUT / name
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "nanomarkov", "reproduce", name, "--out", str(out), "--threads", "1"]
    pin = None if core is None else (lambda: os.sched_setaffinity(0, {core}))
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, preexec_fn=pin)
    return out


def row(folder, load_before, load_after, cpu_seconds, core):
    """The table row of a finished reproduction folder."""
    record = json.loads((Path(folder) / "reproduce.json").read_text())
    if record["scale"] != "cpu" or "seconds" not in record:
        raise SystemExit(f"{folder}: not a reproduction at --scale cpu with its time; run the paper at --scale cpu")
    name, seconds = record["paper"], record["seconds"]
    claims = json.loads((Path(folder) / "claims.json").read_text())
    held, total = sum(c["holds"] for c in claims), len(claims)
    cpu = "not measured" if cpu_seconds is None else f"{cpu_seconds / 60:.1f} min"
    pinned = "no" if core is None else f"core {core}"
    return (
        f"| `{name}` | {seconds / 60:.1f} min | {cpu} | {pinned} | {held} of {total} | {load_before} | {load_after} |"
    )


def with_pinned_column(line):
    """A row written before the pinned column (six cells; those runs were not pinned) with it."""
    cells = line.split("|")
    return line if len(cells) != 8 else "|".join([*cells[:4], " no ", *cells[4:]])


def merged(rows):
    """This run's rows, and the rows of papers it did not measure as BENCHMARKS.md holds them."""
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else ""
    section = re.search(rf"<!-- {SECTION} -->(.*?)<!-- /{SECTION} -->", text, re.S)
    old = {
        m.group(1): m.group(0) for m in re.finditer(r"^\| `([\w-]+)` \|.*$", section.group(1) if section else "", re.M)
    }
    old = {name: with_pinned_column(line) for name, line in old.items()}
    new = {re.match(r"\| `([\w-]+)`", r).group(1): r for r in rows}
    return [({**old, **new})[name] for name in paper_names() if name in {**old, **new}]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--papers", nargs="+", default=paper_names())
    parser.add_argument("--from", dest="done", default=None, help="a reproduction folder that already ran")
    parser.add_argument("--load-before", default="not measured", help="with --from: the load when it started")
    parser.add_argument("--load-after", default=None, help="with --from: the load when it ended (default: now)")
    parser.add_argument("--cpu-seconds", type=float, default=None, help="with --from: its user + sys time")
    parser.add_argument("--core", type=int, default=None, help="pin each run to this one core (with --from: it was)")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    rows = []
    if args.done:
        rows.append(row(args.done, args.load_before, args.load_after or load(), args.cpu_seconds, args.core))
    for name in [] if args.done else args.papers:
        before, started, cpu = load(), time.time(), cpu_time()
        folder = run_paper(name, args.core)
        print(f"{name}: {time.time() - started:.0f} s")
        rows.append(row(folder, before, load(), cpu_time() - cpu, args.core))
    text = "\n".join(
        [
            "## Papers at `--scale cpu` (`python benchmarks/reproduce.py --record`)",
            "",
            f"Machine: {machine()}. `nanomarkov reproduce NAME --threads 1`, from scratch, one paper at a time, on the "
            "machine shared with other work (the load average, 1 / 5 / 15 min, says how busy it was; the CPU time is what "
            "the command itself used). Pinned: the run kept to that one core (`--core`, `taskset -c`), which other work "
            "could still share (wall time above CPU time says how much it did); a paper that fits one core fits the "
            "2-core machine. Budget: 15 min of wall time.",
            "",
            "| paper | wall time | CPU time (user + sys) | pinned | claims held | load before | load after |",
            "|---|---:|---:|---|---:|---|---|",
            *merged(rows),
        ]
    )
    missing = [name for name in paper_names() if f"| `{name}` |" not in text]
    if missing:
        text += f"\n\nNot measured at cpu scale yet: {', '.join(missing)}."
    publish(SECTION, text, args.record)


if __name__ == "__main__":
    main()
