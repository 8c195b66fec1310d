"""icl at tiny and huge concentrations (issue 22): the stationary laws of chains that nearly split, the
theory at the limits where it has a closed form, and one-line refusals where it has none."""

import math

import numpy as np
import pytest

from nanomarkov.cli import main
from nanomarkov.data import load_dataset
from nanomarkov.errors import NanoMarkovError
from nanomarkov.processes import incontext
from nanomarkov.processes.incontext import InContextChain, settled_law, settled_laws, stationary_laws
from nanomarkov.processes.spec import process_from_spec
from nanomarkov.processes.trigger import TriggerChain


def test_a_chain_that_nearly_splits_has_its_exact_stationary_law():
    """P = [[1-a, a], [b, 1-b]] with a, b far below rounding: 1 - a is 1.0, so the solve is singular, but
    pi = (b, a) / (a + b) still holds for the matrix's entries."""
    a, b = 1e-20, 3e-18
    matrices = np.array([[[1.0, a], [b, 1.0]], [[0.3, 0.7], [0.6, 0.4]]])
    pi = stationary_laws(matrices)
    np.testing.assert_allclose(pi[0], [b / (a + b), a / (a + b)], rtol=1e-12)
    np.testing.assert_allclose(pi[1], [6 / 13, 7 / 13], rtol=1e-12)


def test_a_transient_state_that_nearly_stays_settles_by_its_exit_odds():
    """States 0 and 1 absorb; state 2 leaves with chance 3e-18 (its row rounds to a stay), to 0 a third of the
    time: from uniform the chain settles (1/3 + 1/9, 1/3 + 2/9, 0)."""
    matrix = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1e-18, 2e-18, 1.0]])
    np.testing.assert_allclose(settled_law(matrix, np.full(3, 1 / 3)), [4 / 9, 5 / 9, 0.0], atol=1e-9)
    periodic = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # a 2-cycle and an absorbing state
    np.testing.assert_allclose(settled_laws(periodic[None], np.array([0.5, 0.1, 0.4]))[0], [0.3, 0.3, 0.4])


def one_hot_limit_by_position(n_states, seq_len):
    """The Bayes loss at each position as the concentration goes to 0: each row is one-hot on a uniform state,
    so x_{t+1} = f(x_t) for a random map f; predicting x_{t+1} costs log K while x_t is new (x1..x_t distinct,
    chance prod_{i<t} (K-i)/K), else 0."""
    distinct = [math.prod((n_states - i) / n_states for i in range(1, t)) for t in range(1, seq_len - 1)]
    return np.log(n_states) * np.array([1.0, *distinct])


@pytest.mark.parametrize("n_states", [2, 5])
def test_the_theory_at_a_vanishing_concentration_is_the_random_map_limit(n_states, monkeypatch):
    monkeypatch.setattr(incontext, "THEORY_SEQUENCES", 2000)
    chain = InContextChain.random(n_states, alpha=1e-300)
    losses, errors = chain.optimal_loss_by_position(8)
    assert np.all(np.abs(losses - one_hot_limit_by_position(n_states, 8)) <= 5 * errors + 1e-9)
    assert chain.entropy_rate() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("options", [{}, {"order": 2}])
def test_the_theory_at_a_huge_concentration_is_the_uniform_limit(options, monkeypatch):
    monkeypatch.setattr(incontext, "THEORY_SEQUENCES", 500)
    chain = InContextChain.random(3, alpha=1e12, **options)  # every row is 1/K to within 1e-6
    theory = chain.theory(8)
    for key in ("optimal_loss", "entropy_rate", "oracle_loss"):
        assert theory[key] == pytest.approx(math.log(3), abs=1e-6), key


# Sparse rows at a tiny concentration go one matrix at a time (MarkovChain's solve): one case, for time.
SMALL = [(alpha, options) for alpha in (1e-300, 1e-5, 0.01) for options in ({}, {"order": 2})] + [
    (1e-5, {"sparsity": 50})
]


@pytest.mark.parametrize("alpha, options", SMALL)
def test_every_theory_number_is_finite_at_small_concentrations(alpha, options, monkeypatch):
    monkeypatch.setattr(incontext, "THEORY_SEQUENCES", 100)
    monkeypatch.setattr(incontext, "MIN_THEORY_SEQUENCES", 100)
    chain = InContextChain.random(4, alpha=alpha, **options)
    theory = chain.theory(10)
    assert all(np.isfinite(value) for value in theory.values()), theory
    assert 0 <= theory["entropy_rate"] <= theory["optimal_loss"] + 5 * theory["optimal_loss_se"] <= math.log(4) + 1e-9
    tokens = chain.sample(20, 10, np.random.default_rng(0))
    assert np.isfinite(chain.true_loss(tokens)) and np.isfinite(chain.unigram_loss())


def test_the_stationary_start_refuses_concentrations_below_its_range():
    with pytest.raises(NanoMarkovError, match=r"concentrations >= 0\.5, got 0\.49"):
        InContextChain.random(3, alpha=0.49, start="stationary")
    with pytest.raises(NanoMarkovError, match="concentrations >= 0.5"):
        InContextChain([1.0, 0.2], [0.5, 0.5], 2, start="stationary")


def test_a_spec_with_a_tiny_concentration_and_bietti_with_tiny_alpha_have_finite_theory(monkeypatch):
    monkeypatch.setattr(incontext, "THEORY_SEQUENCES", 100)
    monkeypatch.setattr(incontext, "MIN_THEORY_SEQUENCES", 100)
    chain = process_from_spec({"process": "icl", "concentration": [0.01, 0.01, 0.01]})
    assert all(np.isfinite(value) for value in chain.theory(8).values())
    bietti = TriggerChain.random(5, alpha=1e-300, n_triggers=2)  # one-hot rows: chains with several classes
    assert all(np.isfinite(value) for value in bietti.theory(8).values())
    assert bietti.entropy_rate() == pytest.approx(0.0, abs=1e-12)


def test_the_command_line_at_small_concentrations(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(incontext, "THEORY_SEQUENCES", 300)
    monkeypatch.chdir(tmp_path)
    assert main("generate 3 --process icl --alpha 0.01 --train 4 --val 2 --seq_len 8 --out small".split()) == 0
    theory = load_dataset(tmp_path / "small").meta["theory"]
    assert all(value is not None and np.isfinite(value) for value in theory.values())
    capsys.readouterr()
    for command in ("generate 3 --process icl --alpha 0.01 --start stationary --out bad", "theory bad"):
        assert main(command.split()) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "Traceback" not in error
    assert not (tmp_path / "bad").exists()


def test_a_lifted_chain_at_a_small_concentration_is_refused_beyond_its_bounded_range():
    # K = 3, order 4 at alpha 0.01 ran minutes (at 1e-8, hours) before answering: refused at once, naming what works.
    with pytest.raises(NanoMarkovError, match=r"order 4 with K = 3 \(81 contexts\) takes concentrations >= 0\.1"):
        InContextChain.random(3, alpha=0.01, order=4)
    with pytest.raises(NanoMarkovError, match=r"K\^k <= 27 contexts"):
        process_from_spec({"process": "icl", "concentration": [1e-8, 1.0, 1.0], "order": 4})
    InContextChain.random(3, alpha=0.1, order=4)  # no entry of its rows is exactly 0: the fast path
    InContextChain.random(3, alpha=1e-8, order=3)  # 27 contexts: seconds


def test_settling_stops_each_chain_once_it_stops_moving():
    # One-hot lifted rows (a cycle and transients draining into it) settle in a few squarings, not all 80.
    chain = InContextChain.random(2, alpha=1e-300, order=2)
    lifted = chain.lift(chain.sample_matrices(50, np.random.default_rng(0)))
    power, squarings = incontext.settled_powers(lifted)
    assert squarings < incontext.SETTLING_SQUARINGS // 2
    assert np.allclose(power @ power, power, atol=1e-12)  # settled: the limit the 80 squarings reach
    leaky = np.array([[[1 - 1e-20, 1e-20], [0.0, 1.0]]])  # leaves state 0 with chance 1e-20 a step
    power, squarings = incontext.settled_powers(leaky)
    assert squarings > 60 and power[0, 0, 1] == pytest.approx(1.0)  # not stopped before the transient drained
