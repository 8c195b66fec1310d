"""The seed's evaluation commands, run as a user runs them: from a fresh folder, package not on PYTHONPATH."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanomarkov.cli import main

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
TINY = ["--n_embd=8", "--batch_size=8", "--max_iters=6", "--warmup_iters=2", "--eval_interval=3", "--device=cpu"]


def run(args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHON"] = sys.executable  # the interpreter run_full_evaluation.sh calls
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A fresh folder as the seed's workflow leaves it: data/mm5 with three runs, data/mm6-sparse-50 with one."""
    folder = tmp_path_factory.mktemp("user")
    before = Path.cwd()
    os.chdir(folder)
    try:
        assert main(["generate", "5", "--train", "100", "--val", "20", "--seq_len", "12"]) == 0
        assert main(["generate", "6", "--train", "100", "--val", "20", "--seq_len", "12", "--sparsity", "50"]) == 0
        assert main(["train", "5", "--seeds", "42", "123", "999", *TINY]) == 0
        assert main(["train", "6", "7", "--sparse", "50", *TINY]) == 0
    finally:
        os.chdir(before)
    return folder


def test_mm_eval_one_checkpoint(trained):
    run_dir = trained / "trainings/MM/MM-5/MM-5-42"
    result = run([sys.executable, SCRIPTS / "mm_eval.py", "--ckpt_path", "trainings/MM/MM-5/MM-5-42/ckpt.pt"], trained)
    assert result.returncode == 0, result.stderr
    assert "# Evaluation of trainings/MM/MM-5/MM-5-42/ckpt.pt" in result.stdout and "| perplexity |" in result.stdout
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert evaluation["agreement"] is None and (run_dir / "eval.md").exists()
    assert f"{evaluation['cross_entropy']['val_loss']:.6f}" in result.stdout


def test_mm_eval_seeds_summary_measures_agreement(trained):
    result = run([sys.executable, SCRIPTS / "mm_eval.py", "5", "--seeds", "42", "123", "999", "--summary"], trained)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == [f"trainings/MM/MM-5/MM-5-{s}" for s in (42, 123, 999)]
    agreement = json.loads((trained / "trainings/MM/MM-5/MM-5-123/eval.json").read_text())["agreement"]
    assert agreement is not None
    assert lines[-1] == (
        f"agreement across seeds: top-1 {100 * agreement['top1_agreement']:.2f} %, mean JSD {agreement['mean_jsd']:.6f}"
    )
    sparse = run([sys.executable, SCRIPTS / "mm_eval.py", "6", "--seeds", "7", "--sparse", "50", "--summary"], trained)
    assert sparse.returncode == 0, sparse.stderr
    assert "trainings/MM/MM-6-sparse-50/MM-6-sparse-50-7" in sparse.stdout and "n/a (one run)" in sparse.stdout


def test_mm_eval_transition_matrix(trained):
    run_dir = trained / "trainings/MM/MM-5/MM-5-999"
    result = run(
        [
            sys.executable,
            SCRIPTS / "mm_eval_transition_matrix.py",
            "--ckpt_path",
            "trainings/MM/MM-5/MM-5-999/ckpt.pt",
            "--output",
            "m45.json",
        ],
        trained,
    )
    assert result.returncode == 0, result.stderr
    part = json.loads((trained / "m45.json").read_text())
    assert f"{part['transition_fidelity']['mean_kl']:.6f}" in result.stdout and "worst states" in result.stdout
    learned = np.load(run_dir / "learned_matrix.npy")
    assert learned.shape == (5, 5) and np.allclose(learned.sum(axis=1), 1)
    assert (run_dir / "transition_matrix.png").exists() or "no transition_matrix.png" in result.stdout


def test_aggregate_metrics_and_full_evaluation(trained):
    pytest.importorskip("nanomarkov.report")  # and with it matplotlib
    result = run([sys.executable, SCRIPTS / "aggregate_metrics.py", "--output", "all.csv"], trained)
    assert result.returncode == 0, result.stderr
    assert "| MM-5 |" in result.stdout and (trained / "trainings/MM/report/summary.md").exists()
    assert (trained / "all.csv").read_text().count("\n") >= 3  # header, MM-5, MM-6-sparse-50
    full = run(["bash", SCRIPTS / "run_full_evaluation.sh", "6-sparse-50", "7"], trained)
    assert full.returncode == 0, full.stderr
    assert "# Evaluation of trainings/MM/MM-6-sparse-50/MM-6-sparse-50-7/ckpt.pt" in full.stdout
    assert (trained / "trainings/MM/MM-6-sparse-50/report/summary.csv").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["mm_eval.py", "5", "--seeds", "41"],
            "no checkpoint at trainings/MM/MM-5/MM-5-41/ckpt.pt; train it with: nanomarkov train 5 41",
        ),
        (
            ["mm_eval.py", "c4", "--sparse", "75"],
            "MM-100-sparse-75-extra-c4-s42/ckpt.pt; train it with: nanomarkov train 100 42 --sparse 75 --preset c4",
        ),
        (["mm_eval.py", "five"], "chain id must look like 100"),
        (["mm_eval.py", "--frob"], "unrecognized arguments: --frob"),
        (["mm_eval_transition_matrix.py"], "the following arguments are required: --ckpt_path"),
        (["aggregate_metrics.py", "nowhere"], "error: nowhere"),  # report.py words the rest
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = run([sys.executable, SCRIPTS / args[0], *args[1:]], tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr


def test_full_evaluation_without_a_run_fails_cleanly(tmp_path):
    usage = run(["bash", SCRIPTS / "run_full_evaluation.sh"], tmp_path)
    assert usage.returncode == 2 and usage.stderr.startswith("error: usage:")
    missing = run(["bash", SCRIPTS / "run_full_evaluation.sh", "100", "42"], tmp_path)
    assert missing.returncode == 2 and "no checkpoint" not in missing.stdout
    assert missing.stderr.startswith("error: trainings/MM/MM-100/MM-100-42/ckpt.pt: no checkpoint there")
