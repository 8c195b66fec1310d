"""Token-labelled HMMs (T[x][i, j] = P(token x, next hidden j | hidden i)) against their definition,
enumerated over every hidden path, against the state-emitting form, and against hmmlearn."""

import itertools

import numpy as np
import pytest
from test_hmm import TINY, hmmlearn_model, mealy_mess3
from test_markov import SIGNIFICANCE, g_test_pvalue

from nanomarkov import NanoMarkovError
from nanomarkov.data import generate_dataset, load_dataset
from nanomarkov.processes import hmm
from nanomarkov.processes.hmm import HiddenMarkovModel


@pytest.fixture(autouse=True)
def short_exact_head(monkeypatch):
    """Theory enumerates 8 positions or so, not the thousands of prefixes it would: these tests look no further."""
    monkeypatch.setattr(hmm, "MAX_ENUMERATED_ENTRIES", 2**15)


def path_probabilities(token_transitions, startprob, states):
    """P(x_1..x_n, s_0..s_n) for every hidden path s_0..s_n, from the definition (a dict path -> probability)."""
    n_hidden = len(startprob)
    out = {}
    for path in itertools.product(range(n_hidden), repeat=len(states) + 1):
        p = startprob[path[0]]
        for t, x in enumerate(states):
            p *= token_transitions[x][path[t], path[t + 1]]
        out[path] = p
    return out


def probabilities(model, length):
    """{x_1..x_m: P(x_1..x_m)} for every m <= length, summed over hidden paths."""
    t, pi = np.asarray(model.token_transitions), np.asarray(model.startprob)
    k = t.shape[0]
    return {
        s: sum(path_probabilities(t, pi, s).values())
        for m in range(length + 1)
        for s in itertools.product(range(k), repeat=m)
    }


def brute_force(model, seq_len):
    """Per position t = 1..L-1: H(x_t | x_<t) and the optimal accuracy, from the enumerated probabilities."""
    prefix, n = probabilities(model, seq_len - 1), seq_len - 1
    losses, accuracies = np.zeros(n), np.zeros(n)
    for s, p in prefix.items():
        if len(s) < n and p > 0:
            nxt = np.array([prefix[s + (x,)] for x in range(model.n_states)])
            losses[len(s)] -= sum(q * np.log(q / p) for q in nxt if q > 0)
            accuracies[len(s)] += nxt.max()
    return losses, accuracies


def random_token_hmm(k, h, seed, zeros=0.3):
    """Random T (K, H, H) with some zero entries, not of the state-emitting form (the token depends on both ends)."""
    rng = np.random.default_rng(seed)
    joint = rng.dirichlet(np.ones(k * h), size=h) * (rng.random((h, k * h)) > zeros)
    joint[:, 0] += joint.sum(axis=1) == 0  # no row left empty
    joint /= joint.sum(axis=1, keepdims=True)
    return joint.reshape(h, k, h).transpose(1, 0, 2)


TOKEN_MODELS = [
    HiddenMarkovModel.from_token_transitions(random_token_hmm(2, 3, seed=1)),
    HiddenMarkovModel.from_token_transitions(random_token_hmm(3, 2, seed=2), startprob=[0.9, 0.1]),
    HiddenMarkovModel.from_token_transitions([[[0.5]], [[0.5]]]),  # a fair coin: one hidden state
]


@pytest.mark.parametrize("model", TOKEN_MODELS)
def test_optimum_by_position_matches_enumeration_over_hidden_paths(model):
    losses, accuracies = brute_force(model, 6)
    ours, errors = model.optimal_loss_by_position(6)
    np.testing.assert_allclose(ours, losses, rtol=1e-12, atol=1e-15)
    assert np.all(errors == 0.0)
    assert model.optimal_accuracy(6) == pytest.approx(accuracies.mean(), rel=1e-12)


@pytest.mark.parametrize("model", TOKEN_MODELS)
def test_predictions_beliefs_and_true_loss_are_bayes_over_hidden_paths(model):
    tokens = model.sample(8, 6, np.random.default_rng(0))
    log_probs, beliefs = model.optimal_log_probs(tokens), model.belief_states(tokens)
    prefix = probabilities(model, 5)
    t_matrices, pi = np.asarray(model.token_transitions), np.asarray(model.startprob)
    for seq, log_p, belief in zip(tokens[:, 1:].tolist(), log_probs, beliefs):
        np.testing.assert_allclose(belief[0], pi, atol=1e-15)
        for t in range(len(seq)):
            nxt = np.array([prefix[tuple(seq[:t]) + (x,)] for x in range(model.n_states)])
            np.testing.assert_allclose(np.exp(log_p[t]), nxt / prefix[tuple(seq[:t])], atol=1e-12)
            posterior = np.zeros(model.n_hidden)
            for path, p in path_probabilities(t_matrices, pi, seq[: t + 1]).items():
                posterior[path[-1]] += p
            np.testing.assert_allclose(belief[t + 1], posterior / posterior.sum(), atol=1e-12)
    expected = -np.mean([np.log(prefix[tuple(seq)]) for seq in tokens[:, 1:].tolist()]) / 5
    assert model.true_loss(tokens) == pytest.approx(expected, rel=1e-12)


def test_start_defaults_to_the_stationary_law_and_the_coin_is_iid():
    model = TOKEN_MODELS[0]
    chain = model.token_transitions.sum(axis=0)
    np.testing.assert_allclose(model.startprob @ chain, model.startprob, atol=1e-14)
    coin = HiddenMarkovModel.from_token_transitions([[[0.2]], [[0.8]]])
    binary_entropy = -(0.2 * np.log(0.2) + 0.8 * np.log(0.8))
    assert coin.entropy_rate() == pytest.approx(binary_entropy, rel=1e-12)
    assert coin.theory(5)["entropy_rate_se"] < 1e-12 and coin.unigram_loss() == pytest.approx(binary_entropy)


@pytest.mark.parametrize(
    "model",
    [HiddenMarkovModel.mess3(), TINY[2]],  # TINY[2] has zeros and a start that is not stationary
)
def test_the_state_emitting_form_written_token_labelled_is_the_same_process(model):
    token = HiddenMarkovModel.from_token_transitions(model.as_token_transitions(), model.startprob)
    np.testing.assert_allclose(token.optimal_loss_by_position(8)[0], model.optimal_loss_by_position(8)[0], atol=1e-12)
    assert token.optimal_accuracy(8) == pytest.approx(model.optimal_accuracy(8), abs=1e-12)
    assert token.unigram_loss() == pytest.approx(model.unigram_loss(), abs=1e-12)
    tokens = model.sample(30, 50, np.random.default_rng(3))
    log_likelihood = hmmlearn_model(model).score(tokens[:, 1:].reshape(-1, 1), lengths=[49] * 30)
    assert token.true_loss(tokens) == pytest.approx(-log_likelihood / (30 * 49), rel=1e-10)
    np.testing.assert_allclose(token.optimal_log_probs(tokens), model.optimal_log_probs(tokens), atol=1e-12)
    # Its belief is over the state that emits the next token: the state-emitting belief one hidden step on.
    np.testing.assert_allclose(
        token.belief_states(tokens)[:, 1:], model.belief_states(tokens)[:, 1:] @ model.transmat, atol=1e-12
    )


def test_mess3_written_as_the_literature_writes_it_has_the_moore_numbers_and_beliefs():
    moore = HiddenMarkovModel.mess3(0.15, 0.6)
    token = HiddenMarkovModel.from_token_transitions(mealy_mess3(0.15, 0.6))  # stationary start: uniform
    np.testing.assert_allclose(token.startprob, np.full(3, 1 / 3), atol=1e-15)
    np.testing.assert_allclose(token.optimal_loss_by_position(8)[0], moore.optimal_loss_by_position(8)[0], atol=1e-12)
    assert token.optimal_accuracy(8) == pytest.approx(moore.optimal_accuracy(8), abs=1e-12)
    tokens = moore.sample(20, 30, np.random.default_rng(5))
    np.testing.assert_allclose(token.belief_states(tokens), moore.belief_states(tokens), atol=1e-12)


@pytest.mark.parametrize(
    "model",
    [
        TOKEN_MODELS[1],
        # The token decides the next state: 0 stays, 1 switches (a sampler that forgets the token is caught).
        HiddenMarkovModel.from_token_transitions([[[0.5, 0.0], [0.0, 0.1]], [[0.0, 0.5], [0.9, 0.0]]]),
    ],
)
def test_sampled_short_sequences_fit_their_enumerated_probabilities(model):
    k = model.n_states
    tokens = model.sample(20000, 5, np.random.default_rng(2)).astype(np.int64)[:, 1:]
    counts = np.bincount(tokens @ k ** np.arange(3, -1, -1), minlength=k**4)
    prefix = probabilities(model, 4)
    expected = np.array([prefix[s] for s in itertools.product(range(k), repeat=4)])
    assert g_test_pvalue(counts, expected * 20000) > SIGNIFICANCE


def test_sampled_bytes_do_not_depend_on_chunking():
    model, rng = TOKEN_MODELS[1], np.random.default_rng(5)
    parts = np.concatenate([model.sample(10, 9, rng), model.sample(20, 9, rng)])
    assert model.sample(30, 9, np.random.default_rng(5)).tobytes() == parts.tobytes()


def test_a_token_labelled_dataset_round_trips_through_chain_npz(tmp_path):
    model = TOKEN_MODELS[0]
    generate_dataset(tmp_path / "d", None, 20, 10, seq_len=8, chain=model)
    loaded = load_dataset(tmp_path / "d").chain
    assert set(np.load(tmp_path / "d" / "chain.npz").files) == {"token_transitions", "startprob"}
    assert np.array_equal(loaded.token_transitions, model.token_transitions) and loaded.transmat is None
    assert loaded.options() == model.options() == {"preset": None, "hidden_states": 3}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(token_transitions=np.ones((2, 2, 3)) / 6), "token_transitions must have shape"),
        (dict(token_transitions=np.ones((1, 2, 2)) / 2), "token_transitions must have shape"),
        (dict(token_transitions=[[[0.5, np.nan]], [[0.5, 0.0]]]), "token_transitions must have shape"),
        (dict(token_transitions=[[[0.5, np.nan], [1, 0]], [[0.5, 0], [0, 0]]]), "non-finite"),
        (dict(token_transitions=[[[1.5, 0], [1, 0]], [[-0.5, 0], [0, 0]]]), "negative"),
        (dict(token_transitions=[[[0.5, 0], [1, 0]], [[0.4, 0], [0, 0]]]), r"rows of sum_x T\[x\]\) does not sum to 1"),
        (dict(token_transitions=np.ones((2, 2, 2)) / 4, startprob=[1.0]), r"startprob must have shape \(2,\)"),
        (dict(token_transitions=np.ones((2, 2, 2)) / 4, startprob=[0.7, 0.7]), "startprob does not sum to 1"),
        (dict(token_transitions=np.ones((2, 2, 2)) / 4, transmat=np.eye(2)), "not both"),
        (dict(transmat=np.eye(2)), "an HMM needs transmat and emissions"),
    ],
)
def test_bad_arrays_are_refused_with_a_line_naming_them(arguments, message):
    with pytest.raises(NanoMarkovError, match=message):
        HiddenMarkovModel(**arguments)
