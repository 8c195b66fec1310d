"""report: run discovery, seed families, mean ± sd over seeds, the CSV, and that every plot is a real PNG.

One set of tiny real runs (K=4, 20 iterations each) is trained once for the module:
  runs/a/wide-1, runs/wide-2   n_embd 16, seeds 1 and 2, evaluated together (-> agreement)
  runs/b/c/narrow-3            n_embd 8, trained but never evaluated
plus folders that are not runs (notes, an eval output without a checkpoint, an empty one).
"""

import csv
import json
import math

import matplotlib.image
import numpy as np
import pytest
import torch

from nanomarkov import NanoMarkovError
from nanomarkov.config import TrainConfig
from nanomarkov.data import generate_dataset
from nanomarkov.evaluate import evaluate_checkpoints
from nanomarkov.report import find_runs, format_summary, load_run, write_report
from nanomarkov.train import train

N_STATES = 4
RUNS = {"a/wide-1": (16, 1), "wide-2": (16, 2), "b/c/narrow-3": (8, 3)}
EVAL_METRICS = {
    "val_loss": ("cross_entropy", "val_loss"),
    "excess": ("cross_entropy", "excess"),
    "learnable_fraction": ("cross_entropy", "learnable_fraction"),
    "accuracy": ("accuracy", "accuracy"),
    "mean_kl": ("transition_fidelity", "mean_kl"),
    "mean_spread": ("markov_property", "mean_spread"),
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    generate_dataset(base / "data", N_STATES, 200, 40, seq_len=12)
    root = base / "runs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # models this small run slower on a busy machine with more threads
    try:
        for rel, (n_embd, seed) in RUNS.items():
            cfg = TrainConfig(
                data_dir=str(base / "data"),
                out_dir=str(root / rel),
                n_layer=1,
                n_head=2,
                n_embd=n_embd,
                max_iters=20,
                warmup_iters=5,
                eval_interval=5,
                log_interval=5,
                batch_size=8,
                device="cpu",
                seed=seed,
            )
            train(cfg, show_progress=False)
        evaluate_checkpoints([root / "a/wide-1/ckpt.pt", root / "wide-2/ckpt.pt"])
    finally:
        torch.set_num_threads(threads)
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a run")
    (root / "empty").mkdir()
    (root / "eval-out").mkdir()  # what `eval --out` leaves: results, no checkpoint
    (root / "eval-out" / "eval.json").write_text((root / "wide-2" / "eval.json").read_text())
    return root, write_report(root)


def _rows(result):
    return {row["family"]: row for row in result["summary"]}


def test_finds_run_folders_at_any_depth_and_nothing_else(report):
    root, result = report
    expected = sorted(root / rel for rel in RUNS)
    assert find_runs(root) == expected
    assert result["runs"] == [str(p) for p in expected]
    assert find_runs(root / "a" / "wide-1") == [root / "a" / "wide-1"]  # a run folder given directly


def test_a_checkpoint_alone_marks_a_run_too(tmp_path):
    for rel in ("crashed/ckpt.pt", "x/y/finished/done.json", "eval-only/eval.json", "half/ckpt.pt.partial"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    assert find_runs(tmp_path) == [tmp_path / "crashed", tmp_path / "x/y/finished"]


def test_seeds_of_one_config_form_one_family_other_configs_another(report):
    root, result = report
    rows = _rows(result)
    assert set(rows) == {"wide", "narrow"}
    assert sorted(rows["wide"]["runs"]) == ["a/wide-1", "wide-2"] and sorted(rows["wide"]["seeds"]) == [1, 2]
    assert rows["narrow"]["runs"] == ["b/c/narrow-3"] and rows["narrow"]["n_runs"] == 1


def test_mean_and_sd_over_seeds_match_numpy_on_the_eval_files(report):
    root, result = report
    row = _rows(result)["wide"]
    evals = [json.loads((root / rel / "eval.json").read_text()) for rel in ("a/wide-1", "wide-2")]
    for metric, (section, key) in EVAL_METRICS.items():
        values = np.array([e[section][key] for e in evals])
        assert values[0] != values[1], metric  # else the sd below checks nothing
        assert row[f"{metric}_mean"] == pytest.approx(np.mean(values), rel=1e-12), metric
        assert row[f"{metric}_sd"] == pytest.approx(np.std(values, ddof=1), rel=1e-12), metric
    assert row["optimal_loss"] == evals[0]["cross_entropy"]["optimal_loss"]
    # Both seeds were evaluated together: one agreement measurement, stored twice, counted once.
    assert row["agreement_mean"] == evals[0]["agreement"]["top1_agreement"] and row["agreement_sd"] is None
    single = _rows(result)["narrow"]
    assert single["excess_sd"] is None and single["agreement_mean"] is None
    table = format_summary(result["summary"]).splitlines()
    assert f"{row['excess_mean']:.6f} ± {row['excess_sd']:.6f}" in next(line for line in table if "| wide |" in line)
    assert "±" not in next(line for line in table if "| narrow |" in line)


def test_every_png_is_a_real_readable_image(report):
    root, result = report
    pngs = [p for p in result["files"] if p.endswith(".png")]
    # four plots per evaluated run (with the loss by position), the learning curve alone for the other, one comparison
    assert len(pngs) == 2 * 4 + 1 + 1
    assert str(root / "report" / "comparison.png") in pngs
    for path in pngs:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
        image = matplotlib.image.imread(path)
        height, width = image.shape[:2]
        assert 300 <= height <= 3000 and 300 <= width <= 3000 and image.shape[2] in (3, 4), (path, image.shape)
        assert image.std() > 0.01, path  # not a blank canvas


def test_csv_parses_and_matches_the_summary_rows(report):
    root, result = report
    with open(root / "report" / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [line["family"] for line in table] == [row["family"] for row in result["summary"]]
    for line, row in zip(table, result["summary"]):
        for column, text in line.items():
            value = row[column]
            if value is None:
                assert text == "", column
            elif isinstance(value, float):
                assert float(text) == value, column
            elif isinstance(value, list):
                assert text.split() == [str(v) for v in value], column
            else:
                assert text == str(value), column
    assert {"excess_mean", "excess_sd", "optimal_loss", "true_loss_val_mean"} <= set(table[0])
    assert (root / "report" / "summary.md").read_text().count("| wide |") == 1


def test_run_without_eval_still_gets_its_curve_and_a_row(report):
    root, result = report
    folder = root / "b/c/narrow-3"
    assert (folder / "learning_curve.png").is_file() and not (folder / "transition_matrix.png").exists()
    assert result["missing_eval"] == [str(folder)]
    row = _rows(result)["narrow"]
    done = json.loads((folder / "done.json").read_text())
    assert row["n_evaluated"] == 0 and row["val_loss_mean"] == done["val_loss"]
    uniform = math.log(N_STATES)  # the share captured of the way from uniform to the floor, from done.json alone
    captured = (uniform - done["val_loss"]) / (uniform - done["true_loss_val"])
    assert row["excess_mean"] == done["excess"] and row["learnable_fraction_mean"] == pytest.approx(captured)
    assert all(row[f"{m}_mean"] is None for m in ("accuracy", "mean_kl", "mean_spread", "agreement"))
    line = next(line for line in format_summary(result["summary"]).splitlines() if "| narrow |" in line)
    assert "|  |" in line and "nan" not in line.lower()
    assert not any(math.isnan(v) for v in row.values() if isinstance(v, float))


def test_empty_or_missing_root_is_bad_input(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(NanoMarkovError, match="no training runs under .*nanomarkov train 10"):
        write_report(tmp_path)
    with pytest.raises(NanoMarkovError, match="no such folder"):
        write_report(tmp_path / "absent")


@pytest.mark.parametrize("content", ["{half a rec", "[1, 2]"])
def test_a_damaged_run_file_is_named_with_the_fix_and_a_missing_one_is_none(tmp_path, content):
    (tmp_path / "done.json").write_text(content)
    with pytest.raises(NanoMarkovError, match="done.json.*delete it and rerun the command that writes it"):
        load_run(tmp_path)
    (tmp_path / "done.json").unlink()
    run = load_run(tmp_path)
    assert run["done"] is None and run["eval"] is None and run["config"] == {}
