"""Hidden Markov models through the pipeline (generate, load, beliefs, evaluate, train) and the linear probes."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from test_korder_pipeline import OptimalModel, train_small_attention_model

from nanomarkov import NanoMarkovError
from nanomarkov.checkpoint import load_model
from nanomarkov.cli import main
from nanomarkov.data import generate_dataset, load_dataset, load_val_beliefs
from nanomarkov.evaluate import evaluate_models
from nanomarkov.interp.linear_probes import belief_state_probe, context_probe, linear_probe, plot_belief_state_probe
from nanomarkov.model import GPT, GPTConfig
from nanomarkov.processes.hmm import HiddenMarkovModel


def make(path, **kwargs):
    args = dict(n_states=3, train_sequences=300, val_sequences=60, seq_len=12, seed=4, process="hmm", preset="mess3")
    args.update(kwargs)
    return generate_dataset(path, args.pop("n_states"), args.pop("train_sequences"), args.pop("val_sequences"), **args)


@pytest.fixture(scope="module")
def mess3_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("hmm") / "mess3"
    make(path)
    return load_dataset(path)


def tiny_model(vocab_size, block_size=15, **kwargs):
    torch.manual_seed(0)
    config = dict(n_layer=2, n_head=1, n_embd=16, block_size=block_size, vocab_size=vocab_size, mlp_only=False)
    return GPT(GPTConfig(**{**config, **kwargs}))


def test_mess3_round_trip_and_saved_beliefs(mess3_data):
    meta, chain = mess3_data.meta, mess3_data.chain
    assert meta["process"] == "hmm" and (meta["preset"], meta["hidden_states"], meta["x"], meta["a"]) == (
        "mess3",
        3,
        0.05,
        0.85,
    )
    assert isinstance(chain, HiddenMarkovModel)
    for name, array in HiddenMarkovModel.mess3().arrays().items():
        np.testing.assert_array_equal(getattr(chain, name), array)
    theory = dict(meta["theory"])
    assert theory.pop("true_loss_val") == pytest.approx(chain.true_loss(np.asarray(mess3_data.val)), rel=1e-12)
    assert theory == pytest.approx(chain.theory(12), rel=1e-12)
    assert theory["optimal_loss_se"] == 0.0  # 11 predicted positions: enumerated exactly
    beliefs = load_val_beliefs(mess3_data)
    assert beliefs.dtype == np.float32 and beliefs.shape == (60, 12, 3)
    np.testing.assert_allclose(beliefs, chain.belief_states(np.asarray(mess3_data.val)), rtol=1e-6, atol=1e-7)
    # A dataset cut to its first val sequences (as `dynamics --val_sequences` cuts it) gets their rows.
    first = dataclasses.replace(mess3_data, val=mess3_data.val[:7])
    np.testing.assert_allclose(load_val_beliefs(first), chain.belief_states(np.asarray(mess3_data.val[:7])), atol=1e-7)


def test_beliefs_do_not_depend_on_chunking_and_are_checked(tmp_path, mess3_data):
    meta = make(tmp_path / "d", chunk_tokens=12 * 7)
    assert meta["sha256"] == mess3_data.meta["sha256"]
    path = tmp_path / "d" / "val_beliefs.npy"
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(NanoMarkovError, match="val_beliefs.npy: modified .*--process hmm --preset mess3"):
        load_val_beliefs(load_dataset(tmp_path / "d"))
    make(tmp_path / "d", process="markov", preset=None, force=True)
    assert not path.exists()
    with pytest.raises(NanoMarkovError, match="markov dataset has no hidden states"):
        load_val_beliefs(load_dataset(tmp_path / "d"))


def test_random_hmm_dataset_and_options(tmp_path):
    meta = make(tmp_path / "r", n_states=5, preset=None, hidden_states=4, sparsity=50)
    assert (meta["preset"], meta["hidden_states"], meta["sparsity"]) == (None, 4, 50)
    assert "x" not in meta
    dataset = load_dataset(tmp_path / "r")
    assert load_val_beliefs(dataset).shape == (60, 12, 4)
    with pytest.raises(NanoMarkovError, match="hidden_states 4 -> 5.*--force"):
        make(tmp_path / "r", n_states=5, preset=None, hidden_states=5, sparsity=50)
    with pytest.raises(NanoMarkovError, match="--order is not an option of --process hmm"):
        make(tmp_path / "o", order=2)


def test_cli_generate_mess3_and_a_random_hmm(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "generate",
                "3",
                "--process",
                "hmm",
                "--preset",
                "mess3",
                "--train",
                "40",
                "--val",
                "10",
                "--seq_len",
                "12",
            ]
        )
        == 0
    )
    assert "preset mess3" in capsys.readouterr().out
    assert (tmp_path / "data" / "mess3" / "val_beliefs.npy").is_file()
    assert (
        main(
            [
                "generate",
                "5",
                "--process",
                "hmm",
                "--hidden_states",
                "4",
                "--train",
                "40",
                "--val",
                "10",
                "--seq_len",
                "12",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "data" / "hmm5-h4" / "meta.json").read_text())["hidden_states"] == 4
    capsys.readouterr()
    assert main(["theory", "data/mess3", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["process"] == "hmm" and row["optimal_loss"] == pytest.approx(HiddenMarkovModel.mess3().optimal_loss(12))
    assert main(["generate", "3", "--process", "hmm", "--x", "0.1", "--train", "40", "--val", "10"]) == 2
    assert "need preset mess3" in capsys.readouterr().err
    assert main(["generate", "4", "--process", "hmm", "--preset", "mess3"]) == 2
    assert main(["generate", "4", "--process", "korder", "--hidden_states", "3"]) == 2
    assert "--hidden_states is not an option of --process korder" in capsys.readouterr().err


def test_evaluating_the_optimal_hmm_predictor(mess3_data):
    result = evaluate_models({"perfect": OptimalModel(mess3_data.chain)}, mess3_data)["perfect"]
    assert abs(result["cross_entropy"]["excess"]) < 1e-6
    assert result["accuracy"]["accuracy"] == pytest.approx(result["accuracy"]["true_accuracy_val"])
    assert {"transition_fidelity", "markov_property"} <= set(result["skipped"])
    assert result["optimal_fidelity"]["mean_kl"] == pytest.approx(0, abs=1e-6)


# ------------------------------------------------------------ linear probes


def test_linear_probe_recovers_a_linear_target_and_finds_nothing_in_noise():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(4000, 10))
    weights, bias = rng.normal(size=(10, 3)), rng.normal(size=3)
    fit = linear_probe(features, features @ weights + bias, 3000)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(fit["weights"], weights, atol=1e-10)
    np.testing.assert_allclose(fit["bias"], bias, atol=1e-10)
    assert fit["predictions"].shape == (1000, 3)
    noise = linear_probe(features, rng.normal(size=(4000, 2)), 3000)
    assert abs(noise["r2"]) < 0.03  # 11 parameters per target fit on 3000 rows: held-out R² is ~ -0.004
    half = linear_probe(features, features[:, :1] + rng.normal(size=(4000, 1)), 3000)  # signal and noise variance 1
    assert half["r2"] == pytest.approx(0.5, abs=0.05)
    with pytest.raises(NanoMarkovError, match="share their rows"):
        linear_probe(features, features[:10], 5)
    with pytest.raises(NanoMarkovError, match="both sides"):
        linear_probe(features, features, 4000)


def test_belief_state_probe_shapes_layers_and_plot(mess3_data, tmp_path):
    model = tiny_model(4)
    result = belief_state_probe(model, mess3_data, n_sequences=50)
    assert result["layers"] == ["embed", "block 0", "block 1"] and result["layer"] == "block 1"
    assert result["r2"].shape == (3,) and np.all(result["r2"] <= 1)
    held_out = (50 - 40) * 11
    assert result["true"].shape == result["predicted"].shape == (held_out, 3)
    np.testing.assert_allclose(result["true"], load_val_beliefs(mess3_data)[40:50, :-1].reshape(-1, 3), atol=1e-7)
    np.testing.assert_allclose(result["predicted"].sum(axis=1), 1.0, atol=1e-6)  # a fit with a bias keeps sums
    assert belief_state_probe(model, mess3_data, layer="embed", n_sequences=20)["layer"] == "embed"
    with pytest.raises(NanoMarkovError, match="unknown layer"):
        belief_state_probe(model, mess3_data, layer="block 7")
    with pytest.raises(NanoMarkovError, match="vocabulary"):
        belief_state_probe(tiny_model(6), mess3_data)
    fig = plot_belief_state_probe(result)
    fig.savefig(tmp_path / "beliefs.png")
    assert (tmp_path / "beliefs.png").stat().st_size > 10_000


def test_context_probe_reads_the_current_token_from_the_embedding(tmp_path, mess3_data):
    generate_dataset(tmp_path / "k", 4, 100, 60, seq_len=16, seed=1, process="korder", order=2)
    dataset = load_dataset(tmp_path / "k")
    model = tiny_model(5, pos_ape=False)  # the embedding stream is wte[x] alone, so x_t is linear in it
    result = context_probe(model, dataset)
    assert result["layers"] == ["embed", "block 0", "block 1"] and list(result["lags"]) == [0, 1]
    assert result["accuracy"].shape == result["r2"].shape == (3, 2)
    assert result["accuracy"][0, 0] == 1.0 and result["r2"][0, 0] == pytest.approx(1.0, abs=1e-6)
    assert result["accuracy"][0, 1] < 0.6  # no attention yet: the previous state is not in the embedding
    assert result["mse"].shape == result["shuffled_r2"].shape == (3, 2) and result["r2_all"].shape == (2,)
    assert result["mse"][0, 0] == pytest.approx(0, abs=1e-9) and result["accuracy_all"][0] == 1.0
    # Shuffled classes: nothing to read; held-out R² of 17 coefficients fit on 48 x 15 rows, scored on 12 x 15.
    assert np.all(np.abs(result["shuffled_r2"]) < 2 * 17 / 720 + 4 * np.sqrt(2 / 180))
    with pytest.raises(NanoMarkovError, match="process korder"):
        context_probe(model, mess3_data)
    with pytest.raises(NanoMarkovError, match="process hmm"):
        belief_state_probe(model, dataset)


# ------------------------------------------------------------ a short training


def test_short_mess3_training_approaches_the_optimum_and_the_probe_finds_beliefs(tmp_path):
    make(tmp_path / "d", train_sequences=2000, val_sequences=200, seq_len=32, seed=0)
    done, first = train_small_attention_model(tmp_path / "d", tmp_path / "run", max_iters=120, eval_interval=120)
    assert first["iter"] == 0 and first["excess"] > 0.2  # about 0.45 nats above the optimum at the start
    assert done["excess"] < 0.25 * first["excess"]
    # Reading the belief needs the history: the trained block's stream holds it better than the
    # embeddings (current token and position only) and than the same block untrained.
    dataset = load_dataset(tmp_path / "d")
    trained = belief_state_probe(load_model(tmp_path / "run" / "ckpt.pt")[0], dataset)["r2"]
    untrained = belief_state_probe(tiny_model(4, n_layer=1, n_embd=32, block_size=31), dataset)["r2"]
    assert trained[-1] > max(trained[0], untrained[-1]) + 0.02
