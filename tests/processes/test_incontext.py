"""InContextChain: the Bayes predictor, the samplers and the Monte-Carlo theory against independent computations."""

import functools
import itertools
import warnings

import numpy as np
import pytest
from scipy import integrate, stats
from test_markov import SIGNIFICANCE, g_test_pvalue

from nanomarkov import NanoMarkovError
from nanomarkov.processes import incontext
from nanomarkov.processes.incontext import InContextChain
from nanomarkov.processes.markov import MarkovChain

# The tiny processes the enumeration tests integrate numerically: (concentration, startprob, support_size).
TINY = {
    "dense-2": ([0.5, 0.5], [0.3, 0.7], 2),  # endpoint singularities of Beta(1/2, 1/2)
    "dense-2-asymmetric": ([0.7, 1.8], [0.5, 0.5], 2),
    "dense-3": ([1.0, 2.0, 1.5], [0.2, 0.3, 0.5], 3),
    "sparse-4-of-2": ([1.5] * 4, [0.1, 0.2, 0.3, 0.4], 2),
    "sparse-3-of-1": ([0.8] * 3, [1 / 3] * 3, 1),
}


def dirichlet_moment(alpha, n):
    """E[prod_j p_j^n_j] for p ~ Dirichlet(alpha), by stick-breaking and one numerical integral per stick.

    p_1 = B_1, p_j = B_j prod_{i<j} (1 - B_i) with B_j ~ Beta(alpha_j, sum_{i>j} alpha_i)
    independent, so the moment factorises into E[B_j^n_j (1 - B_j)^(sum_{i>j} n_i)].
    """
    moment = 1.0
    for j in range(len(alpha) - 1):
        a, b, rest = alpha[j], alpha[j + 1 :].sum(), n[j + 1 :].sum()
        density = stats.beta(a, b).pdf
        moment *= integrate.quad(
            lambda x, nj=n[j], rest=rest, density=density: x**nj * (1 - x) ** rest * density(x),
            0,
            1,
            epsabs=1e-13,
            epsrel=1e-11,
            limit=200,
        )[0]
    return moment


def row_probability(concentration, support_size, counts):
    """P(a row's targets, in a given order, have these counts), integrating over the row numerically.

    Dense: the Dirichlet moment prod p_j^n_j. Sparse: its average over all
    supports (zero where a target lies outside the support). Independent of the
    class's closed form.
    """
    alpha, k = np.array(concentration), len(concentration)
    supports = list(itertools.combinations(range(k), support_size))
    total = sum(
        dirichlet_moment(alpha[list(support)], np.array([counts[j] for j in support]))
        for support in supports
        if not any(counts[j] and j not in support for j in range(k))
    )
    return total / len(supports)


def probability_function(concentration, startprob, support_size):
    """P(x1..xm) for state tuples: startprob of x1 times, per row, the integrated probability of its targets."""
    k = len(concentration)
    row = functools.lru_cache(maxsize=None)(lambda counts: row_probability(concentration, support_size, counts))

    @functools.cache
    def probability(states):
        if not states:
            return 1.0
        counts = np.zeros((k, k), dtype=int)
        for a, b in zip(states, states[1:]):
            counts[a, b] += 1
        return startprob[states[0]] * np.prod([row(tuple(c)) for c in counts])

    return probability


def all_sequences(k, n_states_per_sequence):
    states = np.array(list(itertools.product(range(k), repeat=n_states_per_sequence)))
    return np.hstack([np.full((len(states), 1), k), states])


@pytest.mark.parametrize("name", TINY)
def test_bayes_predictor_matches_numerical_integration(name):
    concentration, startprob, support_size = TINY[name]
    chain = InContextChain(concentration, startprob, support_size)
    probability = probability_function(concentration, startprob, support_size)
    k, length = chain.n_states, 4
    tokens = all_sequences(k, length)
    log_probs = chain.optimal_log_probs(tokens)
    for seq, predicted in zip(tokens[:, 1:], log_probs):
        for t in range(length):
            prefix = tuple(seq[:t])
            expected = [
                probability(prefix + (x,)) / probability(prefix) if probability(prefix) else np.nan for x in range(k)
            ]
            if probability(prefix):
                np.testing.assert_allclose(np.exp(predicted[t]), expected, atol=1e-8)
    # true_loss is -log P(sequence) per predicted token, on the possible sequences.
    probabilities = np.array([probability(tuple(seq)) for seq in tokens[:, 1:]])
    possible = probabilities > 0
    for seq, p in zip(tokens[possible][:40], probabilities[possible][:40]):
        assert chain.true_loss(seq[None]) == pytest.approx(-np.log(p) / length, rel=1e-7)
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-8)


def exact_law(name, length):
    concentration, startprob, support_size = TINY[name]
    probability = probability_function(concentration, startprob, support_size)
    tokens = all_sequences(len(concentration), length)
    return tokens, np.array([probability(tuple(seq)) for seq in tokens[:, 1:]])


def sequence_index(tokens, k):
    return (tokens[:, 1:].astype(np.int64) * k ** np.arange(tokens.shape[1] - 2, -1, -1)).sum(axis=1)


@pytest.mark.parametrize("name", ["dense-2", "dense-3", "sparse-4-of-2", "sparse-3-of-1"])
def test_both_samplers_follow_the_exact_law_of_whole_sequences(name):
    chain = InContextChain(*TINY[name])
    k, length, n = chain.n_states, 4, 60_000
    tokens, probabilities = exact_law(name, length)
    assert np.array_equal(sequence_index(tokens, k), np.arange(len(tokens)))
    urn = chain.sample(n, length + 1, np.random.default_rng(1))
    rng = np.random.default_rng(2)
    walked = chain.walk(chain.sample_matrices(n, rng), rng.random((n, length)))
    walked = np.hstack([np.full((n, 1), k), walked])
    for sampled in (urn, walked):
        observed = np.bincount(sequence_index(sampled, k), minlength=len(tokens))
        assert g_test_pvalue(observed, n * probabilities) > SIGNIFICANCE


def reference_matrices(chain, n, rng):
    """Prior draws written independently of the class: numpy's Dirichlet, supports from a permutation each."""
    k, m = chain.n_states, chain.n_support
    matrices = np.zeros((n, k, k))
    for i, s in itertools.product(range(n), range(k)):
        support = rng.permutation(k)[:m]
        matrices[i, s, support] = rng.dirichlet(chain.concentration[support])
    return matrices


@pytest.mark.parametrize("concentration, support_size", [([0.6, 1.0, 2.0], 3), ([1.0] * 5, 2)])
def test_predictor_is_calibrated_on_sequences_from_random_matrices(concentration, support_size):
    """Posterior predictive check on long prefixes: where the predictor says p, the next state comes with frequency p.

    Sequences walk matrices drawn by reference code; predictions are binned by
    value, and in each (state, bin) the count of hits is a sum of independent
    Bernoulli(p): mean sum p, variance sum p(1-p).
    """
    chain = InContextChain(concentration, np.full(len(concentration), 1 / len(concentration)), support_size)
    k, n, length = chain.n_states, 3000, 16
    rng = np.random.default_rng(4)
    matrices = reference_matrices(chain, n, rng)
    tokens = np.empty((n, length), dtype=np.int64)
    tokens[:, 0] = k
    tokens[:, 1] = rng.integers(k, size=n)
    for t in range(2, length):
        tokens[:, t] = [rng.choice(k, p=matrices[i, tokens[i, t - 1]]) for i in range(n)]
    probs = np.exp(chain.optimal_log_probs(tokens)[:, 4:])  # late positions: the counts matter
    hits = tokens[:, 5:, None] == np.arange(k)
    bins = np.digitize(probs, np.linspace(0, 1, 11)[1:-1])
    z_squared = []
    for b in range(10):
        for state in range(k):
            where = bins[..., state] == b
            p = probs[..., state][where]
            if p.size and (p * (1 - p)).sum() > 5:
                z_squared.append((hits[..., state][where].sum() - p.sum()) ** 2 / (p * (1 - p)).sum())
    assert len(z_squared) >= 10
    # Cells of one position share a sequence, but bins and states split them; chi-square with one df per cell.
    assert stats.chi2.sf(sum(z_squared), df=len(z_squared)) > SIGNIFICANCE


@pytest.mark.parametrize("sparsity", [None, 60])
@pytest.mark.parametrize("seq_len", [2, 3, 40])
def test_optimal_log_probs_mean_nll_is_true_loss(sparsity, seq_len, monkeypatch):
    chain = InContextChain.random(6, alpha=0.4, sparsity=sparsity)
    tokens = chain.sample(200, seq_len, np.random.default_rng(0))
    log_probs = chain.optimal_log_probs(tokens)
    assert log_probs.shape == (200, seq_len - 1, 6)
    np.testing.assert_allclose(np.exp(log_probs).sum(axis=2), 1.0, atol=1e-12)
    nll = -np.take_along_axis(log_probs, tokens[:, 1:, None].astype(np.int64), axis=2).mean()
    assert chain.true_loss(tokens) == pytest.approx(nll, rel=1e-12)
    monkeypatch.setattr(incontext, "BLOCK_ENTRIES", 36 * 7)  # blocks of 7 sequences
    np.testing.assert_array_equal(chain.optimal_log_probs(tokens), log_probs)
    assert chain.true_loss(tokens) == pytest.approx(nll, rel=1e-12)


def mean_and_se(values):
    values = np.asarray(values, dtype=np.float64)
    return values.mean(), values.std(ddof=1) / np.sqrt(len(values))


def within(estimate, se, reference, reference_se, k=4.5):
    return abs(estimate - reference) < k * np.hypot(se, reference_se)


@pytest.mark.parametrize("n_states, alpha, sparsity", [(3, 1.0, None), (5, 0.3, 50)])
def test_theory_matches_independent_estimates(n_states, alpha, sparsity):
    """Each Monte-Carlo key against a realised-loss estimate on other samples, within their joint error."""
    chain = InContextChain.random(n_states, alpha=alpha, sparsity=sparsity)
    seq_len, n = 24, 3000
    theory = chain.monte_carlo(seq_len, 3000)
    tokens = chain.sample(n, seq_len, np.random.default_rng(11))
    log_probs = chain.optimal_log_probs(tokens)
    states = tokens[:, 1:].astype(np.int64)
    nll = -np.take_along_axis(log_probs, states[..., None], axis=2)[..., 0]
    assert within(theory["optimal_loss"], theory["optimal_loss_se"], *mean_and_se(nll.mean(axis=1)))
    correct = (log_probs.argmax(axis=2) == states).mean(axis=1)
    assert within(theory["optimal_accuracy"], theory["optimal_accuracy_se"], *mean_and_se(correct))
    # The unigram-in-context predictor, from cumulative one-hot counts of the states before each position.
    seen = np.cumsum(states[:, :-1, None] == np.arange(n_states), axis=1)
    unigram = (seen + alpha) / (np.arange(1, seq_len - 1)[:, None] + n_states * alpha)
    unigram_nll = np.concatenate(
        [
            -np.log(chain.startprob[states[:, :1]]),
            -np.log(np.take_along_axis(unigram, states[:, 1:, None], axis=2)[..., 0]),
        ],
        axis=1,
    )
    assert within(
        theory["unigram_in_context_loss"], theory["unigram_in_context_loss_se"], *mean_and_se(unigram_nll.mean(axis=1))
    )
    # The oracle's realised loss on walks of reference matrices.
    rng = np.random.default_rng(12)
    matrices = reference_matrices(chain, n, rng)
    walked = chain.walk(matrices, rng.random((n, seq_len - 1)))
    with np.errstate(divide="ignore"):
        oracle_nll = np.concatenate(
            [
                -np.log(chain.startprob[walked[:, :1]]),
                -np.log(matrices[np.arange(n)[:, None], walked[:, :-1], walked[:, 1:]]),
            ],
            axis=1,
        )
    assert within(theory["oracle_loss"], theory["oracle_loss_se"], *mean_and_se(oracle_nll.mean(axis=1)))
    # Symmetric prior, uniform start: every state is equally likely everywhere.
    assert theory["unigram_loss"] == pytest.approx(np.log(n_states), abs=5e-4)
    assert theory["uniform_loss"] == pytest.approx(np.log(n_states))


def test_the_oracle_term_averages_to_the_exact_loss_of_the_known_matrix():
    """Given one matrix, walks of it average the oracle term to MarkovChain's exact optimal loss."""
    matrix = np.array([[0.4, 0.3, 0.3], [0.05, 0.9, 0.05], [0.0, 0.02, 0.98]])
    chain = InContextChain([1.0, 1.0, 1.0], [1.0, 0.0, 0.0], 3)
    n, seq_len = 20_000, 5
    matrices = np.broadcast_to(matrix, (n, 3, 3))
    states = chain.walk(matrices, np.random.default_rng(8).random((n, seq_len - 1)))
    oracle = chain._per_sequence(matrices, states)["oracle_loss"]
    expected = MarkovChain(matrix, chain.startprob).optimal_loss(seq_len)
    assert within(*mean_and_se(oracle), expected, 0.0)


@pytest.mark.parametrize("n_states, sparsity", [(3, None), (10, None), (10, 70)])
def test_oracle_beats_bayes_beats_unigram_in_context(n_states, sparsity):
    theory = InContextChain.random(n_states, sparsity=sparsity).monte_carlo(64, 1000)
    margin = 5 * max(theory[f"{k}_se"] for k in ("oracle_loss", "optimal_loss", "unigram_in_context_loss"))
    assert theory["oracle_loss"] + margin < theory["optimal_loss"] < theory["unigram_in_context_loss"] - margin


@pytest.mark.parametrize("sparsity", [None, 80])
def test_entropy_rates_are_markov_chain_entropy_rates(sparsity):
    chain = InContextChain.random(5, alpha=0.5, sparsity=sparsity)  # 80%: one target per row, many closed classes
    matrices = chain.sample_matrices(300, np.random.default_rng(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = [MarkovChain(m, chain.startprob).entropy_rate() for m in matrices]
    np.testing.assert_allclose(chain._entropy_rates(matrices), expected, atol=1e-12)


def test_entropy_rate_is_the_oracle_loss_far_from_the_start():
    chain = InContextChain.random(3, alpha=2.0)
    long_run = chain.monte_carlo(800, 1000)
    assert within(
        long_run["oracle_loss"], long_run["oracle_loss_se"], long_run["entropy_rate"], long_run["entropy_rate_se"]
    )
    # And the Bayes predictor closes most of its gap to the oracle by then.
    short = chain.monte_carlo(20, 1000)
    assert long_run["optimal_loss"] - long_run["oracle_loss"] < 0.25 * (short["optimal_loss"] - short["oracle_loss"])


def test_first_states_and_first_transitions_follow_the_prior():
    concentration, startprob = np.array([0.5, 1.0, 2.5]), np.array([0.6, 0.1, 0.3])
    chain = InContextChain(concentration, startprob, 3)
    tokens = chain.sample(30_000, 8, np.random.default_rng(5)).astype(np.int64)
    assert g_test_pvalue(np.bincount(tokens[:, 1], minlength=3), 30_000 * startprob) > SIGNIFICANCE
    # x2 | x1 is the mean of a Dirichlet row, whatever x1.
    for first in range(3):
        after = tokens[tokens[:, 1] == first, 2]
        expected = len(after) * concentration / concentration.sum()
        assert g_test_pvalue(np.bincount(after, minlength=3), expected) > SIGNIFICANCE


def test_sparse_rows_never_exceed_their_support():
    chain = InContextChain.random(8, sparsity=75)  # 2 targets per row
    tokens = chain.sample(500, 200, np.random.default_rng(6)).astype(np.int64)
    for seq in tokens[:, 1:]:
        pairs = np.unique(seq[:-1] * 8 + seq[1:])
        assert np.bincount(pairs // 8, minlength=8).max() <= 2
    assert np.isfinite(chain.true_loss(tokens))


def test_sampled_bytes_do_not_depend_on_chunking(monkeypatch):
    chain = InContextChain.random(4, sparsity=50)
    rng = np.random.default_rng(9)
    pieces = np.vstack([chain.sample(10, 30, rng), chain.sample(20, 30, rng)])
    whole = chain.sample(30, 30, np.random.default_rng(9))
    np.testing.assert_array_equal(pieces, whole)
    monkeypatch.setattr(incontext, "BLOCK_ENTRIES", 16 * 3)  # three sequences per block inside sample
    np.testing.assert_array_equal(chain.sample(30, 30, np.random.default_rng(9)), whole)
    assert whole.dtype == np.uint16 and np.all(whole[:, 0] == 4)


def test_random_and_the_arrays_rebuild_the_process(tmp_path):
    chain = InContextChain.random(10, alpha=0.5, sparsity=75)
    assert chain.n_support == MarkovChain.random(10, sparsity=75).transmat.astype(bool).sum(axis=1).max() == 2
    np.testing.assert_array_equal(chain.startprob, np.full(10, 0.1))
    assert InContextChain.random(10).n_support == 10
    assert chain.options() == {} and InContextChain.folder_name(10) == "icl10"
    assert (chain.vocab_size, chain.bos_token) == (11, 10)
    np.savez(tmp_path / "chain.npz", **{name: getattr(chain, name) for name in InContextChain.ARRAYS})
    with np.load(tmp_path / "chain.npz", allow_pickle=False) as arrays:
        rebuilt = InContextChain(**{name: arrays[name] for name in InContextChain.ARRAYS})
    tokens = chain.sample(50, 20, np.random.default_rng(0))
    np.testing.assert_array_equal(rebuilt.optimal_log_probs(tokens), chain.optimal_log_probs(tokens))
    assert rebuilt.monte_carlo(20, 1000) == chain.monte_carlo(20, 1000)
    with pytest.raises(ValueError):
        rebuilt.concentration[0] = 2.0


@pytest.mark.parametrize(
    "arrays, message",
    [
        (([1.0], [1.0], 1), "K >= 2"),
        (([[1.0, 1.0]], [0.5, 0.5], 2), "vector"),
        (([1.0, 0.0], [0.5, 0.5], 2), "> 0"),
        (([1.0, np.inf], [0.5, 0.5], 2), "finite"),
        (([1.0, 1.0], [0.5, 0.5, 0.0], 2), "startprob must have shape"),
        (([1.0, 1.0], [0.6, 0.6], 2), "does not sum to 1"),
        (([1.0, 1.0, 1.0], [0.5, 0.5, 0.0], 1.5), "single integer"),
        (([1.0, 1.0, 1.0], [0.5, 0.5, 0.0], 4), "single integer"),
        (([1.0, 1.0, 1.0], [0.5, 0.5, 0.0], [2]), "single integer"),
        (([1.0, 2.0, 1.0], [0.5, 0.5, 0.0], 2), "same concentration"),
    ],
)
def test_bad_arrays_are_refused(arrays, message):
    with pytest.raises(NanoMarkovError, match=message):
        InContextChain(*arrays)


def test_bad_arguments_are_refused():
    chain = InContextChain.random(3)
    for call, message in [
        (lambda: InContextChain.random(1), "n_states"),
        (lambda: InContextChain.random(3, alpha=0), "alpha"),
        (lambda: InContextChain.random(3, sparsity=100), "sparsity"),
        (lambda: chain.sample(5, 1, np.random.default_rng(0)), "seq_len"),
        (lambda: chain.theory(1), "seq_len"),
        (lambda: chain.true_loss(np.array([[0, 1, 2]])), "BOS"),
        (lambda: chain.optimal_log_probs(np.array([[3, 1, 3]])), "states"),
    ]:
        with pytest.raises(NanoMarkovError, match=message):
            call()
