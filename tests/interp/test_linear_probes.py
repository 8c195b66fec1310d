"""The probes' MSE, shuffled-target and all-layers baselines and the simplex, against cases whose answer is known."""

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from nanomarkov import NanoMarkovError
from nanomarkov.data import generate_dataset, load_dataset, load_val_beliefs
from nanomarkov.interp.linear_probes import (
    ALL_LAYERS,
    belief_state_probe,
    linear_probe,
    plot_belief_simplex,
    probe_layers,
    shuffled_rows,
)
from nanomarkov.model import GPT, GPTConfig


@pytest.fixture(scope="module")
def mess3(tmp_path_factory):
    path = tmp_path_factory.mktemp("probes") / "mess3"
    generate_dataset(path, 3, 20, 60, seq_len=12, seed=4, process="hmm", preset="mess3")
    return load_dataset(path)


def one_hot_model(vocab_size, n_layer, block_size=11):
    """Every residual stream is the one-hot of the current token: identity embedding, no positions, blocks
    whose output projections are zero (they add nothing)."""
    config = GPTConfig(
        n_layer=n_layer, n_head=1, n_embd=vocab_size, block_size=block_size, vocab_size=vocab_size, use_ln=False
    )
    model = GPT(GPTConfig(**{**config.__dict__, "pos_ape": False}))
    with torch.no_grad():
        model.wte.weight.copy_(torch.eye(vocab_size))
        for block in model.blocks:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
    return model.eval()


def null_tolerance(n_train, n_test, d):
    """How far from 0 a held-out R² of d features on unrelated targets may stray: the fit's own bias,
    about -(d+1)/n_train, twice over, plus 4 standard errors of a variance ratio over n_test rows."""
    return 2 * (d + 1) / n_train + 4 * np.sqrt(2 / n_test)


def test_mse_is_the_squared_error_summed_over_coordinates_per_held_out_row():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(4000, 10))
    weights, bias = rng.normal(size=(10, 2)), rng.normal(size=2)
    exact = linear_probe(features, features @ weights + bias, 3000)
    assert exact["mse"] == pytest.approx(0, abs=1e-20) and exact["fit_mse"] == pytest.approx(0, abs=1e-20)
    assert exact["r2"] == pytest.approx(1.0, abs=1e-12)
    # Noise of variance 1 in each of 2 coordinates: the best probe's error is the noise, 2 per row (summed).
    noisy = linear_probe(features, features @ weights + rng.normal(size=(4000, 2)), 3000)
    assert noisy["mse"] == pytest.approx(2.0, abs=2 * (4 * np.sqrt(2 / 2000) + 11 / 3000))
    unrelated = linear_probe(features, rng.normal(size=(4000, 2)), 3000)
    assert abs(unrelated["r2"]) < null_tolerance(3000, 1000, 10)
    assert unrelated["mse"] == pytest.approx(2.0, abs=2 * (4 * np.sqrt(2 / 2000) + 11 / 3000))


def test_shuffled_targets_leave_nothing_to_find_and_all_layers_never_fit_worse():
    rng = np.random.default_rng(1)
    streams = [rng.normal(size=(200, 10, 3)) for _ in range(3)]  # 3 "layers", 200 sequences of 10 positions
    targets = np.tanh(streams[0].reshape(2000, 3) @ rng.normal(size=(3, 2))) + streams[2].reshape(2000, 3)[:, :2]
    shuffled = shuffled_rows(targets)
    assert np.array_equal(shuffled, shuffled_rows(targets))  # a fixed seed
    assert np.array_equal(np.sort(shuffled, axis=0), np.sort(targets, axis=0))  # the same rows, moved
    probed = probe_layers(["embed", "block 0", "block 1"], streams, targets, 1600)
    assert set(probed["fits"]) == set(probed["shuffled"]) == {"embed", "block 0", "block 1", ALL_LAYERS}
    for name, fit in probed["shuffled"].items():
        d = 9 if name == ALL_LAYERS else 3
        assert abs(fit["r2"]) < null_tolerance(1600, 400, d), name
    # Least squares on a superset of the columns fits its own rows at least as well as on any part.
    best_single = min(probed["fits"][name]["fit_mse"] for name in ("embed", "block 0", "block 1"))
    assert probed["fits"][ALL_LAYERS]["fit_mse"] <= best_single + 1e-12
    # The targets need the first and the last stream: only their concatenation reads both.
    singles = [probed["fits"][name]["r2"] for name in ("embed", "block 0", "block 1")]
    assert probed["fits"][ALL_LAYERS]["r2"] > max(singles) + 0.1 and singles[1] < null_tolerance(1600, 400, 3)


def group_mean_probe(tokens, targets, n_fit):
    """By hand: a linear probe on one-hot tokens predicts each token's mean target over the fitted rows.
    Returns (held-out MSE summed over coordinates, held-out R²)."""
    means = {c: targets[:n_fit][tokens[:n_fit] == c].mean(axis=0) for c in np.unique(tokens)}
    predicted = np.array([means[c] for c in tokens[n_fit:]])
    held_out = targets[n_fit:]
    residual = ((held_out - predicted) ** 2).sum()
    return residual / len(held_out), 1 - residual / ((held_out - held_out.mean(axis=0)) ** 2).sum()


@pytest.mark.parametrize("n_layer", [0, 2])
def test_belief_probe_on_one_hot_streams_is_the_mean_belief_of_each_token(mess3, n_layer):
    result = belief_state_probe(one_hot_model(4, n_layer), mess3, n_sequences=60)
    tokens = np.asarray(mess3.val[:60, :-1]).ravel()
    beliefs = np.asarray(load_val_beliefs(mess3)[:60, :-1], dtype=np.float64).reshape(-1, 3)
    n_fit = 48 * 11  # the first 80% of the sequences
    mse, r2 = group_mean_probe(tokens, beliefs, n_fit)
    shuffled_mse, shuffled_r2 = group_mean_probe(tokens, shuffled_rows(beliefs), n_fit)
    assert result["mse"] == pytest.approx([mse] * (n_layer + 1), rel=1e-9)
    assert result["r2"] == pytest.approx([r2] * (n_layer + 1), rel=1e-9)
    # Every stream is the same one-hot, so all of them together know no more.
    assert (result["mse_all"], result["r2_all"]) == pytest.approx((mse, r2), rel=1e-9)
    assert result["shuffled_mse"] == pytest.approx([shuffled_mse] * (n_layer + 1), rel=1e-9)
    assert result["shuffled_r2_all"] == pytest.approx(shuffled_r2, rel=1e-9, abs=1e-12)
    assert abs(shuffled_r2) < null_tolerance(n_fit, len(tokens) - n_fit, 4)
    assert 0.05 < r2 < 0.95  # the current token says something about the belief, not all
    everything = belief_state_probe(one_hot_model(4, n_layer), mess3, layer=ALL_LAYERS, n_sequences=60)
    np.testing.assert_allclose(everything["predicted"], result["predicted"], atol=1e-9)


def simplex_points_drawn(ax):
    return np.asarray(ax.collections[0].get_offsets())


def test_belief_simplex_draws_true_beliefs_beside_each_probe(mess3, tmp_path):
    results = [belief_state_probe(one_hot_model(4, n), mess3, n_sequences=20) for n in (0, 1)]
    fig = plot_belief_simplex(results, ["iter 0", "iter 9"])
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    # Barycentric coordinates on the triangle (0, 0), (1, 0), (1/2, sqrt 3 / 2), by hand.
    true = results[0]["true"]
    expected = np.column_stack([true[:, 1] + 0.5 * true[:, 2], np.sqrt(3) / 2 * true[:, 2]])
    np.testing.assert_allclose(simplex_points_drawn(fig.axes[0]), expected, atol=1e-6)
    assert "R² " in fig.axes[1].get_title() and "MSE" in fig.axes[1].get_title()
    fig.savefig(tmp_path / "simplex.png")
    assert (tmp_path / "simplex.png").read_bytes()[:4] == b"\x89PNG"
    # Four hidden states: the true beliefs' two principal axes, centred, the first the wider.
    rng = np.random.default_rng(0)
    four = rng.dirichlet(np.ones(4) * 0.3, size=200)
    noisy = {"layers": ["embed"], "layer": "embed", "true": four, "predicted": four + 0.01, "r2": [1], "mse": [0]}
    points = simplex_points_drawn(plot_belief_simplex([noisy], ["x"]).axes[0])
    np.testing.assert_allclose(points.mean(axis=0), 0, atol=1e-9)
    assert points[:, 0].var() >= points[:, 1].var() > 0
    with pytest.raises(NanoMarkovError, match="one title per result"):
        plot_belief_simplex(results, ["only one"])
