"""Where a sweep stands: its manifest (sweep.json), checked against what is still alive.

The manifest says what the sweep last knew; a sweep killed mid-run never wrote that its
runs stopped. So a run the manifest calls running is asked about: its SLURM job through
sacct, or, for a local sweep, whether the sweep's process is still there.
"""

import json
import os
import socket
from pathlib import Path

from nanomarkov.errors import NanoMarkovError
from nanomarkov.files import read_json_or_none
from nanomarkov.sweep.manifest import MANIFEST, read_manifest
from nanomarkov.sweep.slurm import queued_jobs, sacct_states


def _last_line(path):
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError:
        return None
    return lines[-1] if lines else None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process, but there
        return True
    return True


def _live_states(manifest, out_root) -> dict:
    """The manifest's word on a run may be stale (its sweep was killed): ask SLURM, or look for the sweep's process.

    Returns {name: (state, note, slurm_state)} for each run the manifest calls pending or running.
    """
    unsettled = {name: run for name, run in manifest["runs"].items() if run["state"] in ("pending", "running")}
    job_ids = {name: run["job_id"] for name, run in unsettled.items() if run.get("job_id")}
    slurm_states = {}
    if job_ids:
        slurm_states = sacct_states(sorted(set(job_ids.values())))
    here = manifest.get("host") == socket.gethostname()
    sweep_gone = here and manifest.get("pid") and not _alive(manifest["pid"])
    live = {}
    for name, run in unsettled.items():
        job_state = slurm_states.get(job_ids.get(name))
        if job_state in ("RUNNING", "COMPLETING"):
            live[name] = ("running", f"job {job_ids[name]}", job_state)
        elif job_state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "SUSPENDED", "PREEMPTED"):
            live[name] = ("pending", f"job {job_ids[name]} {job_state.lower()}", job_state)
        elif job_state == "CANCELLED":
            live[name] = ("cancelled", f"job {job_ids[name]} cancelled; run the sweep again to resume", job_state)
        elif job_state == "COMPLETED":  # the sweep that waited for it was stopped: the run's folder tells
            done = read_json_or_none(Path(out_root) / "runs" / name / "done.json") or {}
            live[name] = (
                ("done", None, job_state)
                if done.get("status") == "done"
                else ("pending", f"job {job_ids[name]} ended before training did; run the sweep again", job_state)
            )
        elif job_state:
            live[name] = ("failed", f"job {job_ids[name]} ended {job_state}", job_state)
        elif run["state"] == "running" and sweep_gone and not job_state:
            live[name] = ("pending", f"its sweep (pid {manifest['pid']}) is gone; run the sweep again to resume", None)
    return live


def refuse_if_still_running(out_root):
    """Two sweeps training the same run folders would corrupt each other's checkpoints."""
    manifest = read_manifest(out_root)
    if manifest is None:
        return
    job_ids = {
        run["job_id"]: name
        for name, run in manifest["runs"].items()
        if run.get("job_id") and run["state"] in ("pending", "running")
    }
    if job_ids:
        busy = [f"{job_ids[job]} (job {job})" for job in sorted(queued_jobs(list(job_ids)))]
        if busy:
            raise NanoMarkovError(
                f"{out_root} is in use: SLURM still has {', '.join(busy[:3])}"
                f"{' and more' if len(busy) > 3 else ''}; wait for them (nanomarkov sweep status "
                f"{out_root}) or scancel them first"
            )
    if (
        manifest.get("host") == socket.gethostname()
        and manifest.get("pid") not in (None, os.getpid())
        and "finished" not in manifest
        and _alive(manifest["pid"])
    ):
        raise NanoMarkovError(
            f"{out_root} is in use: its sweep (pid {manifest['pid']}) is running; wait for it "
            f"(nanomarkov sweep status {out_root}) or stop it (Ctrl-C) first"
        )


def _logged_iter(log):
    """A run under way: its latest logged iteration (a line cut by a kill, or no log, reads as none)."""
    try:
        record = json.loads(_last_line(log) or "{}")
    except ValueError:
        return None
    return record.get("iter") if isinstance(record, dict) else None


def sweep_status(out_root) -> list:
    """One row per run of the sweep in out_root: name, state, iters, excess, error, last log line."""
    manifest = read_manifest(out_root)
    if manifest is None:
        raise NanoMarkovError(
            f"{out_root} holds no readable {MANIFEST}; start a sweep there with nanomarkov sweep GRID --out {out_root}"
        )
    live = _live_states(manifest, out_root)
    rows = []
    for name, run in manifest["runs"].items():
        if name in live:
            run = {**run, "state": live[name][0], "error": live[name][1]}
        folder = Path(out_root) / "runs" / name
        done, ev = read_json_or_none(folder / "done.json") or {}, read_json_or_none(folder / "eval.json")
        iters = done["iters"] if "iters" in done else _logged_iter(folder / "log.jsonl")
        excess = ev["cross_entropy"]["excess"] if ev else done.get("excess")
        rows.append(
            {
                "name": name,
                "state": run["state"],
                "action": run.get("action"),
                "iters": iters,
                "excess": excess,
                "seconds": run.get("seconds"),
                "error": run.get("error"),
                "last_log_line": _last_line(folder / "training.log") if run["state"] == "failed" else None,
            }
        )
    return rows


def format_status(rows) -> str:
    table = [("run", "state", "iters", "excess", "time", "note")]
    for r in rows:
        note = " | ".join(x for x in (r["error"], r["last_log_line"] and f"log: {r['last_log_line']}") if x)
        table.append(
            (
                r["name"],
                r["state"],
                "-" if r["iters"] is None else str(r["iters"]),
                "-" if r["excess"] is None else f"{r['excess']:+.6f}",
                "-" if r["seconds"] is None else f"{r['seconds']:.0f}s",
                note,
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    lines = [
        "  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:5], widths[1:])), row[5]]).rstrip()
        for row in table
    ]
    counts = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return "\n".join(lines + [f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))])
