"""data_source 'online': fresh sequences from the dataset's own process at every step, seeded by
iteration and slot, so a run killed with SIGKILL and resumed ends bit-identical to one never stopped;
every micro-batch and rank gets its own sequences; val stays the fixed split.

The runs are test_train.py's tiny ones (5 states, 16 tokens, a 1-layer 16-wide model, 40 steps).
"""

import json
import signal
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors import safe_open
from test_train import (
    MAX_ITERS,
    assert_same_run,
    assert_same_state,
    ckpt,
    config,
    make_data,
    one_thread,  # noqa: F401  (autouse: one torch thread, so runs compare bit for bit)
    read_log,
    run,
    run_in_one_thread,
    signal_midway,
    without_timing,
)

import nanomarkov.train as train_module
from nanomarkov import NanoMarkovError
from nanomarkov.batches import ONLINE_CHUNK_ITERS, OnlineSequences
from nanomarkov.checkpoint import list_snapshots
from nanomarkov.cli import main
from nanomarkov.data import load_dataset
from nanomarkov.processes import PROCESSES
from nanomarkov.train import snapshot_iters, training_sequences

SNAPSHOTS = 5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data") / "d")


def online(data_dir, out_dir, **overrides):
    return config(data_dir, out_dir, data_source="online", snapshots=SNAPSHOTS, **overrides)


@pytest.fixture(scope="module")
def run_online(data, tmp_path_factory):
    """The reference online run, never stopped."""
    out = tmp_path_factory.mktemp("online") / "run"
    run_in_one_thread(online(data, out))
    return out


def snapshot_contents(out_dir):
    """{file name: (metadata, tensors)}; not the bytes: safetensors writes the metadata in hash order."""
    contents = {}
    for _, _, path in list_snapshots(out_dir):
        with safe_open(path, framework="pt") as f:
            contents[path.name] = (f.metadata(), {name: f.get_tensor(name) for name in f.keys()})
    return contents


def test_an_online_run_resumed_after_sigkill_equals_one_never_stopped(run_online, data, tmp_path):
    out = tmp_path / "b"
    proc = signal_midway(online(data, out), signal.SIGKILL, np.random.default_rng().uniform(0, 0.2))
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert 20 <= ckpt(out)["iter"] < MAX_ITERS and not (out / "done.json").exists()
    run(online(data, out, init_from="resume"))  # in this process: one torch import fewer than a worker
    assert_same_run(run_online, out)
    assert without_timing(read_log(out)) == without_timing(read_log(run_online))
    # The snapshot series too: the same iterations, the same bytes, none twice.
    assert_same_state(snapshot_contents(out), snapshot_contents(run_online))


def test_online_training_reads_fresh_sequences_and_evaluates_on_the_fixed_val_split(data, tmp_path, monkeypatch):
    seen = []
    real = train_module.to_inputs_targets

    def spy(sequences, device="cpu"):
        seen.append(np.array(sequences))
        return real(sequences, device)

    monkeypatch.setattr(train_module, "to_inputs_targets", spy)
    out = tmp_path / "b"
    run(config(data, out, data_source="online", max_iters=12, grad_accum_steps=2))
    dataset = load_dataset(data)
    val_batches = -(-dataset.val.shape[0] // train_module.EVAL_BATCH_SEQUENCES)
    train_batches = [b for b in seen if b.shape[0] == config(data, out)["batch_size"]][: 12 * 2]
    assert len(seen) - len(train_batches) == val_batches * 3  # evaluations at 0, 10 and 12
    train_rows = {row.tobytes() for row in np.asarray(dataset.train)}
    fresh = np.concatenate(train_batches)
    assert not any(row.tobytes() in train_rows for row in fresh)
    assert len({row.tobytes() for row in fresh}) == len(fresh)  # every micro-batch its own sequences
    evals = [r for r in read_log(out) if r["kind"] == "eval"]
    assert {r["true_loss_val"] for r in evals} == {dataset.meta["theory"]["true_loss_val"]}


def transition_counts(sequences, n_states):
    counts = np.zeros((n_states, n_states))
    np.add.at(counts, (sequences[:, 1:-1].ravel(), sequences[:, 2:].ravel()), 1)
    return counts


def test_online_batches_follow_the_process(data):
    """Empirical transition frequencies of the stream against the chain, within 5 standard errors."""
    chain = load_dataset(data).chain
    stream = OnlineSequences(chain, 16, 8, 1, seed=3)
    try:
        sequences = np.concatenate([stream.batch(it, 0) for it in range(3 * ONLINE_CHUNK_ITERS)]).astype(np.int64)
    finally:
        stream.close()
    assert (sequences[:, 0] == chain.bos_token).all() and (sequences[:, 1:] < chain.n_states).all()
    counts = transition_counts(sequences, chain.n_states)
    rows = counts.sum(axis=1, keepdims=True)
    frequencies = counts / rows
    se = np.sqrt(chain.transmat * (1 - chain.transmat) / rows)
    assert np.abs(frequencies - chain.transmat).max() < 5 * se.max()


def test_a_batch_is_a_function_of_iteration_and_slot_only(data):
    """A fresh stream (a resume) at any iteration, or a rank holding only some slots, sees the same batches."""
    chain = load_dataset(data).chain
    walked, resumed, rank1 = (
        OnlineSequences(chain, 16, 4, 2, seed=7),
        OnlineSequences(chain, 16, 4, 2, seed=7),
        OnlineSequences(chain, 16, 4, 2, seed=7, my_slots=[1]),
    )
    try:
        stream = {(it, s): walked.batch(it, s) for it in range(ONLINE_CHUNK_ITERS + 5) for s in (0, 1)}
        late = ONLINE_CHUNK_ITERS + 3
        assert np.array_equal(resumed.batch(late, 0), stream[late, 0])
        assert np.array_equal(rank1.batch(late, 1), stream[late, 1])
        assert not np.array_equal(stream[late, 0], stream[late, 1])
        assert not np.array_equal(stream[late, 0], stream[late + 1, 0])
    finally:
        for s in (walked, resumed, rank1):
            s.close()
    other_seed = OnlineSequences(chain, 16, 4, 2, seed=8)
    try:
        assert not np.array_equal(other_seed.batch(late, 0), stream[late, 0])
    finally:
        other_seed.close()


def fake_setup(dataset, world_size, rank, grad_accum_steps):
    cfg = SimpleNamespace(data_source="online", grad_accum_steps=grad_accum_steps, batch_size=4, seed=42)
    return SimpleNamespace(cfg=cfg, ddp=SimpleNamespace(world_size=world_size, rank=rank), dataset=dataset)


def micro_batches(setup, it):
    """The batches one process trains on at iteration `it`, as TrainingLoop.accumulate_gradients takes them."""
    sequences = training_sequences(setup)
    try:
        ddp = setup.ddp
        return [sequences.batch(it, m * ddp.world_size + ddp.rank) for m in range(setup.cfg.grad_accum_steps)]
    finally:
        sequences.close()


def test_ranks_and_micro_batches_split_one_global_batch_of_distinct_sequences(data):
    dataset = load_dataset(data)
    it = 70
    one_process = micro_batches(fake_setup(dataset, 1, 0, grad_accum_steps=4), it)
    two_ranks = [micro_batches(fake_setup(dataset, 2, rank, grad_accum_steps=2), it) for rank in (0, 1)]
    # Rank r's micro-batch m is slot m*2 + r of the same global batch.
    assert all(np.array_equal(two_ranks[r][m], one_process[m * 2 + r]) for r in (0, 1) for m in (0, 1))
    rows = np.concatenate(one_process)
    assert len({row.tobytes() for row in rows}) == len(rows)


# A generalized HMM is its matrices (a spec or a named one): `ghmm` draws none at random; post_quantum streams as one.
@pytest.mark.parametrize("process", sorted(set(PROCESSES) - {"ghmm"}))
def test_every_process_streams_online(process):
    cls = PROCESSES[process]
    chain = cls.random(cls.N_STATES or 3, seed=0)  # the named processes fix their own K
    stream = OnlineSequences(chain, 12, 4, 2, seed=0)
    try:
        batch = stream.batch(1, 1)
    finally:
        stream.close()
    assert batch.shape == (4, 12) and (batch[:, 0] == chain.bos_token).all()
    assert (batch[:, 1:] < chain.n_states).all()
    assert np.isfinite(chain.true_loss(batch))  # sequences the process can produce


def test_an_online_run_keeps_its_snapshot_series(run_online):
    tokens_per_iter = json.loads((run_online / "config.json").read_text())["tokens_per_iter"]
    listed = [(i, t) for i, t, _ in list_snapshots(run_online)]
    assert listed == [(i, i * tokens_per_iter) for i in snapshot_iters(SNAPSHOTS, MAX_ITERS)]


def test_the_command_line_takes_snapshots_and_the_data_source(data, tmp_path, capsys):
    out = tmp_path / "cli"
    args = [
        "train",
        str(data),
        "--snapshots",
        "2",
        "--data_source",
        "online",
        f"--out_dir={out}",
        "--max_iters=4",
        "--warmup_iters=1",
    ]
    assert main([*args, "--batch_size=4", "--eval_interval=100", "--device=cpu"]) == 0
    assert [i for i, _, _ in list_snapshots(out)] == [0, 1, 2, 4]  # 4^(1/2) = 2
    assert "online data from the process" in (out / "training.log").read_text()
    assert main(["train", str(data), "--data_source", "live", f"--out_dir={out}"]) == 2
    assert "data_source must be 'fixed' or 'online', got 'live'" in capsys.readouterr().err


def test_a_resume_may_not_switch_the_data_source(data, tmp_path):
    out = tmp_path / "b"
    run(config(data, out, max_iters=10))
    with pytest.raises(NanoMarkovError, match="data_source 'fixed' -> 'online'"):
        run(config(data, out, max_iters=20, init_from="resume", data_source="online"))
