"""Dataset folders: format, atomic writing, validation on load, batches."""

import hashlib
import json
import os
import re
import shutil
import stat

import numpy as np
import pytest

import nanomarkov.data as data_module
import nanomarkov.files as files_module
from nanomarkov import NanoMarkovError
from nanomarkov.batches import SequenceOrder, to_inputs_targets, whole_split_batches
from nanomarkov.data import generate_dataset, load_dataset
from nanomarkov.processes.markov import MarkovChain

META_KEYS = {
    "format_version",
    "process",
    "n_states",
    "vocab_size",
    "bos_token",
    "seq_len",
    "dtype",
    "seed",
    "sparsity",
    "train_sequences",
    "val_sequences",
    "train_tokens",
    "val_tokens",
    "sha256",
    "theory",
}
THEORY_KEYS = {"entropy_rate", "optimal_loss", "true_loss_val", "optimal_accuracy", "uniform_loss", "unigram_loss"}


def make(path, **kwargs):
    args = dict(n_states=5, train_sequences=300, val_sequences=50, seq_len=12, seed=3)
    args.update(kwargs)
    return generate_dataset(path, args.pop("n_states"), args.pop("train_sequences"), args.pop("val_sequences"), **args)


def test_dataset_files_and_meta(tmp_path):
    meta = make(tmp_path / "d", sparsity=40)
    assert META_KEYS <= set(meta) and THEORY_KEYS == set(meta["theory"])
    assert json.loads((tmp_path / "d" / "meta.json").read_text()) == meta
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["chain.npz", "meta.json", "train.bin", "val.bin"]
    raw = np.fromfile(tmp_path / "d" / "train.bin", dtype="<u2")
    assert raw.size == 300 * 12 == meta["train_tokens"]
    sequences = raw.reshape(300, 12)
    assert np.all(sequences[:, 0] == 5) and np.all(sequences[:, 1:] < 5)
    for split in ("train", "val"):
        data = (tmp_path / "d" / f"{split}.bin").read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"][f"{split}.bin"]
    with np.load(tmp_path / "d" / "chain.npz", allow_pickle=False) as npz:
        chain = MarkovChain(npz["transmat"], npz["startprob"])
    assert np.all((chain.transmat > 0).sum(axis=1) == 3)
    dataset = load_dataset(tmp_path / "d")
    assert dataset.train.shape == (300, 12) and dataset.val.shape == (50, 12)
    assert meta["theory"]["true_loss_val"] == pytest.approx(chain.true_loss(np.asarray(dataset.val)), rel=1e-12)
    assert meta["theory"]["optimal_loss"] == pytest.approx(chain.optimal_loss(12), rel=1e-12)


def test_bytes_do_not_depend_on_chunk_size(tmp_path):
    a = make(tmp_path / "a", chunk_tokens=12 * 7)
    b = make(tmp_path / "b")
    assert a["sha256"] == b["sha256"]
    c = make(tmp_path / "c", train_sequences=500)
    assert c["sha256"]["val.bin"] == a["sha256"]["val.bin"]  # val does not move when --train does
    assert c["sha256"]["train.bin"] != a["sha256"]["train.bin"]


def test_uint32_when_asked_and_when_needed(tmp_path):
    meta = make(tmp_path / "d", dtype="uint32")
    assert meta["dtype"] == "uint32"
    assert load_dataset(tmp_path / "d").train.dtype.itemsize == 4
    with pytest.raises(NanoMarkovError, match="uint32"):
        make(tmp_path / "e", n_states=70000, dtype="uint16")


def test_same_parameters_reuse_the_dataset_and_others_are_refused(tmp_path):
    make(tmp_path / "d")
    before = (tmp_path / "d" / "train.bin").stat().st_mtime_ns
    make(tmp_path / "d")
    assert (tmp_path / "d" / "train.bin").stat().st_mtime_ns == before
    with pytest.raises(NanoMarkovError, match="train_sequences 300 -> 400.*--force"):
        make(tmp_path / "d", train_sequences=400)
    assert load_dataset(tmp_path / "d").meta["train_sequences"] == 300
    assert make(tmp_path / "d", train_sequences=400, force=True)["train_sequences"] == 400
    assert load_dataset(tmp_path / "d").train.shape[0] == 400


class Interrupt(Exception):
    pass


def interrupt_after(n_calls):
    calls = []

    def progress(_):
        calls.append(1)
        if len(calls) >= n_calls:
            raise Interrupt

    return progress


def test_interrupted_generation_leaves_nothing_that_loads(tmp_path):
    with pytest.raises(Interrupt):
        make(tmp_path / "d", chunk_tokens=12 * 10, progress=interrupt_after(5))
    assert not (tmp_path / "d").exists()  # nothing was written, so no folder is left behind
    assert list(tmp_path.iterdir()) == []  # nor the hidden build beside it
    with pytest.raises(NanoMarkovError, match="no such dataset folder"):
        load_dataset(tmp_path / "d")


def test_interrupted_force_keeps_the_old_dataset_whole(tmp_path):
    old = make(tmp_path / "d")
    with pytest.raises(Interrupt):
        make(tmp_path / "d", train_sequences=900, force=True, chunk_tokens=12 * 10, progress=interrupt_after(40))
    kept = load_dataset(tmp_path / "d")
    assert kept.meta == old and kept.train.shape[0] == 300


def test_foreign_bin_files_are_not_overwritten_without_force(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.bin").write_bytes(b"seed data")
    with pytest.raises(NanoMarkovError, match=r"holds files that are not a dataset \(train.bin\).*--force"):
        make(tmp_path / "d")
    assert (tmp_path / "d" / "train.bin").read_bytes() == b"seed data"


def rewrite_token(path, index, value):
    data = np.fromfile(path, dtype="<u2")
    data[index] = value
    data.tofile(path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: f.write_bytes(f.read_bytes()[:-2]), "bytes, expected"),
        (lambda f: f.write_bytes(f.read_bytes()[:-24]), "bytes, expected"),
        (lambda f: rewrite_token(f, 13, (np.fromfile(f, dtype="<u2")[13] + 1) % 5), "sha256"),
        (lambda f: rewrite_token(f, 30, 9), "token 9 at sequence 2, position 6"),
        (lambda f: rewrite_token(f, 24, 0), "sequence 2 does not start with BOS"),
        (lambda f: f.unlink(), "missing"),
        (lambda f: (f.unlink(), f.mkdir()), "a folder, not a file; move it away, then regenerate"),
        (lambda f: (f.unlink(), os.mkfifo(f)), "not a regular file .*; move it away, then regenerate"),
        (lambda f: (f.unlink(), f.symlink_to("/dev/zero")), "not a regular file"),
        (lambda f: (f.unlink(), f.symlink_to(f.parent / "gone")), "a link to .*gone, which does not exist"),
    ],
)
def test_damaged_files_are_named_with_the_fix(tmp_path, damage, message):
    make(tmp_path / "d")
    damage(tmp_path / "d" / "train.bin")
    with pytest.raises(NanoMarkovError, match=message) as error:
        load_dataset(tmp_path / "d")
    assert "train.bin" in str(error.value)
    assert "nanomarkov generate 5 --train 300 --val 50" in str(error.value) and "--force" in str(error.value)


def test_bad_meta_and_missing_folder(tmp_path):
    with pytest.raises(NanoMarkovError, match="nanomarkov generate 100 --train 50000"):
        load_dataset(tmp_path / "mm100")
    make(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "d" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(NanoMarkovError, match="format version"):
        load_dataset(tmp_path / "d")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_states=1), "K must be"),
        (dict(train_sequences=0), "--train"),
        (dict(val_sequences=-3), "--val"),
        (dict(sparsity=100), "--sparsity"),
        (dict(sparsity=-1), "--sparsity"),
        (dict(seq_len=1), "--seq_len"),
        (dict(alpha=0.0), "--alpha"),
    ],
)
def test_bad_generation_arguments(tmp_path, kwargs, message):
    with pytest.raises(NanoMarkovError, match=message):
        make(tmp_path / "d", **kwargs)
    assert not (tmp_path / "d").exists()


def test_unwritable_destination(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NanoMarkovError, match="cannot write"):
        make(tmp_path / "file" / "d")


def test_sequence_order_is_a_resumable_sequence_of_permutations():
    order = SequenceOrder(10, seed=1)
    stream = order.indices(0, 35)
    for epoch in range(3):
        assert sorted(stream[10 * epoch : 10 * epoch + 10]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:20])
    # Any way of cutting the stream, by a fresh object (as after a resume), gives the same indices.
    fresh = SequenceOrder(10, seed=1)
    pieces = np.concatenate([fresh.indices(s, c) for s, c in [(0, 3), (3, 14), (17, 18)]])
    np.testing.assert_array_equal(pieces, stream)
    np.testing.assert_array_equal(SequenceOrder(10, seed=1).indices(23, 5), stream[23:28])
    assert not np.array_equal(SequenceOrder(10, seed=2).indices(0, 10), stream[:10])


def test_batches_are_whole_sequences_shifted_by_one(tmp_path):
    make(tmp_path / "d")
    dataset = load_dataset(tmp_path / "d")
    indices = SequenceOrder(300, seed=0).indices(0, 8)
    x, y = to_inputs_targets(dataset.train[indices])
    sequences = np.asarray(dataset.train)[indices]
    assert x.shape == y.shape == (8, 11)
    np.testing.assert_array_equal(x.numpy(), sequences[:, :-1])
    np.testing.assert_array_equal(y.numpy(), sequences[:, 1:])
    assert np.all(x.numpy()[:, 0] == 5) and np.all(y.numpy() < 5)  # BOS only ever as the first input
    covered = np.vstack(list(whole_split_batches(dataset.val, 16)))
    np.testing.assert_array_equal(covered, dataset.val)


@pytest.mark.parametrize(
    "folder, command",
    [
        ("data/mess3", "nanomarkov generate 3 --process hmm --preset mess3 --train 10000 --val 1000"),
        ("data/hmm5-h4", "nanomarkov generate 5 --process hmm --hidden_states 4 --train 10000 --val 1000"),
        ("data/icl3-sparse-50", "nanomarkov generate 3 --process icl --train 10000 --val 1000 --sparsity 50"),
        ("data/mm5-order2", "nanomarkov generate 5 --process korder --order 2 --train 10000 --val 1000"),
        ("elsewhere/mm100", "nanomarkov generate 100 --train 50000 --val 5000 --out elsewhere/mm100"),
    ],
)
def test_a_missing_dataset_names_the_command_that_makes_it(tmp_path, monkeypatch, folder, command):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NanoMarkovError) as info:
        load_dataset(folder)
    assert str(info.value).endswith(f"create it with: {command}")


def test_processes_too_large_to_build_are_refused_before_any_allocation():
    from nanomarkov.processes.hmm import HiddenMarkovModel
    from nanomarkov.processes.incontext import MAX_RANDOM_STATES, InContextChain

    with pytest.raises(NanoMarkovError, match="more than 16777216"):
        HiddenMarkovModel.random(3, hidden_states=100_000)
    with pytest.raises(NanoMarkovError, match=f"up to K = {MAX_RANDOM_STATES}"):
        InContextChain.random(MAX_RANDOM_STATES + 1)


# ------------------------------------------------------------------ trust: tampering, writers, replacing


def test_a_replaced_chain_of_the_same_size_is_caught_by_its_sha256(tmp_path):
    make(tmp_path / "d")
    other = MarkovChain.random(5, seed=99)
    with open(tmp_path / "d" / "chain.npz", "wb") as f:
        np.savez(f, **other.arrays())
    with pytest.raises(NanoMarkovError, match=r"chain.npz: sha256 does not match meta.json.*nanomarkov generate 5"):
        load_dataset(tmp_path / "d")


@pytest.mark.parametrize("content", [b"not a zip at all", b"PK\x03\x04 truncated"])
def test_a_chain_that_is_not_an_npz_is_one_clear_line(tmp_path, content):
    make(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    del meta["sha256"]["chain.npz"]  # as a dataset written before chain.npz was hashed
    (tmp_path / "d" / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "d" / "chain.npz").write_bytes(content)
    with pytest.raises(NanoMarkovError, match="not a readable .npz archive.*regenerate with") as error:
        load_dataset(tmp_path / "d")
    assert "pickle" not in str(error.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda meta: None, "not a JSON object"),
        (lambda meta: [meta], "not a JSON object"),
        (lambda meta: {k: v for k, v in meta.items() if k != "seq_len"}, "seq_len missing or of the wrong type"),
        (lambda meta: dict(meta, sha256="x"), "sha256 missing or of the wrong type"),
        (lambda meta: dict(meta, dtype="float64"), "dtype .uint16 or uint32."),
    ],
)
def test_a_meta_json_that_is_json_but_not_a_dataset_record_is_named(tmp_path, edit, message):
    make(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    (tmp_path / "d" / "meta.json").write_text(json.dumps(edit(meta)))
    with pytest.raises(NanoMarkovError, match=message) as error:
        load_dataset(tmp_path / "d")
    assert "meta.json" in str(error.value) and "--force" in str(error.value)


def test_a_second_generation_into_the_same_folder_is_refused_while_the_first_writes(tmp_path):
    refusals = []

    def second_writer(_):
        if not refusals:
            with pytest.raises(NanoMarkovError, match="another generation is writing here") as error:
                make(tmp_path / "d", seed=4)
            refusals.append(str(error.value))

    make(tmp_path / "d", progress=second_writer)
    assert refusals and load_dataset(tmp_path / "d").meta["seed"] == 3


def test_force_replaces_so_that_the_old_or_the_new_dataset_loads_at_every_moment(tmp_path, monkeypatch):
    old = make(tmp_path / "d")
    (tmp_path / "d" / "model.pkl").write_bytes(b"the seed's pickle")  # not part of a dataset: kept
    seen = []

    def check_while_writing(_):
        seen.append(load_dataset(tmp_path / "d").meta["train_sequences"])

    real_exchange = files_module.exchange_folders

    def check_around_the_swap(new, current):
        seen.append(load_dataset(current).meta["train_sequences"])
        real_exchange(new, current)
        seen.append(load_dataset(current).meta["train_sequences"])
        with pytest.raises(NanoMarkovError, match="another generation is writing here"):
            make(current, seed=4, force=True)  # the lock stayed with the folder through the swap

    monkeypatch.setattr(files_module, "exchange_folders", check_around_the_swap)
    new = make(tmp_path / "d", train_sequences=400, force=True, chunk_tokens=12 * 10, progress=check_while_writing)
    assert seen[0] == old["train_sequences"] == 300 and set(seen[:-1]) == {300} and seen[-1] == 400
    assert load_dataset(tmp_path / "d").meta == new
    assert (tmp_path / "d" / "model.pkl").read_bytes() == b"the seed's pickle"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no build, no lock left beside or inside
    assert ".lock" not in {p.name for p in (tmp_path / "d").iterdir()}


def test_a_failed_swap_keeps_the_old_dataset_and_removes_the_build(tmp_path, monkeypatch):
    old = make(tmp_path / "d")

    def full_disk(new, current):
        raise OSError(28, "No space left on device")

    (tmp_path / "d" / "model.pkl").write_bytes(b"the seed's pickle")
    monkeypatch.setattr(files_module, "exchange_folders", full_disk)
    with pytest.raises(NanoMarkovError, match="No space left on device.*free some space"):
        make(tmp_path / "d", train_sequences=400, force=True)
    assert load_dataset(tmp_path / "d").meta == old
    assert (tmp_path / "d" / "model.pkl").read_bytes() == b"the seed's pickle"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


@pytest.mark.parametrize(
    "process, n_states, options",
    [("markov", 10, {}), ("korder", 3, {"order": 2}), ("icl", 3, {}), ("hmm", 70_000, {"hidden_states": 2})],
)
def test_sizes_whose_theory_cannot_fit_are_refused_before_allocating(tmp_path, process, n_states, options):
    seq_len = 10**5 if process == "hmm" else 10**9  # hmm: 70000 tokens x 1e5 positions, a 52 GiB table
    with pytest.raises(NanoMarkovError, match=r"--seq_len .* table .*use a shorter --seq_len") as refused:
        make(tmp_path / "d", n_states=n_states, seq_len=seq_len, process=process, **options)
    assert not (tmp_path / "d").exists()
    # The size in the unit that shows it (format_bytes): "145.5 TiB", never "148,993.4 GiB".
    size = re.search(r"needs a ([\d,.]+) ([KMGTPEZY]iB) table .*\(at most 2\.0 GiB\)", str(refused.value))
    assert size and float(size.group(1).replace(",", "")) < 1024


def test_an_infinite_alpha_names_the_flag(tmp_path):
    with pytest.raises(NanoMarkovError, match="--alpha must be a finite number > 0"):
        make(tmp_path / "d", alpha=float("inf"))


def test_a_dataset_bigger_than_the_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    with pytest.raises(NanoMarkovError, match=r"the dataset needs 21\.8 TiB and .* free; ask for fewer --train"):
        make(tmp_path / "d", train_sequences=10**12)  # 2.4e13 bytes: 24 TB, 21.8 TiB
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(data_module.shutil, "disk_usage", lambda path: usage._replace(free=300 * 12 * 2))
    # 300 + 50 sequences of 12 uint16 tokens: 8400 bytes = 8.2 KiB, and 7200 free = 7.0 KiB (not "0.0 GiB")
    with pytest.raises(NanoMarkovError, match=r"the dataset needs 8\.2 KiB and .* has 7\.0 KiB free"):
        make(tmp_path / "d")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_dataset_folder_and_its_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        make(tmp_path / "d", train_sequences=4, val_sequences=2)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask  # not tempfile's 0700
    for path in (tmp_path / "d").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


class Lying(MarkovChain):
    """A chain whose theory says what it is told to, where a plugin with wrong probabilities would err."""

    def __init__(self, transmat, startprob, **lies):
        super().__init__(transmat, startprob)
        self.lies = lies

    def entropy_rate(self):
        return self.lies.get("entropy_rate", super().entropy_rate())

    def unigram_loss(self):
        return self.lies.get("unigram_loss", super().unigram_loss())

    def optimal_accuracy(self, seq_len):
        return self.lies.get("optimal_accuracy", super().optimal_accuracy(seq_len))

    def optimal_loss_by_position(self, seq_len):
        losses, errors = super().optimal_loss_by_position(seq_len)
        return losses * self.lies.get("loss_factor", 1.0), errors

    def optimal_log_probs(self, tokens):
        log_probs = super().optimal_log_probs(tokens) + self.lies.get("log_prob_shift", 0.0)
        return self.lies.get("predicted", lambda log_probs: log_probs)(log_probs)

    def sample(self, n_sequences, seq_len, rng):
        return self.lies.get("drawn", lambda tokens: tokens)(super().sample(n_sequences, seq_len, rng))


SWITCH = [[0.9, 0.1], [0.5, 0.5]]  # entropy rate 0.386, unigram 0.451, log 2 = 0.693: room on both sides


# The sequences the theory check draws for a process as small as SWITCH at seq_len 6: the most it takes.
N = data_module.CHECKED_SEQUENCES[1]


def least_likely(tokens):
    """The sampler of another process: from state 0 always to 1, its less likely next state (0.1)."""
    tokens = tokens.copy()
    tokens[:, 1:] = np.arange(tokens.shape[1] - 1) % 2
    return tokens


@pytest.mark.parametrize(
    ("lie", "named"),
    [({"entropy_rate": -0.25}, "entropy_rate = -0.25 is negative"),
     ({"entropy_rate": 0.5}, "entropy_rate = 0.5 is above unigram_loss"),
     ({"unigram_loss": 0.8}, "unigram_loss = 0.8 is above log K"),
     ({"loss_factor": float("nan")}, "optimal_loss = nan"),
     ({"loss_factor": -1.0}, "optimal_loss = -"),
     ({"optimal_accuracy": 1.5}, "optimal_accuracy = 1.5 is outside [1/K, 1]"),
     ({"optimal_accuracy": 0.25}, "optimal_accuracy = 0.25 is outside [1/K, 1]"),
     ({"log_prob_shift": np.log(2)}, "optimal_log_probs gives probabilities outside [0, 1]"),
     ({"log_prob_shift": -0.01}, "rows that do not sum to 1"),
     ({"entropy_rate": "0.3"}, "entropy_rate = '0.3' is not a finite number"),
     ({"optimal_accuracy": None}, "optimal_accuracy = None is not a finite number"),
     ({"loss_factor": 0.6}, "far above the optimal loss it states there"),  # below what its predictor reaches
     ({"drawn": least_likely}, "far above the optimal loss it states there"),
     ({"predicted": lambda log_probs: log_probs[:, 1:]}, f"on ({N}, 6) tokens gives float64 ({N}, 4, 2), not ({N}, 5, 2)"),
     ({"predicted": lambda log_probs: log_probs[..., ::-1]}, "probability 0 to a token that sample() drew"),
     ({"drawn": lambda tokens: tokens[:, 1:]}, f"sample({N}, 6, rng) returned shape ({N}, 5), not ({N}, 6)"),
     ({"drawn": lambda tokens: tokens.astype(float)}, "returned float64 values, not integer tokens"),
     ({"drawn": lambda tokens: tokens + 2}, "a sequence that does not start with BOS = 2"),
     ({"drawn": lambda tokens: np.where(tokens == 2, 2, tokens + 3)}, "a token outside the states 0..1 after BOS")],
)  # fmt: skip
def test_theory_that_cannot_be_right_is_refused_before_anything_is_written(tmp_path, lie, named):
    out = tmp_path / "d"
    generate_dataset(out, 2, 6, 3, seq_len=6, seed=1)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    with pytest.raises(NanoMarkovError) as refused:
        generate_dataset(out, None, 6, 3, seq_len=6, force=True, chain=Lying(SWITCH, [1.0, 0.0], **lie))
    message = str(refused.value)
    assert "process markov (Lying, module test_data)" in message and named in message
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["d"]  # no build left beside it
    with pytest.raises(NanoMarkovError, match="nothing was written"):
        generate_dataset(tmp_path / "new", None, 6, 3, seq_len=6, chain=Lying(SWITCH, [1.0, 0.0], **lie))
    assert not (tmp_path / "new").exists()


def test_a_sampler_that_goes_wrong_after_the_check_is_refused_before_the_swap(tmp_path):
    """Every chunk is checked as it is written, not only the first draw: the old dataset stays whole."""
    out = tmp_path / "d"
    generate_dataset(out, 2, 6, 3, seq_len=6, seed=1)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    calls = []

    def worse_each_call(tokens):
        calls.append(len(tokens))
        return tokens if len(calls) < 3 else tokens.astype(float)  # the theory check's draw and one chunk pass

    chain = Lying(SWITCH, [1.0, 0.0], drawn=worse_each_call)
    with pytest.raises(NanoMarkovError, match=r"sample\(2, 6, rng\) returned float64 values"):
        generate_dataset(out, None, 6, 3, seq_len=6, force=True, chain=chain, chunk_tokens=12)
    assert calls[1:] == [2, 2] and {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_a_rare_costly_token_is_not_taken_for_a_sampler_that_disagrees(tmp_path):
    """State 0 leaves with probability 1e-4, at a cost of 9.2 nats: most checked sequences never see it, so their
    mean loss is far below the optimum; a one-sided check does not refuse that (a two-sided one would)."""
    rare = MarkovChain([[1 - 1e-4, 1e-4], [0.5, 0.5]], [1.0, 0.0])
    meta = generate_dataset(tmp_path / "d", None, 6, 3, seq_len=8, chain=rare)
    assert meta["theory"]["optimal_loss"] > 0


def test_an_optimum_below_the_entropy_rate_is_right_for_a_chain_started_away_from_its_stationary_law(tmp_path):
    """Not refused: started in the quiet state 0, the first positions cost less than the long run does."""
    meta = generate_dataset(tmp_path / "d", None, 6, 3, seq_len=4, chain=MarkovChain(SWITCH, [1.0, 0.0]))
    assert meta["theory"]["optimal_loss"] < meta["theory"]["entropy_rate"]


def test_a_users_own_meta_json_is_not_taken_for_a_dataset(tmp_path):
    """A dataset is told by what `generate` writes in its meta.json, not by the file's name."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "meta.json").write_text('{"n_states": 5, "mine": true}')
    with pytest.raises(NanoMarkovError, match=r"holds files that are not a dataset \(meta.json\).*--force"):
        make(tmp_path / "d")
    assert (tmp_path / "d" / "meta.json").read_text() == '{"n_states": 5, "mine": true}'


def test_a_link_to_a_folder_gets_the_dataset_and_stays_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    make(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and load_dataset(tmp_path / "link").meta["n_states"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no build, no lock left behind
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["chain.npz", "meta.json", "train.bin", "val.bin"]


def test_force_keeps_the_folders_mode_and_every_file_of_the_user(tmp_path):
    make(tmp_path / "d")
    os.chmod(tmp_path / "d", 0o750)
    (tmp_path / "d" / "notes.partial").write_text("someone else's unfinished write")
    make(tmp_path / "d", train_sequences=400, force=True)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750
    assert (tmp_path / "d" / "notes.partial").read_text() == "someone else's unfinished write"
    assert load_dataset(tmp_path / "d").meta["train_sequences"] == 400


def test_the_current_folder_is_not_swapped_away_under_the_shell(tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with pytest.raises(NanoMarkovError, match=f"is the current folder .*; cd {tmp_path} and give --out here$"):
        make(".")
    assert list((tmp_path / "here").iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["here"]
