"""Generalized HMMs: word probabilities, the sampler, refusal of negative words, exact theory against brute force."""

import itertools

import numpy as np
import pytest

from nanomarkov.errors import NanoMarkovError
from nanomarkov.processes import PROCESSES
from nanomarkov.processes.spec import process_from_spec
from tests.processes.test_msp import brute_force

# A 3-state GHMM with negative entries (simplexity's tom_quantum at alpha = beta = 1, written out here).
QUANTUM = np.array(
    [
        [[0.25, 0, 0.25], [0, 0, 0], [0.25, 0, 0.25]],
        [[0.25, 0, -0.25], [0, 0, 0], [-0.25, 0, 0.25]],
        [[0.25, 0.25, 0], [0.25, 0.25, 0], [0, 0, 0]],
        [[0.25, -0.25, 0], [-0.25, 0.25, 0], [0, 0, 0]],
    ]
)


def word_probabilities(tokens, start, normaliser, length):
    return {
        word: float(np.linalg.multi_dot([start, *(tokens[x] for x in word), normaliser]))
        for word in itertools.product(range(len(tokens)), repeat=length)
    }


@pytest.mark.parametrize("name", ["spec", "post_quantum"])
def test_sampler_frequencies_match_word_probabilities(name):
    process = (
        process_from_spec({"process": "ghmm", "token_transitions": QUANTUM.tolist(), "start": "stationary"})
        if name == "spec"
        else PROCESSES["post_quantum"].random()
    )
    r = process._normaliser
    probs = word_probabilities(process.token_transitions, process.startprob, r, 3)
    assert min(probs.values()) > -1e-12 and sum(probs.values()) == pytest.approx(1, abs=1e-12)
    n = 40_000
    words = process.sample(n, 4, np.random.default_rng(1))[:, 1:]
    counts = {}
    for word in map(tuple, words.tolist()):
        counts[word] = counts.get(word, 0) + 1
    for word, p in probs.items():
        tolerance = 5 * np.sqrt(max(p, 1 / n) * (1 - p) / n)  # five binomial standard deviations
        assert abs(counts.get(word, 0) / n - p) < tolerance, (word, p)


def test_a_negative_word_is_refused_in_one_line_naming_it():
    tokens = [[[0.9, 0.3], [0.2, 0.3]], [[-0.2, 0.0], [0.0, 0.5]]]
    with pytest.raises(NanoMarkovError, match=r"the word 0 1 0 has probability -0.0402 < 0") as error:
        process_from_spec({"process": "ghmm", "token_transitions": tokens, "start": "stationary"})
    assert "\n" not in str(error.value)


def test_exact_theory_against_brute_force():
    process = process_from_spec({"process": "ghmm", "token_transitions": QUANTUM.tolist(), "start": "stationary"})
    assert process.theory_note(6).startswith("exact: mixed-state presentation")
    losses, accuracies = brute_force(QUANTUM, process.startprob, process._normaliser, 5)
    by_position, errors = process.optimal_loss_by_position(6)
    np.testing.assert_allclose(by_position, losses, rtol=0, atol=1e-12)
    assert process.optimal_accuracy(6) == pytest.approx(accuracies.mean(), abs=1e-12) and not errors.any()
    # optimal_log_probs is the same conditional: its mean NLL on samples is the optimal loss (Monte-Carlo).
    tokens = process.sample(4000, 6, np.random.default_rng(2))
    nll = -np.take_along_axis(process.optimal_log_probs(tokens), tokens[:, 1:, None].astype(int), axis=2)[..., 0]
    per_sequence = nll.mean(axis=1)
    assert abs(per_sequence.mean() - losses.mean()) < 5 * per_sequence.std() / np.sqrt(len(per_sequence))


def test_post_quantum_theory_matches_brute_force_where_exact():
    process = PROCESSES["post_quantum"].random()
    losses, accuracies = brute_force(process.token_transitions, process.startprob, process._normaliser, 4)
    by_position, errors = process.optimal_loss_by_position(5)
    np.testing.assert_allclose(by_position, losses, rtol=0, atol=1e-12)
    assert not errors.any()


@pytest.fixture(scope="module")
def named_ghmms():
    """tom_quantum and fanizza at their published parameters, built once (fanizza's MSP takes ~0.5 s)."""
    return {name: PROCESSES[name].random() for name in ("tom_quantum", "fanizza")}


@pytest.mark.parametrize(("name", "length"), [("tom_quantum", 4), ("fanizza", 7)])
def test_tom_quantum_and_fanizza_are_processes_whose_theory_is_brute_force(named_ghmms, name, length):
    process = named_ghmms[name]
    tokens, start, r = process.token_transitions, process.startprob, process._normaliser
    for n in range(1, length + 1):
        probs = word_probabilities(tokens, start, r, n)
        assert min(probs.values()) > -1e-12 and sum(probs.values()) == pytest.approx(1, abs=1e-12)
    assert start @ tokens.sum(axis=0) == pytest.approx(start, abs=1e-12)  # the stationary quasi-belief
    losses, accuracies = brute_force(tokens, start, r, length)
    by_position, errors = process.optimal_loss_by_position(length + 1)
    np.testing.assert_allclose(by_position, losses, rtol=0, atol=1e-12)
    assert process.optimal_accuracy(length + 1) == pytest.approx(accuracies.mean(), abs=1e-12) and not errors.any()
    # The sampler against the optimal predictor: the mean NLL of samples is the optimal loss (Monte-Carlo).
    sampled = process.sample(4000, length + 1, np.random.default_rng(3))
    nll = -np.take_along_axis(process.optimal_log_probs(sampled), sampled[:, 1:, None].astype(int), axis=2)
    per_sequence = nll[..., 0].mean(axis=1)
    assert abs(per_sequence.mean() - losses.mean()) < 5 * per_sequence.std() / np.sqrt(len(per_sequence))


def test_tom_quantum_is_a_qubit_measured_in_two_bases(named_ghmms):
    # At alpha = beta = 1 a measurement leaves the qubit in what it found: the same basis repeats the
    # outcome (1/2: that basis is chosen), the other is a fair coin (1/4 each). So the first token is
    # uniform and every later one costs H(1/2, 1/4, 1/4) = 1.5 bits, from the physics, not the matrices.
    process = named_ghmms["tom_quantum"]
    assert process.theory_note(8).startswith("exact: mixed-state presentation")
    losses, errors = process.optimal_loss_by_position(8)
    np.testing.assert_allclose(losses, [np.log(4)] + [1.5 * np.log(2)] * 6, rtol=0, atol=1e-12)
    assert process.entropy_rate() == pytest.approx(1.5 * np.log(2), abs=1e-12)
    assert process.theory(8)["unigram_loss"] == pytest.approx(np.log(4), abs=1e-12)


def test_fanizza_resets_on_token_0_and_its_entropy_rate_is_its_run_lengths(named_ghmms):
    process = named_ghmms["fanizza"]
    alpha, lamb = 2000.0, 0.49
    tokens = process.token_transitions
    np.testing.assert_allclose(tokens.sum(axis=0).sum(axis=1), 1, rtol=0, atol=1e-12)  # r = 1 (Fanizza et al.)
    pi0 = tokens[0][0] / tokens[0][0].sum()  # D_0 = w pi0: every row the reset, row 0 with w_0 = 1
    # P(1^n | reset) = lamb^n (pi0_1 + pi0_2 (cos n alpha - sin n alpha) + pi0_3 (sin n alpha + cos n alpha)),
    # written with scalars: D_1^n is lamb^n times a rotation by n alpha of the last two coordinates.
    n = np.arange(80)
    ones = lamb**n * (
        pi0[1] + pi0[2] * (np.cos(n * alpha) - np.sin(n * alpha)) + pi0[3] * (np.sin(n * alpha) + np.cos(n * alpha))
    )
    ones[0] = 1.0
    run_law = ones[:-1] - ones[1:]  # P(1^n 0 | reset)
    assert run_law.min() >= 0 and run_law.sum() == pytest.approx(1, abs=1e-15)
    rate = -np.sum(run_law * np.log(run_law, where=run_law > 0, out=np.zeros_like(run_law))) / (run_law @ (n[:-1] + 1))
    assert process.entropy_rate() == pytest.approx(rate, abs=1e-12) and process.theory(6)["entropy_rate_se"] == 0
    # Far from the start the MSP's exact loss by position is the rate (P(no reset in 60 tokens) ~ 1e-18).
    assert process.optimal_loss_by_position(62)[0][-1] == pytest.approx(rate, abs=1e-12)
    assert "entropy rate exact" in process.theory_note(62)
