"""icl theory on cases small enough to enumerate: every sequence of K=2 or 3 states up to length 5,
its probability integrated over the Dirichlet prior exactly (Gauss-Jacobi quadrature is exact on the
polynomial likelihood of a row), against the Monte-Carlo theory within its standard error."""

import itertools

import numpy as np
import pytest
from scipy.special import roots_jacobi

from nanomarkov.processes.incontext import InContextChain


def beta_rule(a, b, nodes=80):
    """Points p and weights w with sum_i w_i f(p_i) = E f(p) for p ~ Beta(a, b), exactly for polynomials of
    degree < 2 * nodes."""
    x, w = roots_jacobi(nodes, b - 1, a - 1)  # weight (1-x)^(b-1) (1+x)^(a-1) on [-1, 1], p = (1+x)/2
    return (1 + x) / 2, w / w.sum()


def row_probability(counts, concentration, support_size):
    """P(a row's targets, in a given order) = E prod_j w_j^n_j over the row's prior, for K <= 3, m <= 2:
    a support of m states uniform among the C(K, m), then Dirichlet weights on it."""
    supports = list(itertools.combinations(range(len(counts)), support_size))
    total = 0.0
    for support in supports:
        if any(counts[j] for j in range(len(counts)) if j not in support):
            continue
        if len(support) == 1:
            total += 1.0
            continue
        a, b = support
        p, w = beta_rule(concentration[a], concentration[b])
        total += w @ (p ** counts[a] * (1 - p) ** counts[b])
    return total / len(supports)


def sequence_probabilities(chain, n_positions):
    """{(x1, ..., xn): P} for every sequence of n states, from the prior by quadrature."""
    k = chain.n_states
    out = {}
    for seq in itertools.product(range(k), repeat=n_positions):
        counts = np.zeros((k, k), dtype=int)
        for a, b in zip(seq, seq[1:]):
            counts[a, b] += 1
        rows = [row_probability(counts[s], chain.concentration, chain.n_support) for s in range(k)]
        out[seq] = chain.startprob[seq[0]] * np.prod(rows)
    return out


def entropy(p):
    p = np.asarray(p)
    return float(-(p[p > 0] * np.log(p[p > 0])).sum())


def exact_theory(chain, seq_len):
    """optimal_loss, optimal_accuracy, unigram_loss and unigram_in_context_loss by enumeration."""
    n, k = seq_len - 1, chain.n_states
    probs = sequence_probabilities(chain, n)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-12)
    prefix = {}  # P(x1..xt) for every t <= n
    for seq, p in probs.items():
        for t in range(1, n + 1):
            prefix[seq[:t]] = prefix.get(seq[:t], 0.0) + p
    accuracy = sum(max(prefix[head + (x,)] for x in range(k)) for head in [()] + [h for h in prefix if len(h) < n])
    marginal = np.zeros(k)
    in_context = 0.0
    for seq, p in probs.items():
        for t, x in enumerate(seq):
            marginal[x] += p
            seen = np.bincount(seq[:t], minlength=k)
            q = chain.startprob if t == 0 else (seen + chain.concentration) / (t + chain.concentration.sum())
            in_context -= p * np.log(q[x])
    return {
        "optimal_loss": -sum(p * np.log(p) for p in probs.values() if p > 0) / n,
        "optimal_accuracy": accuracy / n,
        "unigram_loss": entropy(marginal / n),
        "unigram_in_context_loss": in_context / n,
    }


def exact_two_state_matrix_terms(chain, seq_len):
    """oracle_loss and entropy_rate of a dense K=2 chain: expectations over both rows, on a quadrature grid."""
    c0, c1 = chain.concentration
    p, w = beta_rule(c0, c1, nodes=400)  # p = P(s -> 0) of a row; the log terms are smooth enough for 400 nodes
    p0, p1 = np.meshgrid(p, p, indexing="ij")
    weight = np.outer(w, w)
    h0 = -(p0 * np.log(p0) + (1 - p0) * np.log(1 - p0))
    h1 = -(p1 * np.log(p1) + (1 - p1) * np.log(1 - p1))
    oracle = np.full_like(p0, entropy(chain.startprob))
    d0 = np.full_like(p0, chain.startprob[0])  # P(x_t = 0 | matrix)
    for _ in range(seq_len - 2):
        oracle += d0 * h0 + (1 - d0) * h1
        d0 = d0 * p0 + (1 - d0) * p1
    pi0 = p1 / (p1 + 1 - p0)
    return {
        "oracle_loss": float((weight * oracle).sum() / (seq_len - 1)),
        "entropy_rate": float((weight * (pi0 * h0 + (1 - pi0) * h1)).sum()),
    }


# name: (the chain, seq_len, Monte-Carlo sequences); support 1 has several closed classes per matrix,
# whose entropy rates theory solves one matrix at a time, hence its smaller sample.
CHAINS = {
    "K=2 dense, asymmetric prior and start": (lambda: InContextChain([0.5, 2.0], [0.3, 0.7], 2), 6, 200_000),
    "K=3 sparse, support 2": (lambda: InContextChain([0.7, 0.7, 0.7], [0.2, 0.5, 0.3], 2), 5, 200_000),
    "K=2 sparse, support 1": (lambda: InContextChain([1.0, 1.0], [0.5, 0.5], 1), 6, 20_000),
}


@pytest.mark.parametrize("name", CHAINS)
def test_theory_matches_exact_enumeration(name):
    make, seq_len, n_sequences = CHAINS[name]
    chain = make()
    exact = exact_theory(chain, seq_len)
    if chain.n_states == 2 and chain.n_support == 2:
        exact |= exact_two_state_matrix_terms(chain, seq_len)
    theory = chain.monte_carlo(seq_len, n_sequences=n_sequences)
    for key, value in exact.items():
        assert abs(theory[key] - value) < 5 * theory[key + "_se"] + 1e-9, (key, theory[key], value)


def test_unigram_loss_sees_an_asymmetric_prior():
    """The asymmetric chain's states are far from uniform: unigram_loss is well below log 2, and exact."""
    make, seq_len, n_sequences = CHAINS["K=2 dense, asymmetric prior and start"]
    chain = make()
    exact = exact_theory(chain, seq_len)["unigram_loss"]
    assert exact < np.log(2) - 0.05
    theory = chain.monte_carlo(seq_len, n_sequences=n_sequences)
    assert abs(theory["unigram_loss"] - exact) < 5 * theory["unigram_loss_se"]
