"""A sweep: a grid of training runs (nanomarkov/sweep/grid.py) trained and evaluated locally
(in this process or a pool of them, local.py) or on SLURM (slurm.py), then reported.

Everything lands under one folder OUT:
    OUT/data/..., OUT/runs/...               the grid's datasets and runs (grid.py names them)
    OUT/sweep.json                           the manifest (manifest.py); `nanomarkov sweep status` reads it
    OUT/slurm/                               submitit's job scripts and logs (--launcher slurm)

A sweep can be stopped and started again at any moment: a finished run (done.json)
is skipped, a run with a checkpoint is resumed, the rest train from scratch. A
failing run is recorded with its error's first line and the sweep goes on.
"""

import contextlib
import os
import time
from pathlib import Path

import torch

from nanomarkov.checkpoint import list_snapshots
from nanomarkov.config import RESUMABLE_CHANGES, config_changes, is_threads_setting
from nanomarkov.data import generate_dataset
from nanomarkov.dynamics import DYNAMICS_FILE, PLOTS, run_dynamics, write_dynamics
from nanomarkov.errors import NanoMarkovError
from nanomarkov.evaluate import evaluate_checkpoints
from nanomarkov.files import check_output_folder, read_json, read_json_or_none
from nanomarkov.report import family_key, find_runs, write_report
from nanomarkov.sweep.grid import Ticker, dataset_arguments, expand_grid, plan
from nanomarkov.sweep.local import run_here, run_in_pool
from nanomarkov.sweep.manifest import MANIFEST, Progress, new_manifest, read_manifest, save_manifest
from nanomarkov.sweep.slurm import run_jobs, slurm_executor
from nanomarkov.sweep.status import refuse_if_still_running
from nanomarkov.train import train

LAUNCHERS = ("local", "slurm")

# ------------------------------------------------------------------ one run


def check_finished_config(spec, cfg):
    """A finished run that another config made must not pass for this grid's run."""
    saved = read_json_or_none(Path(spec.out_dir) / "config.json") or {}
    changed = config_changes(saved, cfg, RESUMABLE_CHANGES | {"data_dir"})
    if changed:
        raise NanoMarkovError(
            f"{spec.out_dir} holds a finished run with another config ({', '.join(changed)}); "
            "delete that folder to train it again, or give the experiment a tag"
        )


def run_one(spec, threads=None) -> dict:
    """Train (or resume, or skip) one run, then evaluate it; never raises: errors come back as 'failed'."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    out, result, started = Path(spec.out_dir), {"state": "failed", "error": None}, time.time()
    try:
        cfg = spec.config()
        result["action"] = action = plan(spec)
        if action == "skip":
            check_finished_config(spec, cfg)
        else:
            cfg.init_from = "resume" if action == "resume" else "scratch"
            # Every line is in the run's training.log; parallel runs would only interleave them here.
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                done = train(cfg, show_progress=False)
            if done["status"] != "done":
                return {
                    **result,
                    "state": "pending",
                    "error": f"interrupted at iter {done['iters']}; run the sweep again to resume",
                }
        result["train_s"] = round(time.time() - started, 3)
        ckpt, evaluation = out / "ckpt.pt", out / "eval.json"
        if not (evaluation.exists() and evaluation.stat().st_mtime_ns > ckpt.stat().st_mtime_ns):
            evaluate_checkpoints([ckpt])
            result["evaluated"] = True
        done, ev = read_json(out / "done.json", "run record"), read_json(evaluation, "evaluation")
        result.update(state="done", iters=done["iters"], excess=ev["cross_entropy"]["excess"])
    except Exception as e:  # noqa: BLE001 - one run's failure must not end the sweep
        first = (str(e).strip().splitlines() or [""])[0]
        result["error"] = first if isinstance(e, NanoMarkovError) else f"{type(e).__name__}: {first}"
    finally:
        torch.set_num_threads(previous)
        result["seconds"] = round(time.time() - started, 3)
    return result


# ------------------------------------------------------------------ the sweep


# What a sweep writes at the top of its folder (--force writes beside a user's files, never over these names).
SWEEP_FILES = (MANIFEST, "data", "runs", "slurm", "summary.md", "summary.csv", "comparison.png", "*.partial")


def is_sweep_folder(folder) -> bool:
    """A folder a sweep wrote (its sweep.json, told from a user's own by its content)."""
    return read_manifest(folder) is not None


def run_sweep(
    grid,
    out_root,
    jobs=1,
    dry_run=False,
    progress=print,
    threads=None,
    launcher="local",
    slurm=None,
    force=False,
    notes=None,
) -> dict:
    """Generate the grid's datasets, train and evaluate every run, report; returns the manifest.

    Before anything is written, every dataset and run is checked as `generate` and `train` check
    them (a dry run makes the same checks); `notes(line)`, if given, hears how the planning goes
    every few seconds once it has taken a few.

    launcher "local": jobs > 1 runs that many trainings at once in fresh processes,
    each with `threads` torch threads ('auto' or None, the default: the machine's cores shared out evenly).
    launcher "slurm": one job array through submitit; `slurm` holds slurm.slurm_executor's
    options, and each run gets cpus_per_task threads. out_root is new, empty or a sweep's (sweep.json),
    or `force` (files.check_output_folder).
    """
    check_output_folder(out_root, "sweep", is_sweep_folder, force=force, writes=SWEEP_FILES)
    notes = notes or (lambda line: None)
    specs = expand_grid(grid, out_root, tick=Ticker(notes, "checking the grid"))
    check_launcher(jobs, launcher, threads)
    executor = None
    if launcher == "slurm":
        slurm = dict(slurm or {})
        executor = slurm_executor(Path(out_root) / "slurm", **slurm)
        threads = slurm.get("cpus_per_task", 1)
    threads = threads if threads not in (None, "auto") else max(1, (os.cpu_count() or 1) // jobs)
    manifest = new_manifest(
        grid, specs, launcher, jobs, threads, slurm, tick=Ticker(notes, "looking at the run folders")
    )
    if dry_run:
        return say_plan(specs, manifest, progress)
    refuse_if_still_running(out_root)
    try:
        Path(out_root).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NanoMarkovError(f"cannot write in {out_root} ({e.strerror or e}); choose another --out") from None
    save_manifest(manifest, out_root)
    generate_datasets(specs, progress)
    tracker = Progress(manifest, out_root, progress, stop_when_interrupted=executor is None)
    try:
        _launch(specs, tracker, executor, jobs, threads)
    except BaseException as stop:  # Ctrl-C, SIGTERM (cli's Terminated): the runs under way resume next time
        jobs_left = tracker.interrupted()
        if jobs_left:  # the stop's one line says so (cli.guarded reads the note)
            stop.add_note(slurm_jobs_left_note(jobs_left, out_root))
        raise
    evaluate_families(specs, manifest["runs"], progress)
    manifest["finished"] = time.time()
    manifest["report"] = write_sweep_report(Path(out_root) / "runs", progress)
    manifest["dynamics"] = write_dynamics_reports(Path(out_root) / "runs", progress)
    save_manifest(manifest, out_root)
    return manifest


def slurm_jobs_left_note(job_ids, out_root):
    """What a stopped SLURM sweep leaves: its jobs, which go on, and how to follow and collect them."""
    return (
        f"SLURM job(s) {' '.join(job_ids)} go on (scancel them to stop them too); `nanomarkov sweep status "
        f"{out_root}` follows them, and the same command collects their results once they are over"
    )


def say_plan(specs, manifest, progress):
    """A dry run's answer: what the sweep would do with each run; returns the manifest."""
    for s in specs:
        progress(
            f"{manifest['runs'][s.name]['action']:6} {s.name}  (preset {s.preset}, seed {s.seed}, data {s.data_dir})"
        )
    progress(f"{len(specs)} runs; dry run, nothing written")
    return manifest


def check_launcher(jobs, launcher, threads=None):
    """Refuse a `jobs`, `launcher` or `threads` run_sweep cannot use (reproduce checks them before it makes its
    folder)."""
    if type(jobs) is not int or jobs < 1:
        raise NanoMarkovError(f"jobs must be a positive integer, got {jobs!r}")
    if threads is not None and not is_threads_setting(threads):
        raise NanoMarkovError(f"threads must be 'auto' or an integer >= 1, got {threads!r}")
    if launcher not in LAUNCHERS:
        raise NanoMarkovError(f"launcher must be local or slurm, got {launcher!r}")


def generate_datasets(specs, progress):
    """Each dataset the runs need, once (generate_dataset leaves one that is already there as it is)."""
    for data_dir, spec in {s.data_dir: s for s in specs}.items():
        progress(f"data {data_dir}")
        args, keywords = dataset_arguments(spec.dataset)
        generate_dataset(data_dir, *args, **keywords)


def _launch(specs, tracker, executor, jobs, threads):
    """Hand every run to the launcher: SLURM when there is an executor, else this process or a pool."""
    if executor is None and jobs == 1:
        run_here(run_one, specs, threads, tracker.start, tracker.finish)
    elif executor is None:
        run_in_pool(run_one, specs, jobs, threads, tracker.start, tracker.finish)
    else:
        # A finished run is skipped here, where its eval is checked, rather than costing a job.
        skipped = [s for s in specs if tracker.runs[s.name]["action"] == "skip"]
        run_here(run_one, skipped, threads, tracker.start, tracker.finish)
        todo = [s for s in specs if tracker.runs[s.name]["action"] != "skip"]
        if todo:
            run_jobs(executor, run_one, todo, threads, tracker.submitted, tracker.start, tracker.finish)


def write_sweep_report(root, progress):
    """The report of every run under root (its plots and summary), or None when there is nothing to report."""
    try:
        written = write_report(root)
    except NanoMarkovError as e:
        progress(f"report skipped: {e}")
        return None
    progress(f"report written under {root / 'report'}")
    return {"folder": str(root / "report"), "skipped_plots": written.get("skipped", [])}


def write_dynamics_reports(root, progress):
    """`nanomarkov dynamics` for each run under root that kept snapshots (a grid with `snapshots`): the run
    folders written; a run it cannot measure is a progress line, not a failed sweep."""
    written = []
    for folder in find_runs(root) if Path(root).is_dir() else []:
        snapshots = list_snapshots(folder)
        if not snapshots or dynamics_up_to_date(folder, snapshots):
            continue
        try:
            write_dynamics(run_dynamics(folder), folder)
        except NanoMarkovError as e:
            progress(f"dynamics skipped for {folder}: {e}")
            continue
        written.append(str(folder))
    if written:
        progress(f"dynamics written in {len(written)} run(s) with snapshots: dynamics.json and {', '.join(PLOTS)}")
    return written


def dynamics_up_to_date(folder, snapshots) -> bool:
    """Whether the run's dynamics.json is newer than every snapshot (a sweep run again leaves it as it is)."""
    record = Path(folder) / DYNAMICS_FILE
    if not record.is_file():
        return False
    return record.stat().st_mtime_ns > max(path.stat().st_mtime_ns for _, _, path in snapshots)


def evaluate_families(specs, runs, progress):
    """Runs that differ only in seed are evaluated together once more, for agreement (metric 4)."""
    families = {}  # the report's families, so agreement lands where it shows it
    for spec in specs:
        if runs[spec.name]["state"] == "done":
            families.setdefault(family_key(spec.config().to_dict()), []).append(spec)
    for members in families.values():
        folders = [Path(s.out_dir) for s in members]
        evals = [read_json_or_none(f / "eval.json") or {} for f in folders]
        newest_ckpt = max(f.joinpath("ckpt.pt").stat().st_mtime_ns for f in folders)
        if len(members) < 2 or all(
            e.get("agreement") and f.joinpath("eval.json").stat().st_mtime_ns > newest_ckpt
            for e, f in zip(evals, folders)
        ):
            continue
        progress(f"agreement across {', '.join(s.name for s in members)}")
        try:
            evaluate_checkpoints([f / "ckpt.pt" for f in folders])
        except NanoMarkovError as e:
            progress(f"agreement skipped: {e}")
