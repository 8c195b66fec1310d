"""The named processes of the literature: each entropy rate against the literature's closed form, each
process's defining property on its samples, the optimum at every position of every process against an
enumeration of all short sequences, and generate -> theory through the CLI."""

import itertools
import json

import numpy as np
import pytest
from test_hmm import sequence_probability as state_emitting_probability
from test_hmm_token import mealy_mess3
from test_incontext_theory import sequence_probabilities as icl_probabilities
from test_korder import sequence_probability as korder_probability

from nanomarkov import NanoMarkovError
from nanomarkov.cli import main
from nanomarkov.data import load_dataset
from nanomarkov.processes import PROCESSES, hmm
from nanomarkov.processes.hmm import HiddenMarkovModel
from nanomarkov.processes.incontext import InContextChain
from nanomarkov.processes.korder import KOrderChain
from nanomarkov.processes.literature import NAMED_PROCESSES
from nanomarkov.processes.markov import MarkovChain

BIT = np.log(2)


@pytest.fixture(autouse=True)
def short_theory(monkeypatch):
    """Theory enumerates a few positions and estimates the rest from few samples: these tests look no further."""
    monkeypatch.setattr(hmm, "MAX_ENUMERATED_ENTRIES", 2**14)
    monkeypatch.setattr(hmm, "MC_TOKENS", 2**12)


def h(p):
    """The binary entropy in nats."""
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))


def parens_rate(depth, p):
    """Matching parentheses: the depth is a birth-death chain (up 1 from 0, p in between, 0 at the top;
    down 1 - p in between, 1 at the top); detailed balance gives its law, and only the depths strictly
    between 0 and the top draw a token, each with entropy H(p)."""
    up = [1.0] + [p] * (depth - 1)
    down = [1 - p] * (depth - 1) + [1.0]
    pi = np.cumprod([1.0] + [u / d for u, d in zip(up, down)])
    pi /= pi.sum()
    return (1 - pi[0] - pi[-1]) * h(p)


def mr_name_rate(p, q):
    """Mr. name: a first-order chain on its four words, written out; its rate is the stationary mean row entropy."""
    rows = np.array([[0, 0, 0, 1], [q, 1 - p - q, p, 0], [q, p, 1 - p - q, 0], [0, 0.5, 0.5, 0]])
    pi = np.full(4, 0.25) @ np.linalg.matrix_power(rows, 4000)
    with np.errstate(divide="ignore", invalid="ignore"):
        row_entropy = -np.where(rows > 0, rows * np.log(rows), 0).sum(axis=1)
    return pi @ row_entropy


CLOSED_FORMS = [
    ("switching", {}, (0.3 * h(0.2) + 0.2 * h(0.3)) / 0.5),  # stationary (q, p) / (p + q)
    ("switching", {"p": 0.9, "q": 0.6}, (0.6 * h(0.9) + 0.9 * h(0.6)) / 1.5),
    ("coin", {}, h(0.7)),
    ("coin", {"p": 0.1}, h(0.1)),
    ("golden_mean", {}, 2 / 3 * BIT),  # Crutchfield & Feldman 2003
    ("golden_mean", {"p": 0.3}, h(0.3) / 1.3),
    ("even", {}, 2 / 3 * BIT),
    ("even", {"p": 0.8}, h(0.8) / 1.8),
    ("z1r", {}, 1 / 3 * BIT),  # one random bit in three tokens
    ("z1r", {"p": 0.2}, h(0.2) / 3),
    ("rrxor", {}, 2 / 3 * BIT),  # two random bits in three tokens
    ("rrxor", {"p1": 0.3, "p2": 0.6}, (h(0.3) + h(0.6)) / 3),
    ("matching_parens", {}, parens_rate(4, 0.5)),
    ("matching_parens", {"depth": 2, "p": 0.3}, parens_rate(2, 0.3)),
    ("mr_name", {}, mr_name_rate(0.3, 0.2)),
]


@pytest.mark.parametrize(
    ("name", "parameters", "rate"),
    [pytest.param(*case, id=case[0] + "".join(f"-{k}{v}" for k, v in case[1].items())) for case in CLOSED_FORMS],
)
def test_entropy_rate_is_the_closed_form_of_the_literature(name, parameters, rate):
    process = PROCESSES[name].random(**parameters)
    assert process.entropy_rate() == pytest.approx(rate, rel=1e-12, abs=1e-14)
    assert process.standard_errors(8).get("entropy_rate", 0.0) == 0.0


def runs_of_ones(sequence):
    """The lengths of the runs of 1s with a 0 on both sides."""
    text = "".join(map(str, sequence))
    return [len(run) for run in text.strip("1").split("0") if run]


def has_phase(sequence, rule):
    """True when rule(t) holds for every t of one residue class mod 3."""
    return any(all(rule(t) for t in range(phase, len(sequence) - 2, 3)) for phase in range(3))


DEFINING_PROPERTIES = {
    "golden_mean": lambda s: "11" not in "".join(map(str, s)),
    "even": lambda s: all(n % 2 == 0 for n in runs_of_ones(s)),
    "z1r": lambda s: has_phase(s, lambda t: s[t] == 0 and s[t + 1] == 1),
    "rrxor": lambda s: has_phase(s, lambda t: s[t + 2] == s[t] ^ s[t + 1]),
    "sns": lambda s: "11" not in "".join(map(str, s)),  # B emits 1 and goes to A, which emits 0
    "matching_parens": lambda s: np.ptp(np.cumsum(1 - 2 * np.array(s))) <= 4,  # depth 0..4 (default)
    "mr_name": lambda s: (
        all(b == 3 for a, b in zip(s, s[1:]) if a == 0)  # Mr. -> name -> a word
        and all(b in (1, 2) for a, b in zip(s, s[1:]) if a == 3)
    ),
}


@pytest.mark.parametrize("name", DEFINING_PROPERTIES)
def test_samples_have_the_defining_property_of_the_process(name):
    process = PROCESSES[name].random()
    tokens = process.sample(300, 40, np.random.default_rng(1))[:, 1:].tolist()
    assert all(DEFINING_PROPERTIES[name](sequence) for sequence in tokens)


def test_the_chains_and_mess3_are_the_matrices_of_their_papers():
    switching = PROCESSES["switching"].random(p=0.1, q=0.4)
    np.testing.assert_array_equal(switching.transmat, [[0.9, 0.1], [0.4, 0.6]])
    np.testing.assert_allclose(switching.startprob, [0.8, 0.2], atol=1e-15)
    coin = PROCESSES["coin"].random(p=0.1)
    np.testing.assert_allclose(coin.transmat, [[0.9, 0.1], [0.9, 0.1]], atol=0)
    mess3 = PROCESSES["mess3"].random(x=0.15, a=0.6)
    np.testing.assert_allclose(mess3.token_transitions, mealy_mess3(0.15, 0.6), atol=1e-16)
    moore = HiddenMarkovModel.mess3(0.15, 0.6)  # --process hmm --preset mess3: the same token process
    np.testing.assert_allclose(mess3.optimal_loss_by_position(6)[0], moore.optimal_loss_by_position(6)[0], atol=1e-12)
    leaky = PROCESSES["leaky_rrxor"].random(epsilon=0.2)
    np.testing.assert_allclose(leaky.token_transitions, 0.8 * PROCESSES["rrxor"].random().token_transitions + 0.02)


def hidden_probability(process):
    """P(x_1..x_n) = startprob T[x_1] ... T[x_n] r, a product of the process's token-labelled matrices (r = 1 for an
    HMM; a generalized HMM's normalising eigenvector, computed here)."""
    t = process.as_token_transitions()
    values, vectors = np.linalg.eig(t.sum(axis=0))
    r = np.real(vectors[:, np.argmin(np.abs(values - 1))])
    r = r / (process.startprob @ r)

    def probability(states):
        vector = process.startprob
        for x in states:
            vector = vector @ t[x]
        return vector @ r

    return probability


def chain_probability(chain):
    return lambda states: (
        chain.startprob[states[0]] * np.prod([chain.transmat[a, b] for a, b in zip(states, states[1:])])
    )


def icl_probability(chain, n_positions):
    """P(x_1..x_m) for m <= n: the enumerated sequences of n states (test_incontext_theory), marginalised."""
    full = icl_probabilities(chain, n_positions)
    return lambda states: sum(p for seq, p in full.items() if seq[: len(states)] == tuple(states))


def enumerated_losses(probability, n_states, n_positions):
    """H(x_t | x_<t) for t = 1..n from the probabilities of every prefix."""
    prefix = {
        s: probability(s) if s else 1.0
        for m in range(n_positions + 1)
        for s in itertools.product(range(n_states), repeat=m)
    }
    losses = np.zeros(n_positions)
    for s, p in prefix.items():
        if len(s) < n_positions and p > 0:
            for q in (prefix[s + (x,)] for x in range(n_states)):
                losses[len(s)] -= q * np.log(q / p) if q > 0 else 0.0
    return losses


def every_process():
    """(name, process, probability of a prefix, positions to enumerate) for every process there is."""
    builtins = [
        ("markov", MarkovChain.random(3, seed=1), chain_probability, 5),
        ("korder", KOrderChain.random(2, order=2, seed=1), lambda c: lambda s: korder_probability(c, s), 6),
        ("icl", InContextChain([0.5, 2.0], [0.3, 0.7], 2), lambda c: icl_probability(c, 5), 5),
        (
            "hmm",
            HiddenMarkovModel.random(2, seed=3, hidden_states=3),
            lambda m: lambda s: state_emitting_probability(m, s),
            6,
        ),
        ("hmm mess3", HiddenMarkovModel.mess3(0.1, 0.6), hidden_probability, 5),
    ]
    named = []
    for cls in NAMED_PROCESSES:
        process = cls.random()
        probability = chain_probability if isinstance(process, MarkovChain) else hidden_probability
        named.append((cls.process, process, probability, {2: 6, 3: 5, 4: 5}.get(process.n_states, 3)))
    return builtins + named


@pytest.mark.parametrize(
    ("name", "process", "probability", "positions"), [pytest.param(*case, id=case[0]) for case in every_process()]
)
def test_optimum_at_every_position_matches_enumeration(name, process, probability, positions):
    expected = enumerated_losses(probability(process), process.n_states, positions)
    losses, errors = process.optimal_loss_by_position(positions + 1)
    assert np.all(np.abs(losses - expected) <= 5 * errors + 1e-12), (name, losses, expected, errors)
    assert name == "icl" or not errors.any()  # exact, but for icl's Monte-Carlo


def test_named_processes_fix_their_k_and_refuse_what_does_not_apply():
    assert PROCESSES["golden_mean"].random(2, seed=7).options() == {"p": 0.5}
    with pytest.raises(NanoMarkovError, match="K = 2 tokens, fixed by the process; got K = 3"):
        PROCESSES["golden_mean"].random(3)
    with pytest.raises(NanoMarkovError, match="--alpha and --sparsity shape random rows"):
        PROCESSES["rrxor"].random(sparsity=50)
    with pytest.raises(NanoMarkovError, match="--p of --process even must lie strictly between 0 and 1"):
        PROCESSES["even"].random(p=1.5)
    with pytest.raises(NanoMarkovError, match="has no parameter 'q'"):
        PROCESSES["golden_mean"](q=0.3)
    cls = PROCESSES["rrxor"]
    assert cls.folder_name(p1=0.3) == "rrxor-p10.3" and cls.parse_folder_name("rrxor-p10.3") == (2, {"p1": 0.3})
    assert cls.folder_name(p1=0.5) == "rrxor" and cls.parse_folder_name("rrxor") == (2, {})
    assert PROCESSES["mess3"].folder_name() == "mess3-mealy" and cls.parse_folder_name("rrxorx") is None


def test_a_depth_past_the_matrix_limit_is_refused_before_any_matrix_is_built(tmp_path, capsys):
    # 2 tokens x (D+1)^2 entries within 2^24: 2 * 2896^2 = 16,773,632 fits, 2 * 2897^2 = 16,785,218 does not.
    assert PROCESSES["matching_parens"].MAX_DEPTH == 2895
    with pytest.raises(NanoMarkovError, match=r"--depth of --process matching_parens must be at most 2895 \("):
        PROCESSES["matching_parens"](depth=2896)
    spec = tmp_path / "spec.json"
    spec.write_text('{"process": "matching_parens", "depth": 30000}')
    for command in (
        ["generate", "--process", "matching_parens", "--depth", "100000", "--out", str(tmp_path / "parens")],
        ["theory", "--spec", str(spec)],
    ):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.endswith("use a smaller --depth"), err
    assert not (tmp_path / "parens").exists()


def test_a_missing_named_dataset_names_the_command_that_makes_it_without_k(tmp_path):
    with pytest.raises(
        NanoMarkovError, match="create it with: nanomarkov generate --process golden_mean --p 0.4 --train"
    ):
        load_dataset(tmp_path / "golden_mean-p0.4")


@pytest.mark.parametrize("name", ["switching", "z1r"])
def test_chain_npz_holds_matrices_and_parameters_and_an_edited_matrix_is_refused(name):
    process = PROCESSES[name].random(p=0.3)
    arrays = process.arrays()
    rebuilt = PROCESSES[name].from_arrays(arrays)
    assert rebuilt.options() == process.options() and arrays["p"].shape == ()
    matrix = "transmat" if name == "switching" else "token_transitions"
    arrays[matrix] = arrays[matrix][::-1].copy()
    with pytest.raises(NanoMarkovError, match=f"{matrix} is not that of --process {name}"):
        PROCESSES[name].from_arrays(arrays)


@pytest.mark.parametrize("cls", NAMED_PROCESSES, ids=lambda cls: cls.process)
def test_generate_then_theory_through_the_cli(cls, tmp_path, capsys):
    out = tmp_path / cls.process
    seq_len = "4" if cls.N_STATES > 4 else "6"
    flags = ["--train", "4", "--val", "4", "--seq_len", seq_len, "--out", str(out)]
    assert main(["generate", "--process", cls.process, *flags]) == 0
    capsys.readouterr()
    assert main(["theory", str(out), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    process = cls.random()
    assert row["process"] == cls.process and row["n_states"] == cls.N_STATES == process.n_states
    assert row["optimal_loss"] == pytest.approx(process.optimal_loss(int(seq_len)), rel=1e-12)
    loaded = load_dataset(out).chain
    assert type(loaded) is cls and loaded.options() == process.options()
