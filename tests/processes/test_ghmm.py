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
