"""KOrderChain theory and sampling against independent computations."""

import itertools
import warnings

import numpy as np
import pytest
from test_markov import SIGNIFICANCE, g_test_pvalue

from nanomarkov import NanoMarkovError
from nanomarkov.processes import korder
from nanomarkov.processes.korder import KOrderChain
from nanomarkov.processes.markov import MarkovChain


def sequence_probability(chain, states):
    """P(x1..xm) by the definition: the start marginal, then one row per later state."""
    k = chain.order
    head = min(k, len(states))
    p = chain.start.sum(axis=tuple(range(head, k)))[tuple(states[:head])]
    for t in range(k, len(states)):
        p *= chain.transitions[tuple(states[t - k : t])][states[t]]
    return p


def brute_force(chain, seq_len):
    """Expected loss and accuracy of the optimal predictor, by enumerating every sequence.

    The predictor at position t is P(x_t | x_<t) computed as a ratio of
    enumerated prefix probabilities, independently of the class's formulas.
    """
    k, n = chain.n_states, seq_len - 1
    prefix = {(): 1.0}
    for length in range(1, n + 1):
        for states in itertools.product(range(k), repeat=length):
            prefix[states] = sequence_probability(chain, states)
    loss = correct = 0.0
    for states in itertools.product(range(k), repeat=n):
        p = prefix[states]
        if p == 0:
            continue
        for t in range(n):
            predictive = np.array([prefix[states[:t] + (x,)] for x in range(k)]) / prefix[states[:t]]
            loss -= p * np.log(predictive[states[t]])
            correct += p * (np.argmax(predictive) == states[t])
    return loss / n, correct / n


@pytest.mark.parametrize(
    "n_states, order, seq_len, sparsity",
    [
        (2, 2, 7, None),
        (3, 2, 6, None),
        (3, 2, 6, 50),
        (2, 3, 7, None),
        (3, 3, 3, None),  # shorter than the order: only the start's conditionals
    ],
)
def test_optimal_loss_and_accuracy_match_brute_force_enumeration(n_states, order, seq_len, sparsity):
    chain = KOrderChain.random(n_states, order=order, seed=7, sparsity=sparsity)
    loss, accuracy = brute_force(chain, seq_len)
    assert chain.optimal_loss(seq_len) == pytest.approx(loss, abs=1e-12)
    assert chain.optimal_accuracy(seq_len) == pytest.approx(accuracy, abs=1e-12)


def test_a_start_with_zeros_still_matches_brute_force():
    chain = KOrderChain.random(3, order=2, seed=4)
    start = np.array(chain.start)
    start[0, :] = 0.0  # x1 = 0 never happens: its conditionals are undefined and must not matter
    start[2, 1] = 0.0
    chain = KOrderChain(chain.transitions, start / start.sum())
    loss, accuracy = brute_force(chain, 6)
    assert chain.optimal_loss(6) == pytest.approx(loss, abs=1e-12)
    assert chain.optimal_accuracy(6) == pytest.approx(accuracy, abs=1e-12)
    tokens = chain.sample(2000, 6, np.random.default_rng(0))
    assert not np.any(tokens[:, 1] == 0)
    assert not np.any((tokens[:, 1] == 2) & (tokens[:, 2] == 1))


@pytest.mark.parametrize("sparsity", [None, 60])
def test_order_one_is_exactly_the_markov_chain(sparsity):
    chain = KOrderChain.random(6, order=1, seed=3, sparsity=sparsity)
    markov = MarkovChain.random(6, seed=3, sparsity=sparsity)
    np.testing.assert_array_equal(chain.transitions, markov.transmat)
    np.testing.assert_array_equal(chain.to_markov_chain().startprob, markov.startprob)
    for seq_len in (2, 5, 64):
        assert chain.theory(seq_len) == pytest.approx(markov.theory(seq_len), abs=1e-13)
        (losses, errors), (markov_losses, _) = (
            chain.optimal_loss_by_position(seq_len),
            markov.optimal_loss_by_position(seq_len),
        )
        np.testing.assert_allclose(losses, markov_losses, atol=1e-13)
        assert not errors.any()  # exact
    np.testing.assert_allclose(chain.stationary(), markov.stationary(), atol=1e-14)
    tokens = chain.sample(300, 17, np.random.default_rng(5))
    np.testing.assert_array_equal(tokens, markov.sample(300, 17, np.random.default_rng(5)))
    assert chain.true_loss(tokens) == pytest.approx(markov.true_loss(tokens), rel=1e-13)


@pytest.mark.parametrize("seq_len", [2, 3, 12])
def test_true_loss_is_the_direct_log_probability_sum(seq_len):
    chain = KOrderChain.random(4, order=3, seed=3, sparsity=25)
    tokens = chain.sample(60, seq_len, np.random.default_rng(0))
    total = -sum(np.log(sequence_probability(chain, list(seq[1:]))) for seq in tokens.astype(np.int64))
    expected = total / (60 * (seq_len - 1))
    assert chain.true_loss(tokens) == pytest.approx(expected, rel=1e-12)
    chain.chunk_sequences = 7  # several chunks, the last one short
    assert chain.true_loss(tokens) == pytest.approx(expected, rel=1e-12)


def test_true_loss_averages_to_optimal_loss():
    chain = KOrderChain.random(5, order=2, seed=8)
    tokens = chain.sample(20000, 20, np.random.default_rng(2))
    per_sequence = [chain.true_loss(tokens[i : i + 1]) for i in range(0, 20000, 10)]
    # The mean of 2000 independent per-sequence losses: within 5 standard errors.
    assert abs(chain.true_loss(tokens) - chain.optimal_loss(20)) < 5 * np.std(per_sequence) / np.sqrt(2000)


def test_entropy_rate_is_the_limit_of_optimal_loss():
    chain = KOrderChain.random(4, order=2, seed=2)
    gaps = [abs(chain.optimal_loss(L) - chain.entropy_rate()) for L in (10, 100, 1000, 10000)]
    assert all(a > b for a, b in zip(gaps, gaps[1:]))
    assert gaps[-1] < 1e-3


def test_stationary_is_invariant_and_matches_the_lifted_chain():
    chain = KOrderChain.random(3, order=3, seed=5, sparsity=20)  # 2 targets per row
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one closed class: the solve is unique
        pi = chain.stationary()
    assert pi.shape == (3, 3, 3)
    # Invariance under one step, written with the tensors: pi'(b, c, x) = sum_a pi(a, b, c) P(x | a, b, c).
    np.testing.assert_allclose(np.einsum("abc,abcx->bcx", pi, chain.transitions), pi, atol=1e-13)
    lifted = chain.lifted_chain()
    np.testing.assert_allclose(pi.ravel() @ lifted.transmat, pi.ravel(), atol=1e-13)
    assert chain.entropy_rate() == pytest.approx(lifted.entropy_rate(), abs=1e-13)
    # The stationary single-state distribution is any coordinate's marginal.
    np.testing.assert_allclose(pi.sum(axis=(1, 2)), pi.sum(axis=(0, 1)), atol=1e-13)
    assert chain.unigram_loss() == pytest.approx(-(pi.sum(axis=(0, 1)) * np.log(pi.sum(axis=(0, 1)))).sum())
    assert chain.uniform_loss() == pytest.approx(np.log(3))


def test_large_lifted_chains_iterate_to_the_exact_solve():
    chain = KOrderChain.random(10, order=3, seed=6, sparsity=50)  # 1000 tuples: both routes are available
    np.testing.assert_allclose(chain._iterated_stationary(), chain.stationary().ravel(), atol=1e-12)
    big = KOrderChain.random(40, order=2, seed=6)  # 1600 tuples: past the exact solve
    with pytest.raises(NanoMarkovError, match="MAX_LIFTED_STATES"):
        big.lifted_chain()
    pi = big.stationary().ravel()
    np.testing.assert_allclose(big._shift(pi), pi, atol=1e-14)


def test_a_periodic_large_chain_is_refused_not_guessed(monkeypatch):
    monkeypatch.setattr(korder, "STATIONARY_MAX_STEPS", 500)  # it never settles; no need to wait for the full budget
    # Order 2 on 33 states: 1089 tuples. Deterministic x_t = x_{t-1} + 1 mod K is periodic.
    k = 33
    transitions = np.zeros((k, k, k))
    for a, b in itertools.product(range(k), repeat=2):
        transitions[a, b, (b + 1) % k] = 1.0
    start = np.zeros((k, k))
    start[0, 1] = 1.0  # from a uniform start it would already be stationary
    chain = KOrderChain(transitions, start)
    with pytest.raises(NanoMarkovError, match="did not settle"):
        chain.entropy_rate()


def test_a_reducible_chain_warns_like_markov_chain():
    transitions = np.zeros((2, 2, 2))
    transitions[0, 0, 0] = transitions[1, 1, 1] = 1.0  # 00 and 11 are absorbing
    transitions[0, 1] = transitions[1, 0] = [0.5, 0.5]
    chain = KOrderChain(transitions, np.full((2, 2), 0.25))
    with pytest.warns(UserWarning, match="not unique"):
        pi = chain.stationary()
    np.testing.assert_allclose(pi, [[0.5, 0.0], [0.0, 0.5]], atol=1e-12)


@pytest.mark.parametrize("sparsity", [None, 60])
def test_sampled_context_to_next_counts_and_starts_fit_the_chain(sparsity):
    chain = KOrderChain.random(4, order=2, seed=9, sparsity=sparsity)
    n = 6000
    tokens = chain.sample(n, 30, np.random.default_rng(123)).astype(np.int64)
    assert np.all(tokens[:, 0] == chain.bos_token)
    starts = np.zeros((4, 4))
    np.add.at(starts, (tokens[:, 1], tokens[:, 2]), 1)
    assert g_test_pvalue(starts.ravel(), chain.start.ravel() * n) > SIGNIFICANCE
    counts = np.zeros((4, 4, 4))
    np.add.at(counts, (tokens[:, 1:-2].ravel(), tokens[:, 2:-1].ravel(), tokens[:, 3:].ravel()), 1)
    for a, b in itertools.product(range(4), repeat=2):
        row = counts[a, b]
        assert g_test_pvalue(row, chain.transitions[a, b] * row.sum()) > SIGNIFICANCE, (a, b)


def test_sampled_starts_of_an_order_three_chain_fit_the_joint():
    chain = KOrderChain.random(3, order=3, seed=10)
    n = 20000
    tokens = chain.sample(n, 4, np.random.default_rng(7)).astype(np.int64)
    counts = np.bincount(tokens[:, 1] * 9 + tokens[:, 2] * 3 + tokens[:, 3], minlength=27)
    assert g_test_pvalue(counts, chain.start.ravel() * n) > SIGNIFICANCE


def test_same_seed_same_chain_and_bytes_any_chunking():
    a, b = KOrderChain.random(5, order=3, seed=8), KOrderChain.random(5, order=3, seed=8)
    np.testing.assert_array_equal(a.transitions, b.transitions)
    np.testing.assert_array_equal(a.start, b.start)
    assert not np.array_equal(a.transitions, KOrderChain.random(5, order=3, seed=9).transitions)
    whole = a.sample(30, 11, np.random.default_rng(4))
    rng = np.random.default_rng(4)
    pieces = np.vstack([b.sample(n, 11, rng) for n in (7, 1, 22)])
    np.testing.assert_array_equal(whole, pieces)
    assert whole.dtype == np.uint16 and whole.shape == (30, 11)


def test_sparse_rows_keep_exactly_the_promised_number_of_targets():
    for k, order, sparsity, keep in [(20, 2, 75, 5), (10, 3, 99, 1), (7, 2, 50, 3)]:
        chain = KOrderChain.random(k, order=order, seed=5, sparsity=sparsity)
        assert np.all((chain.rows > 0).sum(axis=1) == keep), (k, sparsity)


def test_properties_and_conversions():
    chain = KOrderChain.random(4, order=2, seed=0)
    assert (chain.process, chain.order, chain.n_states, chain.bos_token, chain.vocab_size) == ("korder", 2, 4, 4, 5)
    assert chain.transitions.shape == (4, 4, 4) and chain.start.shape == (4, 4)
    with pytest.raises(ValueError):
        chain.transitions[0, 0, 0] = 1.0
    with pytest.raises(NanoMarkovError, match="only an order-1"):
        chain.to_markov_chain()
    markov = KOrderChain.random(4, order=1, seed=0).to_markov_chain()
    assert isinstance(markov, MarkovChain)


@pytest.mark.parametrize(
    "transitions, start, message",
    [
        (np.full(2, 0.5), [1.0], "order >= 1"),
        (np.full((2, 3), 1 / 3), [0.5, 0.5], "shape"),
        (np.ones((1, 1)), [1.0], "at least 2"),
        (np.full((2, 2, 2), 0.5), [0.5, 0.5], "joint distribution of the first 2"),
        (np.full((2, 2, 2), 0.4), np.full((2, 2), 0.25), "sum to 1"),
        (np.full((2, 2), 0.5), [1.5, -0.5], "negative"),
        (np.full((2, 2), np.nan), [0.5, 0.5], "non-finite"),
        (np.full((2, 2, 2), 0.5), np.full((2, 2), 0.3), "sum to 1"),
    ],
)
def test_invalid_chains_are_rejected(transitions, start, message):
    with pytest.raises(NanoMarkovError, match=message):
        KOrderChain(transitions, start)


def test_random_rejects_bad_parameters_and_huge_chains():
    for kwargs in [
        dict(n_states=1, order=2),
        dict(n_states=5, order=0),
        dict(n_states=5, order=1.5),
        dict(n_states=5, order=2, alpha=0.0),
        dict(n_states=5, order=2, sparsity=100),
    ]:
        with pytest.raises(NanoMarkovError):
            KOrderChain.random(**kwargs)
    with pytest.raises(NanoMarkovError, match="2\\^26"):
        KOrderChain.random(100, order=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KOrderChain.random(3, order=2, sparsity=0).stationary()  # sparsity 0 is dense, irreducible


def test_bad_tokens_and_lengths_are_rejected():
    chain = KOrderChain.random(3, order=2, seed=1)
    with pytest.raises(NanoMarkovError, match="BOS"):
        chain.true_loss(np.array([[0, 1, 2]]))
    with pytest.raises(NanoMarkovError, match="states 0..2"):
        chain.true_loss(np.array([[3, 1, 3]]))
    with pytest.raises(NanoMarkovError, match="seq_len"):
        chain.optimal_loss(1)
    with pytest.raises(NanoMarkovError, match="seq_len"):
        chain.sample(3, 1, np.random.default_rng(0))
