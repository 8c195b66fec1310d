"""The distance to each strategy (Process.stage_log_probs, dynamics' stage_kl and stage_events) and the
attention scores over training (previous-token, induction), each against a hand-built model whose answer is known."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_dynamics import bigram_gpt, every_sequence, icl_probability, korder_probability, logit_table, markov_run

from nanomarkov.data import load_dataset
from nanomarkov.dynamics import (
    STAGE_EVENT_RULE,
    StageDistances,
    attention_scores,
    distance_events,
    format_dynamics,
    run_dynamics,
)
from nanomarkov.evaluate import Batch, state_log_probs
from nanomarkov.interp.readouts import induction_scores, previous_token_scores, repeated_random_tokens
from nanomarkov.model import GPT, GPTConfig
from nanomarkov.processes.incontext import InContextChain
from nanomarkov.processes.korder import KOrderChain
from nanomarkov.processes.markov import MarkovChain

assert markov_run  # the fixture, shared with test_dynamics


def with_bos(sequences, k):
    return np.hstack([np.full((len(sequences), 1), k), sequences])


def expected_nll(log_probs, tokens, probs):
    """The expected mean NLL of a predictor over every sequence, each weighted by its probability."""
    nll = -np.take_along_axis(log_probs, tokens[:, 1:, None], axis=2)[..., 0].mean(axis=1)
    return float(probs @ nll)


def in_context_unigram_by_hand(chain, tokens):
    """startprob for x1, then (counts of x_1..x_t + alpha) / (t + sum alpha), one position at a time."""
    k, out = chain.n_states, np.empty((tokens.shape[0], tokens.shape[1] - 1, chain.n_states))
    for i, xs in enumerate(tokens[:, 1:]):
        out[i, 0] = chain.startprob
        for t in range(1, len(xs)):
            out[i, t] = (np.bincount(xs[:t], minlength=k) + chain.concentration) / (t + chain.concentration.sum())
    return np.log(out)


def first_order_by_hand(sequences, probs, k):
    """Enumerated law of x1, and P_t(x_t | x_{t-1}) for every position t >= 2: (first (K,), (n, K, K))."""
    first, pairs = np.zeros(k), np.zeros((sequences.shape[1], k, k))
    for xs, p in zip(sequences, probs):
        first[xs[0]] += p
        for t in range(1, len(xs)):
            pairs[t, xs[t - 1], xs[t]] += p
    return first, pairs[1:] / np.maximum(pairs[1:].sum(axis=2, keepdims=True), 1e-300)


# ------------------------------------------------------------ the stage predictors of the process contract


def test_markov_and_korder_stage_log_probs_cost_their_stage_losses_exactly():
    """Over every sequence of a short length, each stage's expected NLL is its stage loss (all exact here)."""
    for chain, seq_len in ((MarkovChain.random(3, seed=5), 6), (KOrderChain.random(3, seed=3, order=2, alpha=0.5), 7)):
        sequences = every_sequence(3, seq_len - 1)
        if isinstance(chain, KOrderChain):
            probs = np.array([korder_probability(chain, xs) for xs in sequences])
        else:
            probs = np.array([chain.startprob[xs[0]] * np.prod(chain.transmat[xs[:-1], xs[1:]]) for xs in sequences])
        tokens = with_bos(sequences, 3)
        stages, losses = chain.stage_log_probs(tokens), chain.stage_losses(seq_len)
        assert list(stages) == list(losses)
        for name, log_probs in stages.items():
            assert log_probs.shape == (len(tokens), seq_len - 1, 3)
            assert expected_nll(log_probs, tokens, probs) == pytest.approx(losses[name], abs=1e-12), name


def test_korder_first_order_stage_is_the_conditional_of_each_position():
    chain, seq_len = KOrderChain.random(2, seed=1, order=3, alpha=0.7), 8
    sequences = every_sequence(2, seq_len - 1)
    first, conditionals = first_order_by_hand(
        sequences, np.array([korder_probability(chain, xs) for xs in sequences]), 2
    )
    log_probs = chain.stage_log_probs(with_bos(sequences, 2))["first_order"]
    assert np.exp(log_probs[:, 0]) == pytest.approx(np.broadcast_to(first, (len(sequences), 2)))
    positions = np.arange(seq_len - 2)
    assert np.exp(log_probs[:, 1:]) == pytest.approx(conditionals[positions, sequences[:, :-1]])


def test_icl_stages_are_the_in_context_counts_and_leave_out_the_oracle():
    chain, seq_len = InContextChain([0.5, 2.0], [0.3, 0.7], 2), 7
    sequences = every_sequence(2, seq_len - 1)
    tokens = with_bos(sequences, 2)
    stages = chain.stage_log_probs(tokens)
    assert list(stages) == ["uniform", "unigram", "in_context_unigram", "optimal"]  # no oracle: no matrix in tokens
    assert stages["in_context_unigram"] == pytest.approx(in_context_unigram_by_hand(chain, tokens))
    probs = np.array([icl_probability(chain, xs) for xs in sequences])
    # The Bayes predictor multiplies out to each sequence's probability (chain rule).
    assert expected_nll(stages["optimal"], tokens, probs) == pytest.approx(probs @ -np.log(probs) / (seq_len - 1))
    # Unigram: the estimated mean law of x_t, whose entropy stage_losses reports; every state alike: exactly 1/K.
    law = np.exp(stages["unigram"][0, 0])
    assert -(law @ np.log(law)) == pytest.approx(chain.stage_losses(seq_len)["unigram"])
    assert InContextChain.random(3).unigram_law(seq_len) == pytest.approx(np.full(3, 1 / 3), abs=0)


# ------------------------------------------------------------ the distance from a model to each stage


class PredictorModel(torch.nn.Module):
    """A 'model' whose state logits are a given predictor's log-probs of the input, with a large BOS logit
    (its mass is dropped and the K states renormalised, so it must not change any KL)."""

    def __init__(self, predictor, bos_logit=3.0):
        super().__init__()
        self.predictor, self.bos_logit = predictor, bos_logit

    def forward(self, idx):
        tokens = np.hstack([idx.numpy(), np.zeros((idx.shape[0], 1), dtype=np.int64)])  # the last is never read
        log_probs = np.maximum(self.predictor(tokens), -60.0)
        bos = np.full(log_probs.shape[:2] + (1,), self.bos_logit)
        return torch.from_numpy(np.concatenate([log_probs, bos], axis=-1)), None


def stage_kl_over_positions(model, dataset):
    """StageDistances' distances of a model, fed the whole val split as one batch of evaluate's val pass."""
    tokens = torch.from_numpy(np.asarray(dataset.val, dtype=np.int64))
    logits = model(tokens[:, :-1])[0].double()
    optimal = torch.from_numpy(dataset.chain.optimal_log_probs(tokens.numpy()))
    family = StageDistances(dataset, ["m"])
    family.update(Batch(tokens, optimal, {"m": logits}, {"m": state_log_probs(logits, dataset.chain.n_states)}))
    return family.results("m", None, "cpu", {})[0]["stage_kl"]


def kl(p, q):
    return float(np.sum(np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)))


def test_a_model_that_is_a_stage_is_at_kl_zero_from_it_and_at_a_known_kl_from_another():
    chain = InContextChain([0.5, 2.0, 1.0], [0.2, 0.3, 0.5], 3)
    tokens = chain.sample(6, 9, np.random.default_rng(0)).astype(np.int64)
    dataset = SimpleNamespace(chain=chain, val=tokens, seq_len=9)
    distances = stage_kl_over_positions(PredictorModel(lambda t: in_context_unigram_by_hand(chain, t)), dataset)
    assert distances["in_context_unigram"] == pytest.approx(0, abs=1e-12)
    q = np.exp(in_context_unigram_by_hand(chain, tokens)).reshape(-1, 3)
    assert distances["uniform"] == pytest.approx(np.mean([kl(np.full(3, 1 / 3), row) for row in q]), abs=1e-12)
    assert set(distances) == {"uniform", "unigram", "in_context_unigram", "optimal"}


def test_a_korder_model_that_is_the_first_order_stage():
    chain, seq_len = KOrderChain.random(2, seed=1, order=3, alpha=0.7), 8
    sequences = every_sequence(2, seq_len - 1)
    first, conditionals = first_order_by_hand(
        sequences, np.array([korder_probability(chain, xs) for xs in sequences]), 2
    )

    def first_order(tokens):
        rows = conditionals[np.arange(seq_len - 2), tokens[:, 1:-1]]
        return np.log(np.concatenate([np.broadcast_to(first, (len(tokens), 1, 2)), rows], axis=1))

    val = with_bos(sequences[::5], 2)
    distances = stage_kl_over_positions(PredictorModel(first_order), SimpleNamespace(chain=chain, val=val, seq_len=8))
    assert distances["first_order"] == pytest.approx(0, abs=1e-12)
    half = np.full(2, 0.5)
    expected = np.mean([kl(half, row) for row in np.exp(first_order(val)).reshape(-1, 2)])
    assert distances["uniform"] == pytest.approx(expected, abs=1e-12) and expected > 0.01


# ------------------------------------------------------------ entered and left


@pytest.mark.parametrize(
    ("series", "expected"),
    [
        # min 0.01 at 3, band 2 * 0.01 + 0.001 = 0.021: 0.02 is in it (entered 2), 0.03 is not (left 4)
        ([0.5, 0.1, 0.02, 0.01, 0.03, 0.2, 0.3], (3, 2, 4, 0.021)),
        ([0.3, 0.2, 0.25], (1, None, None, 0.401)),  # 0.2 > 0.25 x 0.3: never approached
        ([0.01, 0.5, 0.015, 0.5], (0, 0, 3, 0.021)),  # back in the band at 2: left for good at 3
        ([0.5, np.nan, 0.0], (2, 2, None, 0.001)),  # still there at the end; a missing number is skipped
        ([np.nan, np.nan], (None, None, None, None)),
    ],
)
def test_distance_events_on_hand_made_series(series, expected):
    assert STAGE_EVENT_RULE == dict(approach_share=0.25, enter_factor=2.0, enter_nats=1e-3)
    closest, entered, left, band = distance_events(series)
    assert (closest, entered, left) == expected[:3]
    assert band == (None if expected[3] is None else pytest.approx(expected[3]))


def test_dynamics_records_the_distance_to_each_stage_and_when_it_was_entered_and_left(markov_run, tmp_path):
    """Snapshots: uniform over K+1 (iter 0), a mixture (10), the true chain (100): KL 0 to uniform, then to the optimum."""
    run, chain, _ = markov_run
    record = run_dynamics(run)
    val = np.asarray(load_dataset(record["dataset"]).val, dtype=np.int64)
    rows = chain.transition_rows()[val[:, :-1]]  # the true predictor at every position
    uniform_to_true = np.mean([kl(np.full(3, 1 / 3), row) for row in rows.reshape(-1, 3)])
    first, _, last = record["snapshots"]
    assert first["stage_kl"]["uniform"] == pytest.approx(0, abs=1e-6)
    assert last["stage_kl"]["optimal"] == pytest.approx(0, abs=1e-6)
    assert last["stage_kl"]["uniform"] == pytest.approx(uniform_to_true, abs=1e-6)
    assert last["attention_scores"] is None  # a 0-layer model has no attention
    events = record["stage_events"]
    assert events["uniform"]["entered"]["iter"] == 0 and events["uniform"]["left"]["iter"] == 10
    assert events["optimal"]["entered"]["iter"] == 100 and events["optimal"]["left"] is None
    text = format_dynamics(record)
    assert "strategy uniform" in text and "entered at iter 0 (0 tokens), left at iter 10 (1,100 tokens)" in text


# ------------------------------------------------------------ attention scores


def positional_gpt(block_size, half):
    """Two layers of two heads that attend by position alone (one-hot positions, no LayerNorm, no MLP output):
    L0H0 to the previous token, L0H1 to BOS, L1H0 to the token n - 1 back (induction on [BOS, r, r], n = half),
    L1H1 uniformly."""
    vocab, head_dim = 4, block_size + 1
    config = GPTConfig(n_layer=2, n_head=2, n_embd=2 * head_dim, vocab_size=vocab, block_size=block_size, use_ln=False)
    model = GPT(config)
    heads = ([("shift", 1), ("bos", 0)], [("shift", half - 1), ("uniform", 0)])  # per layer, per head
    c, position = 400.0, vocab  # position p lives in residual dimension vocab + p
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.wte.weight[:, :vocab] = torch.eye(vocab)
        model.wpe.weight[:, position : position + block_size] = torch.eye(block_size)
        for block, layer in zip(model.blocks, heads):
            weight = block.attn.c_attn.weight  # rows: queries, keys, values of both heads
            for h, (kind, shift) in enumerate(layer):
                for j in range(block_size):
                    weight[config.n_embd + h * head_dim + j, position + j] = 1.0  # key: the one-hot position
                    if kind == "shift" and j + shift < block_size:
                        weight[h * head_dim + j, position + j + shift] = c  # query at t looks for key t - shift
                    if kind == "bos":
                        weight[h * head_dim, position + j] = c  # every query looks for key 0
    return model


def test_attention_scores_of_hand_built_heads():
    block_size, half = 11, 5
    model = positional_gpt(block_size, half)
    val = with_bos(np.random.default_rng(1).integers(3, size=(4, block_size)), 3)
    previous = previous_token_scores(model, val)
    queries = np.arange(1, block_size)  # query t has t + 1 keys
    assert previous[0] == pytest.approx([1.0, 1 / (block_size - 1)], abs=1e-6)
    assert previous[1, 1] == pytest.approx(np.mean(1 / (queries + 1)), abs=1e-6)
    repeated = repeated_random_tokens(3, 5, half, np.random.default_rng(2))
    assert repeated.shape == (5, 2 * half + 2) and (repeated[:, 1 : half + 1] == repeated[:, half + 1 : -1]).all()
    induction = induction_scores(model, repeated)
    assert induction[1, 0] == pytest.approx(1.0, abs=1e-6)
    assert induction[0] == pytest.approx([0.0, 0.0], abs=1e-6)  # previous token and BOS: never the target
    assert induction[1, 1] == pytest.approx(np.mean(1 / (half + np.arange(1, half + 1) + 1)), abs=1e-6)
    dataset = SimpleNamespace(chain=MarkovChain.random(3, seed=1), val=val)
    scores = attention_scores(model, dataset)
    assert scores["layers"] == [0, 1] and scores["induction_half"] == half
    assert np.array(scores["previous_token"]) == pytest.approx(previous)
    assert scores["induction"][1][0] == pytest.approx(1.0, abs=1e-6)
    assert attention_scores(bigram_gpt(logit_table(np.full((4, 3), 1 / 3)), 12), dataset) is None
