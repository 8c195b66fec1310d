"""A sweep's manifest, OUT/sweep.json: each run's spec, state, timings, error and SLURM job id,
and the sweep's launcher, host and pid (so `sweep status` can tell whether it is still alive).

It is rewritten whole (atomically) at every change, so a reader never sees half of one.
"""

import os
import socket
import time
from pathlib import Path

from nanomarkov.files import read_json_or_none, write_json
from nanomarkov.sweep.grid import plan

MANIFEST = "sweep.json"
MANIFEST_MARKS = ("runs", "launcher", "host", "pid")
# A run in one of these states will not change again in this sweep.
SETTLED = ("done", "failed", "cancelled")


def new_manifest(grid, specs, launcher, jobs, threads, slurm, tick=None) -> dict:
    """The manifest of a sweep about to start: every run pending, with what the sweep will do with it
    (tick(n_runs, total) as it looks at each run's folder)."""
    runs = {}
    for spec in specs:
        runs[spec.name] = {"spec": spec.record(), "state": "pending", "action": plan(spec)}
        if tick:
            tick(len(runs), len(specs))
    return {
        "grid": None if isinstance(grid, dict) else str(grid),
        "launcher": launcher,
        "jobs": jobs,
        "threads": threads,
        "slurm": slurm,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.time(),
        "runs": runs,
    }


def read_manifest(out_root):
    """The manifest in out_root, or None when there is none (or it is unreadable)."""
    manifest = read_json_or_none(Path(out_root) / MANIFEST)
    # A sweep's manifest, told from a user's own sweep.json by what every sweep writes in it.
    ours = manifest and all(key in manifest for key in MANIFEST_MARKS) and isinstance(manifest["runs"], dict)
    return manifest if ours else None


def save_manifest(manifest, out_root):
    write_json(Path(out_root) / MANIFEST, manifest, what="sweep manifest")


class Progress:
    """Keeps the manifest true as runs start and finish, saving it at each change and saying so.

    stop_when_interrupted: a run that comes back pending was stopped by Ctrl-C or SIGTERM, and
    the sweep stops too (KeyboardInterrupt); under SLURM a job stopped that way is requeued instead.
    """

    def __init__(self, manifest, out_root, say, stop_when_interrupted):
        self.manifest, self.out_root, self.say = manifest, Path(out_root), say
        self.runs = manifest["runs"]
        self.stop_when_interrupted = stop_when_interrupted

    def save(self):
        save_manifest(self.manifest, self.out_root)

    def start(self, spec):
        self.runs[spec.name].update(state="running", started=time.time())
        self.save()

    def submitted(self, job_ids):
        now = time.time()
        for name, job_id in job_ids.items():
            self.runs[name].update(job_id=job_id, submitted=now)
        self.save()
        arrays = sorted({job_id.split("_")[0] for job_id in job_ids.values()})
        self.say(
            f"submitted {len(job_ids)} runs as SLURM job {', '.join(arrays)}; logs under {self.out_root / 'slurm'}"
        )

    def finish(self, spec, result):
        run = self.runs[spec.name]
        run.update(result, finished=time.time())
        self.save()
        count = sum(r["state"] in SETTLED for r in self.runs.values())
        if result["state"] == "done":
            what = f"{result['iters']} iters, excess {result['excess']:+.6f} nats, {result['seconds']:.1f}s"
        else:
            what = result["error"]
        self.say(f"[{count}/{len(self.runs)}] {spec.name}: {result['state']} ({run['action']}): {what}")
        if result["state"] == "pending" and self.stop_when_interrupted:
            raise KeyboardInterrupt

    def interrupted(self):
        """The sweep was stopped: its local runs under way are pending again. SLURM jobs go on without it (they are
        the cluster's, and a rerun or `sweep status` picks them up): returns the ids of those not yet over."""
        for run in self.runs.values():
            if run["state"] == "running" and "job_id" not in run:
                run.update(state="pending", error="interrupted; run the sweep again to resume")
        self.save()
        return [run["job_id"] for run in self.runs.values() if "job_id" in run and run["state"] not in SETTLED]
