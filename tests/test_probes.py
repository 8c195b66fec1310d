"""Probes against hand-built models whose internals are known: the probe must find what was put there."""

import dataclasses

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from nanomarkov import NanoMarkovError
from nanomarkov.data import generate_dataset, load_dataset
from nanomarkov.evaluate import evaluate_models
from nanomarkov.interp.readouts import (
    _attention_weights,
    attention_summary,
    direct_path,
    logit_lens,
    plot_attention_summary,
    plot_direct_path,
    plot_logit_lens,
    plot_transition_readout,
    transition_readout,
)
from nanomarkov.model import GPT, GPTConfig
from nanomarkov.processes.markov import MarkovChain

# log of "impossible" in the head (BOS row, zero transitions): e^-30 is 1e-13, far below the
# tolerances, yet small enough that a perturbed residual stream keeps every logit finite.
NEG = -30.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("probes") / "d"
    generate_dataset(path, 4, 300, 60, seq_len=12, seed=5, sparsity=25)
    return load_dataset(path)


def perfect_model(chain, n_layer=0, block_size=11):
    """Identity embedding, head = log P table: the direct path alone is exactly the chain.

    Column c of the head is log P[c] (log startprob for BOS); blocks, if any, have
    zero output projections, so they add nothing to the residual stream.
    """
    k = chain.n_states
    model = GPT(
        GPTConfig(
            n_layer=n_layer,
            n_head=1,
            n_embd=k + 1,
            block_size=block_size,
            vocab_size=k + 1,
            one_hot_embed=False,
            use_ln=False,
            pos_ape=False,
            lm_head_tied=False,
        )
    )
    with np.errstate(divide="ignore"):
        log_rows = np.maximum(np.log(np.vstack([chain.transmat, chain.startprob])), NEG)  # current -> next state
    table = np.hstack([log_rows, np.full((k + 1, 1), NEG)])
    with torch.no_grad():
        model.wte.weight.copy_(torch.eye(k + 1))
        model.lm_head.weight.copy_(torch.from_numpy(table.T))  # rows: next token, columns: current token
        for block in model.blocks:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
    return model.eval()


def bos_led(n, length, vocab_size, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size - 1, size=(n, length))
    tokens[:, 0] = vocab_size - 1
    return tokens


def test_readout_and_direct_path_recover_p_from_the_perfect_model(dataset):
    chain = dataset.chain
    for n_layer in (0, 2):
        model = perfect_model(chain, n_layer)
        for probe in (transition_readout, direct_path):
            result = probe(model, chain)
            np.testing.assert_allclose(result["learned"], chain.transmat, atol=1e-6)
            np.testing.assert_array_equal(result["true"], chain.transmat)
            assert result["kl"].shape == (chain.n_states,) and np.all(np.abs(result["kl"]) < 1e-6)


def test_direct_path_sees_past_blocks_that_spoil_the_output(dataset):
    chain = dataset.chain
    model = perfect_model(chain, n_layer=1)
    with torch.no_grad():
        torch.manual_seed(0)
        model.blocks[0].mlp.c_proj.weight.normal_(0, 1.0)
    assert np.all(direct_path(model, chain)["kl"] < 1e-6)
    assert transition_readout(model, chain)["kl"].mean() > 1e-2


def test_direct_path_uses_position_one_with_positional_embeddings():
    chain = MarkovChain.random(6, seed=1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=0, n_head=1, n_embd=12, block_size=8, vocab_size=7)).eval()
    with torch.no_grad():
        model.wpe.weight.normal_(0, 1.0)  # large, so the wrong position would show
    # With no blocks, the direct path is the whole model on [BOS, s].
    np.testing.assert_allclose(
        direct_path(model, chain)["learned"], transition_readout(model, chain)["learned"], atol=1e-6
    )


def test_logit_lens_of_the_perfect_model_is_zero_everywhere(dataset):
    model = perfect_model(dataset.chain, n_layer=2)
    result = logit_lens(model, dataset.chain, dataset.val)
    assert result["layers"] == ["embed", "block 0", "block 1"]
    assert np.all(np.abs(result["kl_to_truth"]) < 1e-6) and np.all(np.abs(result["kl_to_final"]) < 1e-6)


def test_logit_lens_locates_the_damage_and_matches_evaluation(dataset):
    chain = dataset.chain
    model = perfect_model(chain, n_layer=2)
    with torch.no_grad():
        torch.manual_seed(0)
        model.blocks[0].mlp.c_proj.weight.normal_(0, 0.3)  # block 0 moves away from P; block 1 adds nothing
    result = logit_lens(model, chain, dataset.val)
    to_truth, to_final = result["kl_to_truth"], result["kl_to_final"]
    assert abs(to_truth[0]) < 1e-6 and to_final[0] > 1e-3  # the embedding is right, and not the final answer
    assert to_truth[1] > 1e-3 and abs(to_truth[1] - to_truth[2]) < 1e-9
    assert np.all(np.abs(to_final[1:]) < 1e-9)

    # The output's KL to the truth is evaluation's context KL, weighted by how often each
    # state is the current one, plus the start position (evaluation's start_kl).
    fidelity = evaluate_models({"m": model}, dataset)["m"]
    val = np.asarray(dataset.val)
    counts = np.bincount(val[:, 1:-1].ravel(), minlength=chain.n_states)
    context_kl = np.nan_to_num(fidelity["arrays"]["context_kl"])
    total = (context_kl * counts).sum() + val.shape[0] * fidelity["transition_fidelity"]["start_kl"]
    assert to_truth[-1] == pytest.approx(total / (val.shape[0] * (val.shape[1] - 1)), abs=1e-6)


@pytest.mark.parametrize("alibi, trained", [(False, False), (True, False), (True, True)])
def test_recomputed_attention_weights_reproduce_the_layer_output(alibi, trained):
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=4, n_embd=16, block_size=8, vocab_size=7, bias=True, alibi=alibi)
    model = GPT(dataclasses.replace(config, alibi_trained=trained)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
        attn = model.blocks[0].attn
        h = torch.randn(3, 8, 16)
        w = _attention_weights(attn, h)
        v = attn.c_attn(h)[..., 32:].view(3, 8, 4, 4).transpose(1, 2)
        y = attn.c_proj((w @ v).transpose(1, 2).reshape(3, 8, 16))
        torch.testing.assert_close(y, attn(h), atol=1e-5, rtol=1e-5)
    assert torch.all(w.triu(1) == 0)


def attention_forced_to(target):
    """One head whose q.k is 100/sqrt(16) on the chosen key and 0 elsewhere: weight ~ 1 - 8 e^-25 there.

    Positions are one-hot (times 10) in dims 0..7, dim 8 is a constant 10 and tokens
    live in dims 9..15. target "current": q = k = position. target "bos": q = the
    constant, k = the position-0 coordinate, so every query matches BOS only.
    """
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=8, vocab_size=7, use_ln=False)).eval()
    with torch.no_grad():
        model.wte.weight.zero_()
        model.wte.weight[:, 9:].normal_()
        model.wpe.weight.zero_()
        model.wpe.weight[:, :8] = 10 * torch.eye(8)
        model.wpe.weight[:, 8] = 10.0
        w = model.blocks[0].attn.c_attn.weight
        w.zero_()
        if target == "current":
            w[0:8, 0:8] = torch.eye(8)  # queries
            w[16:24, 0:8] = torch.eye(8)  # keys
        elif target == "previous":
            w[0:8, 0:8] = torch.eye(8)  # query t
            w[17:24, 0:7] = torch.eye(7)  # key j looks like position j + 1: query t meets key t - 1
        else:
            w[0, 8] = 1.0
            w[16, 0] = 1.0
    return model


@pytest.mark.parametrize("target", ["current", "bos", "previous"])
def test_attention_summary_finds_where_a_head_was_made_to_look(target):
    result = attention_summary(attention_forced_to(target), bos_led(20, 9, 7))
    assert result["current"].shape == (1, 1) and list(result["layers"]) == [0]
    expected = {"current": 0.0, "earlier": 0.0, "bos": 0.0, "previous": 0.0, target: 1.0}
    if target == "previous":  # of queries t = 1..7, t = 1's previous key is BOS; the other six's is a state
        expected |= {"previous": 6 / 7, "earlier": 6 / 7, "bos": 1 / 7}
    for key, value in expected.items():
        assert result[key][0, 0] == pytest.approx(value, abs=1e-6), key


def test_attention_summary_shapes_and_sums_and_mlp_only():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=8, vocab_size=7))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    tokens = bos_led(30, 9, 7)
    result = attention_summary(model, tokens)
    assert all(result[key].shape == (3, 2) for key in ("current", "earlier", "bos", "previous"))
    assert np.all(result["previous"] <= result["earlier"]) and np.all(result["previous"] > 0)
    np.testing.assert_allclose(result["current"] + result["earlier"] + result["bos"], 1.0, atol=1e-6)
    assert np.all(result["earlier"] > 0.01)  # random heads spread over the history
    empty = attention_summary(GPT(GPTConfig(n_layer=2, n_embd=16, block_size=8, vocab_size=7, mlp_only=True)), tokens)
    assert empty["current"].size == 0 and empty["layers"].size == 0
    assert isinstance(plot_attention_summary(empty), Figure)


def test_probes_leave_the_mode_alone_and_ignore_dropout(dataset):
    chain = dataset.chain
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=11, vocab_size=5, dropout=0.5))
    reference = logit_lens(model.eval(), chain, dataset.val[:10])
    model.train()
    again = logit_lens(model, chain, dataset.val[:10])
    assert model.training
    np.testing.assert_array_equal(again["kl_to_truth"], reference["kl_to_truth"])


def test_bad_inputs_say_what_is_wrong(dataset):
    chain = dataset.chain
    model = perfect_model(chain)
    with pytest.raises(NanoMarkovError, match="probe the model with the chain it was trained on"):
        transition_readout(model, MarkovChain.random(7, seed=0))
    bad = np.asarray(dataset.val[:3]).copy()
    bad[0, 0] = 0
    with pytest.raises(NanoMarkovError, match="BOS = 4"):
        logit_lens(model, chain, bad)
    with pytest.raises(NanoMarkovError, match="block_size"):
        attention_summary(perfect_model(chain, n_layer=1, block_size=5), dataset.val[:3])
    from nanomarkov.processes.korder import KOrderChain

    with pytest.raises(NanoMarkovError, match="a korder process does not have"):
        direct_path(model, KOrderChain.random(chain.n_states, order=2, seed=0))


def test_every_plot_draws(dataset, tmp_path):
    chain = dataset.chain
    model = perfect_model(chain, n_layer=1)
    figures = [
        plot_transition_readout(transition_readout(model, chain)),
        plot_direct_path(direct_path(model, chain)),
        plot_logit_lens(logit_lens(model, chain, dataset.val)),
        plot_attention_summary(attention_summary(model, dataset.val)),
    ]
    for i, fig in enumerate(figures):
        assert isinstance(fig, Figure)
        fig.savefig(tmp_path / f"{i}.png")
        assert (tmp_path / f"{i}.png").stat().st_size > 1000
