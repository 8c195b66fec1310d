"""MarkovChain theory and sampling against independent computations."""

import itertools
import warnings

import numpy as np
import pytest
from scipy import stats

from nanomarkov import NanoMarkovError
from nanomarkov.processes.markov import MarkovChain
from nanomarkov.processes.numerics import alias_tables

# A sampler test fails by chance with probability SIGNIFICANCE when the sampler is right.
SIGNIFICANCE = 1e-4


def enumerate_sequences(chain, seq_len):
    """Every state sequence x1..x_{L-1} with its probability, by brute force."""
    k = chain.n_states
    for states in itertools.product(range(k), repeat=seq_len - 1):
        p = chain.startprob[states[0]]
        for a, b in zip(states, states[1:]):
            p *= chain.transmat[a, b]
        yield states, p


@pytest.mark.parametrize("sparsity", [None, 50])
def test_optimal_loss_and_accuracy_match_brute_force_enumeration(sparsity):
    chain = MarkovChain.random(3, seed=7, sparsity=sparsity)
    seq_len = 6
    expected_loss = 0.0
    expected_correct = 0.0
    for states, p in enumerate_sequences(chain, seq_len):
        if p == 0:
            continue
        expected_loss -= p * np.log(p)
        # The true model's prediction at each position is the argmax of its predictive distribution.
        predictive = [chain.startprob] + [chain.transmat[s] for s in states[:-1]]
        expected_correct += p * sum(np.argmax(d) == x for d, x in zip(predictive, states))
    n_predicted = seq_len - 1
    assert chain.optimal_loss(seq_len) == pytest.approx(expected_loss / n_predicted, abs=1e-12)
    assert chain.optimal_accuracy(seq_len) == pytest.approx(expected_correct / n_predicted, abs=1e-12)


def test_true_loss_is_the_direct_log_probability_sum():
    chain = MarkovChain.random(4, seed=3)
    tokens = chain.sample(50, 9, np.random.default_rng(0))
    total = 0.0
    for seq in tokens:
        total -= np.log(chain.startprob[seq[1]])
        for a, b in zip(seq[1:-1], seq[2:]):
            total -= np.log(chain.transmat[a, b])
    assert chain.true_loss(tokens) == pytest.approx(total / (50 * 8), rel=1e-12)
    chain.chunk_sequences = 7  # several chunks, the last one short
    assert chain.true_loss(tokens) == pytest.approx(total / (50 * 8), rel=1e-12)


def test_true_loss_matches_hmmlearn_score():
    chain = MarkovChain.random(6, seed=11, sparsity=30)
    tokens = chain.sample(40, 17, np.random.default_rng(5))
    states = tokens[:, 1:].astype(np.int64)
    log_likelihood = chain.to_hmmlearn().score(states.reshape(-1, 1), lengths=[16] * 40)
    assert chain.true_loss(tokens) == pytest.approx(-log_likelihood / (40 * 16), rel=1e-9)


def test_stationary_matches_power_iteration_on_aperiodic_chain():
    chain = MarkovChain.random(20, seed=1)
    pi = np.full(20, 1 / 20)
    for _ in range(2000):
        pi = pi @ chain.transmat
    np.testing.assert_allclose(chain.stationary(), pi, atol=1e-12)


def test_stationary_of_a_periodic_chain_is_returned_not_iterated_forever():
    cycle = np.roll(np.eye(3), 1, axis=1)  # 0 -> 1 -> 2 -> 0, period 3: power iteration never converges
    chain = MarkovChain(cycle, [1.0, 0.0, 0.0])
    np.testing.assert_allclose(chain.stationary(), np.full(3, 1 / 3), atol=1e-12)
    assert chain.entropy_rate() == pytest.approx(0.0, abs=1e-12)


def test_reducible_chain_warns_and_uses_the_long_run_distribution_from_start():
    # State 0 is transient and leaks into two closed classes {1, 2} and {3}.
    transmat = np.array(
        [
            [0.2, 0.5, 0.0, 0.3],
            [0.0, 0.1, 0.9, 0.0],
            [0.0, 0.6, 0.4, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    chain = MarkovChain(transmat, [0.5, 0.25, 0.0, 0.25])
    with pytest.warns(UserWarning, match="not unique"):
        pi = chain.stationary()
    # Independent check: the Cesaro average of mu_t from startprob.
    mu, average, steps = chain.startprob.copy(), np.zeros(4), 20000
    for _ in range(steps):
        average += mu / steps
        mu = mu @ transmat
    np.testing.assert_allclose(pi, average, atol=5e-4)
    np.testing.assert_allclose(pi @ transmat, pi, atol=1e-12)


def test_entropy_rate_is_the_limit_of_optimal_loss():
    chain = MarkovChain.random(8, seed=2)
    gaps = [abs(chain.optimal_loss(L) - chain.entropy_rate()) for L in (10, 100, 1000, 10000)]
    assert all(a > b for a, b in zip(gaps, gaps[1:]))
    assert gaps[-1] < 1e-3


def test_uniform_and_unigram_losses():
    chain = MarkovChain.random(5, seed=4)
    assert chain.uniform_loss() == pytest.approx(np.log(5))
    pi = chain.stationary()
    assert chain.unigram_loss() == pytest.approx(-(pi * np.log(pi)).sum())


def test_alias_tables_reproduce_the_probabilities_exactly():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(7), size=50)
    probs[rng.random(probs.shape) < 0.4] = 0.0
    probs[:, 0] += 1e-3
    probs /= probs.sum(axis=1, keepdims=True)
    keep, alias = alias_tables(probs)
    k = probs.shape[1]
    rebuilt = keep / k
    for row in range(probs.shape[0]):
        np.add.at(rebuilt[row], alias[row], (1 - keep[row]) / k)
    np.testing.assert_allclose(rebuilt, probs, atol=1e-14)
    assert np.all(rebuilt[probs == 0] == 0)


def g_test_pvalue(observed, expected):
    """p-value of the G-test of observed counts against expected counts (cells with E > 0)."""
    mask = expected > 0
    assert np.all(observed[~mask] == 0), "a zero-probability event was sampled"
    o, e = observed[mask], expected[mask]
    if mask.sum() == 1:
        return 1.0  # one possible outcome, and only it was seen: nothing to test (and df would be 0)
    g = 2 * np.sum(np.where(o > 0, o * np.log(np.where(o > 0, o, 1) / e), 0.0))
    return stats.chi2.sf(g, df=mask.sum() - 1)


@pytest.mark.parametrize("sparsity", [None, 60])
def test_sampled_transitions_and_starts_fit_the_chain(sparsity):
    chain = MarkovChain.random(6, seed=9, sparsity=sparsity)
    tokens = chain.sample(4000, 30, np.random.default_rng(123)).astype(np.int64)
    assert np.all(tokens[:, 0] == chain.bos_token)
    starts = np.bincount(tokens[:, 1], minlength=6)
    assert g_test_pvalue(starts, chain.startprob * 4000) > SIGNIFICANCE
    counts = np.zeros((6, 6))
    np.add.at(counts, (tokens[:, 1:-1].ravel(), tokens[:, 2:].ravel()), 1)
    for s in range(6):
        assert g_test_pvalue(counts[s], chain.transmat[s] * counts[s].sum()) > SIGNIFICANCE, s


def test_sampling_agrees_with_hmmlearn():
    """Homogeneity test: our transition counts and hmmlearn's come from the same rows."""
    chain = MarkovChain.random(5, seed=21)
    ours = chain.sample(1000, 21, np.random.default_rng(1)).astype(np.int64)[:, 1:]
    model = chain.to_hmmlearn()
    # A RandomState object, not an int: with an int hmmlearn re-seeds on every
    # call and returns the same sequence 1000 times (the seed project's bug).
    hmmlearn_rng = np.random.RandomState(1)
    theirs = np.stack([model.sample(20, random_state=hmmlearn_rng)[0].ravel() for _ in range(1000)])
    for s in range(5):
        table = np.zeros((2, 5))
        for i, seqs in enumerate((ours, theirs)):
            mask = seqs[:, :-1] == s
            table[i] = np.bincount(seqs[:, 1:][mask], minlength=5)
        table = table[:, table.sum(axis=0) > 0]
        assert stats.chi2_contingency(table)[1] > SIGNIFICANCE, s
    start_table = np.stack([np.bincount(ours[:, 0], minlength=5), np.bincount(theirs[:, 0], minlength=5)])
    assert stats.chi2_contingency(start_table[:, start_table.sum(axis=0) > 0])[1] > SIGNIFICANCE


def test_sparse_rows_keep_exactly_the_promised_number_of_targets():
    for k, sparsity, keep in [(100, 75, 25), (10, 99, 1), (7, 50, 3), (40, 10, 36)]:
        chain = MarkovChain.random(k, seed=5, sparsity=sparsity)
        assert np.all((chain.transmat > 0).sum(axis=1) == keep), (k, sparsity)


def test_same_seed_same_chain_and_bytes_any_chunking():
    a, b = MarkovChain.random(12, seed=8), MarkovChain.random(12, seed=8)
    np.testing.assert_array_equal(a.transmat, b.transmat)
    assert not np.array_equal(a.transmat, MarkovChain.random(12, seed=9).transmat)
    whole = a.sample(30, 11, np.random.default_rng(4))
    rng = np.random.default_rng(4)
    pieces = np.vstack([b.sample(n, 11, rng) for n in (7, 1, 22)])
    np.testing.assert_array_equal(whole, pieces)


def test_hmmlearn_round_trip_and_refusal_of_real_hmms():
    chain = MarkovChain.random(4, seed=6)
    back = MarkovChain.from_hmmlearn(chain.to_hmmlearn())
    np.testing.assert_array_equal(back.transmat, chain.transmat)
    np.testing.assert_array_equal(back.startprob, chain.startprob)
    hmm = chain.to_hmmlearn()
    hmm.emissionprob_ = np.full((4, 4), 0.25)
    with pytest.raises(NanoMarkovError, match="not the identity"):
        MarkovChain.from_hmmlearn(hmm)


@pytest.mark.parametrize(
    "transmat, startprob, message",
    [
        ([[1.0, 0.0]], [1.0], "square"),
        ([[1.0]], [1.0], "at least 2"),
        ([[0.5, 0.5], [0.7, 0.2]], [0.5, 0.5], "sum to 1"),
        ([[1.5, -0.5], [0.5, 0.5]], [0.5, 0.5], "negative"),
        ([[np.nan, 1.0], [0.5, 0.5]], [0.5, 0.5], "non-finite"),
        ([[0.5, 0.5], [0.5, 0.5]], [0.5, 0.5, 0.0], "shape"),
    ],
)
def test_invalid_chains_are_rejected(transmat, startprob, message):
    with pytest.raises(NanoMarkovError, match=message):
        MarkovChain(transmat, startprob)


def test_chain_arrays_are_read_only():
    chain = MarkovChain.random(3, seed=0)
    with pytest.raises(ValueError):
        chain.transmat[0, 0] = 1.0


def test_random_rejects_bad_parameters():
    for kwargs in [dict(n_states=1), dict(n_states=5, alpha=0.0), dict(n_states=5, sparsity=100)]:
        with pytest.raises(NanoMarkovError):
            MarkovChain.random(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MarkovChain.random(5, sparsity=0).stationary()  # sparsity 0 is dense, irreducible


@pytest.mark.parametrize("sparsity", [None, 90])
def test_optimal_loss_of_long_sequences_matches_the_plain_recursion(sparsity):
    """state_marginals stops iterating once mu_t has converged; the result must not move."""
    chain = MarkovChain.random(30, seed=12, sparsity=sparsity)
    mu, losses = chain.startprob.copy(), [float(-(chain.startprob * np.log(chain.startprob)).sum())]
    row_entropy = np.array([-(p[p > 0] * np.log(p[p > 0])).sum() for p in chain.transmat])
    for _ in range(998):
        losses.append(float(mu @ row_entropy))
        mu = mu @ chain.transmat
    assert chain.optimal_loss(1000) == pytest.approx(np.mean(losses), abs=1e-13)
