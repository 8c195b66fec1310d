"""A grid of training runs is data: a TOML file, expanded into run specs and run locally
(in this process or a pool of them) or on SLURM (nanomarkov/sweep/slurm.py).

    [defaults]          TrainConfig overrides for every run
    [[datasets]]        n_states, train, val (sequences); sparsity, seq_len, seed (default 42) optional;
                        process (default "markov") and that process's options (korder: order, ...)
    [[experiments]]     datasets ("all" or [indices]), presets, seeds, overrides {...}, tag (optional)

Everything lands under one folder OUT:
    OUT/data/mm{K}[-sparse-S]               one dataset folder per [[datasets]] entry (other processes:
                                             their own names, e.g. OUT/data/mess3, runs OUT/runs/mess3/mess3-42)
    OUT/runs/MM-{id}/MM-{id}-{seed}          the seed's run names (MM-{id}-extra/... for c1..c12)
    OUT/sweep.json                           the manifest: each run's spec, state, timings, error,
                                             SLURM job id; the sweep's host and pid (sweep_status.py)
    OUT/slurm/                               submitit's job scripts and logs (--launcher slurm)

A sweep can be stopped and started again at any moment: a finished run (done.json)
is skipped, a run with a checkpoint is resumed, the rest train from scratch. A
failing run is recorded with its error's first line and the sweep goes on.
"""

import contextlib
import dataclasses
import json
import os
import socket
import time
import tomllib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

from nanomarkov.config import FIELDS, PRESETS, PROCESS_DEFAULTS, TrainConfig, preset
from nanomarkov.data import PROCESSES, default_data_dir
from nanomarkov.errors import NanoMarkovError

MANIFEST = "sweep.json"
TOP_KEYS = ("defaults", "datasets", "experiments")
DATASET_KEYS = ("n_states", "train", "val", "sparsity", "seq_len", "seed", "process")
EXPERIMENT_KEYS = ("datasets", "presets", "seeds", "overrides", "tag")
# The grid decides these per run; setting them by hand would put runs on top of each other.
GRID_OWNED = {
    "data_dir": "each dataset's folder is OUT/data/<its default name>, e.g. mm{K}[-sparse-S]",
    "out_dir": "each run's folder is OUT/runs/<name>; use tag = '...' to tell runs apart",
    "seed": "list the seeds in seeds = [...]",
    "init_from": "the sweep resumes runs that have a checkpoint by itself",
}


@dataclasses.dataclass
class RunSpec:
    name: str  # the run's folder under OUT/runs, e.g. MM-100/MM-100-42
    dataset: dict  # generate_dataset's parameters: n_states, train, val, sparsity, seq_len, seed, process, options
    data_dir: str
    preset: str
    seed: int
    overrides: dict  # [defaults] then the experiment's overrides
    out_dir: str

    def config(self) -> TrainConfig:
        values = preset(self.preset, self.dataset["n_states"], self.dataset["sparsity"], self.seed)
        if self.preset == "default":  # as `nanomarkov train DIR` would: attention where the process needs it
            values.update(PROCESS_DEFAULTS.get(self.dataset.get("process", "markov"), {}))
        return TrainConfig.from_dict(
            {**values, **self.overrides, "data_dir": self.data_dir, "out_dir": self.out_dir}, f"run {self.name}"
        )


def _check_keys(table, valid, where):
    if not isinstance(table, dict):
        raise NanoMarkovError(f"{where} must be a table, got {table!r}")
    for key in table:
        if key not in valid:
            raise NanoMarkovError(f"unknown key {key!r} in {where}; valid keys: {', '.join(valid)}")


def _check_overrides(values, where):
    _check_keys(values, FIELDS, where)
    for key in values:
        if key in GRID_OWNED:
            raise NanoMarkovError(f"{key} cannot be set in {where}: {GRID_OWNED[key]}")
    return dict(values)


def _list_of(value, kind, where):
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise NanoMarkovError(f"{where} must be a list of {kind.__name__}s, got {value!r}")
    return value


def load_grid(path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise NanoMarkovError(f"cannot read grid {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise NanoMarkovError(f"grid {path} is not valid TOML: {e}") from None


def expand_grid(grid, out_root) -> list:
    """The RunSpecs of a grid (a TOML file's path or the same as a dict), every config checked."""
    where = f"grid {grid}" if not isinstance(grid, dict) else "the grid"
    grid = load_grid(grid) if not isinstance(grid, dict) else grid
    out_root = Path(out_root)
    _check_keys(grid, TOP_KEYS, where)
    defaults = _check_overrides(grid.get("defaults", {}), f"{where} [defaults]")
    datasets, folders = [], {}
    for i, entry in enumerate(grid.get("datasets", [])):
        here = f"{where} [[datasets]] #{i}"
        process = entry.get("process", "markov") if isinstance(entry, dict) else None
        if process is not None and process not in PROCESSES:
            raise NanoMarkovError(f"{here}: unknown process {process!r}; choose from {', '.join(PROCESSES)}")
        options = PROCESSES[process].option_names() if process else ()
        _check_keys(entry, DATASET_KEYS + options, here)
        missing = [k for k in ("n_states", "train", "val") if k not in entry]
        if missing:
            raise NanoMarkovError(f"{here} lacks {', '.join(missing)}; e.g. n_states = 100, train = 50000, val = 5000")
        params = {"sparsity": None, "seq_len": None, "seed": 42, "process": "markov", **entry}
        preset("default", params["n_states"], params["sparsity"])  # checks K and sparsity
        folder = (
            out_root
            / "data"
            / default_data_dir(
                params["n_states"], params["sparsity"], process, **{k: entry[k] for k in options if k in entry}
            ).name
        )
        if folder in folders:
            raise NanoMarkovError(
                f"{here} and #{folders[folder]} would both live in {folder}: "
                "a grid holds one dataset per folder name (process, its options, n_states, sparsity)"
            )
        folders[folder] = i
        datasets.append((params, folder))
    specs, seen = [], {}
    for j, exp in enumerate(grid.get("experiments", [])):
        here = f"{where} [[experiments]] #{j}"
        _check_keys(exp, EXPERIMENT_KEYS, here)
        chosen = exp.get("datasets", "all")
        if chosen != "all":
            _list_of(chosen, int, f'{here} datasets (or "all")')
            bad = [d for d in chosen if not 0 <= d < len(datasets)]
            if bad:
                raise NanoMarkovError(f"{here} datasets {bad}: the grid has datasets 0..{len(datasets) - 1}")
        for name in _list_of(exp.get("presets", ["default"]), str, f"{here} presets"):
            if name not in PRESETS:
                raise NanoMarkovError(f"{here}: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        overrides = {**defaults, **_check_overrides(exp.get("overrides", {}), f"{here} overrides")}
        tag = exp.get("tag", "")
        if not isinstance(tag, str) or "/" in tag:
            raise NanoMarkovError(f"{here} tag must be a string without '/', got {tag!r}")
        for d in range(len(datasets)) if chosen == "all" else chosen:
            params, folder = datasets[d]
            for name in exp.get("presets", ["default"]):
                for seed in _list_of(exp.get("seeds", [42]), int, f"{here} seeds"):
                    # The preset's own folder, trainings/MM/<group>/<run>, moved under OUT/runs.
                    if params["process"] == "markov":  # the seed's names: MM-100/MM-100-42, MM-100-extra/...
                        run = Path(preset(name, params["n_states"], params["sparsity"], seed)["out_dir"])
                    else:  # as `nanomarkov train DIR` names them: mess3/mess3-42, mess3/mess3-c4-42
                        run = Path(folder.name) / f"{folder.name}-{'' if name == 'default' else name + '-'}{seed}"
                    run_name = f"{run.parent.name}/{run.name}{'-' + tag if tag else ''}"
                    if run_name in seen:
                        raise NanoMarkovError(
                            f"{here} and {seen[run_name]} both make run {run_name}; "
                            "drop the repeat or give one experiment a tag"
                        )
                    seen[run_name] = here
                    spec = RunSpec(
                        run_name, params, str(folder), name, seed, overrides, str(out_root / "runs" / run_name)
                    )
                    spec.config()  # every override checked now, not hours into the sweep
                    specs.append(spec)
    if not specs:
        raise NanoMarkovError(
            f"{where} expands to no run; it needs [[datasets]] and [[experiments]] with non-empty presets and seeds"
        )
    return specs


# ------------------------------------------------------------------ one run


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def plan(spec) -> str:
    """What the sweep will do with a run: 'skip' (finished), 'resume' (has a checkpoint) or 'train'."""
    done = _read_json(Path(spec.out_dir) / "done.json")
    if done and done.get("status") == "done" and done.get("iters", -1) >= spec.config().max_iters:
        return "skip"
    return "resume" if (Path(spec.out_dir) / "ckpt.pt").exists() else "train"


def _check_finished_config(spec, cfg):
    """A finished run that another config made must not pass for this grid's run."""
    from nanomarkov.train import RESUMABLE_CHANGES

    saved = _read_json(Path(spec.out_dir) / "config.json") or {}
    changed = [
        f"{k} {saved.get(k)!r} -> {v!r}"
        for k, v in cfg.to_dict().items()
        if k not in RESUMABLE_CHANGES and k != "data_dir" and saved.get(k) != v
    ]
    if changed:
        raise NanoMarkovError(
            f"{spec.out_dir} holds a finished run with another config ({', '.join(changed)}); "
            "delete that folder to train it again, or give the experiment a tag"
        )


def run_one(spec, threads=None) -> dict:
    """Train (or resume, or skip) one run, then evaluate it; never raises: errors come back as 'failed'."""
    import torch

    from nanomarkov.evaluate import evaluate_checkpoints
    from nanomarkov.train import train

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    out, result, started = Path(spec.out_dir), {"state": "failed", "error": None}, time.time()
    try:
        cfg = spec.config()
        result["action"] = action = plan(spec)
        if action == "skip":
            _check_finished_config(spec, cfg)
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
        done, ev = _read_json(out / "done.json"), _read_json(evaluation)
        result.update(state="done", iters=done["iters"], excess=ev["cross_entropy"]["excess"])
    except Exception as e:  # noqa: BLE001 - one run's failure must not end the sweep
        first = (str(e).strip().splitlines() or [""])[0]
        result["error"] = first if isinstance(e, NanoMarkovError) else f"{type(e).__name__}: {first}"
    finally:
        torch.set_num_threads(previous)
        result["seconds"] = round(time.time() - started, 3)
    return result


# ------------------------------------------------------------------ the sweep


def _save(manifest, out_root):
    """Write to a temporary name, then rename: a reader never sees half a manifest."""
    path = Path(out_root) / MANIFEST
    partial = path.with_name(MANIFEST + ".partial")
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(partial, path)


def run_sweep(
    grid, out_root, jobs=1, dry_run=False, progress=print, threads=None, launcher="local", slurm=None
) -> dict:
    """Generate the grid's datasets, train and evaluate every run, report; returns the manifest.

    launcher "local": jobs > 1 runs that many trainings at once in fresh processes,
    each with `threads` torch threads (default: the machine's cores shared out evenly).
    launcher "slurm": one job array through submitit; `slurm` holds slurm.slurm_executor's
    options, and each run gets cpus_per_task threads.
    """
    from nanomarkov.data import generate_dataset

    specs = expand_grid(grid, out_root)
    if not isinstance(jobs, int) or jobs < 1:
        raise NanoMarkovError(f"jobs must be a positive integer, got {jobs!r}")
    if launcher not in ("local", "slurm"):
        raise NanoMarkovError(f"launcher must be local or slurm, got {launcher!r}")
    executor = None
    if launcher == "slurm":
        from nanomarkov.sweep.slurm import slurm_executor

        slurm = dict(slurm or {})
        executor = slurm_executor(Path(out_root) / "slurm", **slurm)
        threads = slurm.get("cpus_per_task", 1)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    runs = {s.name: {"spec": dataclasses.asdict(s), "state": "pending", "action": plan(s)} for s in specs}
    manifest = {
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
    if dry_run:
        for s in specs:
            progress(f"{runs[s.name]['action']:6} {s.name}  (preset {s.preset}, seed {s.seed}, data {s.data_dir})")
        progress(f"{len(specs)} runs; dry run, nothing written")
        return manifest
    from nanomarkov.sweep.status import refuse_if_still_running

    refuse_if_still_running(out_root)
    Path(out_root).mkdir(parents=True, exist_ok=True)
    _save(manifest, out_root)
    for data_dir, params in {s.data_dir: s.dataset for s in specs}.items():
        progress(f"data {data_dir}")
        options = {k: v for k, v in params.items() if k not in DATASET_KEYS}
        generate_dataset(
            data_dir,
            params["n_states"],
            params["train"],
            params["val"],
            sparsity=params["sparsity"],
            seq_len=params["seq_len"],
            seed=params["seed"],
            process=params["process"],
            **options,
        )

    def start(spec):
        runs[spec.name].update(state="running", started=time.time())
        _save(manifest, out_root)

    def submitted(job_ids):
        now = time.time()
        for name, job_id in job_ids.items():
            runs[name].update(job_id=job_id, submitted=now)
        _save(manifest, out_root)
        arrays = sorted({job_id.split("_")[0] for job_id in job_ids.values()})
        progress(
            f"submitted {len(job_ids)} runs as SLURM job {', '.join(arrays)}; logs under {Path(out_root) / 'slurm'}"
        )

    def finish(spec, result):
        runs[spec.name].update(result, finished=time.time())
        _save(manifest, out_root)
        count = sum(r["state"] in ("done", "failed", "cancelled") for r in runs.values())
        if result["state"] == "done":
            what = f"{result['iters']} iters, excess {result['excess']:+.6f} nats, {result['seconds']:.1f}s"
        else:
            what = result["error"]
        progress(f"[{count}/{len(specs)}] {spec.name}: {result['state']} ({runs[spec.name]['action']}): {what}")
        if result["state"] == "pending" and executor is None:  # train() saw Ctrl-C or SIGTERM: the sweep stops
            raise KeyboardInterrupt

    try:
        if executor is not None:
            # A finished run is skipped here, where its eval is checked, rather than costing a job.
            for spec in [s for s in specs if runs[s.name]["action"] == "skip"]:
                start(spec)
                finish(spec, run_one(spec, threads))
            from nanomarkov.sweep.slurm import run_jobs

            todo = [s for s in specs if runs[s.name]["action"] != "skip"]
            if todo:
                run_jobs(executor, todo, threads, submitted, start, finish)
        elif jobs == 1:  # in this process: no start-up cost, and tracebacks stay readable under a debugger
            for spec in specs:
                start(spec)
                finish(spec, run_one(spec, threads))
        else:
            # 'spawn': a fresh interpreter per worker, safe with torch's threads (fork is not).
            with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
                queue, running = list(specs), {}
                while queue or running:
                    while queue and len(running) < jobs:
                        spec = queue.pop(0)
                        start(spec)
                        running[pool.submit(run_one, spec, threads)] = spec
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in finished:
                        spec = running.pop(future)
                        try:
                            result = future.result()
                        except Exception as e:  # noqa: BLE001 - the worker process itself died
                            result = {"state": "failed", "error": f"worker died: {type(e).__name__}: {e}", "seconds": 0}
                        finish(spec, result)
    except KeyboardInterrupt:
        for run in runs.values():
            if run["state"] == "running" and "job_id" not in run:  # SLURM jobs go on without us
                run.update(state="pending", error="interrupted; run the sweep again to resume")
        _save(manifest, out_root)
        raise
    _evaluate_families(specs, runs, progress)
    manifest["finished"] = time.time()
    manifest["report"] = _report(Path(out_root) / "runs", progress)
    _save(manifest, out_root)
    return manifest


def _report(root, progress):
    from nanomarkov.report import write_report

    try:
        written = write_report(root)
    except NanoMarkovError as e:
        progress(f"report skipped: {e}")
        return None
    progress(f"report written under {root / 'report'}")
    return {"folder": str(root / "report"), "skipped_plots": written.get("skipped", [])}


def _evaluate_families(specs, runs, progress):
    """Runs that differ only in seed are evaluated together once more, for agreement (metric 4)."""
    from nanomarkov.evaluate import evaluate_checkpoints
    from nanomarkov.report import family_key  # the report's families, so agreement lands where it shows it

    families = {}
    for spec in specs:
        if runs[spec.name]["state"] == "done":
            families.setdefault(family_key(spec.config().to_dict()), []).append(spec)
    for members in families.values():
        folders = [Path(s.out_dir) for s in members]
        evals = [_read_json(f / "eval.json") or {} for f in folders]
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
