"""Training checks that must be able to fail: gradient accumulation is the same global batch in one
step; a kill at a chosen point of a checkpoint save leaves the last ckpt.pt loadable and resumable,
stale ckpt.pt.partial included; the wandb path runs (offline)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import config, fail_at, make_data, one_thread  # noqa: F401 (one_thread: autouse, one torch thread)

from nanomarkov import train as train_module
from nanomarkov.checkpoint import load_checkpoint
from nanomarkov.cli import main
from nanomarkov.config import TrainConfig, format_config_file
from nanomarkov.progress import STOP_GRACE_SECONDS, inherited_ignored
from nanomarkov.train import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("train_checks") / "mm5")


def weights(out_dir):
    return load_checkpoint(Path(out_dir) / "ckpt.pt")["model"]


def test_gradient_accumulation_is_the_same_global_batch_in_one_step(data_dir, tmp_path):
    one_step = config(data_dir, tmp_path / "one", batch_size=16, grad_accum_steps=1, max_iters=4, eval_interval=4)
    one_step.update(warmup_iters=1, lr_decay_iters=4)
    accumulated = dict(one_step, out_dir=str(tmp_path / "accumulated"), batch_size=4, grad_accum_steps=4)
    results = [train(TrainConfig.from_dict(values), show_progress=False) for values in (one_step, accumulated)]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "accumulated")
    start = weights_at_start(data_dir, tmp_path)
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), name
    assert any(not torch.allclose(a[name], start[name]) for name in a)  # the steps moved the weights
    assert results[0]["val_loss"] == pytest.approx(results[1]["val_loss"], rel=1e-6)
    assert results[0]["tokens"] == results[1]["tokens"] == 4 * 16 * 15


def weights_at_start(data_dir, tmp_path):
    """The same model after one step at learning rate ~0: its starting point, to show the runs moved."""
    values = config(
        data_dir, tmp_path / "start", max_iters=1, warmup_iters=1, eval_interval=1, learning_rate=1e-12, min_lr=0.0
    )
    train(TrainConfig.from_dict(values), show_progress=False)
    return weights(tmp_path / "start")


# A run (tests/test_train.py's config: a save every 10 iters) that dies (os._exit, no cleanup, as a kill)
# at its second checkpoint save (iter 20): either
# halfway through writing ckpt.pt.partial, or with it complete, just before it is renamed to ckpt.pt.
KILLED_RUN = """
import json, os, sys
import torch
from nanomarkov.config import TrainConfig
from nanomarkov.train import train

torch.set_num_threads(1)
values, point = json.loads(sys.argv[1]), sys.argv[2]
saves = []
real_fsync, real_replace = os.fsync, os.replace

def fsync(fd):  # files.write_atomic: the .partial is written, then flushed to disk, then renamed
    path = os.readlink(f"/proc/self/fd/{fd}")
    if path.endswith("ckpt.pt.partial"):
        saves.append(path)
        if point == "mid-write" and len(saves) == 2:
            os.truncate(path, os.path.getsize(path) // 2)
            os._exit(9)
    real_fsync(fd)

def replace(source, target):
    if point == "before-rename" and len(saves) == 2 and str(target).endswith("ckpt.pt"):
        os._exit(9)
    real_replace(source, target)

os.fsync, os.replace = fsync, replace
train(TrainConfig.from_dict(values), show_progress=False)
"""


@pytest.mark.parametrize("point", ["mid-write", "before-rename"])
def test_a_kill_during_a_checkpoint_save_keeps_the_last_one_and_resume_works(data_dir, tmp_path, point):
    values = config(data_dir, tmp_path / "killed")
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, json.dumps(values), point], capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == 9, killed.stderr
    out = tmp_path / "killed"
    partial = out / "ckpt.pt.partial"
    assert partial.exists()  # the interrupted save left its temporary file behind
    assert load_checkpoint(out / "ckpt.pt")["iter"] == 10  # the previous checkpoint, intact
    result = train(TrainConfig.from_dict(dict(values, init_from="resume")), show_progress=False)
    assert result["status"] == "done" and result["iters"] == 40
    assert not partial.exists()
    uninterrupted = config(data_dir, tmp_path / "whole")
    train(TrainConfig.from_dict(uninterrupted), show_progress=False)
    for name, tensor in weights(tmp_path / "whole").items():
        assert torch.equal(tensor, weights(out)[name]), name


def test_a_stale_partial_does_not_break_resume(data_dir, tmp_path):
    values = config(data_dir, tmp_path / "run", max_iters=10)
    train(TrainConfig.from_dict(values), show_progress=False)
    (tmp_path / "run" / "ckpt.pt.partial").write_bytes(b"left by a run killed long ago")
    result = train(TrainConfig.from_dict(dict(values, max_iters=20, init_from="resume")), show_progress=False)
    assert result["status"] == "done" and load_checkpoint(tmp_path / "run" / "ckpt.pt")["iter"] == 20


def test_the_wandb_path_runs_offline(data_dir, tmp_path):
    pytest.importorskip("wandb", reason="wandb comes with the [interp] extra (TransformerLens)")
    values = config(data_dir, tmp_path / "run", max_iters=10, wandb_log=True, wandb_run_name="offline-check")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path))
    env.pop("WANDB_API_KEY", None)
    (tmp_path / "cfg.py").write_text(format_config_file(values))
    done = subprocess.run(
        [sys.executable, "-m", "nanomarkov", "train", "cfg.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    (record,) = runs[0].glob("*.wandb")
    logged = record.read_bytes()  # wandb's binary log; the metric names are stored as text
    assert b"val_loss" in logged and b"train/loss" in logged and b"offline-check" in logged
    assert json.loads((tmp_path / "run" / "done.json").read_text())["iters"] == 10


def stop_in_evaluation(monkeypatch, nth, signum=signal.SIGTERM):
    """A signal during the nth evaluation of the val split (1: the one at iter 0), after its first of 4-sequence
    batches."""
    real = train_module.whole_split_batches
    evaluations = []

    def batches(tokens, n_sequences):
        evaluations.append(n_sequences)
        for i, batch in enumerate(real(tokens, n_sequences)):
            if len(evaluations) == nth and i == 1:
                signal.raise_signal(signum)
            yield batch

    monkeypatch.setattr(train_module, "whole_split_batches", batches)
    monkeypatch.setattr(train_module, "eval_batch_sequences", lambda seq_len: 4)


def test_a_stop_during_the_first_evaluation_ends_the_run_at_once_without_a_checkpoint(data_dir, tmp_path, monkeypatch):
    stop_in_evaluation(monkeypatch, 1)
    done = train(TrainConfig.from_dict(config(data_dir, tmp_path / "r")), show_progress=False)
    assert done["status"] == "interrupted" and done["stopped_by"] == "SIGTERM" and done["iters"] == 0
    assert done["val_loss"] is None and not (tmp_path / "r" / "ckpt.pt").exists()
    last = (tmp_path / "r" / "training.log").read_text().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM at iter 0, during its evaluation; no checkpoint yet")


def test_a_stop_during_a_later_evaluation_saves_the_steps_without_it_and_resumes(data_dir, tmp_path, monkeypatch):
    stop_in_evaluation(monkeypatch, 2)  # the evaluation at iter 10 (EVAL_INTERVAL)
    values = config(data_dir, tmp_path / "r")
    done = train(TrainConfig.from_dict(values), show_progress=False)
    assert done["status"] == "interrupted" and done["iters"] == 10
    assert load_checkpoint(tmp_path / "r" / "ckpt.pt")["iter"] == 10  # the steps are kept
    log = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log if r["kind"] == "eval"] == [0]  # the dropped evaluation left no record
    assert "at iter 10, during its evaluation; checkpoint saved" in (tmp_path / "r" / "training.log").read_text()
    monkeypatch.undo()
    resumed = train(TrainConfig.from_dict(dict(values, init_from="resume")), show_progress=False)
    assert resumed["status"] == "done" and resumed["iters"] == values["max_iters"]


def test_the_evaluation_a_stop_asks_for_gives_up_past_half_the_grace(monkeypatch):
    """A stop after a step evaluates before it saves; that evaluation may not eat the time the command has to end."""
    stop = train_module.StopRequests()
    assert not stop.evaluation_stopped(0)  # no stop asked
    clock = iter([100.0, 100.0 + STOP_GRACE_SECONDS / 2 - 1, 100.0 + STOP_GRACE_SECONDS / 2 + 1])
    monkeypatch.setattr(train_module.time, "monotonic", lambda: next(clock))
    stop.handle(signal.SIGTERM, None)  # asked at 100 s
    assert not stop.evaluation_stopped(1)  # the evaluation began after it: it runs on, for a while
    assert stop.evaluation_stopped(1)
    assert stop.evaluation_stopped(0)  # a signal that came while it ran


def test_eval_batches_hold_a_bounded_number_of_tokens():
    assert train_module.eval_batch_sequences(16) == train_module.EVAL_BATCH_SEQUENCES
    assert train_module.eval_batch_sequences(100_000) == 1
    assert train_module.eval_batch_sequences(2049) * 2049 <= train_module.EVAL_BATCH_TOKENS


def test_train_stopped_by_sigterm_exits_143_and_by_ctrl_c_130(data_dir, tmp_path, monkeypatch, capsys):
    argv = ["train", str(data_dir), "--device=cpu", "--n_layer=1", "--n_head=1", "--n_embd=16", "--max_iters=10",
            "--warmup_iters=1", "--eval_interval=5"]  # fmt: skip
    for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        stop_in_evaluation(monkeypatch, 2, signum)
        assert main([*argv, f"--out_dir={tmp_path / signum.name}"]) == code
        said = capsys.readouterr()
        assert "during its evaluation; checkpoint saved; continue with --resume" in said.err.splitlines()[-1]
        assert "stopped by" not in said.out  # every command's stop line is on stderr
        monkeypatch.undo()


@pytest.mark.parametrize("stop_at", ["step", "first evaluation"])
def test_trains_stop_line_is_on_stderr_as_every_commands(data_dir, tmp_path, monkeypatch, capsys, stop_at):
    argv = ["train", str(data_dir), "--device=cpu", "--n_layer=1", "--n_head=1", "--n_embd=16", "--max_iters=10",
            "--warmup_iters=1", "--eval_interval=5", f"--out_dir={tmp_path / 'r'}"]  # fmt: skip
    if stop_at == "step":
        fail_at(monkeypatch, 3, lambda: signal.raise_signal(signal.SIGTERM))
    else:
        stop_in_evaluation(monkeypatch, 1)
    assert main(argv) == 143
    said = capsys.readouterr()
    expected = "iter 4; checkpoint saved;" if stop_at == "step" else "iter 0, during its evaluation; no checkpoint"
    assert said.err.startswith("stopped by SIGTERM at ") and expected in said.err and said.err.count("\n") == 1
    assert "stopped by" not in said.out


def test_training_started_ignoring_ctrl_c_keeps_ignoring_it():
    """A shell without job control starts `nanomarkov train ... &` with SIGINT ignored: training must not take the
    terminal's Ctrl-C that its command ignores (a sweep's worker would end mid-run while its parent goes on)."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert inherited_ignored() == {signal.SIGINT}
        with train_module.StopRequests() as stop:
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop.handle  # the stop it does not ignore is heard
    finally:
        signal.signal(signal.SIGINT, before)
