"""`nanomarkov reproduce NAME --out DIR`: a paper's experiment run by a sweep, its claims judged.

DIR holds:
    reproduce.json   which paper at which scale (a folder of its own kind: run the command again to resume)
    grid.json        the sweep grid the paper made at that scale
    sweep/           the sweep (sweep/run.py: datasets, runs with snapshots, eval, dynamics; resumable)
    measured.json    every quantity of every run (quantities.py)
    claims.json      one {"id", "claim", "paper", "ours", "holds", ...} per claim (claims.judge)
    report.md        the paper's setting, ours beside it, the claims with their numbers, the figures
    figures/         the dynamics plots the paper's figures correspond to
"""

import time
from pathlib import Path

from nanomarkov.errors import NanoMarkovError
from nanomarkov.files import check_output_folder, holds_record, read_json_or_none, write_atomic, write_json
from nanomarkov.reproduce.claims import judge
from nanomarkov.reproduce.paper import check_scale, paper_grid, read_paper
from nanomarkov.reproduce.quantities import QUANTITIES, measure
from nanomarkov.reproduce.report import report_text
from nanomarkov.sweep import check_launcher, expand_grid, require_slurm, run_sweep

REPRODUCE_FILE = "reproduce.json"


# What reproduce writes at the top of its folder (--force writes beside a user's files, never over these names).
REPRODUCTION_FILES = (
    REPRODUCE_FILE,
    "grid.json",
    "sweep",
    "measured.json",
    "claims.json",
    "report.md",
    "figures",
    "*.partial",
)


def is_reproduction(folder) -> bool:
    """A folder reproduce wrote (its reproduce.json, told by its content: files.holds_record)."""
    return holds_record(folder, REPRODUCE_FILE, ("paper", "scale"))


def claim_folder(out, paper, scale, force=False) -> dict:
    """Refuse a folder reproduce may not write (files.check_output_folder), or one holding another paper or
    scale; then mark it as this paper's at this scale. Returns reproduce.json's record (its seconds and
    calls so far: a resumed reproduction adds to them)."""
    check_output_folder(out, "reproduction", is_reproduction, force=force, writes=REPRODUCTION_FILES)
    before = read_json_or_none(Path(out) / REPRODUCE_FILE)
    if before and (before.get("paper"), before.get("scale")) != (paper.name, scale):
        raise NanoMarkovError(
            f"{out} holds {before.get('paper')} at scale {before.get('scale')}; give --out a new folder for "
            f"{paper.name} at scale {scale}"
        )
    Path(out).mkdir(parents=True, exist_ok=True)
    record = {"paper": paper.name, "file": str(paper.path), "scale": scale, "seconds": 0.0, "calls": 0}
    record |= {key: before[key] for key in ("seconds", "calls") if before and key in before}
    write_json(Path(out) / REPRODUCE_FILE, record)
    return record


def measure_runs(paper, grid, sweep_folder, manifest) -> dict:
    """{experiment tag: [one row per seed: run, seed, state and every quantity]}, from each finished run's
    dynamics.json and eval.json."""
    names = sorted(set(QUANTITIES) | {q for c in paper.claims for q in c.quantities()})
    specs = expand_grid(grid, sweep_folder)
    per_experiment = len(specs) // len(paper.experiments)  # one dataset and preset each: its seeds, in order
    table = {}
    for j, tag in enumerate(paper.tags()):
        rows = []
        for spec in specs[j * per_experiment : (j + 1) * per_experiment]:
            state = manifest["runs"].get(spec.name, {}).get("state")
            row = {"run": spec.name, "seed": spec.seed, "state": state}
            if state == "done":
                dynamics = read_json_or_none(Path(spec.out_dir) / "dynamics.json")
                evaluation = read_json_or_none(Path(spec.out_dir) / "eval.json")
                row |= {name: measure(name, dynamics, evaluation) for name in names}
            rows.append(row)
        table[tag] = rows
    return table


def copy_figures(paper, table, sweep_folder, out):
    """Each [[figures]] plot of its experiment's first finished run, into out/figures/: [(figure, path)]."""
    copied = []
    for figure in paper.figures:
        done = [row for row in table[figure["experiment"]] if row["state"] == "done"]
        source = Path(sweep_folder) / "runs" / done[0]["run"] / figure["file"] if done else None
        if source is None or not source.is_file():
            copied.append((figure, None))
            continue
        target = Path(out) / "figures" / f"{figure['experiment']}-{figure['file']}"
        target.parent.mkdir(exist_ok=True)
        write_atomic(target, source.read_bytes(), "figure")
        copied.append((figure, target.relative_to(out)))
    return copied


def reproduce(
    name, out, scale="cpu", jobs=1, launcher="local", slurm=None, threads=None, force=False, progress=print
) -> dict:
    """Run the paper `name` at `scale` into `out` (resuming what is there) and judge its claims; returns
    {"paper", "scale", "claims": claims.json's list, "failed": [runs that did not finish], "seconds"}."""
    started = time.time()
    paper = read_paper(name)
    check_scale(paper, scale)
    check_launcher(jobs, launcher, threads)  # every argument checked before the folder is made
    if launcher == "slurm":
        require_slurm()
    record = claim_folder(out, paper, scale, force)
    out, grid = Path(out), paper_grid(paper, scale)
    write_json(out / "grid.json", grid, what="grid")
    manifest = run_sweep(
        grid, out / "sweep", jobs=jobs, launcher=launcher, slurm=slurm, threads=threads, progress=progress
    )
    table = measure_runs(paper, grid, out / "sweep", manifest)
    results = [judge(claim, table[paper.claim_runs(claim)]) for claim in paper.claims]
    figures = copy_figures(paper, table, out / "sweep", out)
    write_json(out / "measured.json", table, what="measured quantities")
    write_json(out / "claims.json", results, what="claims")
    seconds = time.time() - started
    record.update(seconds=round(record["seconds"] + seconds, 1), calls=record["calls"] + 1)
    write_json(out / REPRODUCE_FILE, record)
    times = (seconds, record["seconds"], record["calls"])
    write_atomic(out / "report.md", report_text(paper, scale, grid, table, results, figures, times), "report")
    failed = [row["run"] for rows in table.values() for row in rows if row["state"] != "done"]
    return {"paper": paper.name, "scale": scale, "claims": results, "failed": failed, "seconds": seconds}


def claims_table(outcomes) -> str:
    """One line per claim of each outcome of reproduce(): paper, claim, holds (--all's table)."""
    rows = [("paper", "claim", "holds", "ours")]
    for outcome in outcomes:
        rows += [(outcome["paper"], c["id"], "yes" if c["holds"] else "NO", c["ours"]) for c in outcome["claims"]]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, [*widths, 0])).rstrip() for row in rows)
