"""import-hmmlearn: a chain pickled by the seed's generator becomes a dataset folder with our theory."""

import json
import pickle

import numpy as np
import pytest

from nanomarkov import NanoMarkovError
from nanomarkov.cli import main
from nanomarkov.data import import_hmmlearn, load_dataset
from nanomarkov.processes.markov import MarkovChain

pytest.importorskip("hmmlearn")


def _pickle(tmp_path, obj, name="model.pkl"):
    path = tmp_path / name
    path.write_bytes(pickle.dumps(obj))
    return path


class _Marker:
    """Unpickling this creates a file: proof that a refused import never loaded it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_round_trip_keeps_the_matrices_exactly_and_the_theory(tmp_path, capsys):
    chain = MarkovChain.random(6, seed=3, sparsity=50)
    pkl = _pickle(tmp_path, chain.to_hmmlearn())
    out = tmp_path / "imported"
    assert (
        main(
            [
                "import-hmmlearn",
                str(pkl),
                "--trust-pickle",
                "--out",
                str(out),
                "--train",
                "40",
                "--val",
                "8",
                "--seq_len",
                "12",
                "--seed",
                "5",
            ]
        )
        == 0
    )
    assert str(out) in capsys.readouterr().out
    with np.load(out / "chain.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["transmat"], chain.transmat)
        np.testing.assert_array_equal(npz["startprob"], chain.startprob)
    dataset = load_dataset(out)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["process"] == "markov" and meta["sparsity"] is None and meta["alpha"] is None
    assert meta["source"]["path"] == str(pkl.resolve()) and meta["source"]["format"] == "hmmlearn-pickle"
    assert (dataset.train.shape, dataset.val.shape) == ((40, 12), (8, 12))
    theory = chain.theory(12)
    for key, value in theory.items():
        assert meta["theory"][key] == value, key
    assert meta["theory"]["true_loss_val"] == pytest.approx(chain.true_loss(dataset.val), rel=1e-12)
    # Same call again: nothing rewritten; another pickle into the same folder: refused without --force.
    assert import_hmmlearn(pkl, out, trust_pickle=True, train_sequences=40, val_sequences=8, seq_len=12, seed=5) == meta
    other = _pickle(tmp_path, MarkovChain.random(6, seed=4).to_hmmlearn(), "other.pkl")
    with pytest.raises(NanoMarkovError, match="different dataset.*source"):
        import_hmmlearn(other, out, trust_pickle=True, train_sequences=40, val_sequences=8, seq_len=12, seed=5)
    # A damaged imported dataset names the import command as its fix.
    (out / "val.bin").write_bytes(b"\0" * 4)
    with pytest.raises(NanoMarkovError, match=f"nanomarkov import-hmmlearn {pkl.resolve()} --trust-pickle"):
        load_dataset(out)


def test_refuses_without_trust_and_never_unpickles(tmp_path, capsys):
    marker = tmp_path / "pwned"
    pkl = _pickle(tmp_path, _Marker(marker))
    assert main(["import-hmmlearn", str(pkl), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "arbitrary code" in err and "--trust-pickle" in err
    assert not marker.exists() and not (tmp_path / "out").exists()
    # The marker really does fire when the pickle is loaded: the check above means something.
    pickle.loads(pkl.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize(
    "obj, message",
    [
        ({"transmat_": [[1.0]]}, "not an hmmlearn CategoricalHMM"),
        (np.eye(3), "not an hmmlearn CategoricalHMM"),
        ("hmm", "not an hmmlearn CategoricalHMM"),
    ],
)
def test_bad_objects_are_one_line_exit_2(tmp_path, capsys, obj, message):
    pkl = _pickle(tmp_path, obj)
    assert main(["import-hmmlearn", str(pkl), "--trust-pickle", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_a_real_hmm_and_a_non_pickle_are_refused(tmp_path, capsys):
    hmm = MarkovChain.random(4, seed=1).to_hmmlearn()
    hmm.emissionprob_ = np.full((4, 4), 0.25)
    pkl = _pickle(tmp_path, hmm)
    assert main(["import-hmmlearn", str(pkl), "--trust-pickle", "--out", str(tmp_path / "out")]) == 2
    assert "not the identity" in capsys.readouterr().err
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"not a pickle at all")
    with pytest.raises(NanoMarkovError, match="not a readable pickle"):
        import_hmmlearn(junk, tmp_path / "out", trust_pickle=True)
