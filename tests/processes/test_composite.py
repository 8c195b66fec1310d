"""Factored and mixture processes against the exact law of every short sequence, enumerated by hand from
their parts' matrices: sampling (G-test), the optimal predictor (Bayes by brute force), theory."""

import io
import itertools

import numpy as np
import pytest
from test_markov import SIGNIFICANCE, g_test_pvalue

from nanomarkov import NanoMarkovError
from nanomarkov.data import generate_dataset, load_dataset
from nanomarkov.processes.composite import FactoredProcess, MixtureProcess
from nanomarkov.processes.hmm import HiddenMarkovModel
from nanomarkov.processes.markov import MarkovChain
from nanomarkov.processes.spec import process_from_spec

FIRST = MarkovChain(np.array([[0.9, 0.1], [0.3, 0.7]]), np.array([0.6, 0.4]))
SECOND = MarkovChain(np.array([[0.2, 0.8], [0.6, 0.4]]), np.array([0.5, 0.5]))
WEIGHTS = np.array([0.3, 0.7])


def chain_probability(chain, states):
    """P(x_1..x_n) of a first-order chain, from its definition."""
    p = chain.startprob[states[0]] if states else 1.0
    for a, b in zip(states, states[1:]):
        p *= chain.transmat[a, b]
    return p


def factored_probability(states):
    """FIRST x SECOND: the joint token j = 2 a + b, its law the product of the chains'."""
    return chain_probability(FIRST, [j // 2 for j in states]) * chain_probability(SECOND, [j % 2 for j in states])


def mixture_probability(states):
    return WEIGHTS[0] * chain_probability(FIRST, states) + WEIGHTS[1] * chain_probability(SECOND, states)


def brute_force(probability, k, seq_len):
    """Per position t = 1..L-1: H(x_t | x_<t) and the optimal accuracy, from the law of every word x_1..x_t."""
    losses, accuracies = np.zeros(seq_len - 1), np.zeros(seq_len - 1)
    for t in range(seq_len - 1):
        joint = np.array([probability(list(s)) for s in itertools.product(range(k), repeat=t + 1)]).reshape(-1, k)
        given = joint / np.where(joint.sum(axis=1, keepdims=True) > 0, joint.sum(axis=1, keepdims=True), 1.0)
        losses[t] = -(joint * np.log(np.where(given > 0, given, 1.0))).sum()
        accuracies[t] = joint.max(axis=1).sum()
    return losses, accuracies


def bayes_log_probs(probability, k, tokens):
    """P(x_{t+1} | x_1..x_t) = P(x_1..x_{t+1}) / P(x_1..x_t), every sequence and position, by brute force."""
    out = np.empty((len(tokens), tokens.shape[1] - 1, k))
    for i, row in enumerate(tokens[:, 1:].tolist()):
        for t in range(len(row)):
            out[i, t] = [np.log(probability(row[:t] + [x]) / probability(row[:t])) for x in range(k)]
    return out


@pytest.fixture
def factored():
    return FactoredProcess([FIRST, SECOND])


@pytest.fixture
def mixture():
    return MixtureProcess([FIRST, SECOND], WEIGHTS)


def sequence_counts(process, seq_len, n, seed):
    tokens = process.sample(n, seq_len, np.random.default_rng(seed)).astype(np.int64)
    index = np.ravel_multi_index(tokens[:, 1:].T, (process.n_states,) * (seq_len - 1))
    return np.bincount(index, minlength=process.n_states ** (seq_len - 1))


@pytest.mark.parametrize("kind", ["factored", "mixture"])
def test_sampled_sequences_follow_the_exact_law(kind, factored, mixture):
    process, probability = (factored, factored_probability) if kind == "factored" else (mixture, mixture_probability)
    seq_len, n = 4, 20000
    expected = np.array([probability(list(s)) for s in itertools.product(range(process.n_states), repeat=seq_len - 1)])
    assert expected.sum() == pytest.approx(1.0)
    assert g_test_pvalue(sequence_counts(process, seq_len, n, 7), n * expected) > SIGNIFICANCE


@pytest.mark.parametrize("kind", ["factored", "mixture"])
def test_optimal_predictor_is_bayes_by_brute_force(kind, factored, mixture):
    process, probability = (factored, factored_probability) if kind == "factored" else (mixture, mixture_probability)
    tokens = process.sample(30, 6, np.random.default_rng(3)).astype(np.int64)
    expected = bayes_log_probs(probability, process.n_states, tokens)
    assert np.allclose(process.optimal_log_probs(tokens), expected, atol=1e-12)


def test_factored_theory_is_exact_against_enumeration(factored):
    seq_len = 6
    losses, accuracies = brute_force(factored_probability, 4, seq_len)
    got, errors = factored.optimal_loss_by_position(seq_len)
    assert np.allclose(got, losses, atol=1e-12) and not errors.any()
    assert factored.optimal_accuracy(seq_len) == pytest.approx(accuracies.mean(), abs=1e-12)
    theory = factored.theory(seq_len)
    assert not any(key.endswith("_se") for key in theory)
    # Closed forms of the two chains: h = sum_s pi_s H(P_s), the unigram H(pi).
    rates = [c.stationary() @ [-(r * np.log(r)).sum() for r in c.transmat] for c in (FIRST, SECOND)]
    assert theory["entropy_rate"] == pytest.approx(sum(rates), abs=1e-12)
    joint = np.outer(FIRST.stationary(), SECOND.stationary()).ravel()
    assert theory["unigram_loss"] == pytest.approx(-(joint * np.log(joint)).sum(), abs=1e-12)


def test_mixture_theory_estimates_agree_with_enumeration(mixture):
    seq_len = 6
    losses, accuracies = brute_force(mixture_probability, 2, seq_len)
    got, errors = mixture.optimal_loss_by_position(seq_len)
    assert (errors > 0).all() and np.all(np.abs(got - losses) < 4 * errors + 1e-12)
    se = mixture.standard_errors(seq_len)
    assert abs(mixture.optimal_loss(seq_len) - losses.mean()) < 4 * se["optimal_loss"]
    assert abs(mixture.optimal_accuracy(seq_len) - accuracies.mean()) < 4 * se["optimal_accuracy"]
    own = [brute_force(lambda s, c=c: chain_probability(c, s), 2, seq_len)[0].mean() for c in (FIRST, SECOND)]
    stages = mixture.stage_losses(seq_len)
    assert list(stages) == ["uniform", "unigram", "optimal", "knows_component"]
    assert stages["knows_component"] == pytest.approx(WEIGHTS @ own, abs=1e-12)
    assert stages["knows_component"] < losses.mean()  # knowing the component is worth something
    rates = [c.stationary() @ [-(r * np.log(r)).sum() for r in c.transmat] for c in (FIRST, SECOND)]
    assert mixture.entropy_rate() == pytest.approx(WEIGHTS @ rates, abs=1e-12)
    law = WEIGHTS @ np.stack([FIRST.stationary(), SECOND.stationary()])
    assert mixture.unigram_loss() == pytest.approx(-(law * np.log(law)).sum(), abs=1e-12)


def test_factored_beliefs_are_the_outer_product_and_mixture_beliefs_weigh_the_components():
    mess3 = HiddenMarkovModel.mess3()
    factored = FactoredProcess([mess3, mess3])
    tokens = factored.sample(5, 7, np.random.default_rng(1))
    first, second = (mess3.belief_states(part) for part in factored.split(tokens))
    beliefs = factored.belief_states(tokens)
    assert beliefs.shape == (5, 7, 9) and np.allclose(
        beliefs, np.einsum("nti,ntj->ntij", first, second).reshape(5, 7, 9)
    )
    mixture = MixtureProcess([mess3, mess3], [0.5, 0.5])
    weighed = mixture.belief_states(mess3.sample(4, 6, np.random.default_rng(2)))
    assert weighed.shape == (4, 6, 6) and np.allclose(weighed.sum(axis=-1), 1.0)
    posterior = MixtureProcess([FIRST, SECOND], WEIGHTS).belief_states(np.array([[2, 0, 0, 1]]))
    assert posterior.shape == (1, 4, 2) and np.allclose(posterior[0, 0], WEIGHTS)
    p = [chain_probability(c, [0, 0, 1]) for c in (FIRST, SECOND)]
    assert np.allclose(posterior[0, 3], WEIGHTS * p / (WEIGHTS @ p))


def test_nested_composites_round_trip_through_their_arrays():
    mixture = MixtureProcess([FIRST, SECOND], WEIGHTS)
    nested = FactoredProcess([mixture, HiddenMarkovModel.mess3()])
    buffer = io.BytesIO()
    np.savez(buffer, **nested.arrays())
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as npz:
        rebuilt = FactoredProcess.from_arrays(npz)
    tokens = nested.sample(8, 6, np.random.default_rng(4))
    assert rebuilt.n_states == 6 and np.array_equal(rebuilt.optimal_log_probs(tokens), nested.optimal_log_probs(tokens))


def test_parts_are_found_in_the_registry_not_among_every_class_of_that_name():
    impostor = type("Impostor", (MarkovChain,), {"process": "markov"})  # never registered, still alive
    rebuilt = MixtureProcess.from_arrays(MixtureProcess([FIRST, SECOND], WEIGHTS).arrays())
    assert type(rebuilt.components[0]) is MarkovChain is not impostor
    arrays = MixtureProcess([FIRST, SECOND], WEIGHTS).arrays()
    arrays["layout"] = np.array(str(arrays["layout"]).replace('"markov"', '"unheard_of"'))
    with pytest.raises(NanoMarkovError, match="unknown process 'unheard_of'"):
        MixtureProcess.from_arrays(arrays)


SPEC_FIRST = {"process": "markov", "transmat": FIRST.transmat.tolist(), "startprob": FIRST.startprob.tolist()}
SPEC_SECOND = {"process": "markov", "transmat": SECOND.transmat.tolist(), "startprob": SECOND.startprob.tolist()}


def test_specs_give_composites_and_refuse_mismatched_vocabularies():
    factored = process_from_spec({"process": "factored", "factors": [SPEC_FIRST, {"process": "mess3"}]})
    assert factored.n_states == 6 and factored.sizes == (2, 3)
    mixture = process_from_spec({"process": "mixture", "components": [SPEC_FIRST, SPEC_SECOND], "weights": [0.3, 0.7]})
    tokens = mixture.sample(4, 5, np.random.default_rng(0))
    assert np.allclose(
        mixture.optimal_log_probs(tokens), MixtureProcess([FIRST, SECOND], WEIGHTS).optimal_log_probs(tokens)
    )
    with pytest.raises(NanoMarkovError) as refused:
        process_from_spec(
            {"process": "mixture", "components": [SPEC_FIRST, {"process": "mess3"}], "weights": [0.5, 0.5]}
        )
    assert str(refused.value) == "spec field 'components' must share one vocabulary (the same K), got K = 2, 3"
    with pytest.raises(NanoMarkovError, match=r"^factors\[1\]: spec field 'transmat' must"):
        process_from_spec(
            {"process": "factored", "factors": [SPEC_FIRST, {**SPEC_SECOND, "transmat": [[1, 1], [0, 1]]}]}
        )
    with pytest.raises(NanoMarkovError, match="'weights' must have one weight per component"):
        process_from_spec({"process": "mixture", "components": [SPEC_FIRST, SPEC_SECOND], "weights": [1.0]})


def test_a_composite_dataset_is_written_and_loaded(tmp_path):
    spec = {"process": "mixture", "components": [SPEC_FIRST, SPEC_SECOND], "weights": [0.3, 0.7]}
    meta = generate_dataset(tmp_path / "mix", None, 20, 10, seq_len=6, spec=spec)
    assert meta["process"] == "mixture" and "knows_component" in meta["stage_losses"]
    assert meta["spec"]["fields"]["components"][0]["arrays"] == {"transmat": [2, 2], "startprob": [2]}
    dataset = load_dataset(tmp_path / "mix")
    assert dataset.chain.weights.tolist() == [0.3, 0.7] and dataset.chain.n_hidden == 2
