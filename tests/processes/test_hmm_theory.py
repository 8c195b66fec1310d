"""HMM theory against estimates that share nothing with it: a sampler and a forward filter written out
here, a seed of our own, and a tolerance from both standard errors."""

import numpy as np
import pytest

from nanomarkov.processes.hmm import MC_SEED, HiddenMarkovModel

OWN_SEED = MC_SEED + 1


def draw(rows, rng):
    """One index per row of probabilities, by inverting the cumulative sums."""
    u = rng.random(len(rows))
    return np.minimum((np.cumsum(rows, axis=1) < u[:, None]).sum(axis=1), rows.shape[1] - 1)


def independent_estimate(model, seq_len, n_sequences, seed=OWN_SEED):
    """Per sequence, the mean over positions 1..L-1 of the optimal predictor's loss H(p_t) and accuracy max p_t."""
    rng = np.random.default_rng(seed)
    hidden = draw(np.tile(model.startprob, (n_sequences, 1)), rng)
    prior = np.tile(model.startprob, (n_sequences, 1))  # P(h_t | x_<t)
    loss, accuracy = np.zeros(n_sequences), np.zeros(n_sequences)
    for _ in range(seq_len - 1):
        predictive = prior @ model.emissions
        with np.errstate(divide="ignore", invalid="ignore"):
            loss -= np.where(predictive > 0, predictive * np.log(predictive), 0.0).sum(axis=1)
        accuracy += predictive.max(axis=1)
        token = draw(model.emissions[hidden], rng)
        posterior = prior * model.emissions[:, token].T
        prior = (posterior / posterior.sum(axis=1, keepdims=True)) @ model.transmat
        hidden = draw(model.transmat[hidden], rng)
    return loss / (seq_len - 1), accuracy / (seq_len - 1)


def mean_and_se(values):
    return values.mean(), values.std(ddof=1) / np.sqrt(len(values))


MODELS = {
    "mess3": HiddenMarkovModel.mess3,
    "random": lambda: HiddenMarkovModel.random(4, seed=2, hidden_states=3),
}


@pytest.mark.parametrize("name", MODELS)
def test_the_independent_estimator_matches_exact_enumeration(name):
    """The estimator below is right where theory is exact (every prefix enumerated): L = 5."""
    model = MODELS[name]()
    exact = model.theory(5)
    assert exact["optimal_accuracy_se"] == 0.0 and exact["optimal_loss_se"] == 0.0
    losses, accuracies = independent_estimate(model, 5, 40_000)
    for key, values in (("optimal_loss", losses), ("optimal_accuracy", accuracies)):
        mean, se = mean_and_se(values)
        assert abs(mean - exact[key]) < 5 * se, key


@pytest.mark.parametrize("name", MODELS)
def test_optimal_accuracy_at_length_40_matches_an_independent_estimate(name):
    model = MODELS[name]()
    theory = model.theory(40)
    assert theory["optimal_accuracy_se"] > 0  # sampled: beyond what enumeration reaches
    losses, accuracies = independent_estimate(model, 40, 40_000)
    for key, values in (("optimal_loss", losses), ("optimal_accuracy", accuracies)):
        mean, se = mean_and_se(values)
        tolerance = 5 * np.hypot(se, theory[key + "_se"])
        assert abs(mean - theory[key]) < tolerance, (key, mean, theory[key], tolerance)
