"""Sweeps: grid expansion and its errors, a whole tiny sweep, skipping, resuming, parallel runs, failures."""

import json
import tomllib
from pathlib import Path

import pytest
import torch

from nanomarkov import NanoMarkovError
from nanomarkov.sweep import expand_grid, run_sweep
from nanomarkov.sweep import grid as sweep_grid
from nanomarkov.sweep import run as sweep_run
from nanomarkov.sweep.status import format_status, sweep_status

REPO = Path(__file__).resolve().parents[2]
# A few seconds of CPU per run: 5 states, 12-token sequences, an 8-wide model.
SMALL = {
    "n_embd": 8,
    "batch_size": 8,
    "max_iters": 6,
    "warmup_iters": 2,
    "eval_interval": 3,
    "log_interval": 3,
    "device": "cpu",
}


def small_grid(**experiment):
    return {
        "defaults": dict(SMALL),
        "datasets": [{"n_states": 5, "train": 100, "val": 20, "seq_len": 12}],
        "experiments": [{"seeds": [42, 123], **experiment}],
    }


def no_report(monkeypatch):
    """The report's plots are tested in test_report.py; here they would only cost time."""
    monkeypatch.setattr(sweep_run, "write_sweep_report", lambda root, progress: None)


def test_seed_grid_expands_to_the_seeds_runs(tmp_path):
    grid = tomllib.loads((REPO / "grids" / "seed.toml").read_text())
    n_datasets = len(grid["datasets"])
    expected = sum(
        (n_datasets if e["datasets"] == "all" else len(e["datasets"])) * len(e["presets"]) * len(e["seeds"])
        for e in grid["experiments"]
    )
    specs = expand_grid(REPO / "grids" / "seed.toml", tmp_path)
    assert len(specs) == expected == 39
    names = [s.name for s in specs]
    assert len(set(names)) == len(names)
    for name in [
        "MM-10/MM-10-42",
        "MM-100/MM-100-999",
        "MM-1000-sparse-75/MM-1000-sparse-75-123",
        "MM-100-extra/MM-100-extra-c4-s42",
        "MM-100-sparse-75-extra/MM-100-sparse-75-extra-c12-s42",
    ]:
        assert name in names
    by_name = {s.name: s for s in specs}
    c4 = by_name["MM-100-sparse-75-extra/MM-100-sparse-75-extra-c4-s42"]
    assert c4.out_dir == str(tmp_path / "runs" / c4.name)
    assert c4.data_dir == str(tmp_path / "data" / "mm100-sparse-75")
    assert c4.dataset == {
        "n_states": 100,
        "train": 50000,
        "val": 5000,
        "sparsity": 75,
        "seq_len": None,
        "seed": 42,
        "process": "markov",
    }
    cfg = c4.config()
    assert (cfg.one_hot_embed, cfg.mlp_ratio, cfg.n_embd, cfg.grad_accum_steps) == (True, 1, 101, 40)
    assert by_name["MM-10/MM-10-42"].dataset["train"] == 10000


def test_dict_grid_overrides_tags_and_dataset_choice(tmp_path):
    grid = {
        "defaults": {"device": "cpu", "n_embd": 16},
        "datasets": [{"n_states": 5, "train": 100, "val": 20}, {"n_states": 7, "train": 50, "val": 10, "sparsity": 50}],
        "experiments": [
            {"datasets": [1], "presets": ["default", "c2"], "seeds": [1, 2, 3]},
            {"datasets": "all", "seeds": [42], "overrides": {"n_embd": 32, "learning_rate": 1e-3}, "tag": "w32"},
        ],
    }
    specs = expand_grid(grid, tmp_path)
    assert [s.name for s in specs] == (
        ["MM-7-sparse-50/MM-7-sparse-50-1", "MM-7-sparse-50/MM-7-sparse-50-2", "MM-7-sparse-50/MM-7-sparse-50-3"]
        + [f"MM-7-sparse-50-extra/MM-7-sparse-50-extra-c2-s{s}" for s in (1, 2, 3)]
        + ["MM-5/MM-5-42-w32", "MM-7-sparse-50/MM-7-sparse-50-42-w32"]
    )
    first, tagged = specs[0].config(), specs[-1].config()
    assert (first.n_embd, first.device, first.seed, first.mlp_filter) == (16, "cpu", 1, "GELU")
    assert specs[3].config().mlp_filter == "RELU"
    assert (tagged.n_embd, tagged.learning_rate, tagged.out_dir) == (32, 1e-3, str(tmp_path / "runs" / specs[-1].name))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda g: g.update(sweeps=1), "the grid: unknown key 'sweeps'; valid keys: defaults, datasets, experiments"),
        (
            lambda g: g["datasets"][0].update(states=5),
            "the grid: [[datasets]] entry 0 (markov K=5): unknown key 'states'; valid keys: n_st",
        ),
        (
            lambda g: g["experiments"][0].update(preset=["c1"]),
            "the grid: [[experiments]] entry 0: unknown key 'preset'",
        ),
        (lambda g: g["defaults"].update(n_emdb=4), "the grid: [defaults]: unknown key 'n_emdb'; valid keys: data_dir"),
        (
            lambda g: g["experiments"][0].update(overrides={"lr": 1}),
            "the grid: [[experiments]] entry 0: overrides: unknown key 'lr'",
        ),
        (lambda g: g["experiments"][0].update(overrides={"out_dir": "x"}), "out_dir cannot be set"),
        (lambda g: g["defaults"].update(seed=3), "the grid: [defaults]: seed cannot be set here: list the seeds"),
        (
            lambda g: g["experiments"][0].update(presets=["c13"]),
            "the grid: [[experiments]] entry 0: unknown preset 'c13'",
        ),
        (
            lambda g: g["experiments"][0].update(datasets=[1]),
            "the grid: [[experiments]] entry 0: datasets [1]: the grid has datasets 0..0",
        ),
        (lambda g: g["experiments"][0].update(seeds=[]), "expands to no run"),
        (lambda g: g.update(experiments=[]), "expands to no run"),
        (
            lambda g: g["experiments"].append({"seeds": [123]}),
            "the grid: [[experiments]] entry 1, run MM-5/MM-5-123: [[experiments]] entry 0 makes it too; drop the repeat",
        ),
        (
            lambda g: g["datasets"].append({"n_states": 5, "train": 9, "val": 9}),
            "the grid: [[datasets]] entry 1 (markov K=5): entry 0 lives in",
        ),
        (lambda g: g["datasets"][0].pop("val"), "the grid: [[datasets]] entry 0 (markov K=5): lacks val"),
        (
            lambda g: g["defaults"].update(max_iters=-1),
            "the grid: [[experiments]] entry 0, run MM-5/MM-5-42: max_iters must be >= 0",
        ),
        (
            lambda g: g["datasets"][0].update(process="hmmm"),
            "the grid: [[datasets]] entry 0 (hmmm K=5): unknown process 'hmmm'; choose from markov, korder",
        ),
        (
            lambda g: g["datasets"][0].update(order=2),
            "the grid: [[datasets]] entry 0 (markov K=5): unknown key 'order'; valid keys: n_st",
        ),
        (lambda g: g["datasets"][0].pop("n_states"), "the grid: [[datasets]] entry 0 (markov): "),  # no K=None
        (lambda g: g.update(datasets=5), "the grid: [[datasets]] must be a list of dicts, got 5"),
        (lambda g: g.update(datasets=[1]), "the grid: [[datasets]] must be a list of dicts, got [1]"),
        (lambda g: g.update(experiments="x"), "the grid: [[experiments]] must be a list of dicts"),
        (lambda g: g["datasets"][0].update(process=[1]), "unknown process [1]"),
    ],
)
def test_grid_errors_name_the_problem(tmp_path, change, message):
    grid = small_grid()
    change(grid)
    with pytest.raises(NanoMarkovError) as info:
        expand_grid(grid, tmp_path)
    assert message in str(info.value)
    with pytest.raises(NanoMarkovError):
        run_sweep(grid, tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()  # refused before sweep.json (or anything) is written


def test_grid_file_errors(tmp_path):
    (tmp_path / "bad.toml").write_text("[defaults\n")
    with pytest.raises(NanoMarkovError, match="bad.toml is not valid TOML"):
        expand_grid(tmp_path / "bad.toml", tmp_path)
    with pytest.raises(NanoMarkovError, match="cannot read grid"):
        expand_grid(tmp_path / "missing.toml", tmp_path)
    with pytest.raises(NanoMarkovError, match="holds no readable sweep.json"):
        sweep_status(tmp_path)


def test_tiny_grid_end_to_end_then_a_second_sweep_trains_nothing(tmp_path):
    lines = []
    manifest = run_sweep(REPO / "grids" / "tiny.toml", tmp_path, progress=lines.append)
    assert len(manifest["runs"]) == 4
    on_disk = json.loads((tmp_path / "sweep.json").read_text())
    for name, run in on_disk["runs"].items():
        folder = tmp_path / "runs" / name
        assert (run["state"], run["action"], run["iters"]) == ("done", "train", 20), run
        assert json.loads((folder / "done.json").read_text())["iters"] == 20
        assert json.loads((folder / "eval.json").read_text())["cross_entropy"]["excess"] == pytest.approx(run["excess"])
    # The two seeds of each preset were evaluated together once more: agreement is measured.
    assert json.loads((tmp_path / "runs" / "MM-5/MM-5-42" / "eval.json").read_text())["agreement"] is not None
    if manifest["report"] is not None:
        assert (tmp_path / "runs" / "report" / "summary.md").exists()
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/*/*") if p.name in ("ckpt.pt", "eval.json")}
    assert len(stamps) == 8

    again = run_sweep(REPO / "grids" / "tiny.toml", tmp_path, progress=lines.append)
    assert {r["action"] for r in again["runs"].values()} == {"skip"}
    assert {r["state"] for r in again["runs"].values()} == {"done"}
    assert all(not r.get("evaluated") for r in again["runs"].values())
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    rows = sweep_status(tmp_path)
    assert [(r["state"], r["iters"]) for r in rows] == [("done", 20)] * 4
    table = format_status(rows)
    assert "MM-5-extra/MM-5-extra-c6-s123" in table and table.endswith("4 runs: 4 done")


def test_a_run_cut_short_is_resumed_not_restarted(tmp_path, monkeypatch):
    no_report(monkeypatch)
    grid = small_grid(seeds=[42])
    run_sweep(grid, tmp_path, progress=lambda _: None)
    folder = tmp_path / "runs" / "MM-5" / "MM-5-42"
    first_log = (folder / "log.jsonl").read_text()
    assert json.loads(first_log.splitlines()[-1])["iter"] == 6
    grid["defaults"]["max_iters"] = 12  # the grid now asks for more: the run goes on from iter 6
    manifest = run_sweep(grid, tmp_path, progress=lambda _: None)
    assert manifest["runs"]["MM-5/MM-5-42"]["action"] == "resume"
    log = (folder / "log.jsonl").read_text()
    assert log.startswith(first_log)
    evals = [json.loads(line)["iter"] for line in log.splitlines() if json.loads(line)["kind"] == "eval"]
    assert evals == [0, 3, 6, 9, 12]
    assert "resuming at iter 6" in (folder / "training.log").read_text()
    assert torch.load(folder / "ckpt.pt", weights_only=True)["iter"] == 12

    (folder / "done.json").unlink()  # killed after its last checkpoint: finishes without training
    manifest = run_sweep(grid, tmp_path, progress=lambda _: None)
    assert manifest["runs"]["MM-5/MM-5-42"]["action"] == "resume"
    assert json.loads((folder / "done.json").read_text())["iters"] == 12


def test_a_finished_run_made_by_another_config_is_not_taken_for_this_one(tmp_path, monkeypatch):
    no_report(monkeypatch)
    grid = small_grid(seeds=[42])
    run_sweep(grid, tmp_path, progress=lambda _: None)
    grid["defaults"].update(eval_interval=2, device="auto")  # what a resume may change: still this run
    assert run_sweep(grid, tmp_path, progress=lambda _: None)["runs"]["MM-5/MM-5-42"]["state"] == "done"
    grid["defaults"]["learning_rate"] = 1e-3
    run = run_sweep(grid, tmp_path, progress=lambda _: None)["runs"]["MM-5/MM-5-42"]
    assert (run["action"], run["state"]) == ("skip", "failed")
    assert "holds a finished run with another config (learning_rate 0.003 -> 0.001); delete" in run["error"]


def test_parallel_runs_match_one_at_a_time(tmp_path, monkeypatch):
    no_report(monkeypatch)
    one = run_sweep(small_grid(), tmp_path / "one", jobs=1, threads=1, progress=lambda _: None)
    two = run_sweep(small_grid(), tmp_path / "two", jobs=2, threads=1, progress=lambda _: None)
    assert two["jobs"] == 2 and {r["state"] for r in [*one["runs"].values(), *two["runs"].values()]} == {"done"}
    for name in one["runs"]:
        a = torch.load(tmp_path / "one" / "runs" / name / "ckpt.pt", weights_only=True)["model"]
        b = torch.load(tmp_path / "two" / "runs" / name / "ckpt.pt", weights_only=True)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_failing_run_is_recorded_and_the_others_go_on(tmp_path, monkeypatch):
    no_report(monkeypatch)
    grid = small_grid(seeds=[42])
    grid["experiments"].insert(0, {"seeds": [42], "tag": "bad"})
    # What the grid's checks cannot foresee (a full GPU, a dead node): the bad run fails once it trains.
    real_train = sweep_run.train

    def train_failing_the_bad_run(cfg, **kwargs):
        if cfg.out_dir.endswith("-bad"):
            raise NanoMarkovError("one_hot_embed needs one residual dimension per token (a stand-in failure)")
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(sweep_run, "train", train_failing_the_bad_run)
    manifest = run_sweep(grid, tmp_path, progress=lambda _: None)
    bad, good = manifest["runs"]["MM-5/MM-5-42-bad"], manifest["runs"]["MM-5/MM-5-42"]
    assert bad["state"] == "failed" and "one_hot_embed needs one residual dimension per token" in bad["error"]
    assert good["state"] == "done" and (tmp_path / "runs" / "MM-5" / "MM-5-42" / "eval.json").exists()
    assert json.loads((tmp_path / "sweep.json").read_text())["runs"]["MM-5/MM-5-42-bad"]["state"] == "failed"
    rows = {r["name"]: r for r in sweep_status(tmp_path)}
    assert rows["MM-5/MM-5-42-bad"]["state"] == "failed" and rows["MM-5/MM-5-42"]["iters"] == 6
    assert "one_hot_embed" in format_status(list(rows.values()))


def test_dry_run_writes_nothing(tmp_path):
    lines = []
    manifest = run_sweep(small_grid(), tmp_path / "out", dry_run=True, progress=lines.append)
    assert not (tmp_path / "out").exists()
    assert [r["action"] for r in manifest["runs"].values()] == ["train", "train"]
    assert lines[-1] == "2 runs; dry run, nothing written"


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            {"n_states": 100000, "train": 9, "val": 9},
            "[[datasets]] entry 1 (markov K=100000): K = 100000 needs a 100000x100000 float64 matrix",
        ),
        ({"process": "coin", "n_states": 2, "p": 1.5, "train": 9, "val": 9}, "[[datasets]] entry 1 (coin K=2): "),
        ({"n_states": 7, "train": 9, "val": 9, "seq_len": 1}, "[[datasets]] entry 1 (markov K=7): --seq_len must be"),
        ({"n_states": 7, "train": 10**12, "val": 9}, "[[datasets]] entry 1 (markov K=7): the dataset needs 232.8 TiB"),
    ],
)
def test_a_dry_run_refuses_the_datasets_generate_refuses_naming_the_grid_file_and_entry(tmp_path, entry, message):
    grid = small_grid()
    grid["datasets"].append(entry)
    path = tmp_path / "grid.toml"
    path.write_text(toml_text(grid))
    with pytest.raises(NanoMarkovError) as refused:
        run_sweep(path, tmp_path / "out", dry_run=True, progress=print)
    assert str(refused.value).startswith(f"{path}: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.toml"]


def test_a_dry_run_refuses_a_run_train_refuses_with_its_dataset_naming_the_run(tmp_path):
    grid = small_grid(presets=["c6"])  # a one-hot embedding needs n_embd (8) >= vocab_size (K + 1 = 11)
    grid["datasets"][0]["n_states"] = 10
    with pytest.raises(
        NanoMarkovError,
        match=r"^the grid: \[\[experiments\]\] entry 0, run MM-10-extra/MM-10-extra-c6-s42: "
        "one_hot_embed needs one residual dimension per token",
    ):
        run_sweep(grid, tmp_path / "out", dry_run=True, progress=print)


@pytest.mark.parametrize(
    "defaults, named",
    [({"n_embd": 100000, "n_layer": 10}, "n_embd 100000, n_layer 10"), ({"batch_size": 10**8}, "batches of 100000000")],
)
def test_a_dry_run_refuses_a_training_step_that_does_not_fit_as_the_real_sweep_does(tmp_path, defaults, named):
    grid = small_grid()
    grid["defaults"].update(defaults)
    for dry_run in (True, False):
        with pytest.raises(NanoMarkovError) as refused:
            run_sweep(grid, tmp_path / "out", dry_run=dry_run, progress=print)
        assert named in str(refused.value) and "use a smaller --batch_size" in str(refused.value)
        assert str(refused.value).startswith("the grid: [[experiments]] entry 0, run MM-5/MM-5-42: training")
    assert not (tmp_path / "out").exists()


def test_a_grid_of_more_runs_than_a_sweep_takes_is_refused_from_its_lists_lengths(tmp_path, monkeypatch):
    expanded = []
    monkeypatch.setattr(sweep_grid, "_experiment_runs", lambda *args: expanded.append(args))
    grid = small_grid(seeds=list(range(20_000)), presets=["default", "c6", "c1"])
    grid["experiments"].append({"seeds": list(range(50_000)), "tag": "more"})  # 60,000 + 50,000 runs
    with pytest.raises(NanoMarkovError) as refused:
        run_sweep(grid, tmp_path / "out", dry_run=True, progress=print)
    assert str(refused.value).startswith(
        f"the grid makes 110,000 runs (datasets x presets x seeds), more than the {sweep_grid.MAX_GRID_RUNS:,} a sweep"
    )
    assert "split it into several grids" in str(refused.value)
    assert expanded == [] and not (tmp_path / "out").exists()  # counted, never expanded


def test_a_grid_file_too_big_to_parse_quickly_is_refused_unread(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_bytes(b"# " + b"x" * sweep_grid.MAX_GRID_BYTES)
    with pytest.raises(NanoMarkovError, match=r"grid .*grid.toml is 2,097,154 bytes, more than the 2,097,152 read"):
        expand_grid(path, tmp_path)


def test_planning_says_how_it_goes_once_it_takes_a_while(tmp_path, monkeypatch):
    clock = iter(range(0, 1000, 2))  # every look at the clock is 2 s later
    monkeypatch.setattr(sweep_grid.time, "monotonic", lambda: next(clock))
    notes = []
    grid = small_grid(seeds=list(range(6)))
    manifest = run_sweep(grid, tmp_path / "out", dry_run=True, progress=lambda line: None, notes=notes.append)
    assert len(manifest["runs"]) == 6
    assert notes[0] == "checking the grid: 2 runs, 4s"  # nothing before the first 3 s
    assert "looking at the run folders: 2 of 6 runs, 4s" in notes


def toml_text(grid):
    """A grid dict as TOML (the few shapes these tests use: tables of scalars and lists of them)."""

    def value(v):
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    lines = ["[defaults]"] + [f"{k} = {value(v)}" for k, v in grid["defaults"].items()]
    for table in ("datasets", "experiments"):
        for entry in grid[table]:
            lines += ["", f"[[{table}]]"] + [f"{k} = {value(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"


def test_datasets_of_other_processes_get_their_folders_names_and_recipes(tmp_path):
    from nanomarkov.config import dataset_preset, process_recipe
    from nanomarkov.data import generate_dataset

    grid = {
        "datasets": [
            {"n_states": 4, "train": 8, "val": 4, "seq_len": 8, "process": "korder", "order": 2},
            {"n_states": 3, "train": 8, "val": 4, "seq_len": 8, "process": "hmm", "preset": "mess3"},
        ],
        "experiments": [{"presets": ["default", "c2"], "seeds": [5]}],
    }
    specs = expand_grid(grid, tmp_path)
    assert [s.name for s in specs] == [
        "mm4-order2/mm4-order2-5",
        "mm4-order2/mm4-order2-c2-5",
        "mess3/mess3-5",
        "mess3/mess3-c2-5",
    ]
    assert [Path(s.data_dir).name for s in specs] == ["mm4-order2", "mm4-order2", "mess3", "mess3"]
    korder = specs[0].config()
    assert korder.mlp_only is False and korder.max_iters == process_recipe("korder")["max_iters"]
    assert specs[1].config().mlp_filter == "RELU"  # a named preset stays what it is
    # The sweep's default run is the run `nanomarkov train DIR` makes, paths aside.
    generate_dataset(tmp_path / "mess3", 3, 8, 4, seq_len=8, process="hmm", preset="mess3")
    by_hand = dataset_preset("default", tmp_path / "mess3", seed=5)
    paths = ("data_dir", "out_dir", "wandb_run_name")
    assert {k: v for k, v in specs[2].config().to_dict().items() if k not in paths} == {
        k: v for k, v in by_hand.items() if k not in paths
    }


def test_a_datasets_concentration_reaches_generate_and_names_its_folder_where_not_1(tmp_path):
    grid = {
        "datasets": [
            {"n_states": 3, "train": 8, "val": 4, "seq_len": 8, "process": "icl", "alpha": 0.1},
            {"n_states": 3, "train": 8, "val": 4, "seq_len": 8, "process": "icl", "alpha": 1.0},
            {"n_states": 3, "train": 8, "val": 4, "seq_len": 8, "alpha": 0.5},
        ],
        "experiments": [{"seeds": [5]}],
    }
    specs = expand_grid(grid, tmp_path)
    assert [s.name for s in specs] == [
        "icl3-alpha-0.1/icl3-alpha-0.1-5",
        "icl3/icl3-5",
        "mm3-alpha-0.5/mm3-alpha-0.5-5",
    ]
    args, keywords = sweep_grid.dataset_arguments(specs[0].dataset)
    assert (
        keywords["alpha"] == 0.1 and "alpha" not in sweep_grid.dataset_arguments({**specs[1].dataset, "alpha": None})[1]
    )
    grid["datasets"][0]["alpha"] = -1.0
    with pytest.raises(NanoMarkovError, match=r"\[\[datasets\]\] entry 0 \(icl K=3\): --alpha must be"):
        expand_grid(grid, tmp_path)


def test_the_processes_grid_expands(tmp_path):
    specs = expand_grid(REPO / "grids" / "processes.toml", tmp_path)
    assert sorted({Path(s.data_dir).name for s in specs}) == ["icl3", "mess3", "mm10", "mm5-order2"]
    assert len(specs) == 8 and all(s.config().mlp_only == (s.dataset["process"] == "markov") for s in specs)


def test_a_users_own_sweep_json_is_not_taken_for_a_sweep(tmp_path):
    """A sweep's folder is told by what a sweep writes in sweep.json, not by the file's name."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sweep.json").write_text('{"runs": ["mine"]}')
    with pytest.raises(NanoMarkovError, match=r"holds files that are not a sweep \(sweep.json\).*--force"):
        run_sweep(small_grid(), tmp_path / "out", dry_run=True, progress=print)
    assert (tmp_path / "out" / "sweep.json").read_text() == '{"runs": ["mine"]}'


def test_a_process_that_fixes_its_k_needs_no_n_states_and_a_missing_size_is_named_alone(tmp_path):
    grid = {
        "datasets": [{"process": "switching", "train": 8, "val": 4, "seq_len": 8}],
        "experiments": [{"seeds": [5]}],
    }
    (spec,) = expand_grid(grid, tmp_path)
    assert spec.dataset["n_states"] == 2
    grid["datasets"][0].pop("val")
    with pytest.raises(NanoMarkovError) as info:
        expand_grid(grid, tmp_path)
    assert str(info.value).endswith("lacks val; e.g. val = 5000"), info.value
