"""The training loop: outputs, exact val loss, bit-identical resume, Ctrl-C, NaN, refusals, safe
checkpoints, the learning-rate schedule (several processes: tests/test_distributed.py).

Every run is tiny (5 states, 200 sequences of 16 tokens, a 1-layer 16-wide model, 40 steps) and
uses one torch thread, in this process and in the subprocesses (tests/train_worker.py), so that
runs compare bit for bit on CPU.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nanomarkov.train as train_module
from nanomarkov import NanoMarkovError
from nanomarkov.checkpoint import load_checkpoint
from nanomarkov.config import FIELDS, TrainConfig
from nanomarkov.data import generate_dataset
from nanomarkov.model import GPT, GPTConfig
from nanomarkov.train import TrainingDiverged, learning_rate_at, model_text, train

WORKER = Path(__file__).resolve().parent / "train_worker.py"
DONE_KEYS = {
    "status",
    "iters",
    "tokens",
    "elapsed_s",
    "val_loss",
    "optimal_loss",
    "true_loss_val",
    "excess",
    "learnable_fraction",
    "pct_of_optimum",
}
EVAL_KEYS = {"iter", "tokens", "elapsed_s", "train_loss", "val_loss", "excess"}
CKPT_KEYS = {"model", "model_args", "optimizer", "iter", "tokens", "config", "rng", "data_dir"}
TIMING_KEYS = {"elapsed_s", "tokens_per_s", "eval_s"}  # the only log fields allowed to differ between equal runs
BATCH, SEQ_LEN, MAX_ITERS, EVAL_INTERVAL = 8, 16, 40, 10


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_data(path, seed=1):
    generate_dataset(path, n_states=5, train_sequences=200, val_sequences=40, seq_len=SEQ_LEN, seed=seed)
    return path


def config(data_dir, out_dir, **overrides):
    values = dict(
        data_dir=str(data_dir),
        out_dir=str(out_dir),
        n_layer=1,
        n_head=1,
        n_embd=16,
        batch_size=BATCH,
        max_iters=MAX_ITERS,
        eval_interval=EVAL_INTERVAL,
        log_interval=5,
        warmup_iters=5,
        lr_decay_iters=40,
        learning_rate=1e-2,
        min_lr=1e-3,
        device="cpu",
    )
    values.update(overrides)
    return values


def run(values, overwrite=False):
    return train(TrainConfig.from_dict(values), overwrite=overwrite, show_progress=False)


def read_log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def ckpt(out_dir):
    return torch.load(Path(out_dir) / "ckpt.pt", map_location="cpu", weights_only=True)


def assert_same_state(a, b, where="state"):
    """Equal nested dicts/lists of tensors and numbers, every tensor bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run(a_dir, b_dir):
    a, b = ckpt(a_dir), ckpt(b_dir)
    for key in ("model", "optimizer", "rng"):
        assert_same_state(a[key], b[key], key)
    assert (a["iter"], a["tokens"]) == (b["iter"], b["tokens"])
    done_a = json.loads((Path(a_dir) / "done.json").read_text())
    done_b = json.loads((Path(b_dir) / "done.json").read_text())
    assert done_b["status"] == "done" and done_b["val_loss"] == done_a["val_loss"]
    assert done_b["iters"] == done_a["iters"] and done_b["tokens"] == done_a["tokens"]


class Stop(Exception):
    """Stands for a kill: raised from inside the loop, it leaves no chance to save anything."""


def fail_at(monkeypatch, iteration, action=None):
    """Make learning_rate_at(iteration) (called at the start of that step) raise Stop, or run `action`."""
    real = train_module.learning_rate_at
    fired = []

    def patched(it, cfg):
        if it == iteration and not fired:
            fired.append(it)
            if action is None:
                raise Stop(it)
            action()
        return real(it, cfg)

    monkeypatch.setattr(train_module, "learning_rate_at", patched)


def worker(values, sleep_s=0.0):
    return subprocess.Popen(
        [sys.executable, str(WORKER), json.dumps(values), str(sleep_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def signal_midway(values, sig, delay_s, timeout=60):
    """Start a slowed-down run in a subprocess; once its log is past iter 20, wait delay_s and send sig.

    Past 20, not at it: iter 20's eval line is logged just before its checkpoint is saved, and
    the first line after it (iter 25) only once that save is done.
    """
    proc = worker(values, sleep_s=0.02)
    log = Path(values["out_dir"]) / "log.jsonl"
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"worker ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no log line passed iter 20 in {timeout}s"
        if log.exists():
            iters = [json.loads(line)["iter"] for line in log.read_text().splitlines() if line.endswith("}")]
            if iters and max(iters) > 20:
                break
        time.sleep(0.01)
    time.sleep(delay_s)
    proc.send_signal(sig)
    return proc


def finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.split("RESULT ", 1)[1])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data") / "d")


@pytest.fixture(scope="module")
def run_a(data, tmp_path_factory):
    """The reference: the tiny run, never stopped."""
    out = tmp_path_factory.mktemp("a") / "run"
    run_in_one_thread(config(data, out))
    return out


def run_in_one_thread(values):
    """run() for a module fixture: those come before the autouse one_thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(values)
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ outputs and the loss itself


def test_the_log_lines_show_the_floor_of_the_excess_and_the_learnable_structure_captured(run_a, data):
    meta = json.loads((data / "meta.json").read_text())
    true_val = meta["theory"]["true_loss_val"]
    lines = (run_a / "training.log").read_text().splitlines()
    evals = [line for line in lines if line.startswith("eval iter")]
    assert evals[0].startswith("eval iter 0: val ") and "; no training step yet; " in evals[0]  # no train loss
    assert all("; train loss since the last eval " in line for line in evals[1:]) and len(evals) > 1, evals
    assert all(f"nats over true_loss_val {true_val:.6f} (expected optimum" in line for line in evals), evals
    done = json.loads((run_a / "done.json").read_text())
    uniform = math.log(meta["n_states"])  # from uniform (0) to the true process on the same sequences (1)
    captured = (uniform - done["val_loss"]) / (uniform - true_val)
    assert done["learnable_fraction"] == pytest.approx(captured, rel=1e-12)
    assert lines[-1].startswith(f"done: val {done['val_loss']:.6f}, excess {done['excess']:+.6f} nats over ")
    assert f", {100 * captured:.1f} % of the learnable structure captured in " in lines[-1]


def test_loss_goes_down_toward_optimum_and_outputs_have_every_documented_key(run_a, data):
    meta = json.loads((data / "meta.json").read_text())
    optimal, true_val = meta["theory"]["optimal_loss"], meta["theory"]["true_loss_val"]
    log = read_log(run_a)
    evals = [r for r in log if r.get("kind") == "eval"]
    assert [r["iter"] for r in evals] == list(range(0, MAX_ITERS + 1, EVAL_INTERVAL))
    for r in evals:
        assert EVAL_KEYS <= set(r)
        assert r["tokens"] == r["iter"] * BATCH * (SEQ_LEN - 1)
        assert r["excess"] == pytest.approx(r["val_loss"] - true_val, abs=1e-12)
    assert evals[0]["train_loss"] is None and all(math.isfinite(r["train_loss"]) for r in evals[1:])
    # The eval line's train loss is the mean over the steps since the last eval: here the two
    # log windows of 5 steps each.
    trains = {r["iter"]: r["loss"] for r in log if r.get("kind") == "train"}
    for r in evals[1:]:
        i = r["iter"]
        assert r["train_loss"] == pytest.approx((trains[i - 5] + trains[i]) / 2, rel=1e-9)
    # Untrained, the model is near uniform over 6 tokens; 40 steps take most of the way to the optimum.
    first, last = evals[0]["val_loss"], evals[-1]["val_loss"]
    assert first == pytest.approx(math.log(6), abs=0.05)
    assert last < first and last - optimal < 0.5 * (first - optimal)
    assert all(b["val_loss"] < a["val_loss"] for a, b in zip(evals, evals[1:]))

    done = json.loads((run_a / "done.json").read_text())
    assert set(done) >= DONE_KEYS
    assert done["status"] == "done" and done["iters"] == MAX_ITERS
    assert done["tokens"] == MAX_ITERS * BATCH * (SEQ_LEN - 1)
    assert done["optimal_loss"] == optimal and done["true_loss_val"] == true_val
    assert done["val_loss"] == evals[-1]["val_loss"]
    assert done["excess"] == pytest.approx(done["val_loss"] - true_val, abs=1e-12)
    assert done["pct_of_optimum"] == pytest.approx(100 * true_val / done["val_loss"], rel=1e-12)
    assert done["elapsed_s"] > 0

    saved = json.loads((run_a / "config.json").read_text())
    expected = TrainConfig.from_dict(config(data, run_a)).to_dict()
    assert set(FIELDS) <= set(saved)
    assert {k: saved[k] for k in FIELDS} == expected
    assert saved["threads"] == "auto" and saved["threads_resolved"] == 1  # one_thread's 1, at most AUTO_THREADS_MAX


def test_val_loss_is_the_mean_cross_entropy_over_the_whole_val_split(run_a, data):
    state = ckpt(run_a)
    assert state["iter"] == MAX_ITERS
    model = GPT(GPTConfig(**state["model_args"]))
    model.load_state_dict(state["model"])
    model.eval()
    val = torch.from_numpy(np.fromfile(data / "val.bin", dtype="<u2").astype(np.int64)).view(-1, SEQ_LEN)
    assert val.shape[0] == 40  # the whole split, not a sample of it
    with torch.no_grad():
        logits, _ = model(val[:, :-1])
        total = F.cross_entropy(logits.reshape(-1, logits.size(-1)).double(), val[:, 1:].reshape(-1), reduction="sum")
    expected = total.item() / val[:, 1:].numel()
    done = json.loads((run_a / "done.json").read_text())
    assert done["val_loss"] == pytest.approx(expected, abs=1e-5)


# ------------------------------------------------------------------ resume


def test_resume_after_a_crash_is_bit_identical(run_a, data, tmp_path, monkeypatch):
    out = tmp_path / "b"
    fail_at(monkeypatch, 23)
    with pytest.raises(Stop):
        run(config(data, out))
    assert ckpt(out)["iter"] == 20 and not (out / "done.json").exists()
    assert max(r["iter"] for r in read_log(out)) >= 20
    monkeypatch.undo()
    result = run(config(data, out, init_from="resume"))
    assert result["status"] == "done"
    assert_same_run(run_a, out)
    # The log is cut back to the checkpoint and written again: the same lines, only timings differ.
    assert without_timing(read_log(out)) == without_timing(read_log(run_a))


def test_resume_after_sigkill_at_a_random_moment_is_bit_identical(run_a, data, tmp_path):
    out = tmp_path / "b"
    # Anywhere in the next ~10 steps, or in the middle of a save.
    proc = signal_midway(config(data, out), signal.SIGKILL, np.random.default_rng().uniform(0, 0.2))
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed_at = ckpt(out)["iter"]
    assert 20 <= killed_at < MAX_ITERS and not (out / "done.json").exists()
    finish(worker(config(data, out, init_from="resume")))
    assert_same_run(run_a, out)
    assert without_timing(read_log(out)) == without_timing(read_log(run_a))


def test_sigint_saves_stops_cleanly_and_resumes_bit_identical(run_a, data, tmp_path):
    out = tmp_path / "b"
    result = finish(signal_midway(config(data, out), signal.SIGINT, 0.05))  # exit code 0: train() returned
    assert result["status"] == "interrupted"
    assert not (out / "done.json").exists()
    stopped = ckpt(out)["iter"]
    log = read_log(out)
    assert 20 <= stopped < MAX_ITERS
    assert stopped == max(r["iter"] for r in log)  # the last step completed is the one saved
    assert log[-1]["kind"] == "eval" and log[-1]["iter"] == stopped
    assert f"at iter {stopped}" in (out / "training.log").read_text().splitlines()[-1]
    finish(worker(config(data, out, init_from="resume")))
    assert_same_run(run_a, out)


@pytest.mark.parametrize("how", ["crash", "ctrl-c"])
def test_resumed_log_has_the_same_train_losses(data, tmp_path, monkeypatch, how):
    """The train-loss means in log.jsonl do not depend on where a run was stopped.

    With log_interval=3 the log windows straddle the checkpoint at iter 20 (crash); a Ctrl-C at
    iter 24 saves mid-window and mid-eval-window. The resumed log must still report, at every
    line, the mean over the same steps as the run never stopped.
    """
    values = config(data, tmp_path / "a", log_interval=3)
    run(values)
    reference = read_log(tmp_path / "a")
    out = tmp_path / "b"
    if how == "crash":
        fail_at(monkeypatch, 23)
        with pytest.raises(Stop):
            run(dict(values, out_dir=str(out)))
    else:
        fail_at(monkeypatch, 23, lambda: signal.raise_signal(signal.SIGINT))
        assert run(dict(values, out_dir=str(out)))["status"] == "interrupted"
    monkeypatch.undo()
    run(dict(values, out_dir=str(out), init_from="resume"))
    resumed = read_log(out)
    # A Ctrl-C adds one eval line at the iteration where it stopped; nothing else may differ.
    extra = [r for r in resumed if r["kind"] == "eval" and r["iter"] % EVAL_INTERVAL and r["iter"] != MAX_ITERS]
    assert len(extra) == (1 if how == "ctrl-c" else 0)
    resumed = [r for r in resumed if r not in extra]
    assert without_timing(resumed) == without_timing(reference)


def test_resume_refuses_another_model_or_other_data(tmp_path):
    other = make_data(tmp_path / "other")
    out = tmp_path / "c"
    run(config(other, out, max_iters=10))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(NanoMarkovError, match="n_embd 16 -> 32"):
        run(config(other, out, init_from="resume", n_embd=32))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # a refusal touches nothing
    # Other data in the same folder: the sha256 recorded in the checkpoint no longer matches.
    make_data(tmp_path / "fresh", seed=2)
    shutil.rmtree(other)
    shutil.copytree(tmp_path / "fresh", other)
    with pytest.raises(NanoMarkovError, match="sha256"):
        run(config(other, out, init_from="resume", max_iters=20))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_with_more_iters_continues_as_one_longer_run(data, tmp_path):
    b = tmp_path / "b"
    run(config(data, b))
    result = run(config(data, b, init_from="resume", max_iters=60))
    assert result["status"] == "done" and result["iters"] == 60 and ckpt(b)["iter"] == 60
    # The schedule depends on lr_decay_iters, not max_iters: the same as 60 steps from scratch.
    run(config(data, tmp_path / "d", max_iters=60))
    assert_same_run(tmp_path / "d", b)


def test_a_moved_run_folder_or_another_spelling_of_its_path_resumes(run_a, data, tmp_path, monkeypatch):
    """out_dir is where the checkpoint is, not a property of the run: moving the folder, or naming it
    by a relative path from another working directory, must not refuse the resume."""
    moved = tmp_path / "moved"
    shutil.copytree(run_a, moved)
    assert run(config(data, moved, init_from="resume", max_iters=50))["iters"] == 50
    monkeypatch.chdir(tmp_path)
    run(config(data, "rel", max_iters=10))
    assert run(config(data, tmp_path / "rel", init_from="resume", max_iters=20))["iters"] == 20


def test_scratch_into_an_existing_run_needs_overwrite(run_a, data, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(run_a, b)
    ckpt_bytes = (b / "ckpt.pt").read_bytes()
    with pytest.raises(NanoMarkovError, match="ckpt.pt"):
        run(config(data, b))
    assert (b / "ckpt.pt").read_bytes() == ckpt_bytes
    run(config(data, b, max_iters=20), overwrite=True)
    assert ckpt(b)["iter"] == 20
    log = read_log(b)
    assert log[0]["iter"] == 0 and max(r["iter"] for r in log) == 20  # the old run's lines are gone
    assert json.loads((b / "done.json").read_text())["iters"] == 20


# ------------------------------------------------------------------ divergence


def test_nan_training_loss_stops_the_run_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    out = tmp_path / "b"
    good = {}

    def poison():
        good["bytes"] = (out / "ckpt.pt").read_bytes()
        real_forward = GPT.forward

        def nan_forward(self, idx, targets=None):
            logits, loss = real_forward(self, idx, targets)
            return logits, None if loss is None else loss * float("nan")

        monkeypatch.setattr(GPT, "forward", nan_forward)

    fail_at(monkeypatch, 15, poison)
    with pytest.raises(TrainingDiverged, match=r"(?i)nan.*iter 15"):
        run(config(data, out))
    assert (out / "ckpt.pt").read_bytes() == good["bytes"]
    assert ckpt(out)["iter"] == 10 and not (out / "done.json").exists()


def test_nan_val_loss_stops_the_run_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    out = tmp_path / "b"
    good = {}
    real_split_loss = train_module.split_loss

    def split_loss(model, *args, **kwargs):
        loss = real_split_loss(model, *args, **kwargs)
        if (out / "ckpt.pt").exists() and ckpt(out)["iter"] == 20:
            good.setdefault("bytes", (out / "ckpt.pt").read_bytes())
            return float("nan")
        return loss

    monkeypatch.setattr(train_module, "split_loss", split_loss)
    with pytest.raises(TrainingDiverged, match=r"(?i)nan.*iter 30"):
        run(config(data, out))
    assert (out / "ckpt.pt").read_bytes() == good["bytes"]


def test_huge_learning_rate_diverges_with_a_clear_message(data, tmp_path):
    with pytest.raises(TrainingDiverged, match="learning_rate"):
        run(config(data, tmp_path / "b", learning_rate=1e6, min_lr=1e-3))
    assert not (tmp_path / "b" / "done.json").exists()


# ------------------------------------------------------------------ checkpoint safety


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_checkpoint_is_plain_data_and_unsafe_or_broken_files_are_refused(run_a, tmp_path):
    state = torch.load(run_a / "ckpt.pt", weights_only=True)
    assert CKPT_KEYS <= set(state)
    assert state["tokens"] == state["iter"] * BATCH * (SEQ_LEN - 1)
    assert Path(state["data_dir"]).resolve() == Path(state["config"]["data_dir"]).resolve()
    assert set(FIELDS) <= set(state["config"])
    assert_same_state(load_checkpoint(run_a / "ckpt.pt")["model"], state["model"])

    truncated = tmp_path / "truncated.pt"
    data = (run_a / "ckpt.pt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(NanoMarkovError, match="truncated.pt"):
        load_checkpoint(truncated)
    with pytest.raises(NanoMarkovError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": RunsCode(marker), "iter": 1}, evil)
    with pytest.raises(NanoMarkovError, match="evil.pt"):
        load_checkpoint(evil)
    assert not marker.exists()
    # The file is live: an unsafe load would have run it.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_no_partial_files_are_left_behind(run_a):
    assert sorted(p.name for p in run_a.iterdir()) == [
        "ckpt.pt",
        "config.json",
        "done.json",
        "log.jsonl",
        "training.log",
    ]


# ------------------------------------------------------------------ learning-rate schedule


def test_learning_rate_schedule():
    peak, floor, warmup, decay = 6e-3, 6e-4, 10, 50
    cfg = TrainConfig(learning_rate=peak, min_lr=floor, warmup_iters=warmup, lr_decay_iters=decay)
    lrs = [learning_rate_at(it, cfg) for it in range(decay + 20)]
    # Warmup: positive from the first step, equal increments (a straight line), reaching the peak.
    ramp = lrs[: warmup + 1]
    assert ramp[0] > 0 and ramp[warmup] == pytest.approx(peak, rel=1e-12)
    steps = np.diff(ramp)
    assert np.all(steps > 0) and np.allclose(steps, steps[0], rtol=1e-9)
    assert ramp[0] == pytest.approx(steps[0], rel=1e-9)  # the line starts from 0 one step before it=0
    # Cosine from the peak at warmup to the floor at lr_decay_iters, the floor after.
    for it in range(warmup, decay + 1):
        t = (it - warmup) / (decay - warmup)
        assert lrs[it] == pytest.approx(floor + (peak - floor) * (1 + math.cos(math.pi * t)) / 2, rel=1e-12)
    assert lrs[decay] == pytest.approx(floor, rel=1e-12)
    assert all(lr == floor for lr in lrs[decay:])
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))
    flat = TrainConfig(learning_rate=peak, min_lr=floor, warmup_iters=warmup, lr_decay_iters=decay, decay_lr=False)
    assert {learning_rate_at(it, flat) for it in range(decay + 20)} == {peak}
    no_warmup = TrainConfig(learning_rate=peak, min_lr=floor, warmup_iters=0, lr_decay_iters=decay)
    assert learning_rate_at(0, no_warmup) == peak


# ------------------------------------------------------------------ one writer, full disk, divergence


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_trains(data, tmp_path):
    values = config(data, tmp_path / "b", max_iters=400, eval_interval=200)
    first = worker(values, sleep_s=0.02)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "b" / "log.jsonl").exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(NanoMarkovError, match=rf"another training run is writing here \(pid {first.pid} "):
            run(config(data, tmp_path / "b"), overwrite=True)
    finally:
        first.kill()
        first.wait()
    assert json.loads((tmp_path / "b" / "config.json").read_text())["max_iters"] == 400  # the first one's


def test_a_resume_that_fails_on_a_full_disk_keeps_done_json_and_the_checkpoint(run_a, data, tmp_path, monkeypatch):
    out = tmp_path / "b"
    shutil.copytree(run_a, out)
    before = {name: (out / name).read_bytes() for name in ("done.json", "ckpt.pt")}

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)  # every atomic write ends in fsync: the config.json one fails
    with pytest.raises(NanoMarkovError, match="No space left on device.*free some space"):
        run(config(data, out, max_iters=60, init_from="resume"))
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not list(out.glob("*.partial"))


def test_a_checkpoint_save_on_a_full_disk_is_one_error_and_keeps_the_last_good_one(data, tmp_path, monkeypatch):
    out = tmp_path / "b"
    good = {}

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    def fill_disk():
        good["bytes"] = (out / "ckpt.pt").read_bytes()
        monkeypatch.setattr(os, "fsync", full_disk)

    fail_at(monkeypatch, 15, fill_disk)
    with pytest.raises(NanoMarkovError, match="cannot write the checkpoint .*ckpt.pt .No space left on device"):
        run(config(data, out))
    assert (out / "ckpt.pt").read_bytes() == good["bytes"]
    assert not list(out.glob("*.partial"))


def test_a_divergence_before_any_checkpoint_does_not_promise_one(data, tmp_path, monkeypatch):
    real_forward = GPT.forward

    def nan_forward(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        return logits, None if loss is None else loss * float("nan")

    monkeypatch.setattr(GPT, "forward", nan_forward)
    with pytest.raises(TrainingDiverged, match="no checkpoint was saved before it") as error:
        run(config(data, tmp_path / "b"))
    assert "is kept" not in str(error.value)


@pytest.mark.parametrize(
    "switches, said",
    [
        (
            dict(n_layer=2, n_head=4, n_embd=32, alibi=True, pos_ape=False),
            "2 layers 32 wide, 4 heads, alibi, no position table",
        ),
        (dict(n_layer=1, n_head=1, n_embd=8, mlp_only=True), "1 layer 8 wide, MLP-only"),
        (dict(n_layer=1, n_head=2, n_embd=8, alibi=True, alibi_trained=True), "1 layer 8 wide, 2 heads, trained alibi"),
        (dict(n_layer=0, n_embd=8, pos_ape=False), "0 layers 8 wide, no position table"),
    ],
)
def test_the_first_log_line_says_the_models_shape(switches, said):
    assert model_text(GPTConfig(**switches)) == said
