"""icl's stationary start (x1 from the stationary law of the sequence's own matrix) against an
independent computation: for K = 2 every sequence's probability E[pi_P(x1) prod P] is a 2-d
integral over the two rows' free entries, done here by tensor Gauss-Legendre quadrature."""

import itertools

import numpy as np
import pytest
from scipy.stats import chi2

from nanomarkov.cli import main
from nanomarkov.data import generate_dataset, load_dataset
from nanomarkov.errors import NanoMarkovError
from nanomarkov.processes import incontext
from nanomarkov.processes.incontext import InContextChain, positive_stationary, solve_stationary

NODES = 400


def row_grid(concentration):
    """Nodes (a, b) and weights on [0,1]^2 for a = P[0,1] ~ Beta(c1, c0) and b = P[1,0] ~ Beta(c0, c1)."""
    x, w = np.polynomial.legendre.leggauss(NODES)
    u, w = (x + 1) / 2, w / 2
    c0, c1 = concentration
    density_a = u ** (c1 - 1) * (1 - u) ** (c0 - 1)
    density_b = u ** (c0 - 1) * (1 - u) ** (c1 - 1)
    wa, wb = w * density_a / (w * density_a).sum(), w * density_b / (w * density_b).sum()
    a, b = np.meshgrid(u, u, indexing="ij")
    return a, b, np.outer(wa, wb)


def exact_probabilities(concentration, n_positions):
    """{(x1..xn): P} under the stationary start, K = 2, by quadrature."""
    a, b, weights = row_grid(concentration)
    matrix = [[1 - a, a], [b, 1 - b]]
    pi = [b / (a + b), a / (a + b)]
    out = {}
    for seq in itertools.product(range(2), repeat=n_positions):
        integrand = pi[seq[0]].copy()
        for s, j in zip(seq, seq[1:]):
            integrand = integrand * matrix[s][j]
        out[seq] = float((weights * integrand).sum())
    return out


def conditional_entropies(probs, n_positions):
    """H(x_{t+1} | x_1..x_t) for t = 0..n-1 from the probabilities of whole sequences."""
    block = []
    for t in range(1, n_positions + 1):
        prefix = {}
        for seq, p in probs.items():
            prefix[seq[:t]] = prefix.get(seq[:t], 0.0) + p
        block.append(-sum(p * np.log(p) for p in prefix.values() if p > 0))
    return np.diff([0.0] + block)


@pytest.mark.parametrize("concentration", [(1.0, 1.0), (0.7, 1.8)])
def test_theory_by_position_matches_quadrature(concentration, monkeypatch):
    monkeypatch.setattr(incontext, "THEORY_SEQUENCES", 3000)  # the errors say how far to trust it
    monkeypatch.setattr(incontext, "START_LAW_MATRICES", 20_000)
    chain = InContextChain(concentration, [0.5, 0.5], 2, start="stationary")
    exact = conditional_entropies(exact_probabilities(concentration, 4), 4)
    losses, errors = chain.optimal_loss_by_position(5)
    # 1e-4: the delta method's bias correction leaves O(1/particles^2) of the particles' KL.
    assert np.all(np.abs(losses - exact) <= 4 * errors + 1e-4), (losses, exact, errors)
    assert (errors[0] == 0.0) == (concentration[0] == concentration[1])  # 1/K exactly when the states are alike
    assert chain.theory(5)["optimal_loss"] == pytest.approx(losses.mean(), abs=1e-12)


def test_start_law_is_the_prior_mean_of_the_stationary_law(monkeypatch):
    monkeypatch.setattr(incontext, "START_LAW_MATRICES", 20_000)
    concentration = (0.7, 1.8)
    a, b, weights = row_grid(concentration)
    exact = np.array([(weights * b / (a + b)).sum(), (weights * a / (a + b)).sum()])
    law, errors = InContextChain(concentration, [0.5, 0.5], 2, start="stationary").start_law()
    assert np.all(errors > 0) and np.all(np.abs(law - exact) <= 4 * errors)
    assert np.array_equal(InContextChain.random(4, start="stationary").start_law()[0], np.full(4, 0.25))


def test_predictor_averages_to_the_exact_conditionals():
    """Each row of a batch gets its own particles: over many copies of a sequence the estimated
    predictive averages to the quadrature's p(x_{t+1} | x_1..x_t), within its own spread."""
    concentration, n, copies = (1.0, 1.0), 4, 300
    probs = exact_probabilities(concentration, n)
    chain = InContextChain(concentration, [0.5, 0.5], 2, start="stationary")
    sequences = np.array(list(probs))
    tokens = np.hstack([np.full((len(sequences) * copies, 1), 2), np.repeat(sequences, copies, axis=0)])
    estimated = np.exp(chain.optimal_log_probs(tokens)).reshape(len(sequences), copies, n, 2)
    mean, spread = estimated.mean(axis=1), estimated.std(axis=1, ddof=1) / np.sqrt(copies)
    for i, seq in enumerate(probs):
        for t in range(n):
            head = sum(p for s, p in probs.items() if s[:t] == seq[:t])
            exact = sum(p for s, p in probs.items() if s[:t] == seq[:t] and s[t] == 0) / head
            assert abs(mean[i, t, 0] - exact) <= 4 * spread[i, t, 0] + 2e-4, (seq, t, mean[i, t, 0], exact)
    # The predictor differs from the uniform start's (x1 says something about P): at t = 1 by ~0.01.
    uniform = np.exp(InContextChain(concentration, [0.5, 0.5], 2).optimal_log_probs(tokens[:1]))
    assert abs(mean[0, 1, 0] - uniform[0, 1, 0]) > 0.005


def test_sampler_draws_the_stationary_start():
    """Frequencies of the 16 sequences of four states against the quadrature's probabilities (chi-square)."""
    concentration, n, draws = (0.7, 1.8), 4, 5000
    probs = exact_probabilities(concentration, n)
    chain = InContextChain(concentration, [0.5, 0.5], 2, start="stationary")
    tokens = chain.sample(draws, n + 1, np.random.default_rng(3))[:, 1:].astype(int)
    observed = np.bincount(tokens @ (2 ** np.arange(n)[::-1]), minlength=2**n)
    expected = draws * np.array([probs[seq] for seq in itertools.product(range(2), repeat=n)])
    statistic = ((observed - expected) ** 2 / expected).sum()
    assert statistic < chi2.ppf(1 - 1e-4, 2**n - 1), statistic


def test_start_rule_survives_the_arrays_and_refuses_bad_values():
    chain = InContextChain.random(3, start="stationary")
    rebuilt = InContextChain(**chain.arrays())
    assert rebuilt.start == "stationary" and rebuilt.options() == {"start": "stationary"}
    assert InContextChain.random(3).options() == {} and "start" not in InContextChain.random(3).arrays()
    assert InContextChain.folder_name(3, start="stationary") == "icl3-startstationary"
    with pytest.raises(NanoMarkovError, match="start must be one of uniform, stationary"):
        InContextChain([1.0, 1.0], [0.5, 0.5], 2, start="fixed")
    with pytest.raises(NanoMarkovError, match="dense rows"):
        InContextChain.random(4, sparsity=50, start="stationary")
    with pytest.raises(NanoMarkovError, match="goes up to K = 20"):
        InContextChain.random(21, start="stationary")


def test_positive_stationary_matches_the_linear_solve():
    matrices = np.random.default_rng(0).dirichlet(np.full(5, 0.3), size=(200, 5))
    np.testing.assert_allclose(positive_stationary(matrices), solve_stationary(matrices), atol=1e-10)


def test_a_dataset_reloads_with_its_start_rule(tmp_path, monkeypatch):
    monkeypatch.setattr(incontext, "THEORY_SEQUENCES", 1000)
    monkeypatch.setattr(incontext, "GAIN_SEQUENCES", 100)
    command = "generate 3 --process icl --start stationary --train 20 --val 10 --seq_len 6 --out"
    assert main([*command.split(), str(tmp_path / "stationary")]) == 0
    for start in ("stationary", None):
        folder = tmp_path / str(start)
        meta = generate_dataset(folder, 3, 20, 10, seq_len=6, process="icl", start=start)
        assert meta.get("start") == start  # the default leaves meta.json as it was before the option
        with np.load(folder / "chain.npz", allow_pickle=False) as npz:
            assert ("start" in npz.files) == (start is not None)
        assert load_dataset(folder).chain.start == (start or "uniform")


def test_predictor_for_three_states_matches_monte_carlo_over_the_prior():
    """K = 3, unequal concentrations: p(x_{t+1} | x_1..x_t) = E[pi_P(x1) prod P P_{x_t, j}] / E[pi_P(x1) prod P]
    over 200,000 prior matrices (delta-method errors), against the predictor averaged over 200 copies."""
    concentration, n_matrices, copies = np.array([0.6, 1.0, 2.5]), 200_000, 200
    rng = np.random.default_rng(11)
    matrices = rng.dirichlet(concentration, size=(n_matrices, 3))
    pi = solve_stationary(matrices)
    chain = InContextChain(concentration, np.full(3, 1 / 3), 3, start="stationary")
    heads = [(a, b) for a in range(3) for b in range(3)]
    tokens = np.array([[3, a, b, 0] for a, b in heads])
    estimated = np.exp(chain.optimal_log_probs(np.repeat(tokens, copies, axis=0))).reshape(len(heads), copies, 3, 3)
    for i, (a, b) in enumerate(heads):
        for t, weight in ((1, pi[:, a]), (2, pi[:, a] * matrices[:, a, b])):
            target = matrices[:, (a, b)[t - 1]]  # (n, K): P[x_t, j]
            ratio = (weight[:, None] * target).mean(axis=0) / weight.mean()
            error = (weight[:, None] * (target - ratio)).std(axis=0) / (np.sqrt(n_matrices) * weight.mean())
            mean = estimated[i, :, t].mean(axis=0)
            spread = estimated[i, :, t].std(axis=0, ddof=1) / np.sqrt(copies)
            assert np.all(np.abs(mean - ratio) <= 4 * np.hypot(error, spread) + 2e-4), ((a, b), t, mean, ratio)
