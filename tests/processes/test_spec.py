"""Spec files: every kind from a dict, a .json and a .npz; every refusal one line naming its field."""

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest

from nanomarkov.errors import NanoMarkovError
from nanomarkov.processes import PROCESSES, Option, Process, korder
from nanomarkov.processes import spec as spec_module
from nanomarkov.processes.hmm import HiddenMarkovModel, mess3_arrays
from nanomarkov.processes.markov import MarkovChain
from nanomarkov.processes.spec import process_from_file, process_from_spec, read_spec, spec_record

DOCS = Path(__file__).resolve().parents[2] / "docs" / "specs.md"

P, Q = 0.1, 0.3
SWITCHING = {"process": "markov", "transmat": [[1 - P, P], [Q, 1 - Q]], "startprob": "stationary"}
KORDER = {
    "process": "korder",
    "transitions": [[[0.9, 0.1], [0.5, 0.5]], [[0.2, 0.8], [0.6, 0.4]]],
    "start": [[0.25, 0.25], [0.4, 0.1]],
}
MOORE = {
    "process": "hmm",
    "transmat": [[0.8, 0.2], [0.4, 0.6]],
    "emissions": [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]],
    "startprob": "stationary",
}
ICL = {"process": "icl", "concentration": [0.5, 0.5, 0.5], "support_size": 2, "startprob": [0.2, 0.3, 0.5]}


def binary_entropy(p):
    return -p * np.log(p) - (1 - p) * np.log(1 - p)


def write(tmp_path, spec, suffix):
    """The spec as a .json or a .npz file (arrays as entries, scalars as 0-d entries)."""
    path = tmp_path / f"spec{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(spec))
    else:
        np.savez(path, **{name: np.asarray(value) for name, value in spec.items()})
    return path


@pytest.fixture(params=["dict", ".json", ".npz"])
def given(request, tmp_path):
    """A function that gives a spec's process the way this test's parameter says."""

    def build(spec):
        if request.param == "dict":
            return process_from_spec(spec)
        return process_from_file(write(tmp_path, spec, request.param))[1]

    return build


def test_markov_switching_chain_has_the_closed_form_theory(given):
    chain = given(SWITCHING)
    pi = np.array([Q, P]) / (P + Q)  # the switching chain's stationary law
    np.testing.assert_allclose(chain.startprob, pi, rtol=1e-12)
    assert chain.entropy_rate() == pytest.approx(pi[0] * binary_entropy(P) + pi[1] * binary_entropy(Q), rel=1e-12)
    np.testing.assert_array_equal(chain.transmat, SWITCHING["transmat"])


def test_korder_keeps_its_arrays_and_a_stationary_start_is_stationary(given):
    chain = given(KORDER)
    assert chain.order == 2
    np.testing.assert_allclose(chain.transitions, KORDER["transitions"], rtol=1e-12)
    np.testing.assert_allclose(chain.start, KORDER["start"], rtol=1e-12)
    stationary = given({**KORDER, "start": "stationary"}).start
    transitions = np.array(KORDER["transitions"])
    shifted = np.einsum("ab,abc->bc", stationary, transitions)  # (x1, x2) -> (x2, x3)
    np.testing.assert_allclose(shifted, stationary, atol=1e-12)
    assert stationary.sum() == pytest.approx(1)


def test_state_emitting_hmm_keeps_its_arrays_and_starts_stationary(given):
    hmm = given(MOORE)
    transmat = np.array(MOORE["transmat"])
    np.testing.assert_allclose(hmm.emissions, MOORE["emissions"], rtol=1e-12)
    pi = np.array([2, 1]) / 3  # 0.2 pi_0 = 0.4 pi_1
    np.testing.assert_allclose(hmm.startprob, pi, rtol=1e-12)
    np.testing.assert_allclose(pi @ transmat, pi, rtol=1e-12)


def test_icl_keeps_its_numbers(given):
    chain = given(ICL)
    np.testing.assert_array_equal(chain.concentration, ICL["concentration"])
    np.testing.assert_array_equal(chain.startprob, ICL["startprob"])
    assert chain.n_support == 2
    dense = given({"process": "icl", "concentration": [1.0, 2.0]})
    assert dense.n_support == 2 and list(dense.startprob) == [0.5, 0.5] and dense.start == "uniform"
    assert given({"process": "icl", "concentration": [1.0, 2.0], "start": "stationary"}).start == "stationary"


def test_a_spec_without_arrays_is_the_process_random_builds(given):
    chain = given({"process": "markov", "n_states": 4, "seed": 3, "sparsity": 50})
    np.testing.assert_array_equal(chain.transmat, MarkovChain.random(4, seed=3, sparsity=50).transmat)
    assert np.all((chain.transmat > 0).sum(axis=1) == 2)
    mess3 = given({"process": "hmm", "n_states": 3, "preset": "mess3", "x": 0.1, "a": 0.6})
    for mine, theirs in zip((mess3.transmat, mess3.emissions), mess3_arrays(0.1, 0.6)):
        np.testing.assert_array_equal(mine, theirs)


def test_a_named_process_is_given_by_its_parameters(given):
    switching = given({"process": "switching", "p": P, "q": Q})
    np.testing.assert_allclose(switching.transmat, SWITCHING["transmat"], rtol=1e-15)
    np.testing.assert_allclose(switching.startprob, np.array([Q, P]) / (P + Q), rtol=1e-12)
    with pytest.raises(NanoMarkovError, match="spec field 'q' must be a number"):
        process_from_spec({"process": "switching", "p": P, "q": "0.3"})


class Coin(Process):
    """A researcher's process, registered by a test: i.i.d. tokens from `probs`."""

    process = "spec_test_coin"
    ARRAYS = ("probs",)
    OPTIONS = (Option("peak", float, None, "probability of state 0"),)

    def __init__(self, probs):
        self.probs = np.asarray(probs, dtype=np.float64)

    @classmethod
    def random(cls, n_states, seed=42, alpha=1.0, sparsity=None, peak=None):
        return cls(np.r_[peak, np.full(n_states - 1, (1 - peak) / (n_states - 1))])


def test_a_process_of_your_own_is_given_by_its_arrays_or_its_options(given, monkeypatch):
    monkeypatch.setitem(PROCESSES, Coin.process, Coin)
    assert list(given({"process": "spec_test_coin", "probs": [0.25, 0.75]}).probs) == [0.25, 0.75]
    assert list(given({"process": "spec_test_coin", "n_states": 3, "peak": 0.5}).probs) == [0.5, 0.25, 0.25]
    with pytest.raises(NanoMarkovError, match="spec field 'peak' must be a number"):
        process_from_spec({"process": "spec_test_coin", "n_states": 3, "peak": "high"})


def test_rows_within_the_tolerance_are_divided_by_their_sum():
    chain = process_from_spec({"process": "markov", "transmat": [[0.3333333, 0.6666666], [1, 0]], "startprob": [1, 0]})
    np.testing.assert_allclose(chain.transmat.sum(axis=1), 1, rtol=0, atol=1e-15)
    assert chain.transmat[0, 0] == pytest.approx(1 / 3, rel=1e-6)


def twice(matrix):
    return {"process": "markov", "transmat": matrix, "startprob": [0.5, 0.5]}


BAD_SPECS = [
    (["not", "a", "dict"], "a spec is a dict"),
    ({"transmat": [[1]]}, "spec field 'process' is missing"),
    ({"process": 3}, "spec field 'process' must be a process name"),
    ({"process": "nonesuch"}, "unknown process 'nonesuch'"),
    ({**SWITCHING, "colour": "red"}, "spec field 'colour' is not a field of a markov spec"),
    ({"process": "markov", "transmat": [[1, 0], [0, 1]]}, "spec field 'startprob' is missing"),
    ({"process": "hmm", "emissions": [[1, 0]], "startprob": [1]}, "spec field 'transmat' is missing"),
    (twice([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]]), "spec field 'transmat' must be square"),
    (twice([[0.5, 0.5], [1.0]]), "spec field 'transmat' must be an array of numbers with rows of equal length"),
    (twice([[0.5, "0.5"], [1.0, 0.0]]), "spec field 'transmat' must hold numbers only"),
    (twice([[True, False], [False, True]]), "spec field 'transmat' must hold numbers only"),
    (
        twice([[True, False], [0.5, 0.5]]),
        "spec field 'transmat' must hold numbers only, got a bool at index [0, 0]",
    ),
    (
        {**SWITCHING, "startprob": [0.5, np.True_]},
        "spec field 'startprob' must hold numbers only, got a bool at index [1]",
    ),
    (twice([0.5, 0.5]), "spec field 'transmat' must be a 2-dimensional array"),
    (
        twice([[1.5, -0.5], [0.5, 0.5]]),
        "spec field 'transmat' must have entries >= 0 (probabilities), got -0.5 at index [0, 1]",
    ),
    (
        twice([[0.5, float("nan")], [0.5, 0.5]]),
        "spec field 'transmat' must have finite entries, got nan at index [0, 1]",
    ),
    (
        twice([[0.5, 0.5], [0.5, 0.6]]),
        "spec field 'transmat' must sum to 1 (within 1e-06) in every row, got row 1 sums to 1.1",
    ),
    ({**SWITCHING, "startprob": [0.5, 0.6]}, "spec field 'startprob' must sum to 1 (within 1e-06), got a sum of 1.1"),
    ({**SWITCHING, "startprob": [1.0]}, "spec field 'startprob' must have shape (2,)"),
    ({**SWITCHING, "startprob": "uniform"}, "spec field 'startprob' must be an array of shape (2,) or \"stationary\""),
    (
        {"process": "markov", "transmat": [[1, 0], [0, 1]], "startprob": "stationary"},
        "spec field 'startprob' must be an array: the chain has several closed classes",
    ),
    ({**KORDER, "transitions": [0.5, 0.5]}, "spec field 'transitions' must have shape (K,)*(order+1)"),
    (
        {**KORDER, "transitions": [[[0.9, 0.1], [0.5, 0.5]], [[0.2, 0.8], [0.6, 0.5]]]},
        "spec field 'transitions' must sum to 1 (within 1e-06) in every context, got context [1, 1] sums to 1.1",
    ),
    ({**KORDER, "start": [0.5, 0.5]}, "spec field 'start' must be a 2-dimensional array"),
    ({**MOORE, "emissions": [[0.5, 0.5]]}, "spec field 'emissions' must have shape (H=2, K)"),
    ({**MOORE, "emissions": [[0.5, 0.6], [0.5, 0.5]]}, "spec field 'emissions' must sum to 1"),
    ({**ICL, "concentration": [1.0, 0.0, 1.0]}, "spec field 'concentration' must be a vector of K >= 2"),
    ({**ICL, "support_size": 4}, "spec field 'support_size' must be an integer in 1..3, got 4"),
    ({**ICL, "startprob": [0.5, 0.5]}, "spec field 'startprob' must have shape (3,)"),
    ({**ICL, "start": "first"}, "spec field 'start' must be one of 'uniform', 'stationary'"),
    ({**ICL, "start": "stationary"}, "spec field 'startprob' must be left out with start \"stationary\""),
    ({"process": "icl", "concentration": [1, 1, 1], "support_size": 2, "start": "stationary"}, "spec field 'start'"),
    ({"process": "markov", "n_states": 1}, "spec field 'n_states' must be an integer in 2.., got 1"),
    ({"process": "markov", "n_states": 3.0}, "spec field 'n_states' must be an integer in 2.., got 3.0"),
    ({"process": "markov", "n_states": 3.5}, "spec field 'n_states' must be an integer in 2.., got 3.5"),
    ({**ICL, "support_size": 2.0}, "spec field 'support_size' must be an integer in 1..3, got 2.0"),
    ({"process": "markov", "n_states": 3, "seed": -1}, "spec field 'seed' must be an integer in 0..4294967295"),
    ({"process": "markov", "n_states": 3, "alpha": 0}, "spec field 'alpha' must be a number > 0 and at most 1e+12"),
    ({"process": "markov", "n_states": 3, "sparsity": 100}, "spec field 'sparsity' must be a number in [0, 100)"),
    (
        {"process": "markov", "n_states": 3, "order": 2},
        "spec field 'order' is not a field of a markov spec without arrays",
    ),
    ({"process": "korder", "n_states": 3, "order": 2.5}, "spec field 'order' must be an integer in 0.., got 2.5"),
    ({"process": "hmm", "n_states": 3, "preset": 3}, "spec field 'preset' must be of type str"),
    ({"process": "hmm", "n_states": 3, "preset": "mess4"}, "spec field 'preset' must be one of 'mess3', got 'mess4'"),
]


@pytest.mark.parametrize("spec, message", BAD_SPECS, ids=lambda x: x if isinstance(x, str) else None)
def test_every_bad_field_is_refused_in_one_line_naming_it(spec, message):
    with pytest.raises(NanoMarkovError) as error:
        process_from_spec(spec)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_too_large_arrays_are_refused_by_their_size(tmp_path, monkeypatch):
    monkeypatch.setattr(spec_module, "MAX_TABLE_ENTRIES", 3)
    with pytest.raises(
        NanoMarkovError, match=r"spec field 'transmat' must have at most 3 entries \(MAX_TABLE_ENTRIES\)"
    ):
        process_from_spec(SWITCHING)
    np.savez(tmp_path / "big.npz", process="markov", transmat=np.full((40, 40), 1 / 40), startprob="stationary")
    with pytest.raises(NanoMarkovError, match=r"big.npz: entry transmat.npy holds .*\(MAX_TABLE_ENTRIES\)"):
        read_spec(tmp_path / "big.npz")
    # A k-th order chain's own limit on K^(k+1), named by its constructor.
    monkeypatch.setattr(spec_module, "MAX_TABLE_ENTRIES", 2**28)
    monkeypatch.setattr(korder, "MAX_TRANSITION_ENTRIES", 8)
    with pytest.raises(NanoMarkovError, match="K\\^\\(k\\+1\\) = 16 transition entries, more than the limit"):
        process_from_spec({"process": "korder", "transitions": np.full((2,) * 4, 0.5), "start": "stationary"})


def test_unreadable_files_are_refused_naming_the_file(tmp_path, monkeypatch):
    cases = {
        "spec.txt": ("x", "spec.txt: a spec file is .json or .npz"),
        "missing.json": (None, "missing.json: no spec file there"),
        "broken.json": ("{", "broken.json: not a readable spec file"),
        "twice.json": (
            '{"process": "markov", "n_states": 3, "process": "hmm"}',
            "twice.json: not a readable spec file (spec field 'process' is given twice)",
        ),
        "list.json": ("[1, 2]", "list.json: not a spec file (a JSON object was expected, found list)"),
        "deep.json": ("[" * 100_000 + "]" * 100_000, "deep.json: "),
        "broken.npz": ("not a zip", "broken.npz: not a readable .npz spec"),
        "missing.npz": (None, "missing.npz: no spec file there"),
    }
    for name, (text, message) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(NanoMarkovError) as error:
            read_spec(tmp_path / name)
        assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
    np.savez(tmp_path / "objects.npz", process=np.array([{"a": 1}], dtype=object))
    with pytest.raises(NanoMarkovError, match="objects.npz: not a readable .npz spec"):
        read_spec(tmp_path / "objects.npz")
    monkeypatch.setattr(spec_module, "MAX_JSON_BYTES", 10)
    (tmp_path / "big.json").write_text(json.dumps(SWITCHING))
    with pytest.raises(
        NanoMarkovError, match=r"big.json: .* bytes, more than a JSON spec's 10; write its arrays to a .npz"
    ):
        read_spec(tmp_path / "big.json")


def test_an_error_in_a_file_names_the_file_and_the_field(tmp_path):
    path = write(tmp_path, {**SWITCHING, "startprob": [0.2, 0.2]}, ".json")
    with pytest.raises(NanoMarkovError, match=r"^.*spec.json: spec field 'startprob' must sum to 1"):
        process_from_file(path)


def test_the_record_is_the_same_for_a_dict_its_json_and_its_npz_and_changes_with_a_number(tmp_path):
    record = spec_record(SWITCHING)
    assert record["fields"] == {"process": "markov", "startprob": "stationary"}
    assert record["arrays"] == {"transmat": [2, 2]}
    for suffix in (".json", ".npz"):
        assert spec_record(read_spec(write(tmp_path, SWITCHING, suffix))) == record
    assert re.fullmatch(r"[0-9a-f]{64}", record["sha256"])
    assert spec_record(twice([[0.9, 0.1], [0.3, 0.7]]))["sha256"] != record["sha256"]
    assert spec_record({**SWITCHING, "transmat": [[0.9, 0.1], [0.30001, 0.69999]]})["sha256"] != record["sha256"]


def documented_specs():
    """Every ```json block of docs/specs.md that names a process."""
    blocks = re.findall(r"^```json\n(.*?)^```", DOCS.read_text(), re.MULTILINE | re.DOTALL)
    return [spec for spec in map(json.loads, blocks) if "process" in spec]


def test_every_documented_spec_builds():
    specs = documented_specs()
    assert {spec["process"] for spec in specs} >= {"markov", "korder", "hmm", "icl"}
    for spec in specs:
        process_from_spec(spec)


def test_the_documented_mess3_is_the_built_in_mess3():
    """The docs' token-labelled mess3 (x=0.05, a=0.85), written out with its numbers: every sequence of
    five tokens has the probability pi T[x1] ... T[x5] 1 of the documented matrices, under both processes."""
    (spec,) = [spec for spec in documented_specs() if "token_transitions" in spec and spec["process"] == "hmm"]
    documented, built_in = process_from_spec(spec), HiddenMarkovModel.mess3(0.05, 0.85)
    matrices = np.array(spec["token_transitions"])
    sequences = np.array([[3, *tokens] for tokens in itertools.product(range(3), repeat=5)])
    expected = np.array(
        [np.full(3, 1 / 3) @ np.linalg.multi_dot([matrices[x] for x in seq[1:]]) @ np.ones(3) for seq in sequences]
    )
    assert expected.sum() == pytest.approx(1, abs=1e-12)
    for hmm in (documented, built_in):
        log_probs = hmm.optimal_log_probs(sequences)
        picked = np.take_along_axis(log_probs, sequences[:, 1:, None], axis=2)[..., 0].sum(axis=1)
        np.testing.assert_allclose(np.exp(picked), expected, rtol=1e-10)
    assert documented.entropy_rate() == pytest.approx(built_in.entropy_rate(), abs=1e-6)
