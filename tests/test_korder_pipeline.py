"""k-th order chains through the pipeline: generate, load, theory, the optimal predictor, evaluation, training."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nanomarkov import NanoMarkovError
from nanomarkov.cli import main
from nanomarkov.data import generate_dataset, load_dataset
from nanomarkov.evaluate import evaluate_checkpoints, evaluate_models, format_eval, write_eval
from nanomarkov.processes.korder import KOrderChain
from nanomarkov.processes.markov import MarkovChain

ORDER = 2


def make(path, **kwargs):
    args = dict(n_states=3, train_sequences=300, val_sequences=60, seq_len=14, seed=4, process="korder", order=ORDER)
    args.update(kwargs)
    return generate_dataset(path, args.pop("n_states"), args.pop("train_sequences"), args.pop("val_sequences"), **args)


@pytest.fixture(scope="module")
def korder_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("korder") / "d"
    make(path, sparsity=30)
    return load_dataset(path)


def test_korder_round_trip(korder_data):
    meta, chain = korder_data.meta, korder_data.chain
    assert meta["process"] == "korder" and meta["order"] == ORDER and meta["sparsity"] == 30
    assert isinstance(chain, KOrderChain) and chain.order == ORDER
    expected = KOrderChain.random(3, order=ORDER, seed=4, sparsity=30)
    np.testing.assert_array_equal(chain.transitions, expected.transitions)
    np.testing.assert_array_equal(chain.start, expected.start)
    with np.load(korder_data.path / "chain.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["start", "transitions"]
    assert json.loads((korder_data.path / "meta.json").read_text()) == meta
    theory = dict(meta["theory"])
    assert theory.pop("true_loss_val") == pytest.approx(chain.true_loss(np.asarray(korder_data.val)), rel=1e-12)
    assert theory == pytest.approx(chain.theory(14), rel=1e-12)


def test_markov_meta_has_no_order(tmp_path):
    meta = make(tmp_path / "m", process="markov", order=None)
    assert meta["process"] == "markov" and "order" not in meta
    with np.load(tmp_path / "m" / "chain.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["startprob", "transmat"]
    assert isinstance(load_dataset(tmp_path / "m").chain, MarkovChain)
    with pytest.raises(NanoMarkovError, match="--order is not an option of --process markov"):
        make(tmp_path / "x", process="markov", order=3)
    with pytest.raises(NanoMarkovError, match="unknown process 'nosuch'.*markov, korder"):
        make(tmp_path / "y", process="nosuch")


def test_other_order_refused_without_force(tmp_path):
    make(tmp_path / "d")
    with pytest.raises(NanoMarkovError, match="order 2 -> 3.*--force"):
        make(tmp_path / "d", order=3)
    with pytest.raises(NanoMarkovError, match="process 'korder' -> 'markov'"):
        make(tmp_path / "d", process="markov", order=None)
    assert make(tmp_path / "d", order=3, force=True)["order"] == 3
    assert load_dataset(tmp_path / "d").chain.order == 3


def test_load_errors_name_the_process(tmp_path):
    make(tmp_path / "d")
    (tmp_path / "d" / "val.bin").unlink()
    with pytest.raises(NanoMarkovError, match="--process korder --order 2 --train 300 --val 60.*--force"):
        load_dataset(tmp_path / "d")
    make(tmp_path / "e")
    meta = json.loads((tmp_path / "e" / "meta.json").read_text())
    meta["process"] = "hmm9"
    (tmp_path / "e" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(NanoMarkovError, match="unknown process 'hmm9'.*markov, korder"):
        load_dataset(tmp_path / "e")


def test_cli_generate_korder_default_folder_and_theory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "generate",
                "3",
                "--process",
                "korder",
                "--order",
                "2",
                "--train",
                "50",
                "--val",
                "10",
                "--seq_len",
                "10",
                "--sparsity",
                "30",
            ]
        )
        == 0
    )
    folder = tmp_path / "data" / "mm3-order2-sparse-30"
    assert json.loads((folder / "meta.json").read_text())["order"] == 2
    capsys.readouterr()
    assert main(["theory", str(folder), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["process"] == "korder" and row["order"] == 2
    assert row["optimal_loss"] == pytest.approx(load_dataset(folder).chain.optimal_loss(10), rel=1e-12)
    assert main(["theory", str(folder)]) == 0
    assert "korder order=2" in capsys.readouterr().out.splitlines()[1]
    assert (
        main(
            [
                "generate",
                "3",
                "--process",
                "korder",
                "--order",
                "3",
                "--train",
                "50",
                "--val",
                "10",
                "--seq_len",
                "10",
                "--sparsity",
                "30",
                "--out",
                str(folder),
            ]
        )
        == 2
    )
    assert "order 2 -> 3" in capsys.readouterr().err


def test_optimal_log_probs_of_a_markov_chain():
    chain = MarkovChain.random(4, seed=1, sparsity=25)
    tokens = chain.sample(30, 9, np.random.default_rng(0))
    log_probs = chain.optimal_log_probs(tokens)
    assert log_probs.shape == (30, 8, 4)
    with np.errstate(divide="ignore"):
        np.testing.assert_array_equal(log_probs[:, 0], np.tile(np.log(chain.startprob), (30, 1)))
        np.testing.assert_array_equal(log_probs[:, 1:], np.log(chain.transmat)[tokens[:, 1:-1].astype(np.int64)])


@pytest.mark.parametrize("order, seq_len", [(1, 9), (2, 9), (3, 12), (3, 3)])
def test_optimal_log_probs_of_a_korder_chain_give_true_loss(order, seq_len):
    chain = KOrderChain.random(3, order=order, seed=order, sparsity=30)
    tokens = chain.sample(200, seq_len, np.random.default_rng(1))
    log_probs = chain.optimal_log_probs(tokens)
    assert log_probs.shape == (200, seq_len - 1, 3)
    np.testing.assert_allclose(np.exp(log_probs).sum(-1), 1.0, atol=1e-12)
    nll = -np.take_along_axis(log_probs, tokens[:, 1:, None].astype(np.int64), axis=-1).mean()
    assert nll == pytest.approx(chain.true_loss(tokens), rel=1e-12, abs=1e-15)
    # The position after a full context is that context's row, independently indexed.
    if seq_len - 1 > order:
        context = tuple(int(s) for s in tokens[5, 1 : order + 1])
        np.testing.assert_allclose(np.exp(log_probs[5, order]), chain.transitions[context], rtol=1e-12)


class OptimalModel(torch.nn.Module):
    """Logits = the chain's optimal log-probs (floored at -30), BOS logit -30."""

    def __init__(self, chain):
        super().__init__()
        self.chain = chain

    def forward(self, idx):
        n = idx.shape[0]
        tokens = np.hstack([idx.numpy(), np.zeros((n, 1), dtype=np.int64)])  # the last token is never looked at
        log_probs = np.maximum(self.chain.optimal_log_probs(tokens), -30.0)
        logits = np.concatenate([log_probs, np.full(log_probs.shape[:2] + (1,), -30.0)], axis=-1)
        return torch.from_numpy(logits), None


def test_evaluating_the_optimal_korder_predictor(korder_data, tmp_path):
    chain = korder_data.chain
    result = evaluate_models({"perfect": OptimalModel(chain)}, korder_data)["perfect"]
    ce = result["cross_entropy"]
    assert abs(ce["excess"]) < 1e-6
    assert ce["val_loss"] == pytest.approx(chain.true_loss(np.asarray(korder_data.val)), abs=1e-6)
    assert result["accuracy"]["accuracy"] == pytest.approx(result["accuracy"]["true_accuracy_val"])
    assert result["transition_fidelity"] is None and result["markov_property"] is None
    assert set(result["skipped"]) == {"transition_fidelity", "markov_property"}
    kf = result["korder_fidelity"]
    assert kf["order"] == ORDER and kf["positions"] == 60 * (13 - ORDER)
    assert kf["mean_kl"] < 1e-6 and kf["first_order_kl"] > 0.01
    assert result["optimal_fidelity"] == {"positions": 60 * 13, "mean_kl": pytest.approx(0, abs=1e-6)}
    assert "order-2 KL" in format_eval(result)  # a result of evaluate_models alone has no "run" yet
    result["run"] = {
        "checkpoint": "x",
        "dataset": "d",
        "iter": 0,
        "n_states": 3,
        "process": "korder",
        "order": ORDER,
        "seq_len": 14,
        "val_sequences": 60,
    }
    write_eval(result, tmp_path / "out")
    record = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert record["transition_fidelity"] is None and "first-order" in record["skipped"]["transition_fidelity"]
    markdown = (tmp_path / "out" / "eval.md").read_text()
    assert (
        "not measured, the transition KL against the true matrix" in markdown
        and "not measured, the Markov spread" in markdown
    )
    assert "order-2 KL" in markdown


def test_a_first_order_model_on_korder_data_shows_in_korder_fidelity(korder_data):
    """The table model that knows only the current state has korder KL equal to the direct computation."""
    chain = korder_data.chain
    rows = chain.first_order_rows()
    table = np.full((4, 4), -30.0)
    with np.errstate(divide="ignore"):
        table[:3, :3] = np.maximum(np.log(rows), -30.0)
    table[3, :3] = 0.0

    class Table(torch.nn.Module):
        def forward(self, idx):
            return torch.as_tensor(table)[idx], None

    result = evaluate_models({"t": Table()}, korder_data)["t"]
    kf, of = result["korder_fidelity"], result["optimal_fidelity"]
    # The same KL summed over all positions includes the full-context ones (and KL >= 0 at the rest).
    assert of["mean_kl"] * of["positions"] >= kf["mean_kl"] * kf["positions"] * (1 - 1e-9)
    val = np.asarray(korder_data.val, dtype=np.int64)
    q = np.exp(table[:, :3]) / np.exp(table[:, :3]).sum(-1, keepdims=True)
    kls = []
    for seq in val:
        for t in range(ORDER + 1, val.shape[1]):  # predicting x_t from x_{t-2}, x_{t-1}
            p = chain.transitions[seq[t - 2], seq[t - 1]]
            kls.append(sum(pi * np.log(pi / qi) for pi, qi in zip(p, q[seq[t - 1]]) if pi > 0))
    assert kf["mean_kl"] == pytest.approx(np.mean(kls), rel=1e-6)
    assert kf["first_order_kl"] == pytest.approx(np.mean(kls), rel=1e-6)


def train_small_attention_model(data_dir, out_dir, max_iters, eval_interval):
    """One layer, one head, 32 wide, a few hundred steps on two threads: (done.json's dict, the first log line)."""
    from nanomarkov.config import TrainConfig
    from nanomarkov.train import train

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = TrainConfig.from_dict(
            dict(
                data_dir=str(data_dir),
                out_dir=str(out_dir),
                n_layer=1,
                n_head=1,
                n_embd=32,
                mlp_only=False,
                batch_size=32,
                max_iters=max_iters,
                eval_interval=eval_interval,
                log_interval=eval_interval,
                warmup_iters=10,
                lr_decay_iters=max_iters,
                learning_rate=1e-2,
                min_lr=1e-3,
                device="cpu",
            )
        )
        done = train(cfg, overwrite=True, show_progress=False)
    finally:
        torch.set_num_threads(before)
    return done, json.loads((Path(out_dir) / "log.jsonl").read_text().splitlines()[0])


def test_short_korder_training_approaches_the_optimum(tmp_path):
    from nanomarkov.report import write_report

    make(tmp_path / "d", train_sequences=1000, val_sequences=100, seq_len=32, seed=0, alpha=0.2, order=2)
    done, first = train_small_attention_model(tmp_path / "d", tmp_path / "run", max_iters=300, eval_interval=100)
    assert first["iter"] == 0 and first["val_loss"] > 0.5
    assert done["excess"] < 0.01  # from about 1 nat of excess at the start
    ((_, result),) = evaluate_checkpoints([tmp_path / "run" / "ckpt.pt"])
    kf = result["korder_fidelity"]
    # It uses both states of context: far below what any first-order predictor can reach.
    assert kf["mean_kl"] < 0.1 * kf["first_order_kl"]
    assert result["cross_entropy"]["val_loss"] < result["cross_entropy"]["bigram_baseline"]
    report = write_report(tmp_path / "run")
    assert report["skipped"] == [] and report["missing_eval"] == []
