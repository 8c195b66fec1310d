"""The command line: the seed's commands, the theory table, one-line errors with exit 2."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanomarkov.cli import expand_home, main
from nanomarkov.data import load_dataset

REPO = Path(__file__).resolve().parent.parent


def run(args, cwd):
    """A command as a new user types it, in a fresh directory, with the package not on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120)


def test_seed_generate_commands_and_theory_script_from_a_fresh_directory(tmp_path):
    small = run([str(REPO / "scripts" / "mm_generate.py"), "10", "--train", "300", "--val", "40"], tmp_path)
    assert small.returncode == 0, small.stderr
    sparse = run(
        [str(REPO / "scripts" / "mm_generate.py"), "100", "--train", "50", "--val", "10", "--sparsity", "75"], tmp_path
    )
    assert sparse.returncode == 0, sparse.stderr
    assert load_dataset(tmp_path / "data" / "mm10").seq_len == 128
    sparse_data = load_dataset(tmp_path / "data" / "mm100-sparse-75")
    assert sparse_data.seq_len == 256 and np.all((sparse_data.chain.transmat > 0).sum(axis=1) == 25)
    table = run([str(REPO / "calculate_theoretical_minimums.py")], tmp_path)
    assert table.returncode == 0, table.stderr
    assert "data/mm10 " in table.stdout and "data/mm100-sparse-75" in table.stdout


def test_console_script_is_installed(tmp_path):
    exe = shutil.which("nanomarkov", path=str(Path(sys.executable).parent))
    assert exe, "the package's console script is not installed next to this python"
    result = subprocess.run(
        [exe, "generate", "3", "--train", "5", "--val", "5", "--out", "d"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "d" / "meta.json").exists()


def test_theory_numbers_agree_with_the_chain_and_json(tmp_path, capsys):
    assert main(["generate", "4", "--train", "20", "--val", "30", "--seq_len", "9", "--out", str(tmp_path / "d")]) == 0
    capsys.readouterr()
    assert main(["theory", str(tmp_path / "d"), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    dataset = load_dataset(tmp_path / "d")
    chain = dataset.chain
    assert row["optimal_loss"] == pytest.approx(chain.optimal_loss(9), rel=1e-12)
    assert row["true_loss_val"] == pytest.approx(chain.true_loss(np.asarray(dataset.val)), rel=1e-12)
    assert row["uniform_loss"] == pytest.approx(np.log(4))
    assert main(["theory", str(tmp_path / "d")]) == 0
    table = capsys.readouterr().out
    assert f"{row['optimal_loss']:.6f}" in table and f"{row['true_loss_val']:.6f}" in table
    assert "±" not in table.splitlines()[1] and table.splitlines()[1].split()[1] == "markov"  # exact, first-order


def test_theory_table_gives_an_estimate_with_its_error(tmp_path, capsys):
    assert (
        main(
            [
                "generate",
                "3",
                "--process",
                "icl",
                "--train",
                "20",
                "--val",
                "10",
                "--seq_len",
                "9",
                "--out",
                str(tmp_path / "icl"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["theory", str(tmp_path / "icl"), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert main(["theory", str(tmp_path / "icl")]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert f"{row['optimal_loss']:.6f}±{row['optimal_loss_se']:.1g}" in line and " icl " in line


def one_line_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "1"], "K must be"),
        (["generate", "70000", "--dtype", "uint16"], "uint32"),
        (["generate", "5", "--sparsity", "100"], "--sparsity"),
        (["generate", "5", "--sparsity", "-5"], "--sparsity"),
        (["generate", "5", "--train", "0"], "--train"),
        (["generate", "5", "--val", "-1"], "--val"),
        (["generate", "5", "--seq_len", "1"], "--seq_len"),
        (["generate", "five"], "invalid int value"),
        (["frobnicate"], "invalid choice"),
        (["theory"], "required"),
        (["train", "data/mess3"], "data/mess3 is no dataset folder, config file or chain id"),
        (["train", "100-sparse-x"], "make the dataset first with nanomarkov generate"),
        (["train", "100", "--snapshot_every", "-5"], "snapshot_every must be >= 0, got -5"),
        (["train", "100", "--snapshot_every", "6001"], "snapshot_every (6001) is more than max_iters (6000)"),
        (["train", "100", "--attn_only=True"], "attn_only and mlp_only together"),  # the recipe is MLP-only
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert message in one_line_error(capsys, argv)
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("meta.json"))


def test_file_errors_are_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "cannot write" in one_line_error(capsys, ["generate", "3", "--out", str(tmp_path / "file" / "d")])
    (tmp_path / "empty").mkdir()
    assert "no meta.json" in one_line_error(capsys, ["theory", str(tmp_path / "empty")])
    d = str(tmp_path / "d")
    assert main(["generate", "3", "--train", "10", "--val", "10", "--out", d]) == 0
    before = (tmp_path / "d" / "meta.json").read_text()
    assert "--force" in one_line_error(capsys, ["generate", "3", "--train", "11", "--val", "10", "--out", d])
    assert (tmp_path / "d" / "meta.json").read_text() == before
    with open(tmp_path / "d" / "val.bin", "r+b") as f:
        f.truncate(10)
    assert "val.bin" in one_line_error(capsys, ["theory", d])
    assert main(["generate", "3", "--train", "11", "--val", "10", "--out", d, "--force"]) == 0
    assert load_dataset(d).meta["train_sequences"] == 11


TINY_TRAIN = [
    "--max_iters=6",
    "--warmup_iters=2",
    "--eval_interval=3",
    "--log_interval=3",
    "--n_embd=8",
    "--device=cpu",
]


def test_train_by_chain_id_writes_the_run_folder_and_refuses_to_overwrite(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "5", "--train", "40", "--val", "8", "--seq_len", "12"]) == 0
    assert main(["train", "5", "7", *TINY_TRAIN]) == 0
    run_dir = tmp_path / "trainings" / "MM" / "MM-5" / "MM-5-7"
    done = json.loads((run_dir / "done.json").read_text())
    assert done["status"] == "done" and done["iters"] == 6
    config = json.loads((run_dir / "config.json").read_text())
    assert config["seed"] == 7 and config["dataset_sha256"] == load_dataset("data/mm5").meta["sha256"]
    # --max_iters alone: the decay ends with the run (the recipe's lr_decay_iters is 600), as the first line says.
    assert config["lr_decay_iters"] == 6
    first = (run_dir / "training.log").read_text().splitlines()[0]
    assert "warm-up 2 iters to 0.003, cosine decay until iter 6 to min_lr 3e-05" in first
    capsys.readouterr()
    assert "--resume" in one_line_error(capsys, ["train", "5", "7", *TINY_TRAIN])
    assert main(["train", "5", "7", *TINY_TRAIN, "--max_iters=9", "--resume"]) == 0
    assert json.loads((run_dir / "done.json").read_text())["iters"] == 9
    assert json.loads((run_dir / "config.json").read_text())["lr_decay_iters"] == 6  # resuming keeps the schedule
    assert "(held there for the last 3 of 9 iters)" in (run_dir / "training.log").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "33"], "nanomarkov generate 33 --train 50000 --val 5000"),
        (["train", "5", "--n_emdb=3"], "did you mean 'n_embd'"),
        (["train", "5", "--max_iters", "3"], "expected --key=value"),
        (["train", "5", "--max_iters=three"], "max_iters must be an integer"),
        (["train", "5", "--preset", "c99"], "unknown preset"),
        (["train", "5", "1", "--seeds", "2", "3"], "either SEED or --seeds"),
        (["train", "missing.py"], "cannot read config file"),
    ],
)
def test_train_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert message in one_line_error(capsys, argv)


def test_seed_training_commands_from_a_fresh_directory(tmp_path):
    assert run([str(REPO / "scripts" / "mm_generate.py"), "5", "--train", "40", "--val", "8"], tmp_path).returncode == 0
    shell = subprocess.run(
        [str(REPO / "train_mm.sh"), "5", "3", *TINY_TRAIN],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert shell.returncode == 0, shell.stderr
    assert (tmp_path / "trainings" / "MM" / "MM-5" / "MM-5-3" / "done.json").exists()
    config = run([str(REPO / "configs" / "mm_config.py"), "5", "11"], tmp_path)
    assert config.returncode == 0, config.stderr
    (tmp_path / "cfg.py").write_text(config.stdout)
    trained = run(
        [str(REPO / "train_mm.py"), "cfg.py", "--grad_accum_steps=1", "--out_dir=runs/cfg", *TINY_TRAIN], tmp_path
    )
    assert trained.returncode == 0, trained.stderr
    assert json.loads((tmp_path / "runs" / "cfg" / "config.json").read_text())["seed"] == 11


def test_demo_generates_trains_and_prints_the_loss_against_the_optimum(tmp_path):
    result = run(["-m", "nanomarkov", "demo", "--max_iters=30", "--warmup_iters=5", "--eval_interval=15"], tmp_path)
    assert result.returncode == 0, result.stderr
    done = json.loads((tmp_path / "trainings" / "MM" / "MM-10" / "MM-10-42" / "done.json").read_text())
    assert f"val loss      {done['val_loss']:.6f}" in result.stdout
    assert f"optimal loss  {done['optimal_loss']:.6f}" in result.stdout
    captured = (math.log(10) - done["val_loss"]) / (math.log(10) - done["true_loss_val"])  # uniform 0, floor 1
    assert f"excess        {done['excess']:+.6f}  nats" in result.stdout
    assert f"captured      {100 * captured:.1f} %  of the learnable structure" in result.stdout
    assert "six metrics" not in result.stdout and "_s[" not in result.stdout
    # Each kind of line a newcomer meets is said in words once: the training lines, the baselines, the seed's score.
    assert "`iter N: train loss` is the mean loss (nats/token) of the training batches since" in result.stdout
    evals = [line for line in result.stdout.splitlines() if line.startswith("eval iter ")]
    assert "; no training step yet; " in evals[0] and all("; train loss since the last eval " in e for e in evals[1:])
    assert "bigram (next-token counts on train) " in result.stdout
    assert "flatters" not in result.stdout and "the row above is the headline" in result.stdout
    assert "Markov spread: how much the prediction after a state changes with the states before it" in result.stdout
    assert load_dataset(tmp_path / "data" / "mm10").meta["train_sequences"] == 10000
    run_dir = tmp_path / "trainings" / "MM" / "MM-10" / "MM-10-42"
    record = json.loads((run_dir / "eval.json").read_text())
    assert f"| cross-entropy (nats/token) | {record['cross_entropy']['val_loss']:.6f} |" in result.stdout
    for plot in ("learning_curve.png", "transition_matrix.png", "per_state_kl.png", "loss_by_position.png"):
        assert (run_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(
            Path("trainings") / "MM" / "MM-10" / "MM-10-42" / plot
        ) in result.stdout


def test_wandb_without_wandb_installed_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here; this checks the message users get without it")
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "5", "--train", "40", "--val", "8", "--seq_len", "12"]) == 0
    assert "pip install wandb" in one_line_error(capsys, ["train", "5", *TINY_TRAIN, "--wandb_log=True"])
    assert not (tmp_path / "trainings").exists()  # refused before anything was written


def folder_of_the_users(folder):
    """A folder holding the user's own files, named as nanoMarkov's are; returns {path: bytes}."""
    folder.mkdir(parents=True)
    files = {"config.json": b'{"mine": 1}\n', "training.log": b"my notes\n", "log.jsonl": b"{}\n", "x.txt": b"x"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {folder / name: data for name, data in files.items()}


@pytest.mark.parametrize(
    "verb, kind",
    [
        (["train", "DATA", *TINY_TRAIN, "--out_dir=OUT"], "not a training run"),
        (["generate", "3", "--train", "4", "--val", "2", "--seq_len", "6", "--out", "OUT"], "not a dataset"),
        (["export", "CKPT", "--out", "OUT"], "not a model export"),
        (["export", "CKPT", "--format", "hf", "--out", "OUT"], "not a Hugging Face export"),
        (["dynamics", "RUN", "--out", "OUT"], "not a dynamics"),
        (["sweep", "GRID", "--out", "OUT"], "not a sweep"),
    ],
)
def test_no_verb_writes_among_the_users_files_unasked(tmp_path, capsys, verb, kind):
    """A folder of the user's own files (its names nanoMarkov's own) is left byte-identical, without --force."""
    generate_tiny = ["generate", "3", "--train", "4", "--val", "2", "--seq_len", "6", "--out", str(tmp_path / "d")]
    if "DATA" in verb:
        assert main(generate_tiny) == 0
    (tmp_path / "ckpt.pt").write_bytes(b"checked after the folder")
    (tmp_path / "run").mkdir()
    (tmp_path / "grid.toml").write_text("")
    out = tmp_path / "out"
    before = folder_of_the_users(out)
    names = {"DATA": tmp_path / "d", "OUT": out, "CKPT": tmp_path / "ckpt.pt", "RUN": tmp_path / "run"}
    names["GRID"] = tmp_path / "grid.toml"
    argv = [str(names[a]) if a in names else a.replace("OUT", str(out)) for a in verb]
    capsys.readouterr()
    message = one_line_error(capsys, argv)
    assert f"{out} holds files that are not" in message and kind in message and "new or empty folder" in message
    assert {path: path.read_bytes() for path in out.iterdir()} == before


def test_train_never_writes_into_a_home_folder_even_with_force(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    before = folder_of_the_users(tmp_path / "home")
    assert main(["generate", "3", "--train", "4", "--val", "2", "--seq_len", "6", "--out", str(tmp_path / "d")]) == 0
    capsys.readouterr()
    argv = ["train", str(tmp_path / "d"), *TINY_TRAIN, f"--out_dir={tmp_path / 'home'}", "--force"]
    assert "is a home folder" in one_line_error(capsys, argv)
    assert {path: path.read_bytes() for path in (tmp_path / "home").iterdir()} == before


TINY_GENERATE = ["generate", "3", "--train", "4", "--val", "2", "--seq_len", "6"]


@pytest.mark.parametrize("given", ["--out=~/d", "~/d"])  # '~/d' as a quoted word: the shell expands neither
def test_a_path_starting_with_a_tilde_is_in_the_home_folder(tmp_path, capsys, monkeypatch, given):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    argv = [*TINY_GENERATE, given] if given.startswith("--") else [*TINY_GENERATE, "--out", given]
    assert main(argv) == 0
    assert load_dataset(tmp_path / "home" / "d").meta["n_states"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # no folder named ~


def test_only_a_path_flags_value_has_its_tilde_expanded_after_an_equals_sign():
    home = os.path.expanduser("~root")
    given = ["train", "~root/d", "--out_dir=~root/x", "--data_dir=~root", "--wandb_run_name=~root", "--tag=~root/t"]
    assert expand_home(given) == ["train", f"{home}/d", f"--out_dir={home}/x", f"--data_dir={home}", *given[-2:]]


def test_the_demo_names_a_way_out_it_has(tmp_path, capsys, monkeypatch):
    """The demo takes no --force or --out: a folder in its way is refused with a fix it can take."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "mm10").mkdir(parents=True)
    (tmp_path / "data" / "mm10" / "notes.txt").write_text("mine")
    message = one_line_error(capsys, ["demo"])
    assert "data/mm10 holds files that are not a dataset (notes.txt); run the demo from another folder" in message
    assert "--force" not in message and "--out" not in message
    (tmp_path / "data" / "mm10" / "notes.txt").unlink()
    assert main(["generate", "10", "--train", "4", "--val", "2", "--seq_len", "6", "--out", "data/mm10"]) == 0
    capsys.readouterr()
    message = one_line_error(capsys, ["demo"])
    assert "already holds a different dataset" in message and "run the demo from another folder" in message
    assert "--force" not in message and "--out" not in message and not (tmp_path / "trainings").exists()


def test_generate_into_a_link_writes_the_folder_it_names_and_leaves_nothing_else(tmp_path, capsys):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    assert main([*TINY_GENERATE, "--out", str(tmp_path / "link")]) == 0
    assert (tmp_path / "link").is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    assert load_dataset(tmp_path / "real").meta["n_states"] == 3 and not (tmp_path / "real" / ".lock").exists()
