"""A grid of training runs is data: a TOML file, expanded here into run specs.

    [defaults]          TrainConfig overrides for every run
    [[datasets]]        n_states, train, val (sequences); sparsity, alpha (the Dirichlet concentration,
                        default 1), seq_len, seed (default 42) optional; process (default "markov") and
                        that process's options (korder: order, ...)
    [[experiments]]     datasets ("all" or [indices]), presets, seeds, overrides {...}, tag (optional)

Each run's folders are decided here, under the sweep's folder OUT:
    OUT/data/mm{K}[-sparse-S][-alpha-A]     one dataset folder per [[datasets]] entry (other processes:
                                             their own names, e.g. OUT/data/mess3, runs OUT/runs/mess3/mess3-42;
                                             -alpha-A where alpha is given and not 1)
    OUT/runs/MM-{id}/MM-{id}-{seed}          the seed's run names (MM-{id}-extra/... for c1..c12)
"""

import dataclasses
import errno
import os
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path

from nanomarkov.config import (
    FIELDS,
    PRESETS,
    TrainConfig,
    check_seed,
    merge_settings,
    mm_id,
    preset,
    process_recipe,
    run_folder,
)
from nanomarkov.data import check_free_space, default_data_dir, is_dataset_folder, plan_dataset
from nanomarkov.errors import NanoMarkovError
from nanomarkov.files import read_capped, read_json_or_none
from nanomarkov.memory import check_fits
from nanomarkov.processes import DEFAULT_PROCESS, PROCESSES
from nanomarkov.train import check_training_fits, resolve_device

TOP_KEYS = ("defaults", "datasets", "experiments")
DATASET_KEYS = ("n_states", "train", "val", "sparsity", "alpha", "seq_len", "seed", "process")
EXPERIMENT_KEYS = ("datasets", "presets", "seeds", "overrides", "tag")
# The most runs one sweep plans and tracks (its sweep.json holds them all): benchmarks/dry_run.py plans this
# many in seconds. A grid of more is refused before it is expanded; it is several sweeps.
MAX_GRID_RUNS = 100_000
# What planning holds per run, measured: its RunSpec, its sweep.json record and the dry run's line (1.5 KiB
# measured at 20,000 runs), with room for longer names and overrides.
RUN_PLAN_BYTES = 4096
# A grid file is read whole and parsed (tomllib: about 3 s a MiB here) before its runs can be counted: 100,000
# seeds take 0.6 MiB.
MAX_GRID_BYTES = 2 << 20
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

    def record(self) -> dict:
        """The spec as sweep.json keeps it (dataclasses.asdict's dict, without its deep copy: 100x faster)."""
        return {**vars(self), "dataset": dict(self.dataset), "overrides": dict(self.overrides)}


def dataset_arguments(params) -> tuple:
    """generate_dataset's (and plan_dataset's) positional and keyword arguments for a grid's dataset."""
    options = {k: v for k, v in params.items() if k not in DATASET_KEYS}
    keywords = {k: params[k] for k in ("sparsity", "seq_len", "seed", "process")}
    if params.get("alpha") is not None:  # generate's default (1) otherwise
        keywords["alpha"] = params["alpha"]
    return (params["n_states"], params["train"], params["val"]), {**keywords, **options}


class Ticker:
    """A line through `say` every `every` seconds, once `every` seconds have passed: a long planning shows
    it is alive, a short one prints nothing. Called with the count done so far."""

    def __init__(self, say, what, every=3.0):
        self.say, self.what, self.every = say, what, every
        self.started = time.monotonic()
        self.next_note = self.started + every

    def __call__(self, done, total=None):
        now = time.monotonic()
        if now >= self.next_note:
            self.next_note = now + self.every
            of = "" if total is None else f" of {total:,}"
            self.say(f"{self.what}: {done:,}{of} runs, {now - self.started:.0f}s")


def plan(spec) -> str:
    """What the sweep will do with a run: 'skip' (finished), 'resume' (has a checkpoint) or 'train'."""
    if not os.path.isdir(spec.out_dir):  # one stat for a run not yet begun, the most common by far
        return "train"
    done = read_json_or_none(Path(spec.out_dir) / "done.json")
    if done and done.get("status") == "done" and done.get("iters", -1) >= spec.config().max_iters:
        return "skip"
    return "resume" if (Path(spec.out_dir) / "ckpt.pt").exists() else "train"


@contextmanager
def naming(where):
    """Every refusal inside the block starts with `where` (the grid file and its entry)."""
    try:
        yield
    except NanoMarkovError as e:
        raise NanoMarkovError(f"{where}: {e}") from None


def _check_keys(table, valid):
    if not isinstance(table, dict):
        raise NanoMarkovError(f"must be a table, got {table!r}")
    for key in table:
        if key not in valid:
            raise NanoMarkovError(f"unknown key {key!r}; valid keys: {', '.join(valid)}")


def _check_overrides(values):
    _check_keys(values, FIELDS)
    for key in values:
        if key in GRID_OWNED:
            raise NanoMarkovError(f"{key} cannot be set here: {GRID_OWNED[key]}")
    return dict(values)


def _list_of(value, kind, what):
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise NanoMarkovError(f"{what} must be a list of {kind.__name__}s, got {value!r}")
    return value


GRID_TOO_BIG = (
    f"a grid file of {MAX_GRID_RUNS:,} runs takes far less; split it into several grids, each its own sweep --out"
)


def load_grid(path, what="grid", too_big=GRID_TOO_BIG, fix=None) -> dict:
    """The TOML file at `path`, a grid or what else reads as one (a paper: reproduce.paper); `what` names it
    in the errors, `too_big` is the fix for a file over the size a grid file takes, `fix` for one unread."""
    try:
        return tomllib.loads(read_capped(path, MAX_GRID_BYTES).decode("utf-8"))
    except OSError as e:
        if e.errno == errno.EFBIG:
            raise NanoMarkovError(f"{what} {path} is {e.strerror}: {too_big}") from None
        raise NanoMarkovError(f"cannot read {what} {path}: {e.strerror or e}{'; ' + fix if fix else ''}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise NanoMarkovError(f"{what} {path} is not valid TOML: {e}") from None


def expand_grid(grid, out_root, tick=None) -> list:
    """The RunSpecs of a grid (a TOML file's path or the same as a dict), every dataset and run checked as
    `generate` and `train` check them before they start, each refusal naming the file and the entry.

    A run's config is checked once for each dataset, preset and experiment (its seeds change only its
    seed and folder), so a grid of 100,000 runs is planned in seconds; tick(n_runs) as it goes."""
    where = str(grid) if not isinstance(grid, dict) else "the grid"
    grid = load_grid(grid) if not isinstance(grid, dict) else grid
    out_root, tick = Path(out_root), tick or (lambda done: None)
    with naming(where):
        _check_keys(grid, TOP_KEYS)
    with naming(f"{where}: [defaults]"):
        defaults = _check_overrides(grid.get("defaults", {}))
    with naming(where):
        entries = _list_of(grid.get("datasets", []), dict, "[[datasets]]")
        experiments = _list_of(grid.get("experiments", []), dict, "[[experiments]]")
    datasets = _datasets(entries, out_root, where)
    planned = []
    for j, exp in enumerate(experiments):
        here = f"{where}: [[experiments]] entry {j}" + (f" (tag {exp['tag']})" if exp.get("tag") else "")
        with naming(here):
            planned.append((here, exp, _experiment(exp, datasets, defaults)))
    check_grid_size(sum(_run_count(exp, datasets, parsed) for _, exp, parsed in planned), where)
    specs, seen = [], {}
    for here, exp, parsed in planned:
        _experiment_runs(exp, here, parsed, datasets, out_root, seen, specs, tick)
    if not specs:
        raise NanoMarkovError(
            f"{where} expands to no run; it needs [[datasets]] and [[experiments]] with non-empty presets and seeds"
        )
    return specs


def _datasets(entries, out_root, where) -> list:
    """(the entry's parameters, folder, its model's sizes) of each [[datasets]] entry, checked as generate checks
    it (the process is built, as generate builds it, without writing anything); one dataset per folder."""
    datasets, folders = [], {}
    for i, entry in enumerate(entries):
        given_k = f" K={entry['n_states']}" if "n_states" in entry else ""  # only what the entry gives: no K=None
        here = f"{where}: [[datasets]] entry {i} ({entry.get('process', DEFAULT_PROCESS)}{given_k})"
        with naming(here):
            params, folder, sizes = _dataset(entry, out_root)
            if folder in folders:
                raise NanoMarkovError(
                    f"entry {folders[folder]} lives in {folder} too: "
                    "a grid holds one dataset per folder name (process, its options, n_states, sparsity)"
                )
        folders[folder] = i
        datasets.append((params, folder, sizes))
    return datasets


def _dataset(entry, out_root):
    process = entry.get("process", DEFAULT_PROCESS)
    if not isinstance(process, str) or process not in PROCESSES:
        raise NanoMarkovError(f"unknown process {process!r}; choose from {', '.join(PROCESSES)}")
    options = PROCESSES[process].option_names()
    _check_keys(entry, DATASET_KEYS + options)
    if "n_states" not in entry and PROCESSES[process].N_STATES is not None:  # the process fixes K (switching: 2)
        entry = {**entry, "n_states": PROCESSES[process].N_STATES}
    missing = [k for k in ("n_states", "train", "val") if k not in entry]
    if missing:
        example = {"n_states": "n_states = 100", "train": "train = 50000", "val": "val = 5000"}
        raise NanoMarkovError(f"lacks {', '.join(missing)}; e.g. {', '.join(example[k] for k in missing)}")
    params = {"sparsity": None, "seq_len": None, "seed": 42, "process": DEFAULT_PROCESS, **entry}
    preset("default", params["n_states"], params["sparsity"])  # checks K and sparsity as the recipes take them
    args, keywords = dataset_arguments(params)
    chain, planned, dtype = plan_dataset(*args, **keywords)
    chosen = {k: entry[k] for k in options if k in entry}
    folder = out_root / "data" / default_data_dir(params["n_states"], params["sparsity"], process, **chosen).name
    if _alpha_named(params):  # two concentrations of one process, two folders
        folder = folder.with_name(f"{folder.name}-alpha-{params['alpha']:g}")
    if not is_dataset_folder(folder):  # as generate checks it before it writes (one already there is kept)
        check_free_space(folder, chain, planned, dtype)
    return params, folder, {"vocab_size": chain.vocab_size, "block_size": planned["seq_len"] - 1}


def _chosen_datasets(exp, datasets):
    """The indices of the datasets an [[experiments]] entry runs on."""
    return range(len(datasets)) if exp.get("datasets", "all") == "all" else exp["datasets"]


def _run_count(exp, datasets, parsed):
    """How many runs an [[experiments]] entry makes, from its lists' lengths alone: datasets x presets x seeds."""
    presets, seeds, _, _ = parsed
    return len(_chosen_datasets(exp, datasets)) * len(presets) * len(seeds)


def check_grid_size(n_runs, where):
    """Refuse, before a single run is expanded, a grid of more runs than a sweep takes, or than memory holds."""
    if n_runs > MAX_GRID_RUNS:
        raise NanoMarkovError(
            f"{where} makes {n_runs:,} runs (datasets x presets x seeds), more than the {MAX_GRID_RUNS:,} a sweep "
            "takes; split it into several grids, each its own sweep --out"
        )
    check_fits(
        n_runs * RUN_PLAN_BYTES,
        f"planning {where}'s {n_runs:,} runs",
        "split it into several grids, each its own sweep",
    )


def _experiment_runs(exp, here, parsed, datasets, out_root, seen, specs, tick):
    """Appends the RunSpecs of one [[experiments]] entry (`parsed` by _experiment) to `specs`; `seen` (run name
    -> where it came from) catches repeats."""
    presets, seeds, overrides, tag = parsed
    runs_root = str(out_root / "runs")
    for d in _chosen_datasets(exp, datasets):
        params, folder, sizes = datasets[d]
        for name in presets:
            checked, run_name = False, None
            try:  # one try for all the seeds, not a `with naming` each: this loop runs once per run
                for seed in seeds:
                    run_name = _run_name(name, seed, params, folder) + (f"-{tag}" if tag else "")
                    if run_name in seen:
                        raise NanoMarkovError(f"{seen[run_name]} makes it too; drop the repeat or give one a tag")
                    check_seed(seed)
                    spec = RunSpec(run_name, params, str(folder), name, seed, overrides, f"{runs_root}/{run_name}")
                    if not checked:  # as train checks it before it starts: the config, the model, its memory
                        check_run_fits(spec.config(), sizes)
                        checked = True
                    seen[run_name] = here.partition(": ")[2]
                    specs.append(spec)
                    tick(len(specs))
            except NanoMarkovError as e:
                raise NanoMarkovError(f"{here}, run {run_name}: {e}") from None


def check_run_fits(cfg, sizes):
    """train's checks of a run's model before it is built (train.set_up_run): its GPTConfig, and its training
    step against the memory of the device it would train on."""
    device, _, _ = resolve_device(cfg)
    check_training_fits(cfg.gpt_config(**sizes), cfg.batch_size, device)


def _experiment(exp, datasets, defaults):
    """(presets, seeds, overrides, tag) of an [[experiments]] entry, checked."""
    _check_keys(exp, EXPERIMENT_KEYS)
    chosen = exp.get("datasets", "all")
    if chosen != "all":
        _list_of(chosen, int, 'datasets (or "all")')
        bad = [d for d in chosen if not 0 <= d < len(datasets)]
        if bad:
            raise NanoMarkovError(f"datasets {bad}: the grid has datasets 0..{len(datasets) - 1}")
    presets = _list_of(exp.get("presets", ["default"]), str, "presets")
    for name in presets:
        if name not in PRESETS:
            raise NanoMarkovError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    with naming("overrides"):
        overrides = {**defaults, **_check_overrides(exp.get("overrides", {}))}
    tag = exp.get("tag", "")
    if not isinstance(tag, str) or "/" in tag:
        raise NanoMarkovError(f"tag must be a string without '/', got {tag!r}")
    return presets, _list_of(exp.get("seeds", [42]), int, "seeds"), overrides, tag


def _alpha_named(params) -> bool:
    """A grid dataset's folder (and run) names its Dirichlet concentration where it is given and not 1."""
    return isinstance(params.get("alpha"), (int, float)) and params["alpha"] != 1


def _run_name(name, seed, params, folder) -> str:
    """The folder the preset's run would have under trainings/, here under OUT/runs."""
    if params["process"] == "markov" and not _alpha_named(
        params
    ):  # the seed's names: MM-100/MM-100-42, MM-100-extra/...
        return run_folder(name, seed, chain=mm_id(params["n_states"], params["sparsity"]))
    return run_folder(name, seed, dataset=folder.name)  # as `nanomarkov train DIR` names them: mess3/mess3-42
