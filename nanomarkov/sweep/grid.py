"""A grid of training runs is data: a TOML file, expanded here into run specs.

    [defaults]          TrainConfig overrides for every run
    [[datasets]]        n_states, train, val (sequences); sparsity, seq_len, seed (default 42) optional;
                        process (default "markov") and that process's options (korder: order, ...)
    [[experiments]]     datasets ("all" or [indices]), presets, seeds, overrides {...}, tag (optional)

Each run's folders are decided here, under the sweep's folder OUT:
    OUT/data/mm{K}[-sparse-S]               one dataset folder per [[datasets]] entry (other processes:
                                             their own names, e.g. OUT/data/mess3, runs OUT/runs/mess3/mess3-42)
    OUT/runs/MM-{id}/MM-{id}-{seed}          the seed's run names (MM-{id}-extra/... for c1..c12)
"""

import dataclasses
import tomllib
from pathlib import Path

from nanomarkov.config import FIELDS, PRESETS, TrainConfig, merge_settings, mm_id, preset, process_recipe, run_folder
from nanomarkov.data import default_data_dir
from nanomarkov.errors import NanoMarkovError
from nanomarkov.files import read_json_or_none
from nanomarkov.processes import DEFAULT_PROCESS, PROCESSES

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
            values.update(process_recipe(self.dataset.get("process", DEFAULT_PROCESS)))
        # A run with a checkpoint is resumed (plan), and keeps its schedule (config.merge_settings).
        resume = (Path(self.out_dir) / "ckpt.pt").exists()
        given = {**self.overrides, "data_dir": self.data_dir, "out_dir": self.out_dir}
        given["init_from"] = "resume" if resume else "scratch"
        return TrainConfig.from_dict(merge_settings(values, given), f"run {self.name}")

    def dataset_options(self) -> dict:
        """The dataset's process options (korder's order, ...): its parameters beyond DATASET_KEYS."""
        return {k: v for k, v in self.dataset.items() if k not in DATASET_KEYS}


def plan(spec) -> str:
    """What the sweep will do with a run: 'skip' (finished), 'resume' (has a checkpoint) or 'train'."""
    done = read_json_or_none(Path(spec.out_dir) / "done.json")
    if done and done.get("status") == "done" and done.get("iters", -1) >= spec.config().max_iters:
        return "skip"
    return "resume" if (Path(spec.out_dir) / "ckpt.pt").exists() else "train"


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
    datasets = _datasets(_list_of(grid.get("datasets", []), dict, f"{where} [[datasets]]"), out_root, where)
    specs, seen = [], {}
    for j, exp in enumerate(_list_of(grid.get("experiments", []), dict, f"{where} [[experiments]]")):
        specs += _experiment_runs(exp, f"{where} [[experiments]] #{j}", datasets, defaults, out_root, seen)
    if not specs:
        raise NanoMarkovError(
            f"{where} expands to no run; it needs [[datasets]] and [[experiments]] with non-empty presets and seeds"
        )
    return specs


def _datasets(entries, out_root, where) -> list:
    """(generate_dataset's parameters, folder) of each [[datasets]] entry, checked; one dataset per folder."""
    datasets, folders = [], {}
    for i, entry in enumerate(entries):
        here = f"{where} [[datasets]] #{i}"
        process = entry.get("process", DEFAULT_PROCESS)
        if not isinstance(process, str) or process not in PROCESSES:
            raise NanoMarkovError(f"{here}: unknown process {process!r}; choose from {', '.join(PROCESSES)}")
        options = PROCESSES[process].option_names()
        _check_keys(entry, DATASET_KEYS + options, here)
        missing = [k for k in ("n_states", "train", "val") if k not in entry]
        if missing:
            raise NanoMarkovError(f"{here} lacks {', '.join(missing)}; e.g. n_states = 100, train = 50000, val = 5000")
        params = {"sparsity": None, "seq_len": None, "seed": 42, "process": DEFAULT_PROCESS, **entry}
        preset("default", params["n_states"], params["sparsity"])  # checks K and sparsity
        chosen = {k: entry[k] for k in options if k in entry}
        folder = out_root / "data" / default_data_dir(params["n_states"], params["sparsity"], process, **chosen).name
        if folder in folders:
            raise NanoMarkovError(
                f"{here} and #{folders[folder]} would both live in {folder}: "
                "a grid holds one dataset per folder name (process, its options, n_states, sparsity)"
            )
        folders[folder] = i
        datasets.append((params, folder))
    return datasets


def _experiment_runs(exp, here, datasets, defaults, out_root, seen) -> list:
    """The RunSpecs of one [[experiments]] entry; `seen` (run name -> where it came from) catches repeats."""
    _check_keys(exp, EXPERIMENT_KEYS, here)
    chosen = exp.get("datasets", "all")
    if chosen != "all":
        _list_of(chosen, int, f'{here} datasets (or "all")')
        bad = [d for d in chosen if not 0 <= d < len(datasets)]
        if bad:
            raise NanoMarkovError(f"{here} datasets {bad}: the grid has datasets 0..{len(datasets) - 1}")
    presets = _list_of(exp.get("presets", ["default"]), str, f"{here} presets")
    for name in presets:
        if name not in PRESETS:
            raise NanoMarkovError(f"{here}: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    overrides = {**defaults, **_check_overrides(exp.get("overrides", {}), f"{here} overrides")}
    tag = exp.get("tag", "")
    if not isinstance(tag, str) or "/" in tag:
        raise NanoMarkovError(f"{here} tag must be a string without '/', got {tag!r}")
    specs = []
    for d in range(len(datasets)) if chosen == "all" else chosen:
        params, folder = datasets[d]
        for name in presets:
            for seed in _list_of(exp.get("seeds", [42]), int, f"{here} seeds"):
                run_name = _run_name(name, seed, params, folder) + (f"-{tag}" if tag else "")
                if run_name in seen:
                    raise NanoMarkovError(
                        f"{here} and {seen[run_name]} both make run {run_name}; "
                        "drop the repeat or give one experiment a tag"
                    )
                seen[run_name] = here
                spec = RunSpec(run_name, params, str(folder), name, seed, overrides, str(out_root / "runs" / run_name))
                spec.config()  # every override checked now, not hours into the sweep
                specs.append(spec)
    return specs


def _run_name(name, seed, params, folder) -> str:
    """The folder the preset's run would have under trainings/, here under OUT/runs."""
    if params["process"] == "markov":  # the seed's names: MM-100/MM-100-42, MM-100-extra/...
        return run_folder(name, seed, chain=mm_id(params["n_states"], params["sparsity"]))
    return run_folder(name, seed, dataset=folder.name)  # as `nanomarkov train DIR` names them: mess3/mess3-42
