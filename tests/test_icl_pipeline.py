"""In-context chains through the pipeline: generate, load, theory, evaluation, a short training."""

import json

import numpy as np
import pytest
from test_korder_pipeline import OptimalModel

from nanomarkov.cli import main
from nanomarkov.data import generate_dataset, load_dataset
from nanomarkov.evaluate import evaluate_models
from nanomarkov.processes.incontext import InContextChain


def make(path, **kwargs):
    args = dict(n_states=3, train_sequences=200, val_sequences=40, seq_len=12, seed=4, process="icl")
    args.update(kwargs)
    return generate_dataset(path, args.pop("n_states"), args.pop("train_sequences"), args.pop("val_sequences"), **args)


@pytest.fixture(scope="module")
def icl_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("icl") / "d"
    make(path, sparsity=30, alpha=0.5)
    return load_dataset(path)


def test_icl_round_trip(icl_data):
    meta, chain = icl_data.meta, icl_data.chain
    assert meta["process"] == "icl" and meta["sparsity"] == 30 and meta["alpha"] == 0.5
    assert isinstance(chain, InContextChain) and chain.n_support == 2
    with np.load(icl_data.path / "chain.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["concentration", "startprob", "support_size"]
    theory = dict(meta["theory"])
    val = np.asarray(icl_data.val)
    assert theory.pop("true_loss_val") == pytest.approx(chain.true_loss(val), rel=1e-12)
    assert theory == pytest.approx(chain.theory(12), rel=1e-12)
    # The val split is the urn's output for the split's stream: the same bytes as sampling it directly.
    np.testing.assert_array_equal(val, chain.sample(40, 12, np.random.default_rng([4, 2])))


def test_cli_generate_icl_default_folder_and_theory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "3", "--process", "icl", "--train", "50", "--val", "10", "--seq_len", "10"]) == 0
    folder = tmp_path / "data" / "icl3"
    assert json.loads((folder / "meta.json").read_text())["process"] == "icl"
    capsys.readouterr()
    assert main(["theory", str(folder), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["process"] == "icl" and row["oracle_loss"] < row["optimal_loss"] < row["uniform_loss"]
    assert main(["generate", "3", "--process", "icl", "--n_triggers", "2", "--train", "50", "--val", "10"]) == 2
    assert "--n_triggers is not an option of --process icl" in capsys.readouterr().err  # bietti's, not icl's


def test_evaluating_the_bayes_predictor(icl_data):
    result = evaluate_models({"bayes": OptimalModel(icl_data.chain)}, icl_data)["bayes"]
    assert abs(result["cross_entropy"]["excess"]) < 1e-6
    assert result["optimal_fidelity"]["mean_kl"] == pytest.approx(0, abs=1e-6)
    assert result["transition_fidelity"] is None and result["markov_property"] is None
    assert "its own transition matrix" in result["skipped"]["transition_fidelity"]
    theory = icl_data.meta["theory"]
    assert result["cross_entropy"]["process_baselines"] == {
        "oracle_loss": theory["oracle_loss"],
        "unigram_in_context_loss": theory["unigram_in_context_loss"],
    }
    from nanomarkov.evaluate import format_eval

    assert f"oracle {theory['oracle_loss']:.4f}" in format_eval(result)


def test_short_icl_training_learns_in_context(tmp_path, capsys):
    """Two attention layers learn from the sequence's own transitions: below the in-context unigram.

    Peaked rows (alpha 0.1) make the in-context signal strong; the default
    (MLP-only) recipe could not do this at all: without attention the model
    sees only the current state, and every state is alike under the prior.
    """
    meta = make(tmp_path / "d", train_sequences=2000, val_sequences=200, seq_len=24, seed=0, alpha=0.1)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "3",
                f"--data_dir={tmp_path / 'd'}",
                f"--out_dir={run}",
                "--device=cpu",
                "--mlp_only=False",
                "--n_layer=2",
                "--n_head=1",
                "--n_embd=32",
                "--batch_size=32",
                "--max_iters=90",
                "--eval_interval=30",
                "--log_interval=30",
                "--warmup_iters=10",
                "--lr_decay_iters=90",
                "--learning_rate=1e-2",
                "--min_lr=1e-3",
            ]
        )
        == 0
    )
    theory = meta["theory"]
    evals = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [e for e in evals if "val_loss" in e]
    assert evals[0]["iter"] == 0 and evals[0]["val_loss"] > theory["uniform_loss"] - 0.05
    # The in-context unigram counts states without their predecessors: below it, the model uses transitions.
    final = evals[-1]["val_loss"]
    assert final < theory["unigram_in_context_loss"] - 0.08
    assert final > theory["true_loss_val"] - 0.01
    capsys.readouterr()
    assert main(["eval", str(run / "ckpt.pt")]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["cross_entropy"]["val_loss"] == pytest.approx(final, abs=1e-4)
    assert result["optimal_fidelity"]["mean_kl"] < 0.25
    assert "- not measured, the Markov spread: " in capsys.readouterr().out
