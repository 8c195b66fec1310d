"""bietti (Bietti et al. 2023's trigger process) against brute force: every sequence of a few tokens
enumerated, its probability the sum over the output tuples of the product of its transitions."""

import itertools

import numpy as np
import pytest
from test_markov import SIGNIFICANCE, g_test_pvalue

from nanomarkov import NanoMarkovError
from nanomarkov.cli import main
from nanomarkov.data import load_dataset
from nanomarkov.processes import trigger
from nanomarkov.processes.markov import MarkovChain
from nanomarkov.processes.spec import process_from_spec
from nanomarkov.processes.trigger import TriggerChain

TRANSMAT = np.array(
    [[0.1, 0.5, 0.2, 0.2], [0.3, 0.3, 0.3, 0.1], [0.6, 0.1, 0.1, 0.2], [0.25, 0.25, 0.4, 0.1]],
)
# name: (transmat, startprob, triggers, output_law)
TINY = {
    "K=3, one trigger": (
        TRANSMAT[:3, :3] / TRANSMAT[:3, :3].sum(1, keepdims=True),
        [0.2, 0.5, 0.3],
        [1],
        [0.3, 0, 0.7],
    ),
    "K=4, two triggers": (TRANSMAT, [0.1, 0.2, 0.3, 0.4], [2, 0], [0, 0.6, 0, 0.4]),
}
N_POSITIONS = 5


def exact_law(name):
    """Every sequence of N_POSITIONS tokens (rows of BOS-led tokens) and its probability, summed over the outputs."""
    transmat, startprob, triggers, output_law = TINY[name]
    k = len(startprob)
    sequences = list(itertools.product(range(k), repeat=N_POSITIONS))
    probabilities = np.zeros(len(sequences))
    for outputs in itertools.product(range(k), repeat=len(triggers)):
        weight = np.prod([output_law[o] for o in outputs])
        if weight == 0:
            continue
        chain = np.array(transmat, dtype=float)
        for q, o in zip(triggers, outputs):
            chain[q] = np.eye(k)[o]
        for i, seq in enumerate(sequences):
            probabilities[i] += weight * startprob[seq[0]] * np.prod([chain[a, b] for a, b in zip(seq, seq[1:])])
    return np.hstack([np.full((len(sequences), 1), k), sequences]), probabilities


def exact_theory(name):
    """By position: H(x_{t+1} | x_1..x_t), the argmax's accuracy, the global bigram's loss; and the law of each x_t."""
    transmat, startprob, triggers, output_law = TINY[name]
    k = len(startprob)
    tokens, probabilities = exact_law(name)
    bigram = np.array(transmat, dtype=float)
    bigram[triggers] = output_law
    loss, accuracy, bigram_loss = (np.zeros(N_POSITIONS) for _ in range(3))
    marginals = np.zeros((N_POSITIONS, k))
    for t in range(N_POSITIONS):
        heads = {}
        for seq, p in zip(map(tuple, tokens[:, 1:]), probabilities):
            heads.setdefault(seq[:t], np.zeros(k))[seq[t]] += p
            marginals[t, seq[t]] += p
            q = startprob if t == 0 else bigram[seq[t - 1]]
            bigram_loss[t] -= p * np.log(q[seq[t]]) if p > 0 else 0.0
        for law in heads.values():
            positive = law > 0
            loss[t] -= (law[positive] * np.log(law[positive] / law.sum())).sum()
            accuracy[t] += law.max()
    return loss, accuracy, bigram_loss, marginals


def make(name):
    return TriggerChain(*TINY[name])


@pytest.mark.parametrize("name", TINY)
def test_optimal_predictor_is_the_ratio_of_prefix_probabilities(name):
    chain = make(name)
    tokens, probabilities = exact_law(name)
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-12)
    possible = probabilities > 0
    tokens, probabilities = tokens[possible], probabilities[possible]
    log_probs = chain.optimal_log_probs(tokens)
    for t in range(N_POSITIONS):
        prefix = {}
        for seq, p in zip(map(tuple, tokens[:, 1:]), probabilities):
            for length in (t, t + 1):
                prefix[seq[:length]] = prefix.get(seq[:length], 0.0) + p
        expected = [prefix[tuple(seq[1 : t + 2])] / prefix[tuple(seq[1 : t + 1])] for seq in tokens]
        np.testing.assert_allclose(np.exp(log_probs[np.arange(len(tokens)), t, tokens[:, t + 1]]), expected, rtol=1e-10)
    np.testing.assert_allclose(np.exp(log_probs).sum(axis=2), 1.0, rtol=1e-12)


@pytest.mark.parametrize("name", TINY)
def test_theory_is_exact_by_enumeration(name):
    chain = make(name)
    loss, accuracy, bigram_loss, marginals = exact_theory(name)
    seq_len = N_POSITIONS + 1
    losses, errors = chain.optimal_loss_by_position(seq_len)
    np.testing.assert_allclose(losses, loss, rtol=1e-10)
    assert not errors.any() and chain.standard_errors(seq_len) == {}
    assert chain.optimal_accuracy(seq_len) == pytest.approx(accuracy.mean(), rel=1e-10)
    assert chain.stage_losses(seq_len)["global_bigram"] == pytest.approx(bigram_loss.mean(), rel=1e-10)
    np.testing.assert_allclose(chain.token_marginals(seq_len), marginals, atol=1e-12)


@pytest.mark.parametrize("name", TINY)
def test_monte_carlo_over_outputs_agrees_with_enumeration(name, monkeypatch):
    monkeypatch.setattr(trigger, "MAX_EXACT_OUTPUTS", 0)
    monkeypatch.setattr(trigger, "THEORY_OUTPUTS", 3000)
    chain, seq_len = make(name), N_POSITIONS + 1
    loss, accuracy, bigram_loss, _ = exact_theory(name)
    theory = chain.theory(seq_len)
    assert theory["output_tuples"] == 3000 and chain.token_marginals(seq_len) is None
    for key, value in (("optimal_loss", loss.mean()), ("optimal_accuracy", accuracy.mean())):
        assert abs(theory[key] - value) < 5 * theory[f"{key}_se"], (key, theory[key], value)
    assert abs(theory["global_bigram_loss"] - bigram_loss.mean()) < 5 * theory["global_bigram_loss_se"]


@pytest.mark.parametrize("name", TINY)
def test_entropy_rate_is_the_mean_over_outputs_of_the_chains_entropy_rates(name):
    transmat, startprob, triggers, output_law = TINY[name]
    rate, law = 0.0, np.zeros(len(startprob))
    for outputs in itertools.product(np.flatnonzero(output_law), repeat=len(triggers)):
        chain = np.array(transmat, dtype=float)
        chain[triggers] = np.eye(len(startprob))[list(outputs)]
        weight = np.prod(np.asarray(output_law)[list(outputs)])
        rate += weight * MarkovChain(chain, startprob).entropy_rate()
        law += weight * MarkovChain(chain, startprob).stationary()
    assert make(name).entropy_rate() == pytest.approx(rate, rel=1e-10)
    assert make(name).unigram_loss() == pytest.approx(-(law * np.log(law)).sum(), rel=1e-10)


@pytest.mark.parametrize("name", TINY)
def test_samples_follow_the_exact_law(name):
    chain, n = make(name), 30_000
    tokens, probabilities = exact_law(name)
    k = chain.n_states
    sampled = chain.sample(n, N_POSITIONS + 1, np.random.default_rng(5))[:, 1:].astype(np.int64)
    observed = np.bincount(sampled @ k ** np.arange(N_POSITIONS - 1, -1, -1), minlength=len(tokens))
    assert g_test_pvalue(observed, n * probabilities) > SIGNIFICANCE
    halves = chain.sample(10, 8, np.random.default_rng(1)), chain.sample(20, 8, np.random.default_rng(1))
    assert np.array_equal(halves[0], halves[1][:10])


def test_stage_predictors_score_their_stage_losses_on_samples():
    chain, seq_len, n = TriggerChain.random(6, seed=3, n_triggers=2), 24, 4000
    tokens = chain.sample(n, seq_len, np.random.default_rng(7)).astype(np.int64)
    losses = chain.stage_losses(seq_len)
    assert list(losses) == ["uniform", "unigram", "global_bigram", "optimal"]
    assert losses["global_bigram"] > losses["optimal"] + 0.02  # the induction head is worth something
    for stage, log_probs in chain.stage_log_probs(tokens).items():
        nll = -np.take_along_axis(log_probs, tokens[:, 1:, None], axis=2)[..., 0].mean(axis=1)
        assert abs(nll.mean() - losses[stage]) <= 5 * nll.std() / np.sqrt(n) + 1e-12, stage


@pytest.mark.parametrize(
    "arrays, message",
    [
        (dict(triggers=[1, 1]), "distinct"),
        (dict(triggers=[5]), "distinct tokens"),
        (dict(output_law=[0.5, 0.5, 0.0]), "no mass on a trigger"),
        (dict(triggers=[0, 1, 2]), "vector of 1..2"),
    ],
)
def test_bad_arrays_are_refused(arrays, message):
    given = dict(zip(TriggerChain.ARRAYS, TINY["K=3, one trigger"])) | arrays
    with pytest.raises(NanoMarkovError, match=message):
        TriggerChain(**given)


def test_generate_and_theory_from_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main("generate 5 --process bietti --n_triggers 1 --train 4 --val 2 --seq_len 10".split()) == 0
    dataset = load_dataset(tmp_path / "data" / "bietti5-n_triggers1")
    assert dataset.meta["n_triggers"] == 1 and len(dataset.chain.triggers) == 1
    assert np.array_equal(dataset.chain.transmat, TriggerChain.random(5, n_triggers=1).transmat)
    assert main(["theory", str(tmp_path / "data" / "bietti5-n_triggers1")]) == 0
    capsys.readouterr()
    assert main("generate 3 --process bietti --n_triggers 3 --out bad".split()) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "bad").exists()


def test_a_spec_gives_the_process_by_its_arrays_or_by_random():
    transmat, startprob, triggers, output_law = TINY["K=3, one trigger"]
    arrays = {"transmat": transmat.tolist(), "startprob": startprob, "triggers": [1.0], "output_law": output_law}
    chain = process_from_spec({"process": "bietti", **arrays})
    assert chain.triggers.tolist() == [1] and np.array_equal(chain.transmat, transmat)
    drawn = process_from_spec({"process": "bietti", "n_states": 6, "n_triggers": 2, "seed": 4})
    assert np.array_equal(drawn.transmat, TriggerChain.random(6, seed=4, n_triggers=2).transmat)


def test_the_default_leaves_at_least_two_outputs():
    for n_states, expected in ((2, 1), (3, 1), (4, 2), (5, 2), (6, 3), (65, 3)):
        chain = TriggerChain.random(n_states)
        assert len(chain.triggers) == expected and chain.options() == {}
        assert n_states == 2 or (chain.output_law > 0).sum() >= 2
