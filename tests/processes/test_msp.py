"""The mixed-state presentation's exact theory against brute-force enumeration of every word of a short length."""

import itertools

import numpy as np
import pytest

from nanomarkov.processes import PROCESSES, hmm
from nanomarkov.processes.hmm import HiddenMarkovModel
from nanomarkov.processes.msp import MixedStatePresentation


def brute_force(tokens, start, normaliser, n_positions):
    """Per position t = 1..n: sum over every prefix x_<t of p(prefix) H(p(. | prefix)), and of p(prefix) max p(x | prefix),
    from a forward vector per word computed here, word by word."""
    n_tokens = len(tokens)
    losses, accuracies = np.zeros(n_positions), np.zeros(n_positions)
    for t in range(n_positions):
        for prefix in itertools.product(range(n_tokens), repeat=t):
            forward = np.array(start, dtype=float)
            for x in prefix:
                forward = forward @ tokens[x]
            joint = np.array([forward @ tokens[x] @ normaliser for x in range(n_tokens)])
            mass = joint.sum()
            if mass <= 0:
                continue
            law = joint / mass
            losses[t] -= mass * sum(q * np.log(q) for q in law if q > 0)
            accuracies[t] += mass * law.max()
    return losses, accuracies


def random_token_hmm(seed=3, n_tokens=2, n_hidden=3):
    weights = np.random.default_rng(seed).random((n_tokens, n_hidden, n_hidden))
    return weights / weights.sum(axis=(0, 2), keepdims=True)


@pytest.mark.parametrize(
    "name, tokens, length",
    [
        ("mess3", PROCESSES["mess3"].random().token_transitions, 5),
        ("random", random_token_hmm(), 7),
        ("days_of_week", PROCESSES["days_of_week"].random().token_transitions, 4),
    ],
)
def test_msp_losses_and_accuracies_are_brute_force(name, tokens, length):
    process = HiddenMarkovModel.from_token_transitions(tokens)
    msp = MixedStatePresentation(tokens, np.ones(tokens.shape[1]), process.startprob)
    assert msp.covers(length)
    losses, accuracies = msp.loss_and_accuracy(length)
    expected_losses, expected_accuracies = brute_force(tokens, process.startprob, np.ones(tokens.shape[1]), length)
    np.testing.assert_allclose(losses, expected_losses, rtol=0, atol=1e-12)
    np.testing.assert_allclose(accuracies, expected_accuracies, rtol=0, atol=1e-12)


def test_days_of_week_theory_is_exact_from_its_28_state_msp():
    process = PROCESSES["days_of_week"].random()
    theory = process.theory(5)
    assert process.theory_note(5) == "exact: mixed-state presentation, 28 states"
    assert theory["entropy_rate_se"] == theory["optimal_loss_se"] == theory["optimal_accuracy_se"] == 0.0
    losses, accuracies = brute_force(process.token_transitions, process.startprob, np.ones(7), 4)
    assert theory["optimal_loss"] == pytest.approx(losses.mean(), abs=1e-12)
    assert theory["optimal_accuracy"] == pytest.approx(accuracies.mean(), abs=1e-12)
    by_position, errors = process.optimal_loss_by_position(5)
    np.testing.assert_allclose(by_position, losses, rtol=0, atol=1e-12)
    assert not errors.any()


def block_entropy(tokens, start, length):
    total = 0.0
    for word in itertools.product(range(len(tokens)), repeat=length):
        forward = np.array(start, dtype=float)
        for x in word:
            forward = forward @ tokens[x]
        p = forward.sum()
        total -= p * np.log(p) if p > 0 else 0.0
    return total


def test_entropy_rate_is_the_limit_of_block_entropy_differences():
    """rrxor's H(L) - H(L-1) falls towards the MSP's rate (2/3 bit) from above, and the gap shrinks."""
    process = PROCESSES["rrxor"].random()
    rate = process.entropy_rate()
    assert process.theory(4)["entropy_rate_se"] == 0.0 and process._msp.closed
    entropies = [block_entropy(process.token_transitions, process.startprob, n) for n in range(0, 13)]
    gaps = np.diff(entropies) - rate
    assert np.all(gaps > -1e-12)
    assert np.all(np.diff(gaps[2:]) < 1e-12)  # non-increasing
    assert gaps[-1] < 0.2 * gaps[1]
    assert rate == pytest.approx(2 / 3 * np.log(2), abs=1e-14)  # and the closed form (Crutchfield & Feldman 2003)


def test_entropy_rate_counts_each_closed_class_with_its_absorption_probability():
    """A non-ergodic HMM: from a 50/50 start, one of two coins (P(1) = 0.1 or 0.5) forever; the rate is the mean."""
    tokens = np.zeros((2, 2, 2))
    tokens[:, 0, 0] = 0.9, 0.1
    tokens[:, 1, 1] = 0.5, 0.5
    process = HiddenMarkovModel.from_token_transitions(tokens, [0.5, 0.5])
    binary = lambda p: -p * np.log(p) - (1 - p) * np.log(1 - p)  # noqa: E731
    assert process.entropy_rate() == pytest.approx((binary(0.1) + binary(0.5)) / 2, abs=1e-9)


def test_belief_states_are_the_msp_states_and_the_forward_filter():
    process = PROCESSES["days_of_week"].random()
    tokens = process.sample(20, 12, np.random.default_rng(0))
    beliefs = process.belief_states(tokens)
    states = {row.tobytes() for row in process._msp.beliefs}
    assert all(row.tobytes() in states for row in beliefs.reshape(-1, 7))
    for sequence, expected in zip(tokens, beliefs):
        belief = process.startprob
        for t, x in enumerate(sequence[1:], start=1):
            belief = belief @ process.token_transitions[x]
            belief = belief / belief.sum()
            np.testing.assert_allclose(expected[t], belief, atol=1e-12)


def test_estimate_agrees_with_the_exact_value_within_its_error(monkeypatch):
    """Capping the MSP at one state falls back to the Monte-Carlo estimates, which must hit the exact numbers."""
    exact = PROCESSES["days_of_week"].random().theory(8)
    monkeypatch.setattr(hmm, "msp_state_cap", lambda n_tokens, n_hidden: 1)
    monkeypatch.setattr(hmm, "MC_TOKENS", 2**15)  # a coarser estimate, as well tested against its own error
    capped = PROCESSES["days_of_week"].random()
    estimate = capped.theory(8)
    assert capped.theory_note(8) == "estimated: the mixed-state presentation passed 1 states at depth 1"
    for key in ("optimal_loss", "optimal_accuracy"):
        assert estimate[f"{key}_se"] > 0
        assert abs(estimate[key] - exact[key]) < 4 * estimate[f"{key}_se"]


def test_the_note_says_from_which_depth_different_beliefs_were_merged():
    """A belief that converges geometrically (token 0 is 500 times likelier from B than from A) comes within
    MSP_TOLERANCE of another while still different: positions up to that depth are exact, and the note says so."""
    emits_zero, mixing = np.array([0.001, 0.5]), np.array([[0.95, 0.05], [0.05, 0.95]])
    tokens = np.stack([emits_zero[:, None] * mixing, (1 - emits_zero)[:, None] * mixing])
    process = HiddenMarkovModel.from_token_transitions(tokens)
    depth, gap = process._msp.first_merge()
    assert 1e-12 < gap <= 1e-10 and depth == 5
    assert process.theory_note(12).startswith("exact by position up to position 5;")
    assert "from depth 5, beliefs within 1e-10 of one another are one state" in process.theory_note(12)
    # Independently: every word's belief by forward filtering; by depth 5 two differ by less than 1e-10.
    beliefs = []
    for word in itertools.chain.from_iterable(itertools.product(range(2), repeat=n) for n in range(6)):
        forward = process.startprob
        for x in word:
            forward = forward @ tokens[x]
        beliefs.append(forward / forward.sum())
    distinct = np.unique(np.round(np.array(beliefs), 15), axis=0)
    apart = np.abs(distinct[:, None] - distinct[None]).max(axis=2)
    assert np.any((apart > 1e-12) & (apart < 1e-10))
    losses, _ = brute_force(tokens, process.startprob, np.ones(2), 5)
    np.testing.assert_allclose(process.optimal_loss_by_position(6)[0], losses, rtol=0, atol=1e-12)
    assert PROCESSES["rrxor"].random()._msp.first_merge() == (None, 0.0)  # a finite MSP merges float rounding only


@pytest.mark.parametrize(("p", "q"), [(0.5, 0.5), (0.3, 0.6)])
def test_a_renewal_process_has_its_exact_entropy_rate(p, q):
    """sns: token 1 (B back to A) resets the belief, so the tokens are i.i.d. blocks 0^N 1. Derived by hand:
    N = a + b - 1 zeros, a ~ Geometric(p) steps in A, b ~ Geometric(q) in B, so P(N = n) = sum_a (1-p)^(a-1) p
    (1-q)^(n-a) q and E[N + 1] = 1/p + 1/q; h = H(N) / E[N + 1]. Theory's rate is that, exactly."""
    process = PROCESSES["sns"].random(p=p, q=q)
    n = np.arange(1, 300)
    law = np.array([sum((1 - p) ** (a - 1) * p * (1 - q) ** (m - a) * q for a in range(1, m + 1)) for m in n])
    rate = -np.sum(law * np.log(law, where=law > 0, out=np.zeros_like(law))) / (1 / p + 1 / q)
    assert process.entropy_rate() == pytest.approx(rate, abs=1e-14) and process._renewal[0] == 1


def test_a_reset_token_that_may_never_come_is_no_renewal_process():
    """Half the time the walk starts in a closed class where only token 0 occurs: token 1 is rank one (it
    resets to state 0) but need not occur, so the rate is the two classes' mean, not the renewal formula's."""
    tokens = np.zeros((2, 3, 3))
    tokens[0, 0, 0], tokens[1, 0, 0] = 0.7, 0.3  # state 0: a coin, token 1 back to state 0
    tokens[0, 1, 2] = tokens[0, 2, 1] = 1.0  # states 1 and 2: token 0 forever
    process = HiddenMarkovModel.from_token_transitions(tokens, [0.5, 0.5, 0.0])
    binary = -0.7 * np.log(0.7) - 0.3 * np.log(0.3)
    assert process._renewal is None and process.entropy_rate() == pytest.approx(binary / 2, abs=1e-9)
