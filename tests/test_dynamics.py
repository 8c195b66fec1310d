"""Stage predictors (Process.stage_losses) against brute-force enumeration, and `nanomarkov dynamics`."""

import itertools

import numpy as np
import pytest

from nanomarkov.processes.incontext import InContextChain
from nanomarkov.processes.korder import KOrderChain
from nanomarkov.processes.markov import MarkovChain

# ------------------------------------------------------------ stage losses by enumeration


def every_sequence(k, n_states_after_bos):
    """All (x1, ..., xn) over k states, as an (k^n, n) int array."""
    return np.array(list(itertools.product(range(k), repeat=n_states_after_bos)))


def korder_probability(chain, xs):
    """P(x1..xn) of a k-th order chain, straight from its start and transitions."""
    order = chain.order
    p = chain.start[tuple(xs[:order])]
    for t in range(order, len(xs)):
        p *= chain.transitions[tuple(xs[t - order : t + 1])]
    return p


def enumerated_unigram(sequences, probs, k):
    """The expected loss of predicting every x_t with q = the mean law of x_t over positions."""
    q = np.zeros(k)
    for xs, p in zip(sequences, probs):
        q += p * np.bincount(xs, minlength=k) / len(xs)
    return sum(p * -np.log(q[xs]).mean() for xs, p in zip(sequences, probs)), q


def enumerated_first_order(sequences, probs, k):
    """Expected loss of P_t(x_t | x_{t-1}) per position t (P(x1) at t = 1), from the enumerated joint laws."""
    n = sequences.shape[1]
    first = np.zeros(k)
    pairs = np.zeros((n, k, k))
    for xs, p in zip(sequences, probs):
        first[xs[0]] += p
        for t in range(1, n):
            pairs[t, xs[t - 1], xs[t]] += p
    conditional = pairs / np.maximum(pairs.sum(axis=2, keepdims=True), 1e-300)
    losses = [
        p * (-np.log(first[xs[0]]) - sum(np.log(conditional[t, xs[t - 1], xs[t]]) for t in range(1, n))) / n
        for xs, p in zip(sequences, probs)
    ]
    return sum(losses)


def test_markov_stages_match_enumeration():
    chain = MarkovChain.random(3, seed=5)
    seq_len = 6
    sequences = every_sequence(3, seq_len - 1)
    probs = np.array([chain.startprob[xs[0]] * np.prod(chain.transmat[xs[:-1], xs[1:]]) for xs in sequences])
    unigram, q = enumerated_unigram(sequences, probs, 3)
    stages = chain.stage_losses(seq_len)
    assert list(stages) == ["uniform", "unigram", "optimal"]
    assert stages["uniform"] == pytest.approx(np.log(3))
    assert stages["unigram"] == pytest.approx(unigram, abs=1e-12)
    # It is the best single distribution: the stationary one (the long-run unigram) costs more here.
    stationary_cost = sum(p * -np.log(chain.stationary()[xs]).mean() for xs, p in zip(sequences, probs))
    assert stages["unigram"] < stationary_cost
    optimal = sum(p * -np.log(p) for p in probs) / (seq_len - 1)  # H(x1..xn) / n by the chain rule
    assert stages["optimal"] == pytest.approx(optimal, abs=1e-12)
    assert chain.stage_loss_errors(seq_len) == dict.fromkeys(stages, 0.0)


@pytest.mark.parametrize(("k", "order", "seq_len"), [(3, 2, 7), (2, 3, 9), (3, 1, 5)])
def test_korder_first_order_stage_matches_enumeration(k, order, seq_len):
    chain = KOrderChain.random(k, seed=3, order=order, alpha=0.5)
    sequences = every_sequence(k, seq_len - 1)
    probs = np.array([korder_probability(chain, xs) for xs in sequences])
    assert probs.sum() == pytest.approx(1.0)
    stages = chain.stage_losses(seq_len)
    assert list(stages) == ["uniform", "unigram", "first_order", "optimal"]
    assert stages["first_order"] == pytest.approx(enumerated_first_order(sequences, probs, k), abs=1e-12)
    assert stages["unigram"] == pytest.approx(enumerated_unigram(sequences, probs, k)[0], abs=1e-12)
    if order == 1:  # reading the last state is everything an order-1 chain needs
        assert stages["first_order"] == pytest.approx(stages["optimal"], abs=1e-12)
    else:
        assert stages["unigram"] > stages["first_order"] > stages["optimal"]


def icl_probability(chain, xs):
    """P(x1..xn) of a dense in-context chain: startprob, then a Polya urn per row (Dirichlet-multinomial)."""
    alpha, k = chain.concentration, chain.n_states
    counts = np.zeros((k, k))
    p = chain.startprob[xs[0]]
    for prev, nxt in zip(xs[:-1], xs[1:]):
        p *= (counts[prev, nxt] + alpha[nxt]) / (counts[prev].sum() + alpha.sum())
        counts[prev, nxt] += 1
    return p


def test_icl_in_context_unigram_matches_enumeration():
    """The Monte-Carlo stage losses against exact enumeration, within 4 of their standard errors."""
    chain = InContextChain([0.5, 2.0], [0.3, 0.7], 2)
    seq_len = 8
    sequences = every_sequence(2, seq_len - 1)
    probs = np.array([icl_probability(chain, xs) for xs in sequences])
    assert probs.sum() == pytest.approx(1.0)
    expected = 0.0
    for xs, p in zip(sequences, probs):
        loss = -np.log(chain.startprob[xs[0]])
        for t in range(1, len(xs)):  # x_{t+1} (0-based xs[t]) from the counts of x_1..x_t
            seen = np.bincount(xs[:t], minlength=2)
            loss -= np.log((seen[xs[t]] + chain.concentration[xs[t]]) / (t + chain.concentration.sum()))
        expected += p * loss / len(xs)
    stages, errors = chain.stage_losses(seq_len), chain.stage_loss_errors(seq_len)
    assert list(stages) == ["uniform", "unigram", "in_context_unigram", "optimal", "oracle"]
    assert abs(stages["in_context_unigram"] - expected) < 4 * errors["in_context_unigram"]
    optimal = sum(p * -np.log(p) for p in probs) / (seq_len - 1)
    assert abs(stages["optimal"] - optimal) < 4 * errors["optimal"]
    unigram = enumerated_unigram(sequences, probs, 2)[0]
    assert abs(stages["unigram"] - unigram) < 4 * errors["unigram"] + 1e-9
    assert stages["oracle"] < stages["optimal"] < stages["in_context_unigram"] < stages["uniform"]


def test_stage_losses_without_marginals_use_the_long_run_unigram():
    class WithoutMarginals(MarkovChain):
        def token_marginals(self, seq_len):
            return None

    chain = MarkovChain.random(4, seed=1)
    chain = WithoutMarginals(chain.transmat, chain.startprob)
    stages = chain.stage_losses(16)
    assert (
        stages["unigram"] == chain.unigram_loss() == pytest.approx(-(chain.stationary() @ np.log(chain.stationary())))
    )
    assert stages["optimal"] == chain.optimal_loss(16)
