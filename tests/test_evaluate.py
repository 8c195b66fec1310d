"""The six metrics against models whose right answers are known, recomputed independently."""

import numpy as np
import pytest
import torch

from nanomarkov.data import generate_dataset, load_dataset
from nanomarkov.evaluate import bigram_baseline, evaluate_models

NEG = -1e9  # the BOS logit of hand-built models: BOS never follows anything


class TableModel(torch.nn.Module):
    """Logits looked up from a (K+1) x (K+1) table by the current token (BOS = row K)."""

    def __init__(self, log_table):
        super().__init__()
        self.table = torch.as_tensor(log_table, dtype=torch.float64)

    def forward(self, idx):
        return self.table[idx], None


class LeakyModel(torch.nn.Module):
    """The true model, plus a bias toward repeating the token before the current one."""

    def __init__(self, log_table, strength):
        super().__init__()
        self.table = torch.as_tensor(log_table, dtype=torch.float64)
        self.strength = strength

    def forward(self, idx):
        logits = self.table[idx].clone()
        previous = torch.roll(idx, 1, dims=1)
        bonus = torch.zeros_like(logits)
        bonus.scatter_(-1, previous.unsqueeze(-1), self.strength)
        bonus[:, 0] = 0.0
        bonus[..., -1] = 0.0  # keep BOS out of it
        return logits + bonus, None


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "d"
    generate_dataset(path, 4, 400, 80, seq_len=12, seed=5, sparsity=25)
    return load_dataset(path)


def true_table(chain):
    k = chain.n_states
    with np.errstate(divide="ignore"):
        rows = np.log(np.vstack([chain.transmat, chain.startprob]))
    return np.hstack([np.maximum(rows, NEG), np.full((k + 1, 1), NEG)])


def independent_losses(dataset, table):
    """Per-position -log softmax(table[x])[y] by plain loops."""
    val = np.asarray(dataset.val, dtype=np.int64)
    losses, hits = [], []
    for seq in val:
        for x, y in zip(seq[:-1], seq[1:]):
            row = table[x]
            log_z = np.log(np.exp(row - row.max()).sum()) + row.max()
            losses.append(log_z - row[y])
            hits.append(np.argmax(row) == y)
    return np.mean(losses), np.mean(hits)


def test_perfect_model_sits_on_the_optimum(dataset):
    chain = dataset.chain
    result = evaluate_models({"perfect": TableModel(true_table(chain))}, dataset)["perfect"]
    ce = result["cross_entropy"]
    assert ce["val_loss"] == pytest.approx(chain.true_loss(np.asarray(dataset.val)), abs=1e-9)
    assert abs(ce["excess"]) < 1e-9 and ce["pct_of_optimum"] == pytest.approx(100, abs=1e-7)
    assert ce["learnable_fraction"] == pytest.approx(1.0, abs=1e-8)
    _, true_accuracy = independent_losses(dataset, true_table(chain))
    assert result["accuracy"]["accuracy"] == pytest.approx(true_accuracy)
    assert result["accuracy"]["true_accuracy_val"] == pytest.approx(true_accuracy)
    fidelity = result["transition_fidelity"]
    assert fidelity["mean_kl"] < 1e-9 and fidelity["context_mean_kl"] < 1e-9 and fidelity["start_kl"] < 1e-9
    np.testing.assert_allclose(result["arrays"]["learned_matrix"], chain.transmat, atol=1e-9)
    assert result["markov_property"]["mean_spread"] < 1e-9
    assert result["agreement"] is None
    assert result["perplexity"]["perplexity"] == pytest.approx(np.exp(ce["val_loss"]))


def test_input_blind_unigram_model_has_the_computed_gap(dataset):
    chain = dataset.chain
    pi = chain.stationary()
    row = np.append(np.log(pi), NEG)
    table = np.tile(row, (chain.n_states + 1, 1))
    result = evaluate_models({"unigram": TableModel(table)}, dataset)["unigram"]
    expected_loss, expected_accuracy = independent_losses(dataset, table)
    ce = result["cross_entropy"]
    assert ce["val_loss"] == pytest.approx(expected_loss, rel=1e-9)
    assert ce["excess"] == pytest.approx(expected_loss - chain.true_loss(np.asarray(dataset.val)), rel=1e-9)
    assert result["accuracy"]["accuracy"] == pytest.approx(expected_accuracy)
    # KL(P_s || pi) for each state, by hand; and a model that ignores its input is memoryless.
    kl = [sum(p * np.log(p / q) for p, q in zip(chain.transmat[s], pi) if p > 0) for s in range(chain.n_states)]
    assert result["transition_fidelity"]["mean_kl"] == pytest.approx(np.mean(kl), rel=1e-9)
    assert result["transition_fidelity"]["context_mean_kl"] == pytest.approx(np.mean(kl), rel=1e-9)
    assert result["markov_property"]["mean_spread"] < 1e-12


def test_a_model_that_reads_history_breaks_the_markov_property(dataset):
    chain = dataset.chain
    leaky = LeakyModel(true_table(chain), strength=1.5)
    result = evaluate_models({"leaky": leaky}, dataset)["leaky"]
    # Independent spread: gather each state's next-token distributions over its contexts, by loops.
    k = chain.n_states
    val = torch.as_tensor(np.asarray(dataset.val, dtype=np.int64))
    logits = leaky(val[:, :-1])[0][..., :k]
    q = torch.softmax(logits, -1).numpy()
    spreads = []
    for s in range(k):
        rows = [q[i, t] for i in range(val.shape[0]) for t in range(1, val.shape[1] - 1) if val[i, t] == s]
        mean = np.mean(rows, axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):  # 0 log 0 = 0 on the sparse chain's zeros
            spreads.append(np.mean([np.sum(np.where(r > 0, r * np.log(r / mean), 0)) for r in rows]))
    assert result["markov_property"]["mean_spread"] == pytest.approx(np.mean(spreads), rel=1e-6)
    assert result["markov_property"]["mean_spread"] > 0.01
    # The clean prompts [BOS, s] have no history, so there the leak is invisible.
    assert result["transition_fidelity"]["mean_kl"] < 1e-9 < result["transition_fidelity"]["context_mean_kl"]


def test_agreement_between_runs(dataset):
    chain = dataset.chain
    table = true_table(chain)
    same = evaluate_models({"a": TableModel(table), "b": TableModel(table)}, dataset)
    agreement = same["a"]["agreement"]
    assert agreement == same["b"]["agreement"]
    assert agreement["top1_agreement"] == 1.0 and agreement["mean_jsd"] < 1e-12
    other = table.copy()
    other[:, :-1] = np.log(np.full(chain.n_states, 1 / chain.n_states))
    different = evaluate_models({"a": TableModel(table), "u": TableModel(other)}, dataset)["a"]["agreement"]
    # Independent JSD between the true rows and the uniform distribution, averaged over val positions.
    val = np.asarray(dataset.val, dtype=np.int64)[:, :-1]
    p_rows = np.exp(table[:, :-1] - np.log(np.exp(table[:, :-1]).sum(1, keepdims=True)))
    u = np.full(chain.n_states, 1 / chain.n_states)

    def jsd(p):
        m = (p + u) / 2
        return 0.5 * sum(a * np.log(a / c) for a, c in zip(p, m) if a > 0) + 0.5 * np.sum(u * np.log(u / m))

    assert different["mean_jsd"] == pytest.approx(np.mean([jsd(p_rows[x]) for x in val.ravel()]), rel=1e-9)
    top_true = np.argmax(table, axis=1)
    assert different["top1_agreement"] == pytest.approx(np.mean(top_true[val.ravel()] == 0))


def test_bigram_baseline_matches_smoothed_counts_by_hand(dataset):
    k = dataset.chain.n_states
    counts = np.ones((k + 1, k))
    for seq in np.asarray(dataset.train, dtype=np.int64):
        for a, b in zip(seq[:-1], seq[1:]):
            counts[a, b] += 1
    q = counts / counts.sum(axis=1, keepdims=True)
    val = np.asarray(dataset.val, dtype=np.int64)
    expected = -np.mean([np.log(q[a, b]) for seq in val for a, b in zip(seq[:-1], seq[1:])])
    assert bigram_baseline(dataset) == pytest.approx(expected, rel=1e-12)


def train_tiny_runs(root, runs_folder, seeds=(1, 2)):
    """Tiny runs (K=4) on one dataset root/d that differ only in seed, in runs_folder/run{seed}; their ckpt.pt paths."""
    from nanomarkov.config import TrainConfig
    from nanomarkov.train import train

    generate_dataset(root / "d", 4, 200, 40, seq_len=12, seed=2)
    paths = []
    for seed in seeds:
        cfg = TrainConfig.from_dict(
            dict(
                data_dir=str(root / "d"),
                out_dir=str(runs_folder / f"run{seed}"),
                n_layer=1,
                n_head=1,
                n_embd=16,
                batch_size=8,
                max_iters=20,
                eval_interval=10,
                warmup_iters=2,
                lr_decay_iters=20,
                seed=seed,
                device="cpu",
            )
        )
        train(cfg, show_progress=False)
        paths.append(runs_folder / f"run{seed}" / "ckpt.pt")
    return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny runs on one dataset that differ only in seed."""
    root = tmp_path_factory.mktemp("runs")
    return root, train_tiny_runs(root, root)


def test_eval_command_writes_files_that_match_an_independent_recomputation(trained, capsys):
    import json

    import torch.nn.functional as F

    from nanomarkov.cli import main
    from nanomarkov.model import GPT, GPTConfig

    root, (first, second) = trained
    assert main(["eval", str(first), str(second)]) == 0
    out = capsys.readouterr().out
    assert "| cross-entropy (nats/token) |" in out and "agreement across seeds" in out
    record = json.loads((first.parent / "eval.json").read_text())
    assert {"cross_entropy", "perplexity", "accuracy", "agreement", "transition_fidelity", "markov_property"} <= set(
        record
    )
    ckpt = torch.load(first, weights_only=True)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    val = torch.as_tensor(np.asarray(load_dataset(root / "d").val, dtype=np.int64))
    with torch.no_grad():
        logits = model(val[:, :-1])[0].double()
    expected = F.cross_entropy(logits.reshape(-1, 5), val[:, 1:].reshape(-1)).item()
    assert record["cross_entropy"]["val_loss"] == pytest.approx(expected, abs=1e-9)
    done = json.loads((first.parent / "done.json").read_text())
    assert record["cross_entropy"]["val_loss"] == pytest.approx(done["val_loss"], abs=1e-6)
    learned = np.load(first.parent / "learned_matrix.npy", allow_pickle=False)
    with torch.no_grad():
        prompt_logits = model(torch.tensor([[4, s] for s in range(4)]))[0][:, 1, :4].double()
    np.testing.assert_allclose(learned, torch.softmax(prompt_logits, -1).numpy(), atol=1e-12)
    assert record["agreement"]["runs"] == [str(first), str(second)]
    assert 0 < record["agreement"]["top1_agreement"] <= 1
    assert "| metric | model | optimum | baselines |" in (first.parent / "eval.md").read_text()


def test_unsafe_or_broken_checkpoints_are_one_line_and_exit_2(trained, tmp_path, capsys):
    import os

    from nanomarkov.cli import main

    _, (first, _) = trained
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    (tmp_path / "truncated.pt").write_bytes(first.read_bytes()[:1000])
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    for name in ("evil.pt", "truncated.pt", "notes.pt", "foreign.pt", "missing.pt"):
        assert main(["eval", str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and name in err[0], err
    assert not marker.exists()
    assert main(["eval", str(first), "--data", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
