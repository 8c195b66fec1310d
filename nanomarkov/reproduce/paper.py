"""A paper as a file: papers/NAME.toml read, checked and turned into a sweep grid at a scale.

    [paper]          title, authors, year (required); url, setting (the paper's, in words),
                     differences (ours against theirs, each a string)
    [[datasets]]     a grid's [[datasets]] without train and val (the scale gives them)
    [[experiments]]  tag (required, unique), dataset (index, default 0), preset (default "default"),
                     overrides (TrainConfig fields), about (in words): one condition of the paper
    [scales.S]       S in SCALES: train, val (sequences per dataset), seeds, defaults (TrainConfig fields),
                     seq_len (optional: every dataset's at this scale)
    [[figures]]      file (a dynamics plot), experiment (tag), paper (its figure), caption
    [[claims]]       claims.Claim's keys

Every refusal names the file and the entry, as a grid's do (docs/papers.md).
"""

import dataclasses
from pathlib import Path

from nanomarkov.dynamics import PLOTS, SIMPLEX_PLOT
from nanomarkov.errors import NanoMarkovError
from nanomarkov.reproduce.claims import Claim, read_claim
from nanomarkov.sweep.grid import expand_grid, load_grid, naming

# The papers shipped with the package: papers/ at the repository root, beside grids/.
PAPERS_DIR = Path(__file__).resolve().parents[2] / "papers"
SCALES = ("smoke", "cpu", "paper")
TOP_KEYS = ("paper", "datasets", "experiments", "scales", "figures", "claims")
PAPER_KEYS = ("title", "authors", "year", "url", "setting", "differences")
EXPERIMENT_KEYS = ("tag", "dataset", "preset", "overrides", "about")
SCALE_KEYS = ("train", "val", "seeds", "defaults", "about", "seq_len")
FIGURE_KEYS = ("file", "experiment", "paper", "caption")
FIGURES = (*PLOTS, SIMPLEX_PLOT)


@dataclasses.dataclass
class Paper:
    name: str
    path: Path
    citation: dict  # [paper]
    datasets: list
    experiments: list  # [{"tag", "dataset", "preset", "overrides", "about"}]
    scales: dict  # {scale: {"train", "val", "seeds", "defaults", "about"[, "seq_len"]}}
    figures: list
    claims: list  # [Claim]

    def tags(self):
        return [e["tag"] for e in self.experiments]

    def claim_runs(self, claim: Claim):
        """The experiment tag whose runs measure `claim`."""
        return claim.experiment or self.experiments[0]["tag"]


def paper_names():
    """The shipped papers' names (papers/*.toml), sorted."""
    return sorted(p.stem for p in PAPERS_DIR.glob("*.toml"))


PAPER_FIX = "give a paper's name (nanomarkov reproduce --list) or the path of a paper's .toml"
# A paper's file is a few kilobytes of tables; one past a grid file's size is no paper.
PAPER_TOO_BIG = f"a paper's .toml is a few kilobytes; {PAPER_FIX}"


def paper_path(name) -> Path:
    """papers/NAME.toml for a name, or the path itself for a .toml path."""
    if str(name).endswith(".toml"):
        return Path(name)
    path = PAPERS_DIR / f"{name}.toml"
    if not path.is_file():
        raise NanoMarkovError(
            f"no paper {name!r}; choose from {', '.join(paper_names()) or 'none'} (nanomarkov reproduce --list), "
            "or give the path of a paper's .toml"
        )
    return path


def _table(value, keys, required=()):
    if not isinstance(value, dict):
        raise NanoMarkovError(f"must be a table, got {value!r}")
    unknown = [key for key in value if key not in keys]
    if unknown:
        raise NanoMarkovError(f"unknown key {unknown[0]!r}; valid keys: {', '.join(keys)}")
    missing = [key for key in required if key not in value]
    if missing:
        raise NanoMarkovError(f"lacks {', '.join(missing)}")
    return value


def _tables(value, what):
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value) or not value:
        raise NanoMarkovError(f"needs at least one {what} table, got {value!r}")
    return value


def _experiment(entry, n_datasets, seen):
    _table(entry, EXPERIMENT_KEYS, ("tag",))
    tag, dataset = entry["tag"], entry.get("dataset", 0)
    if not isinstance(tag, str) or not tag or "/" in tag or tag in seen:
        raise NanoMarkovError(f"tag must be a new non-empty string without '/', got {tag!r}")
    if not isinstance(dataset, int) or isinstance(dataset, bool) or not 0 <= dataset < n_datasets:
        raise NanoMarkovError(f"dataset must be an index 0..{n_datasets - 1}, got {dataset!r}")
    return {"preset": "default", "overrides": {}, "about": "", **entry, "dataset": dataset}


def _scale(entry):
    _table(entry, SCALE_KEYS, ("train", "val", "seeds"))
    seeds = entry["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise NanoMarkovError(f"seeds must be a non-empty list of integers, got {seeds!r}")
    seq_len = entry.get("seq_len", 2)
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise NanoMarkovError(f"seq_len must be an integer >= 2 (BOS and one token at least), got {seq_len!r}")
    return {"defaults": {}, "about": "", **entry}


def _figure(entry, tags):
    _table(entry, FIGURE_KEYS, ("file", "paper"))
    if entry["file"] not in FIGURES:
        raise NanoMarkovError(f"file {entry['file']!r} is no dynamics plot; choose from {', '.join(FIGURES)}")
    if entry.get("experiment", tags[0]) not in tags:
        raise NanoMarkovError(f"experiment {entry['experiment']!r} is not one of {', '.join(tags)}")
    return {"experiment": tags[0], "caption": "", **entry}


def read_paper(name) -> Paper:
    """The paper `name` (papers/NAME.toml, or a path), every table checked; each scale's grid is checked
    too (as a sweep checks it, without writing), so a paper that reads is a paper that runs."""
    path = paper_path(name)
    where = str(path)
    raw = load_grid(path, "paper", PAPER_TOO_BIG, PAPER_FIX)
    with naming(where):
        _table(raw, TOP_KEYS, ("paper", "datasets", "experiments", "scales", "claims"))
    with naming(f"{where}: [paper]"):
        citation = _table(raw["paper"], PAPER_KEYS, ("title", "authors", "year"))
    with naming(where):
        datasets = _tables(raw["datasets"], "[[datasets]]")
    experiments = []
    for i, entry in enumerate(_tables_named(raw, "experiments", where)):
        with naming(f"{where}: [[experiments]] entry {i}"):
            experiments.append(_experiment(entry, len(datasets), [e["tag"] for e in experiments]))
    tags = [e["tag"] for e in experiments]
    scales = {}
    with naming(f"{where}: [scales]"):
        for scale, entry in _table(raw["scales"], SCALES).items():
            with naming(scale):
                scales[scale] = _scale(entry)
    figures, claims = [], []
    for i, entry in enumerate(raw.get("figures", [])):
        with naming(f"{where}: [[figures]] entry {i}"):
            figures.append(_figure(entry, tags))
    for i, entry in enumerate(_tables_named(raw, "claims", where)):
        with naming(f"{where}: [[claims]] entry {i} ({entry.get('id', 'no id') if isinstance(entry, dict) else ''})"):
            claims.append(read_claim(entry, tags))
    paper = Paper(path.stem, path, citation, datasets, experiments, scales, figures, claims)
    for scale in scales:
        with naming(f"{where}: [scales.{scale}]"):
            _check_runs(expand_grid(paper_grid(paper, scale), "/nonexistent-reproduce-check"))
    return paper


def _check_runs(specs):
    """Every run keeps snapshots: the claims read the dynamics of their snapshot series."""
    for spec in specs:
        config = spec.config()
        if not config.snapshots and not config.snapshot_every:
            raise NanoMarkovError(
                f"run {spec.name} keeps no snapshots, which the claims' dynamics need; set snapshots = N "
                "(e.g. 12) in the scale's defaults"
            )


def _tables_named(raw, key, where):
    with naming(where):
        return _tables(raw.get(key), f"[[{key}]]")


def check_scale(paper, scale):
    if scale not in paper.scales:
        raise NanoMarkovError(
            f"{paper.path} has no scale {scale!r}; its scales: {', '.join(paper.scales)} (of {', '.join(SCALES)})"
        )


def paper_grid(paper, scale) -> dict:
    """The sweep grid (a dict, as grids/*.toml hold) of the paper at `scale`: every dataset with the scale's
    sizes (train, val and seq_len where the scale gives it), one [[experiments]] entry per experiment (its dataset, preset, overrides, tag) over the scale's seeds."""
    check_scale(paper, scale)
    chosen = paper.scales[scale]
    # A scale's seq_len replaces every dataset's: the paper's length at scale paper, a short one for smoke.
    sizes = {key: chosen[key] for key in ("train", "val", "seq_len") if key in chosen}
    datasets = [{**d, **sizes} for d in paper.datasets]
    experiments = [
        {
            "datasets": [e["dataset"]],
            "presets": [e["preset"]],
            "seeds": list(chosen["seeds"]),
            "overrides": dict(e["overrides"]),
            "tag": e["tag"],
        }
        for e in paper.experiments
    ]
    return {"defaults": dict(chosen["defaults"]), "datasets": datasets, "experiments": experiments}
