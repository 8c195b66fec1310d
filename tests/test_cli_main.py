"""cli.main's guard: seeds checked at parse time, and a reader that leaves early (`| head -1`); --version; the
commands that need no model never import torch."""

import importlib.metadata
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from nanomarkov.cli import EXIT_CLOSED_STDOUT, MAX_SEED, main
from nanomarkov.data import estimate_text, generate_dataset
from nanomarkov.progress import stopped_line


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "5", "--seed", "-1"],
        ["generate", "5", "--seed", str(MAX_SEED + 1)],
        ["generate", "5", "--seed", "1e3"],
        ["train", "5", "-1"],
        ["train", "5", "--seeds", "1", "-2"],
        ["train", "5", "--seeds", str(2**70)],
        ["import-hmmlearn", "model.pkl", "--trust-pickle", "--out", "x", "--seed", "-7"],
    ],
)
def test_bad_seeds_are_refused_at_parse_time(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert f"a seed is an integer in [0, {MAX_SEED}]" in err
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_the_largest_seed_is_accepted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "3", "--train", "4", "--val", "2", "--seq_len", "6", "--seed", str(MAX_SEED)]) == 0


@pytest.mark.parametrize("argv", [["theory", "DATA"], ["theory", "DATA", "--json"]])
def test_a_closed_stdout_exits_quietly(tmp_path, argv):
    generate_dataset(tmp_path / "d", 3, 4, 2, seq_len=8)
    command = [sys.executable, "-m", "nanomarkov", *[str(tmp_path / "d") if a == "DATA" else a for a in argv]]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # the reader is gone before the first byte is written
    _, err = child.communicate(timeout=120)
    assert err.decode() == ""
    assert child.returncode == EXIT_CLOSED_STDOUT


def test_sigterm_during_generate_leaves_no_build_and_no_lock(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanomarkov", "generate", "5", "--train", "5000000", "--seq_len", "64", "--out", "g/i"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list((tmp_path / "g").glob(".i.partial-*/train.bin")):  # writing has begun
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and err.strip() == stopped_line(signal.SIGTERM)
    assert not (tmp_path / "g").exists()  # the unfinished build, the lock and the folders it made are gone


# Run in a fresh interpreter (this one has torch loaded by other tests): each command, then whether torch came in.
WITHOUT_TORCH = """
import sys
from nanomarkov.cli import main
data = sys.argv[1]
for argv in (
    ["--help"],
    ["--version"],
    ["generate", "3", "--train", "4", "--val", "2", "--seq_len", "6", "--out", data],
    ["theory", data],
):
    assert main(argv) == 0, argv
    loaded = sorted(name for name in sys.modules if name.startswith("nanomarkov"))
    assert "torch" not in sys.modules, f"{argv} imported torch; package modules loaded: {loaded}"
"""


def test_help_version_generate_and_theory_never_import_torch(tmp_path):
    child = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, str(tmp_path / "d")], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr
    assert (tmp_path / "d" / "meta.json").is_file()


@pytest.mark.parametrize(
    "verb",
    [
        ["train", "5"],
        ["eval", "ckpt.pt"],
        ["dynamics", "run"],
        ["reproduce", "shai2024-mess3", "--out", "r7"],
        ["tune", "d", "--out", "t"],
    ],
)
@pytest.mark.parametrize("threads", ["0", "-1", "two", "1.5"])
def test_threads_are_auto_or_a_positive_integer(tmp_path, monkeypatch, capsys, verb, threads):
    monkeypatch.chdir(tmp_path)
    assert main([*verb, "--threads", threads]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"threads are 'auto' or an integer >= 1, got {threads!r}" in err
    assert not any(tmp_path.iterdir())  # refused before anything is written


@pytest.mark.parametrize("verb", [["sweep", "g.toml", "--out", "s"], ["reproduce", "shai2024-mess3", "--out", "r7"]])
@pytest.mark.parametrize("jobs", ["0", "-1", "two"])
def test_jobs_are_a_positive_integer(tmp_path, monkeypatch, capsys, verb, jobs):
    monkeypatch.chdir(tmp_path)
    assert main([*verb, "--jobs", jobs]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"jobs are an integer >= 1, got {jobs!r}" in err
    assert not any(tmp_path.iterdir())


def test_a_sweep_out_that_is_a_file_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    grid = tmp_path / "g.toml"
    grid.write_text("[[datasets]]\nn_states = 3\ntrain = 4\nval = 2\n[[experiments]]\nseeds = [1]\n")
    assert main(["sweep", str(grid), "--out", "afile"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "afile: a file, not a folder" in err
    assert (tmp_path / "afile").read_text() == "x"


def test_version_prints_the_packages_version_and_exits_0(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"nanomarkov {importlib.metadata.version('nanomarkov')}\n"


def test_the_version_is_written_once_pyproject_reads_it_from_the_package():
    with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
        pyproject = tomllib.load(f)
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "nanomarkov.version.VERSION"}


def test_an_estimated_theory_number_prints_with_its_error_an_exact_one_without():
    theory = {"optimal_loss": 0.52608, "optimal_loss_se": 0.0021, "entropy_rate": 0.497782, "entropy_rate_se": 0.0}
    assert estimate_text(theory, "optimal_loss") == "0.526080±0.002"  # generate's and train's lines, theory's table
    assert (
        estimate_text(theory, "entropy_rate") == estimate_text({"entropy_rate": 0.497782}, "entropy_rate") == "0.497782"
    )
