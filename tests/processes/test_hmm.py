"""HiddenMarkovModel against independent computations: hmmlearn, brute-force Bayes, Monte-Carlo."""

import itertools

import numpy as np
import pytest
from hmmlearn.hmm import CategoricalHMM
from scipy import stats
from test_markov import SIGNIFICANCE, g_test_pvalue

from nanomarkov import NanoMarkovError
from nanomarkov.processes import hmm
from nanomarkov.processes.hmm import HiddenMarkovModel


def hmmlearn_model(model):
    theirs = CategoricalHMM(n_components=model.n_hidden, n_features=model.n_states, init_params="", params="")
    theirs.startprob_ = np.array(model.startprob)
    theirs.transmat_ = np.array(model.transmat)
    theirs.emissionprob_ = np.array(model.emissions)
    return theirs


def mealy_mess3(x, a):
    """The literature's token-labelled matrices T[k][i, j] = P(emit k, go to j | in i), written out."""
    b, y = (1 - a) / 2, 1 - 2 * x
    return np.array(
        [[[(a if j == k else b) * (y if i == j else x) for j in range(3)] for i in range(3)] for k in range(3)]
    )


def path_probabilities(model, states):
    """P(x_1..x_t, h_1..h_t) for every hidden path, by the definition (a dict path -> probability)."""
    out = {}
    for path in itertools.product(range(model.n_hidden), repeat=len(states)):
        p = model.startprob[path[0]] * model.emissions[path[0], states[0]]
        for t in range(1, len(states)):
            p *= model.transmat[path[t - 1], path[t]] * model.emissions[path[t], states[t]]
        out[path] = p
    return out


def sequence_probability(model, states):
    return sum(path_probabilities(model, states).values()) if states else 1.0


def brute_force(model, seq_len):
    """Expected loss and accuracy of the optimal predictor at each position, listing every sequence and hidden path.

    The predictor at position t is P(x_t | x_<t), a ratio of enumerated prefix probabilities.
    """
    k, n = model.n_states, seq_len - 1
    prefix = {s: sequence_probability(model, s) for m in range(n + 1) for s in itertools.product(range(k), repeat=m)}
    losses, accuracies = np.zeros(n), np.zeros(n)
    for s, p in prefix.items():
        if len(s) < n and p > 0:
            nxt = np.array([prefix[s + (x,)] for x in range(k)])
            losses[len(s)] -= sum(q * np.log(q / p) for q in nxt if q > 0)
            accuracies[len(s)] += nxt.max()
    return losses, accuracies


TINY = [
    HiddenMarkovModel.random(2, seed=3, hidden_states=3),
    HiddenMarkovModel.random(3, seed=4, hidden_states=2),
    HiddenMarkovModel(
        [[0.5, 0.5, 0.0], [0.0, 0.2, 0.8], [1.0, 0.0, 0.0]], [[1.0, 0.0], [0.3, 0.7], [0.0, 1.0]], [0.6, 0.4, 0.0]
    ),
]


@pytest.mark.parametrize("model", TINY + [HiddenMarkovModel.mess3(0.1, 0.6)])
def test_optimal_loss_and_accuracy_match_brute_force(model, monkeypatch):
    monkeypatch.setattr(hmm, "MC_TOKENS", 2**12)  # the entropy rate is not under test here
    for seq_len in (2, 3, 6):
        theory = model.theory(seq_len)
        losses, accuracies = brute_force(model, seq_len)
        assert theory["optimal_loss"] == pytest.approx(losses.mean(), rel=1e-12)
        assert theory["optimal_accuracy"] == pytest.approx(accuracies.mean(), rel=1e-12)
        assert theory["optimal_loss_se"] == theory["optimal_accuracy_se"] == 0.0


@pytest.mark.parametrize("model", TINY + [HiddenMarkovModel.mess3()])
def test_belief_states_are_bayes_over_hidden_paths(model):
    tokens = model.sample(6, 6, np.random.default_rng(0))
    beliefs = model.belief_states(tokens)
    assert beliefs.shape == (6, 6, model.n_hidden)
    for seq, belief in zip(tokens, beliefs):
        assert np.allclose(belief[0], model.startprob)
        for t in range(1, len(seq)):
            posterior = np.zeros(model.n_hidden)
            for path, p in path_probabilities(model, seq[1 : t + 1]).items():
                posterior[path[-1]] += p
            assert np.allclose(belief[t], posterior / posterior.sum(), atol=1e-12), (seq, t)


@pytest.mark.parametrize(
    "model", TINY + [HiddenMarkovModel.mess3(), HiddenMarkovModel.random(6, seed=9, hidden_states=5)]
)
def test_true_loss_matches_hmmlearn_score(model):
    for n, seq_len in ((40, 30), (3, 3000)):  # the long ones would underflow without renormalising
        tokens = model.sample(n, seq_len, np.random.default_rng(seq_len))
        log_likelihood = hmmlearn_model(model).score(tokens[:, 1:].reshape(-1, 1), lengths=[seq_len - 1] * n)
        assert model.true_loss(tokens) == pytest.approx(-log_likelihood / (n * (seq_len - 1)), rel=1e-10)
        picked = np.take_along_axis(model.optimal_log_probs(tokens), tokens[:, 1:, None].astype(np.int64), axis=2)
        assert -picked.mean() == pytest.approx(model.true_loss(tokens), rel=1e-10)


def test_optimal_log_probs_are_minus_infinity_where_impossible():
    alternating = HiddenMarkovModel([[0.0, 1.0], [1.0, 0.0]], np.eye(2), [0.5, 0.5])  # 0101... or 1010...
    log_probs = alternating.optimal_log_probs(np.array([[2, 0, 1, 0]]))
    assert np.allclose(np.exp(log_probs[0]), [[0.5, 0.5], [0, 1], [1, 0]])
    assert log_probs[0, 1, 0] == log_probs[0, 2, 1] == -np.inf
    assert alternating.true_loss(np.array([[2, 0, 1, 0]])) == pytest.approx(np.log(2) / 3)
    assert alternating.true_loss(np.array([[2, 0, 0, 1]])) == np.inf
    assert np.all(np.isfinite(alternating.belief_states(np.array([[2, 0, 0, 1]]))))


def test_mess3_is_the_literature_process_in_moore_form():
    for x, a in ((0.05, 0.85), (0.15, 0.6)):
        model = HiddenMarkovModel.mess3(x, a)
        mealy = mealy_mess3(x, a)
        assert np.allclose(mealy.sum(axis=(0, 2)), 1.0)  # sum_k T(k) is row-stochastic
        for k in range(3):
            assert np.allclose(model.transmat * model.emissions[:, k], mealy[k])
        assert np.allclose(model.transmat.sum(axis=1), 1) and np.allclose(model.emissions.sum(axis=1), 1)
        assert np.allclose(model.startprob @ model.transmat, model.startprob)  # stationary start
        # The literature's belief update eta <- eta T(x) / |eta T(x)| from the uniform start gives our beliefs.
        tokens = model.sample(20, 40, np.random.default_rng(1))
        beliefs = model.belief_states(tokens)
        for seq, belief in zip(tokens, beliefs):
            eta = np.full(3, 1 / 3)
            for t, token in enumerate(seq[1:], start=1):
                eta = eta @ mealy[token]
                eta /= eta.sum()
                assert np.allclose(belief[t], eta, atol=1e-12)
    assert HiddenMarkovModel.mess3().options() == {"preset": "mess3", "hidden_states": 3, "x": 0.05, "a": 0.85}


def models_for_rates():
    return [HiddenMarkovModel.mess3(), HiddenMarkovModel.random(4, seed=2, hidden_states=3)]


def test_monte_carlo_estimates_agree_with_the_exact_and_bracketed_values(monkeypatch):
    monkeypatch.setattr(hmm, "MC_TOKENS", 2**17)
    exact = [(m.theory(8), m.theory(40)) for m in models_for_rates()]
    assert all(short["optimal_loss_se"] == 0.0 and long["optimal_loss_se"] < 1e-6 for short, long in exact)
    assert all(short["entropy_rate_se"] < 1e-6 for short, _ in exact)  # both brackets are tight
    monkeypatch.setattr(hmm, "MAX_ENUMERATED_ENTRIES", 0)  # exact at position 1 only, bracket far too wide
    monkeypatch.setattr(hmm, "msp_state_cap", lambda n_tokens, n_hidden: 1)  # and no mixed-state presentation
    for model, theories in zip(models_for_rates(), exact):
        fresh = HiddenMarkovModel(model.transmat, model.emissions, model.startprob)
        for e, m in zip(theories, (fresh.theory(8), fresh.theory(40))):
            for key in ("optimal_loss", "optimal_accuracy", "entropy_rate"):
                assert 0 < m[key + "_se"] < 5e-3
                assert abs(m[key] - e[key]) < 5 * m[key + "_se"] + e[key + "_se"], key


def position_loss(model, t):
    """H(x_t | x_<t) by brute force."""
    return brute_force(model, t + 1)[0][-1]


@pytest.mark.parametrize("model", models_for_rates())
def test_entropy_rate_lies_between_brute_force_bounds(model, monkeypatch):
    """H(x_t | x_<t, h_1) <= entropy rate <= H(x_t | x_<t) (Cover & Thomas 4.5.1), both by brute force at t = 4."""
    t = 4
    upper = position_loss(model, t)
    lower = sum(
        model.startprob[s]
        * position_loss(HiddenMarkovModel(model.transmat, model.emissions, np.eye(model.n_hidden)[s]), t)
        for s in range(model.n_hidden)
    )
    rate, error = model.entropy_rate(), model.theory(2)["entropy_rate_se"]
    assert lower - error <= rate <= upper + error
    assert upper - lower > 10 * error  # t = 4 is a much looser bracket than the class's own
    monkeypatch.setattr(hmm, "MC_TOKENS", 2**14)  # for the accuracy at 128, not under test
    assert model.optimal_loss(128) > rate  # a stationary process: the loss only falls with position


def test_sampled_short_sequences_fit_their_probabilities():
    model = HiddenMarkovModel.random(3, seed=7, hidden_states=2)
    tokens = model.sample(20000, 4, np.random.default_rng(2)).astype(np.int64)[:, 1:]
    counts = np.bincount(tokens @ np.array([9, 3, 1]), minlength=27)
    expected = np.array([sequence_probability(model, s) for s in itertools.product(range(3), repeat=3)])
    assert g_test_pvalue(counts, expected * 20000) > SIGNIFICANCE


def test_sampling_agrees_with_hmmlearn():
    model = HiddenMarkovModel.random(3, seed=8, hidden_states=4)
    ours = model.sample(2000, 4, np.random.default_rng(3)).astype(np.int64)[:, 1:]
    theirs_model, rng = hmmlearn_model(model), np.random.RandomState(3)
    theirs = np.stack([theirs_model.sample(3, random_state=rng)[0].ravel() for _ in range(2000)])
    table = np.stack([np.bincount(seqs @ np.array([9, 3, 1]), minlength=27) for seqs in (ours, theirs)])
    assert stats.chi2_contingency(table[:, table.sum(axis=0) > 0])[1] > SIGNIFICANCE


@pytest.mark.parametrize("model", [HiddenMarkovModel.mess3(), HiddenMarkovModel.random(5, seed=1, hidden_states=3)])
def test_late_tokens_follow_the_stationary_emission_distribution(model):
    last = model.sample(20000, 30, np.random.default_rng(4))[:, -1].astype(np.int64)  # one per sequence: independent
    frequencies = np.linalg.matrix_power(model.transmat.T, 200) @ np.full(model.n_hidden, 1 / model.n_hidden)
    expected = frequencies @ model.emissions
    assert g_test_pvalue(np.bincount(last, minlength=model.n_states), expected * 20000) > SIGNIFICANCE
    assert model.unigram_loss() == pytest.approx(-(expected * np.log(expected)).sum(), rel=1e-9)


def test_bytes_do_not_depend_on_chunking_and_random_is_reproducible():
    model = HiddenMarkovModel.random(4, seed=6, hidden_states=3)
    whole = model.sample(30, 9, np.random.default_rng(5))
    rng = np.random.default_rng(5)
    parts = np.concatenate([model.sample(10, 9, rng), model.sample(20, 9, rng)])
    assert whole.tobytes() == parts.tobytes() and whole.dtype == np.uint16
    assert np.all(whole[:, 0] == 4) and whole[:, 1:].max() < 4
    again = HiddenMarkovModel.random(4, seed=6, hidden_states=3)
    assert all(np.array_equal(getattr(model, n), getattr(again, n)) for n in HiddenMarkovModel.ARRAYS)


def test_options_folder_names_and_rebuilding_from_the_arrays():
    for model in (
        HiddenMarkovModel.random(3, preset="mess3"),
        HiddenMarkovModel.random(3, preset="mess3", x=0.1, a=0.6),
        HiddenMarkovModel.random(5, seed=2, hidden_states=4, sparsity=50),
    ):
        rebuilt = HiddenMarkovModel(**{name: getattr(model, name) for name in HiddenMarkovModel.ARRAYS})
        assert rebuilt.options() == model.options()
    assert HiddenMarkovModel.random(3, preset="mess3", x=0.1, a=0.6).options()["x"] == 0.1
    assert HiddenMarkovModel.random(3, seed=1, hidden_states=3).options() == {"preset": None, "hidden_states": 3}
    assert HiddenMarkovModel.folder_name(3, preset="mess3", hidden_states=3, x=0.05, a=0.85) == "mess3"
    assert HiddenMarkovModel.folder_name(3, preset="mess3", x=0.1, a=0.6) == "mess3-x0.1-a0.6"
    assert HiddenMarkovModel.folder_name(5, preset=None, hidden_states=4) == "hmm5-h4"
    sparse = HiddenMarkovModel.random(6, seed=2, hidden_states=8, sparsity=75)
    assert np.all((sparse.transmat > 0).sum(axis=1) == 2)
    assert np.allclose(sparse.startprob @ sparse.transmat, sparse.startprob)
    with pytest.raises(ValueError):
        sparse.transmat[0, 0] = 1.0


@pytest.mark.parametrize(
    "arrays, message",
    [
        (([[1.0]], [[0.5, 0.5]], [1.0]), "H >= 2"),
        (([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0]], [0.5, 0.5]), "emissions must have shape"),
        (([[1.0, 0.0], [0.0, 1.0]], [[1.0], [1.0]], [0.5, 0.5]), "K >= 2"),
        (([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]], [1.0]), "startprob must have shape"),
        (([[0.9, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5]), "transmat rows does not sum to 1"),
        (([[1.0, 0.0], [0.0, 1.0]], [[1.5, -0.5], [0.0, 1.0]], [0.5, 0.5]), "emissions rows has negative"),
        (([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]], [np.nan, 0.5]), "startprob has non-finite"),
    ],
)
def test_invalid_arrays_are_rejected(arrays, message):
    with pytest.raises(NanoMarkovError, match=message):
        HiddenMarkovModel(*arrays)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_states=4, preset="mess3"), "3 tokens"),
        (dict(n_states=3, preset="mess3", hidden_states=4), "3 hidden states"),
        (dict(n_states=3, preset="mess3", x=0.5), "0 < x < 1/2"),
        (dict(n_states=3, preset="mess3", a=1.0), "0 < a < 1"),
        (dict(n_states=3, preset="mess3", sparsity=50), "mess3 is fixed"),
        (dict(n_states=3, preset="mess4"), "unknown HMM preset"),
        (dict(n_states=3, x=0.1), "need preset mess3"),
        (dict(n_states=3, hidden_states=1), "hidden_states must be"),
        (dict(n_states=1), "n_states must be"),
    ],
)
def test_random_rejects_bad_parameters(kwargs, message):
    with pytest.raises(NanoMarkovError, match=message):
        HiddenMarkovModel.random(**kwargs)


def test_bad_tokens_are_rejected():
    model = HiddenMarkovModel.mess3()
    with pytest.raises(NanoMarkovError, match="BOS"):
        model.belief_states(np.array([[0, 1, 2]]))
    with pytest.raises(NanoMarkovError, match="states 0..2"):
        model.true_loss(np.array([[3, 1, 3]]))
    with pytest.raises(NanoMarkovError, match="seq_len"):
        model.sample(2, 1, np.random.default_rng(0))
