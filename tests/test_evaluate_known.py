"""Known answers for evaluation numbers: a model whose logits are a fixed table, every metric recomputed
by brute force (a loop over every val position, in numpy), on one batch and on several."""

import numpy as np
import pytest
import torch

from nanomarkov import evaluate
from nanomarkov.data import generate_dataset, load_dataset
from nanomarkov.evaluate import evaluate_models

K = 3


class TableModel(torch.nn.Module):
    """Logits looked up by (previous token, current token), BOS before the first: a model with memory."""

    def __init__(self, seed, vocab):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, vocab, vocab, generator=generator, dtype=torch.float64)
        self.bos = vocab - 1

    def forward(self, idx):
        previous = torch.cat([torch.full_like(idx[:, :1], self.bos), idx[:, :-1]], dim=1)
        return self.table[previous, idx], None


def kl(p, q):
    return sum(pi * np.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def state_dist(logits):
    """The model's distribution over the K states: BOS dropped, renormalised."""
    q = np.exp(logits[:K] - logits[:K].max())
    return q / q.sum()


def stationary(transmat):
    values, vectors = np.linalg.eig(transmat.T)
    v = np.real(vectors[:, np.argmin(np.abs(values - 1))])
    return v / v.sum()


def brute_force_markov(model, chain, val):
    """Every transition_fidelity / markov_property number of one model, one val position at a time."""
    p, pi = chain.transmat, stationary(chain.transmat)
    logits = model(torch.from_numpy(val[:, :-1].astype(np.int64)))[0].numpy()
    per_state = {s: [] for s in range(K)}  # the model's state distribution at each context ending in s
    losses, hits = [], []
    for seq, seq_logits in zip(val, logits):
        for t in range(len(seq) - 1):
            z = seq_logits[t]
            losses.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[seq[t + 1]])
            hits.append(np.argmax(z) == seq[t + 1])
            if t >= 1:
                per_state[seq[t]].append(state_dist(z))
    prompts = model(torch.tensor([[K, s] for s in range(K)]))[0].numpy()
    prompt_kl = np.array([kl(p[s], state_dist(prompts[s, 1])) for s in range(K)])
    context_kl = np.array([np.mean([kl(p[s], q) for q in per_state[s]]) for s in range(K)])
    spread = np.array([np.mean([kl(q, np.mean(per_state[s], axis=0)) for q in per_state[s]]) for s in range(K)])
    return {
        "val_loss": np.mean(losses),
        "accuracy": np.mean(hits),
        "mean_kl": prompt_kl.mean(),
        "weighted_kl": pi @ prompt_kl,
        "context_mean_kl": context_kl.mean(),
        "context_weighted_kl": pi @ context_kl,
        "start_kl": kl(chain.startprob, state_dist(prompts[0, 0])),
        "mean_spread": spread.mean(),
        "weighted_spread": pi @ spread,
        "max_spread": spread.max(),
        "max_spread_state": int(np.argmax(spread)),
        "contexts": sum(len(v) for v in per_state.values()),
    }


def reported_markov(result):
    tf, mp = result["transition_fidelity"], result["markov_property"]
    return {
        "val_loss": result["cross_entropy"]["val_loss"],
        "accuracy": result["accuracy"]["accuracy"],
        **{key: tf[key] for key in ("mean_kl", "weighted_kl", "context_mean_kl", "context_weighted_kl", "start_kl")},
        **{key: mp[key] for key in ("mean_spread", "weighted_spread", "max_spread", "max_spread_state", "contexts")},
    }


@pytest.fixture(scope="module")
def markov_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate_known") / "mm3"
    generate_dataset(folder, K, 8, 40, seq_len=8, seed=5)
    return load_dataset(folder)


def test_first_order_metrics_have_their_known_values(markov_data):
    models = {"a": TableModel(1, K + 1), "b": TableModel(2, K + 1)}
    results = evaluate_models(models, markov_data)
    for name, model in models.items():
        got, expected = reported_markov(results[name]), brute_force_markov(model, markov_data.chain, markov_data.val)
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
        # Non-zero answers: a zero would pass however the number were computed.
        assert min(expected["start_kl"], expected["max_spread"], expected["weighted_kl"]) > 1e-3
        assert expected["context_weighted_kl"] != pytest.approx(expected["context_mean_kl"], rel=1e-3)


def test_agreement_between_two_models(markov_data):
    models = {"a": TableModel(1, K + 1), "b": TableModel(2, K + 1)}
    models["b"].table = models["a"].table + 0.7 * models["b"].table  # close enough to agree sometimes
    x = torch.from_numpy(markov_data.val[:, :-1].astype(np.int64))
    qa, qb = (np.apply_along_axis(state_dist, -1, m(x)[0].numpy()) for m in models.values())
    m = (qa + qb) / 2
    jsd = 0.5 * (np.sum(qa * np.log(qa / m), -1) + np.sum(qb * np.log(qb / m), -1))
    top = [m(x)[0].argmax(-1) for m in models.values()]
    agreement = evaluate_models(models, markov_data)["a"]["agreement"]
    assert agreement["mean_jsd"] == pytest.approx(jsd.mean(), rel=1e-9)
    assert agreement["top1_agreement"] == pytest.approx((top[0] == top[1]).double().mean().item(), rel=1e-12)
    assert 0 < agreement["mean_jsd"] and 0 < agreement["top1_agreement"] < 1


@pytest.mark.parametrize("sequences_per_batch", [1, 3, 7])
def test_several_batches_give_the_one_batch_answers(markov_data, monkeypatch, sequences_per_batch):
    models = {"a": TableModel(1, K + 1), "b": TableModel(2, K + 1)}
    whole = evaluate_models(models, markov_data)
    # evaluate_models takes EVAL_BATCH_ELEMENTS // ((seq_len - 1) * (K + 1)) sequences per batch.
    monkeypatch.setattr(evaluate, "EVAL_BATCH_ELEMENTS", sequences_per_batch * (markov_data.seq_len - 1) * (K + 1))
    streamed = evaluate_models(models, markov_data)
    for name, model in models.items():
        expected = brute_force_markov(model, markov_data.chain, markov_data.val)
        assert reported_markov(streamed[name]) == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert reported_markov(streamed[name]) == pytest.approx(reported_markov(whole[name]), rel=1e-12)
    assert streamed["a"]["agreement"]["mean_jsd"] == pytest.approx(whole["a"]["agreement"]["mean_jsd"], rel=1e-12)


def hmm_predictives(chain, tokens):
    """P(x_t | x_<t) for every position of every sequence, by the forward recursion written out."""
    out = np.zeros((len(tokens), tokens.shape[1] - 1, chain.emissions.shape[1]))
    for i, seq in enumerate(tokens):
        prior = chain.startprob  # P(h_t | x_<t)
        for t, token in enumerate(seq[1:]):
            out[i, t] = prior @ chain.emissions
            posterior = prior * chain.emissions[:, token]
            prior = (posterior / posterior.sum()) @ chain.transmat
    return out


@pytest.mark.parametrize("sequences_per_batch", [None, 4])
def test_optimal_fidelity_has_its_known_value(tmp_path, monkeypatch, sequences_per_batch):
    generate_dataset(tmp_path / "hmm", K, 8, 20, seq_len=10, seed=3, process="hmm", hidden_states=2)
    data = load_dataset(tmp_path / "hmm")
    if sequences_per_batch:
        monkeypatch.setattr(evaluate, "EVAL_BATCH_ELEMENTS", sequences_per_batch * (data.seq_len - 1) * (K + 1))
    model = TableModel(7, K + 1)
    result = evaluate_models({"m": model}, data)["m"]
    optimal = hmm_predictives(data.chain, data.val)
    logits = model(torch.from_numpy(data.val[:, :-1].astype(np.int64)))[0].numpy()
    expected = np.mean([kl(p, state_dist(z)) for p, z in zip(optimal.reshape(-1, K), logits.reshape(-1, K + 1))])
    assert result["optimal_fidelity"]["positions"] == optimal.shape[0] * optimal.shape[1]
    assert result["optimal_fidelity"]["mean_kl"] == pytest.approx(expected, rel=1e-9)
    assert expected > 1e-3
    hits = optimal.argmax(-1) == data.val[:, 1:]
    assert result["accuracy"]["true_accuracy_val"] == pytest.approx(hits.mean(), rel=1e-12)
