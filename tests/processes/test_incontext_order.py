"""icl with order k > 1 (a fresh k-th order transition tensor per sequence) against brute force: every
sequence of a few states enumerated, its probability the closed-form Dirichlet-multinomial marginal
likelihood of each context's row (conjugacy), the Bayes predictive the ratio of two such marginals."""

import hashlib
import itertools
import json

import numpy as np
import pytest
from scipy.special import gammaln
from test_markov import SIGNIFICANCE, g_test_pvalue

from nanomarkov import NanoMarkovError
from nanomarkov.cli import main
from nanomarkov.data import load_dataset
from nanomarkov.processes import incontext
from nanomarkov.processes.incontext import InContextChain
from nanomarkov.processes.korder import KOrderChain
from nanomarkov.processes.numerics import entropy

# name: (concentration, startprob, order)
TINY = {
    "K=2 order 2, asymmetric": ([0.7, 1.8], [0.4, 0.6], 2),
    "K=2 order 3": ([1.0, 1.0], [0.5, 0.5], 3),
    "K=3 order 2": ([0.5, 1.0, 2.0], [0.2, 0.3, 0.5], 2),
}


def marginal_probability(sequence, concentration, startprob, order):
    """P(x1..xn) = prod_{i<=k} startprob[x_i] times, per context, the Dirichlet-multinomial probability of the
    targets seen after it: G(sum c)/G(sum c + n) prod_j G(c_j + n_j)/G(c_j)."""
    concentration = np.asarray(concentration, dtype=float)
    probability = float(np.prod([startprob[x] for x in sequence[:order]]))
    counts = {}
    for t in range(order, len(sequence)):
        row = counts.setdefault(tuple(sequence[t - order : t]), np.zeros(len(concentration)))
        row[sequence[t]] += 1
    for row in counts.values():
        log_row = gammaln(concentration.sum()) - gammaln(concentration.sum() + row.sum())
        probability *= np.exp(log_row + (gammaln(concentration + row) - gammaln(concentration)).sum())
    return probability


def exact_law(name, n_positions):
    """Every sequence of n states (lexicographic, as rows of BOS-led tokens) and its probability."""
    concentration, startprob, order = TINY[name]
    k = len(concentration)
    sequences = list(itertools.product(range(k), repeat=n_positions))
    probabilities = np.array([marginal_probability(s, concentration, startprob, order) for s in sequences])
    tokens = np.hstack([np.full((len(sequences), 1), k), np.array(sequences)])
    return tokens, probabilities


@pytest.mark.parametrize("name", TINY)
def test_bayes_predictor_is_the_ratio_of_marginal_likelihoods(name):
    chain = InContextChain(*TINY[name][:2], len(TINY[name][0]), order=TINY[name][2])
    n_positions = 5
    tokens, probabilities = exact_law(name, n_positions)
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-12)
    log_probs = chain.optimal_log_probs(tokens)
    for t in range(n_positions):
        heads = {}
        for seq, p in zip(map(tuple, tokens[:, 1:]), probabilities):
            heads[seq[:t]] = heads.get(seq[:t], 0.0) + p
            heads[seq[: t + 1]] = heads.get(seq[: t + 1], 0.0) + p
        expected = [heads[tuple(seq[1 : t + 2])] / heads[tuple(seq[1 : t + 1])] for seq in tokens]
        picked = np.exp(log_probs[np.arange(len(tokens)), t, tokens[:, t + 1]])
        # Each prefix is counted once per continuation above; the ratio is unaffected.
        np.testing.assert_allclose(picked, expected, rtol=1e-10)
    for seq, p in zip(tokens[:20], probabilities[:20]):
        assert chain.true_loss(seq[None]) == pytest.approx(-np.log(p) / n_positions, rel=1e-10)


@pytest.mark.parametrize("name", ["K=2 order 2, asymmetric", "K=3 order 2"])
def test_both_samplers_follow_the_exact_law_of_whole_sequences(name):
    concentration, startprob, order = TINY[name]
    chain = InContextChain(concentration, startprob, len(concentration), order=order)
    n_positions, n = 4, 40_000
    tokens, probabilities = exact_law(name, n_positions)
    weights = len(concentration) ** np.arange(n_positions - 1, -1, -1)
    urn = chain.sample(n, n_positions + 1, np.random.default_rng(1))[:, 1:].astype(np.int64)
    rng = np.random.default_rng(2)
    walked = chain.walk(chain.sample_matrices(n, rng), rng.random((n, n_positions)))
    for sampled in (urn, walked):
        observed = np.bincount(sampled @ weights, minlength=len(tokens))
        assert g_test_pvalue(observed, n * probabilities) > SIGNIFICANCE


def exact_theory(name, n_positions):
    """The Bayes predictor's loss at each position, its accuracy, and the losses of the in-context unigram and of
    the in-context (k-1)-gram (add-concentration counts of the transitions out of the last k-1 states), by enumeration."""
    concentration, startprob, order = TINY[name]
    tokens, probabilities = exact_law(name, n_positions)
    k, losses, accuracy, in_context, lower = len(concentration), np.zeros(n_positions), 0.0, 0.0, 0.0
    for t in range(n_positions):
        heads = {}
        for seq, p in zip(map(tuple, tokens[:, 1:]), probabilities):
            heads.setdefault(seq[:t], np.zeros(k))[seq[t]] += p
        for law in heads.values():
            losses[t] -= (law * np.log(law / law.sum())).sum()
            accuracy += law.max()
    for seq, p in zip(tokens[:, 1:], probabilities):
        for t, x in enumerate(seq):
            seen = np.bincount(seq[:t], minlength=k)
            q = np.asarray(startprob) if t == 0 else (seen + concentration) / (t + np.sum(concentration))
            in_context -= p * np.log(q[x])
            m, counts = order - 1, np.zeros(k)
            for s in range(m, t):
                counts[seq[s]] += tuple(seq[s - m : s]) == tuple(seq[t - m : t])
            q = np.asarray(startprob) if t < m else (counts + concentration) / (counts.sum() + np.sum(concentration))
            lower -= p * np.log(q[x])
    return losses, accuracy / n_positions, in_context / n_positions, lower / n_positions


@pytest.mark.parametrize("name", ["K=2 order 2, asymmetric", "K=3 order 2"])
def test_monte_carlo_theory_matches_enumeration(name, monkeypatch):
    concentration, startprob, order = TINY[name]
    chain = InContextChain(concentration, startprob, len(concentration), order=order)
    seq_len = 6
    losses, accuracy, in_context, lower = exact_theory(name, seq_len - 1)
    monkeypatch.setattr(incontext, "THEORY_SEQUENCES", 5000)
    theory = chain.monte_carlo(seq_len)
    estimated, errors = chain.optimal_loss_by_position(seq_len)
    assert np.all(errors[:order] == 0) and np.allclose(estimated[:order], losses[:order], atol=1e-12)
    assert np.all(np.abs(estimated - losses) <= 5 * errors + 1e-12), (estimated, losses, errors)
    assert abs(theory["optimal_accuracy"] - accuracy) < 5 * theory["optimal_accuracy_se"]
    assert abs(theory["unigram_in_context_loss"] - in_context) < 5 * theory["unigram_in_context_loss_se"]
    assert abs(theory["lower_order_in_context_loss"] - lower) < 5 * theory["lower_order_in_context_loss_se"]
    stages = chain.stage_losses(seq_len)
    assert list(stages)[2:] == ["in_context_unigram", "in_context_lower_order", "optimal", "oracle"]


def test_entropy_rates_are_the_k_order_chains_entropy_rates():
    chain = InContextChain.random(3, alpha=0.5, order=2)
    tensors = chain.sample_matrices(5, np.random.default_rng(0))
    rates = (chain.context_stationaries(tensors) * entropy(tensors, axis=2)).sum(axis=1)
    for tensor, rate in zip(tensors, rates):
        reference = KOrderChain(tensor.reshape(3, 3, 3), np.full((3, 3), 1 / 9)).entropy_rate()
        assert rate == pytest.approx(reference, rel=1e-9)


# sha256 of InContextChain.random(4, **options).sample(7, 16, default_rng(3)), written by the code before the
# order option existed: order 1 (the default, or given) draws the same bytes.
ORDER_ONE_BYTES = {
    "": "2cd3a3c440bf285f8eff26bb1ce1900e5a712273cc2bfc831301f9090de96c89",
    "sparsity=50": "c78b822ac6a8d430913e66c3382ca715a994dac9e377dd1542d85e2c45a123ed",
    "start=stationary": "8b05e645e47d8dd4d6b07df32484e4dd57e878a4898026c9f72cced4d5cd588c",
    "alpha=0.3": "bdee2352c02f194552d30d1599a35dfe262533ab00a90ff9db955b255828c2a5",
}


@pytest.mark.parametrize("options", ORDER_ONE_BYTES)
def test_order_one_draws_the_bytes_it_drew_before(options):
    parsed = dict(option.split("=") for option in options.split(",") if option)
    parsed = {key: float(value) if key != "start" else value for key, value in parsed.items()}
    chain = InContextChain.random(4, order=1, **parsed)
    assert chain.options().get("order") is None and "order" not in chain.arrays()
    tokens = chain.sample(7, 16, np.random.default_rng(3))
    assert hashlib.sha256(tokens.tobytes()).hexdigest() == ORDER_ONE_BYTES[options]


def test_the_arrays_rebuild_the_order():
    chain = InContextChain.random(2, order=3)
    assert chain.options() == {"order": 3}
    rebuilt = InContextChain.from_arrays(chain.arrays())
    assert rebuilt.order == 3 and rebuilt.n_contexts == 8


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(order=0), "order must be an integer >= 1"),
        (dict(order=2.5), "order must be an integer >= 1"),
        (dict(order=2, sparsity=50), "dense rows and the uniform start"),
        (dict(order=2, start="stationary"), "dense rows and the uniform start"),
        (dict(order=5, n_states=4), "more than 256"),
    ],
)
def test_bad_orders_are_refused(options, message):
    n_states = options.pop("n_states", 3)
    with pytest.raises(NanoMarkovError, match=message):
        InContextChain.random(n_states, **options)


def test_generate_and_a_spec_file_take_the_order(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(incontext, "THEORY_SEQUENCES", 1000)
    monkeypatch.chdir(tmp_path)
    assert main("generate 3 --process icl --order 2 --train 4 --val 2 --seq_len 8".split()) == 0
    dataset = load_dataset(tmp_path / "data" / "icl3-order2")  # the default folder names the order
    assert dataset.chain.order == 2 and dataset.meta["order"] == 2
    (tmp_path / "spec.json").write_text(json.dumps({"process": "icl", "concentration": [1.0, 1.0], "order": 3}))
    assert main(f"generate --spec {tmp_path / 'spec.json'} --train 4 --val 2 --seq_len 8".split()) == 0
    assert load_dataset(tmp_path / "data" / "spec").chain.n_contexts == 8
    capsys.readouterr()
    assert main("generate 3 --process icl --order 2 --sparsity 50 --out bad".split()) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "dense rows" in error and not (tmp_path / "bad").exists()


def test_the_stage_predictors_score_their_stage_losses_on_samples(monkeypatch):
    monkeypatch.setattr(incontext, "THEORY_SEQUENCES", 5000)
    chain, seq_len, n = InContextChain.random(2, order=3, alpha=0.5), 24, 3000
    tokens = chain.sample(n, seq_len, np.random.default_rng(7)).astype(np.int64)
    losses, errors = chain.stage_losses(seq_len), chain.stage_loss_errors(seq_len)
    stages = chain.stage_log_probs(tokens)
    assert list(stages) == ["uniform", "unigram", "in_context_unigram", "in_context_lower_order", "optimal"]
    for stage, log_probs in stages.items():
        nll = -np.take_along_axis(log_probs, tokens[:, 1:, None], axis=2)[..., 0].mean(axis=1)
        assert abs(nll.mean() - losses[stage]) <= 5 * np.hypot(nll.std() / np.sqrt(n), errors[stage]) + 1e-12, stage
