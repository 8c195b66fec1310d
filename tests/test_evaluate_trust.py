"""What eval, report and export write when the model or the disk fails: strict JSON with the model's
non-finite outputs flagged and never hidden, one line and the previous files intact on a full disk
or an --out that cannot be written."""

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluate import TableModel, train_tiny_runs, true_table

from nanomarkov import evaluate
from nanomarkov.cli import main
from nanomarkov.data import generate_dataset, load_dataset
from nanomarkov.evaluate import Batch, FirstOrderFidelity, evaluate_models, state_log_probs
from nanomarkov.files import PARTIAL_SUFFIX
from nanomarkov.report import write_report

EVAL_FILES = ("eval.json", "eval.md", "learned_matrix.npy", "per_state.npz", "loss_by_position.npz")


def strict_loads(text):
    def refuse(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def leaves(record, prefix=()):
    """{path: value} for every number, string, bool or None in a nested record."""
    if isinstance(record, dict):
        return {p: v for key, item in record.items() for p, v in leaves(item, (*prefix, key)).items()}
    if isinstance(record, list):
        return {p: v for i, item in enumerate(record) for p, v in leaves(item, (*prefix, i)).items()}
    return {prefix: record}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("trust") / "d"
    generate_dataset(path, 4, 300, 60, seq_len=10, seed=3)
    return load_dataset(path)


def test_a_model_with_nan_outputs_is_flagged_and_every_number_measured_from_it_is_null(dataset):
    table = true_table(dataset.chain)
    broken = table.copy()
    broken[0, 1] = math.nan  # the prediction after state 0 only: most positions stay finite
    results = evaluate_models({"good": TableModel(table), "nan": TableModel(broken)}, dataset)
    good, bad = results["good"], results["nan"]
    assert good["outputs_finite"] and good["nonfinite_positions"] == 0
    assert bad["outputs_finite"] is False
    val = np.asarray(dataset.val)
    assert bad["nonfinite_positions"] == int((val[:, :-1] == 0).sum()) and bad["positions"] == val[:, 1:].size
    # Whatever the model changes is null: a number that differs from the good model's was measured from the bad one.
    ignore = {"outputs_finite", "nonfinite_positions", "timing", "arrays", "agreement"}
    good_leaves = leaves({k: v for k, v in good.items() if k not in ignore})
    bad_leaves = leaves({k: v for k, v in bad.items() if k not in ignore})
    differing = {p for p in good_leaves.keys() | bad_leaves.keys() if good_leaves.get(p) != bad_leaves.get(p)}
    assert differing and all(bad_leaves.get(p) is None for p in differing), {p: bad_leaves.get(p) for p in differing}
    for section, key in [
        ("cross_entropy", "val_loss"),
        ("accuracy", "accuracy"),  # an argmax over NaN logits is a number, not a measurement
        ("transition_fidelity", "context_weighted_kl"),
        ("transition_fidelity", "start_kl"),  # the prompt [BOS] is finite, the model is not
        ("markov_property", "max_spread_state"),
    ]:
        assert bad[section][key] is None, (section, key)
    assert bad["cross_entropy"]["true_loss_val"] == good["cross_entropy"]["true_loss_val"]  # theory stays
    pair = bad["agreement"]["pairs"][0]
    assert pair["top1_agreement"] is None and pair["mean_jsd"] is None
    assert bad["agreement"]["top1_agreement"] is None and bad["agreement"]["mean_jsd"] is None


def test_nan_on_one_state_is_not_averaged_away_by_the_per_state_means(dataset):
    """The per-state arrays mark states without contexts with NaN; the means must not skip a NaN the model made."""
    k = dataset.chain.n_states
    tokens = torch.as_tensor(np.asarray(dataset.val, dtype=np.int64))
    logits = torch.as_tensor(true_table(dataset.chain))[tokens[:, :-1]]
    logits[tokens[:, :-1] == 0] = math.nan
    family = FirstOrderFidelity(dataset, ["m"])
    family.update(Batch(tokens, None, {"m": logits}, {"m": state_log_probs(logits, k)}))
    values, _ = family.results("m", {"m": TableModel(true_table(dataset.chain))}, "cpu", {})
    fidelity, markov = values["transition_fidelity"], values["markov_property"]
    for number in (fidelity["context_mean_kl"], fidelity["context_weighted_kl"], markov["mean_spread"]):
        assert math.isnan(number), values
    assert math.isnan(markov["weighted_spread"]) and math.isnan(markov["max_spread"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs of one dataset (seeds 1, 2), and a copy of the first whose ckpt.pt holds a NaN weight."""
    root = tmp_path_factory.mktemp("runs")
    train_tiny_runs(root, root / "runs")
    shutil.copytree(root / "runs" / "run1", root / "runs" / "broken")
    ckpt = torch.load(root / "runs" / "broken" / "ckpt.pt", weights_only=True)
    ckpt["model"]["wte.weight"][0, 0] = math.nan
    torch.save(ckpt, root / "runs" / "broken" / "ckpt.pt")
    return root


def one_error_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_eval_of_a_nan_checkpoint_writes_strict_json_says_so_and_exits_1(runs, capsys):
    folder = runs / "runs" / "broken"
    assert main(["eval", str(folder / "ckpt.pt")]) == 1
    assert "not finite" in one_error_line(capsys)
    assert "NaN or inf in its weights wte.weight" in (folder / "eval.md").read_text()

    record = strict_loads((folder / "eval.json").read_text())
    assert record["outputs_finite"] is False and record["nonfinite_positions"] > 0
    assert record["cross_entropy"]["val_loss"] is None and record["transition_fidelity"]["context_weighted_kl"] is None
    table = (folder / "eval.md").read_text()
    assert "**The model's outputs are not finite**" in table
    assert "| cross-entropy (nats/token) | not finite |" in table and "| accuracy | not finite |" in table

    report = write_report(runs / "runs")
    summary = (runs / "runs" / "report" / "summary.md").read_text()
    assert f"Outputs not finite (NaN or inf: broken weights, nothing measured, left blank): {folder}" in summary
    assert not (folder / "transition_matrix.png").exists()
    assert all(str(folder) != skip["run"] for skip in report["skipped"])


def test_the_eval_table_counts_its_rows_labels_the_floor_and_names_its_timings_in_words(runs, tmp_path, capsys):
    assert main(["eval", str(runs / "runs" / "run1" / "ckpt.pt"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| metric |")]
    assert f"\n{len(rows)} metrics against the exact theory" in out
    record = json.loads((tmp_path / "eval.json").read_text())
    ce = record["cross_entropy"]
    assert any(row.startswith(f"| excess over true on val (nats) | {ce['excess']:.6f} |") for row in rows)
    uniform_pct = 100 * ce["true_loss_val"] / math.log(record["run"]["n_states"])
    assert any(row.startswith("| learnable structure captured: (uniform − val)") for row in rows)
    assert any(row.startswith("| % of optimum") and f"uniform {uniform_pct:.3f} %" in row for row in rows)
    (time_line,) = [line for line in out.splitlines() if line.startswith("time: ")]
    assert "_s" not in time_line and "[" not in time_line and "prompts and summary" in time_line, time_line


@pytest.mark.parametrize("form", ["safetensors", "hf"])
def test_export_of_a_nan_checkpoint_names_its_weights_and_writes_nothing(runs, tmp_path, capsys, form):
    ckpt = runs / "runs" / "broken" / "ckpt.pt"
    assert main(["export", str(ckpt), "--format", form, "--out", str(tmp_path / "out")]) == 2
    error = one_error_line(capsys)
    assert f"{ckpt}: its weights are not finite (NaN or inf in wte.weight" in error
    assert not (tmp_path / "out").exists()


def snapshot(folder, names):
    return {name: (folder / name).read_bytes() for name in names}


def partials(root):
    return sorted(str(p) for p in root.rglob(f"*{PARTIAL_SUFFIX}"))


def full_disk_at(monkeypatch, call):
    """os.fsync (which every atomic write calls once per file) fails with ENOSPC from its `call`-th call on."""
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) >= call:
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("failing_file", range(1, len(EVAL_FILES) + 1))
def test_eval_on_a_full_disk_is_one_line_and_keeps_the_previous_evaluation(
    runs, tmp_path, capsys, monkeypatch, failing_file
):
    out = tmp_path / "ev"
    assert main(["eval", str(runs / "runs" / "run1" / "ckpt.pt"), "--out", str(out)]) == 0
    before = snapshot(out, EVAL_FILES)
    capsys.readouterr()
    full_disk_at(monkeypatch, failing_file)
    assert main(["eval", str(runs / "runs" / "run2" / "ckpt.pt"), "--out", str(out)]) == 2
    assert "No space left on device" in one_error_line(capsys)
    assert snapshot(out, EVAL_FILES) == before and partials(tmp_path) == []


def test_eval_on_a_full_disk_into_a_new_folder_leaves_no_file_nor_folder(runs, tmp_path, capsys, monkeypatch):
    full_disk_at(monkeypatch, 3)
    assert main(["eval", str(runs / "runs" / "run1" / "ckpt.pt"), "--out", str(tmp_path / "new" / "er")]) == 2
    one_error_line(capsys)
    assert not (tmp_path / "new").exists()  # the folders it made, removed again


def test_eval_in_a_run_folder_never_replaces_a_users_file_of_its_names(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs / "runs" / "run1", run, ignore=shutil.ignore_patterns("eval*", "*.np?"))
    (run / "eval.md").write_text("my notes\n")
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    for argv in (["eval", str(run / "ckpt.pt")], ["eval", str(run / "ckpt.pt"), "--out", str(run), "--force"]):
        assert main(argv) == 2
        assert "holds eval.md, which no model evaluation of nanoMarkov wrote" in one_error_line(capsys)
        assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before


def test_eval_out_writes_beside_a_users_files_only_with_force_and_never_over_them(runs, tmp_path, capsys):
    ckpt = str(runs / "runs" / "run1" / "ckpt.pt")
    mine = tmp_path / "d"
    mine.mkdir()
    (mine / "eval.json").write_text("mine\n")  # the user's own file of that name: not an evaluation
    (mine / "notes.txt").write_text("mine\n")
    assert main(["eval", ckpt, "--out", str(mine)]) == 2
    error = one_error_line(capsys)
    assert "holds files that are not a model evaluation (eval.json, notes.txt)" in error and "--force" in error
    assert sorted(p.name for p in mine.iterdir()) == ["eval.json", "notes.txt"]
    assert (mine / "eval.json").read_text() == "mine\n"
    assert main(["eval", ckpt, ckpt.replace("run1", "run2"), "--out", str(mine)]) == 2  # nor a sub-folder made
    one_error_line(capsys)
    assert sorted(p.name for p in mine.iterdir()) == ["eval.json", "notes.txt"]

    assert main(["eval", ckpt, "--out", str(mine), "--force"]) == 2  # --force writes beside their files, not over
    assert "holds files of yours (eval.json)" in one_error_line(capsys)
    assert (mine / "eval.json").read_text() == "mine\n"
    (mine / "eval.json").rename(tmp_path / "moved.json")
    assert main(["eval", ckpt, "--out", str(mine), "--force"]) == 0
    assert "outputs_finite" in json.loads((mine / "eval.json").read_text())
    assert (mine / "notes.txt").read_text() == "mine\n"
    assert main(["eval", ckpt, "--out", str(mine)]) == 0  # now an evaluation: written again unasked


def full_disk_under(monkeypatch, folder_name, call):
    """os.fsync fails with ENOSPC from the `call`-th file in a folder named `folder_name` on."""
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).parent.name == folder_name:
            calls.append(fd)
            if len(calls) >= call:
                raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("failing_file", [1, 2, 3])
def test_report_on_a_full_disk_is_one_line_and_keeps_the_previous_report(
    runs, tmp_path, capsys, monkeypatch, failing_file
):
    root = tmp_path / "runs"
    shutil.copytree(runs / "runs", root, ignore=shutil.ignore_patterns("eval.*", "report"))
    assert main(["report", str(root)]) == 0
    files = ["report/summary.md", "report/summary.csv", "report/comparison.png"]
    before = snapshot(root, files)
    assert main(["eval", str(root / "run1" / "ckpt.pt")]) == 0  # the next report differs in every file
    capsys.readouterr()
    full_disk_under(monkeypatch, "report", failing_file)
    assert main(["report", str(root)]) == 2
    assert "No space left on device" in one_error_line(capsys)
    assert snapshot(root, files) == before and partials(root) == []


def test_a_run_plot_on_a_full_disk_is_skipped_and_keeps_the_previous_plot(runs, tmp_path, capsys, monkeypatch):
    root = tmp_path / "runs"
    shutil.copytree(runs / "runs", root, ignore=shutil.ignore_patterns("eval.*", "report"))
    assert main(["report", str(root)]) == 0
    before = snapshot(root / "run1", ["learning_curve.png"])
    assert main(["eval", str(root / "run1" / "ckpt.pt")]) == 0  # its curve gains the bigram baseline
    capsys.readouterr()
    full_disk_under(monkeypatch, "run1", 1)
    assert main(["report", str(root)]) == 0  # one run's plots must not sink the report
    assert "learning_curve.png: cannot write the plot" in capsys.readouterr().err
    assert snapshot(root / "run1", ["learning_curve.png"]) == before and partials(root) == []


def test_eval_json_is_strict_even_where_a_non_finite_number_is_not_nulled(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "without_model_numbers", lambda result: result)
    assert main(["eval", str(runs / "runs" / "broken" / "ckpt.pt"), "--out", str(tmp_path)]) == 1
    capsys.readouterr()
    record = strict_loads((tmp_path / "eval.json").read_text())
    assert record["outputs_finite"] is False and record["cross_entropy"]["val_loss"] is None


def test_export_on_a_full_disk_keeps_the_previous_export_whole(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "export"
    assert main(["export", str(runs / "runs" / "run1" / "ckpt.pt"), "--out", str(out)]) == 0
    before = snapshot(out, ["model.safetensors", "config.json"])
    capsys.readouterr()
    full_disk_at(monkeypatch, 2)  # the weights are on disk, the config is not: neither may replace the old
    assert main(["export", str(runs / "runs" / "run2" / "ckpt.pt"), "--out", str(out)]) == 2
    assert "No space left on device" in one_error_line(capsys)
    assert snapshot(out, ["model.safetensors", "config.json"]) == before and partials(tmp_path) == []


@pytest.mark.parametrize("verb", ["eval", "export"])
def test_out_naming_an_existing_file_or_a_path_through_one_is_one_line_and_exit_2(runs, tmp_path, capsys, verb):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    for out in (blocker, blocker / "sub"):
        assert main([verb, str(runs / "runs" / "run1" / "ckpt.pt"), "--out", str(out)]) == 2
        assert "cannot write the" in one_error_line(capsys)
    assert blocker.read_text() == "keep me"
