"""Stage predictors (Process.stage_losses) against brute-force enumeration, and `nanomarkov dynamics`."""

import itertools
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from nanomarkov.checkpoint import save_snapshot
from nanomarkov.cli import main
from nanomarkov.data import generate_dataset, load_dataset
from nanomarkov.dynamics import PLOTS, check_dynamics_folder, crossing_levels, first_crossings, learning_coefficient
from nanomarkov.errors import NanoMarkovError
from nanomarkov.files import writer_lock
from nanomarkov.model import GPT, GPTConfig
from nanomarkov.processes.incontext import InContextChain
from nanomarkov.processes.korder import KOrderChain
from nanomarkov.processes.markov import MarkovChain
from nanomarkov.sweep.run import write_dynamics_reports

# ------------------------------------------------------------ stage losses by enumeration


def every_sequence(k, n_states_after_bos):
    """All (x1, ..., xn) over k states, as an (k^n, n) int array."""
    return np.array(list(itertools.product(range(k), repeat=n_states_after_bos)))


def korder_probability(chain, xs):
    """P(x1..xn) of a k-th order chain, straight from its start and transitions."""
    order = chain.order
    p = chain.start[tuple(xs[:order])]
    for t in range(order, len(xs)):
        p *= chain.transitions[tuple(xs[t - order : t + 1])]
    return p


def enumerated_unigram(sequences, probs, k):
    """The expected loss of predicting every x_t with q = the mean law of x_t over positions."""
    q = np.zeros(k)
    for xs, p in zip(sequences, probs):
        q += p * np.bincount(xs, minlength=k) / len(xs)
    return sum(p * -np.log(q[xs]).mean() for xs, p in zip(sequences, probs)), q


def enumerated_first_order(sequences, probs, k):
    """Expected loss of P_t(x_t | x_{t-1}) per position t (P(x1) at t = 1), from the enumerated joint laws."""
    n = sequences.shape[1]
    first = np.zeros(k)
    pairs = np.zeros((n, k, k))
    for xs, p in zip(sequences, probs):
        first[xs[0]] += p
        for t in range(1, n):
            pairs[t, xs[t - 1], xs[t]] += p
    conditional = pairs / np.maximum(pairs.sum(axis=2, keepdims=True), 1e-300)
    losses = [
        p * (-np.log(first[xs[0]]) - sum(np.log(conditional[t, xs[t - 1], xs[t]]) for t in range(1, n))) / n
        for xs, p in zip(sequences, probs)
    ]
    return sum(losses)


def test_markov_stages_match_enumeration():
    chain = MarkovChain.random(3, seed=5)
    seq_len = 6
    sequences = every_sequence(3, seq_len - 1)
    probs = np.array([chain.startprob[xs[0]] * np.prod(chain.transmat[xs[:-1], xs[1:]]) for xs in sequences])
    unigram, q = enumerated_unigram(sequences, probs, 3)
    stages = chain.stage_losses(seq_len)
    assert list(stages) == ["uniform", "unigram", "optimal"]
    assert stages["uniform"] == pytest.approx(np.log(3))
    assert stages["unigram"] == pytest.approx(unigram, abs=1e-12)
    # It is the best single distribution: the stationary one (the long-run unigram) costs more here.
    stationary_cost = sum(p * -np.log(chain.stationary()[xs]).mean() for xs, p in zip(sequences, probs))
    assert stages["unigram"] < stationary_cost
    optimal = sum(p * -np.log(p) for p in probs) / (seq_len - 1)  # H(x1..xn) / n by the chain rule
    assert stages["optimal"] == pytest.approx(optimal, abs=1e-12)
    assert chain.stage_loss_errors(seq_len) == dict.fromkeys(stages, 0.0)


@pytest.mark.parametrize(("k", "order", "seq_len"), [(3, 2, 7), (2, 3, 9), (3, 1, 5)])
def test_korder_first_order_stage_matches_enumeration(k, order, seq_len):
    chain = KOrderChain.random(k, seed=3, order=order, alpha=0.5)
    sequences = every_sequence(k, seq_len - 1)
    probs = np.array([korder_probability(chain, xs) for xs in sequences])
    assert probs.sum() == pytest.approx(1.0)
    stages = chain.stage_losses(seq_len)
    assert list(stages) == ["uniform", "unigram", "first_order", "optimal"]
    assert stages["first_order"] == pytest.approx(enumerated_first_order(sequences, probs, k), abs=1e-12)
    assert stages["unigram"] == pytest.approx(enumerated_unigram(sequences, probs, k)[0], abs=1e-12)
    if order == 1:  # reading the last state is everything an order-1 chain needs
        assert stages["first_order"] == pytest.approx(stages["optimal"], abs=1e-12)
    else:
        assert stages["unigram"] > stages["first_order"] > stages["optimal"]


def icl_probability(chain, xs):
    """P(x1..xn) of a dense in-context chain: startprob, then a Polya urn per row (Dirichlet-multinomial)."""
    alpha, k = chain.concentration, chain.n_states
    counts = np.zeros((k, k))
    p = chain.startprob[xs[0]]
    for prev, nxt in zip(xs[:-1], xs[1:]):
        p *= (counts[prev, nxt] + alpha[nxt]) / (counts[prev].sum() + alpha.sum())
        counts[prev, nxt] += 1
    return p


def test_icl_in_context_unigram_matches_enumeration():
    """The Monte-Carlo stage losses against exact enumeration, within 4 of their standard errors."""
    chain = InContextChain([0.5, 2.0], [0.3, 0.7], 2)
    seq_len = 8
    sequences = every_sequence(2, seq_len - 1)
    probs = np.array([icl_probability(chain, xs) for xs in sequences])
    assert probs.sum() == pytest.approx(1.0)
    expected = 0.0
    for xs, p in zip(sequences, probs):
        loss = -np.log(chain.startprob[xs[0]])
        for t in range(1, len(xs)):  # x_{t+1} (0-based xs[t]) from the counts of x_1..x_t
            seen = np.bincount(xs[:t], minlength=2)
            loss -= np.log((seen[xs[t]] + chain.concentration[xs[t]]) / (t + chain.concentration.sum()))
        expected += p * loss / len(xs)
    stages, errors = chain.stage_losses(seq_len), chain.stage_loss_errors(seq_len)
    assert list(stages) == ["uniform", "unigram", "in_context_unigram", "optimal", "oracle"]
    assert abs(stages["in_context_unigram"] - expected) < 4 * errors["in_context_unigram"]
    optimal = sum(p * -np.log(p) for p in probs) / (seq_len - 1)
    assert abs(stages["optimal"] - optimal) < 4 * errors["optimal"]
    unigram = enumerated_unigram(sequences, probs, 2)[0]
    assert abs(stages["unigram"] - unigram) < 4 * errors["unigram"] + 1e-9
    assert stages["oracle"] < stages["optimal"] < stages["in_context_unigram"] < stages["uniform"]


def test_stage_losses_without_marginals_use_the_long_run_unigram():
    class WithoutMarginals(MarkovChain):
        def token_marginals(self, seq_len):
            return None

    chain = MarkovChain.random(4, seed=1)
    chain = WithoutMarginals(chain.transmat, chain.startprob)
    stages = chain.stage_losses(16)
    assert (
        stages["unigram"] == chain.unigram_loss() == pytest.approx(-(chain.stationary() @ np.log(chain.stationary())))
    )
    assert stages["optimal"] == chain.optimal_loss(16)


# ------------------------------------------------------------ nanomarkov dynamics


def test_first_crossings_on_a_hand_made_series():
    values = [3.0, None, 2.5, 2.0, float("nan"), 1.5, 1.6, 1.0]
    levels = {"uniform": 2.2, "unigram": 1.5, "optimal": 0.5, "exactly": 3.0}
    assert first_crossings(values, levels) == {"uniform": 3, "unigram": 5, "optimal": None, "exactly": 0}


def test_crossing_levels_leave_out_stages_below_the_optimum():
    theory = {
        "stages": {"uniform": 1.1, "unigram": 1.0, "in_context_unigram": 0.9, "optimal": 0.8, "oracle": 0.7},
        "floor": 0.79,
        "reached_excess": 0.003,
    }
    levels = crossing_levels(theory)
    assert levels == {"uniform": 1.1, "unigram": 1.0, "in_context_unigram": 0.9, "optimal": pytest.approx(0.793)}


def bigram_gpt(table, seq_len):
    """A GPT whose next-token logits after token x are exactly table[x] (K+1 x K+1): embed -> head, no block."""
    vocab = table.shape[0]
    config = GPTConfig(
        n_layer=0,
        n_head=1,
        n_embd=vocab,
        vocab_size=vocab,
        block_size=seq_len - 1,
        use_ln=False,
        pos_ape=False,
        lm_head_tied=False,
    )
    model = GPT(config)
    with torch.no_grad():
        model.wte.weight.copy_(torch.eye(vocab))
        model.lm_head.weight.copy_(torch.from_numpy(table.T.astype(np.float32)))
    return model


def logit_table(rows):
    """Logits from next-state rows ((K+1) x K, row K after BOS), BOS's own logit far below the rest."""
    return np.hstack([np.log(rows), np.full((rows.shape[0], 1), -40.0)])


@pytest.fixture(scope="module")
def markov_run(tmp_path_factory):
    """A run folder whose snapshots are hand-made bigram models: uniform over K+1, a mixture, the true chain."""
    root = tmp_path_factory.mktemp("dynamics")
    generate_dataset(root / "data", 3, 20, 40, seq_len=12, alpha=0.3, seed=4)
    chain = load_dataset(root / "data").chain
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data_dir": str(root / "data")}))
    true_rows = chain.transition_rows()
    series = {
        0: np.zeros((4, 4)),
        10: logit_table(0.5 * true_rows + 0.5 / 3),
        100: logit_table(true_rows),
    }
    for iter_num, table in series.items():
        save_snapshot(bigram_gpt(table, 12), run, iter_num, iter_num * 110)
    return run, chain, series


def model_loss(table, tokens):
    """Mean NLL, per position too, of a bigram model with these logits on BOS-led sequences (numpy)."""
    log_q = table - np.log(np.exp(table).sum(axis=1, keepdims=True))
    nll = -log_q[tokens[:, :-1], tokens[:, 1:]]
    return nll.mean(), nll.mean(axis=0)


def strict_json(path):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_dynamics_of_hand_made_snapshots(markov_run, capsys):
    run, chain, series = markov_run
    assert main(["dynamics", str(run)]) == 0
    out = capsys.readouterr().out
    assert "crossed at iter 10" in out and "on the first 40 of 40 val sequences" in out
    assert "reached at iter 100 (11,000 tokens): within 0.003 of the floor" in out
    assert "the gap between them is the probability the model still puts on BOS" in out  # excess vs optimal KL
    record = strict_json(run / "dynamics.json")
    tokens = np.asarray(load_dataset(record["dataset"]).val, dtype=np.int64)
    assert [e["iter"] for e in record["snapshots"]] == [0, 10, 100]
    for entry, table in zip(record["snapshots"], series.values()):
        loss, by_position = model_loss(table, tokens)
        assert entry["val_loss"] == pytest.approx(loss, abs=1e-6)
        assert entry["loss_by_position"] == pytest.approx(by_position, abs=1e-6)
    exact = record["snapshots"][-1]
    assert record["theory"]["floor"] == pytest.approx(chain.true_loss(tokens))
    assert exact["excess"] == pytest.approx(0, abs=1e-6)
    assert exact["optimal_kl"] == pytest.approx(0, abs=1e-6) and exact["transition_kl"] == pytest.approx(0, abs=1e-6)
    assert record["theory"]["stages"] == pytest.approx(chain.stage_losses(12))
    # By hand: uniform over K+1 costs log 4, above every stage; the mixture lies between unigram and optimum.
    mixture = record["snapshots"][1]["val_loss"]
    assert record["theory"]["stages"]["unigram"] > mixture > record["theory"]["floor"] + 0.003
    assert record["crossings"] == {
        "uniform": {"iter": 10, "tokens": 1100, "level": pytest.approx(np.log(3))},
        "unigram": {"iter": 10, "tokens": 1100, "level": pytest.approx(record["theory"]["stages"]["unigram"])},
        "optimal": {"iter": 100, "tokens": 11000, "level": pytest.approx(record["theory"]["floor"] + 0.003)},
    }
    for name in PLOTS:
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def one_snapshot_copy(run, folder):
    """A copy of the run folder with its first snapshot only (a quicker run of dynamics), without the dynamics an
    earlier test may have written into the shared run (it would be newer than the snapshots: up to date)."""
    shutil.copytree(run, folder, ignore=shutil.ignore_patterns("dynamics*"))
    for snapshot in sorted((folder / "snapshots").iterdir())[1:]:
        snapshot.unlink()
    return folder


def test_dynamics_json_flag_and_out(markov_run, tmp_path, capsys):
    run = one_snapshot_copy(markov_run[0], tmp_path / "run")
    assert main(["dynamics", str(run), "--json", "--val_sequences", "8", "--out", str(tmp_path / "out")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == strict_json(tmp_path / "out" / "dynamics.json")
    assert printed["val_sequences"] == 8 and printed["val_sequences_total"] == 40
    assert set(printed) >= {"run", "dataset", "process", "theory", "snapshots", "crossings", "timing"}


def test_a_second_writer_of_the_folder_is_refused_and_nothing_written(markov_run, tmp_path, capsys):
    run = one_snapshot_copy(markov_run[0], tmp_path / "run")
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    with writer_lock(run, "training run"):  # a train still writing the run (another open file: flock conflicts)
        assert main(["dynamics", str(run), "--val_sequences", "8"]) == 2
        err = capsys.readouterr().err
        assert "another training run is writing here (pid" in err and err.count("\n") == 1
        assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file() and path.name != ".lock"} == before


@pytest.mark.parametrize(
    ("make", "argv", "message"),
    [
        (lambda d: d.mkdir(), [], "no snapshots"),
        (lambda d: None, [], "no such run folder"),
        (lambda d: None, ["--val_sequences", "1"], "--val_sequences must be"),
    ],
)
def test_dynamics_bad_input_is_one_line_and_exit_2(markov_run, tmp_path, capsys, make, argv, message):
    run = markov_run[0] if "--val_sequences" in argv else tmp_path / "run"
    make(tmp_path / "run")
    assert main(["dynamics", str(run), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    if message == "no snapshots":
        assert "--snapshots" in err


# ------------------------------------------------------------ the learning coefficient (devinterp, optional)


def test_llc_without_devinterp_is_one_line(markov_run, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "devinterp", None)  # as if not installed, whatever this environment has
    monkeypatch.setitem(sys.modules, "devinterp.slt.llc", None)
    assert main(["dynamics", str(markov_run[0]), "--llc"]) == 2
    err = capsys.readouterr().err
    assert "devinterp" in err and "pip install" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--llc_draws", "5"], "--llc_draws sets the learning coefficient's estimate; add --llc"),
        (["--llc", "--llc_draws", "0"], "num_draws must be an integer >= 1, got 0"),
        (["--llc", "--llc_chains", "-2"], "num_chains must be an integer >= 1, got -2"),
        (["--llc", "--llc_lr", "nan"], "lr must be a finite number > 0, got nan"),
        (["--llc", "--llc_localization", "0"], "localization must be a finite number > 0, got 0.0"),
        (["--llc", "--llc_draws", "many"], "--llc_draws"),
    ],
)
def test_bad_learning_coefficient_settings_are_one_line(markov_run, capsys, flags, message, tmp_path):
    assert main(["dynamics", str(markov_run[0]), "--out", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_learning_coefficient_settings_reach_the_estimate(markov_run, monkeypatch, capsys):
    seen = {}

    def stop_at_start(run, llc=None, **_):
        seen.update(llc)
        raise NanoMarkovError("stopped before any snapshot")

    monkeypatch.setattr("nanomarkov.dynamics.run_dynamics", stop_at_start)
    argv = ["dynamics", str(markov_run[0]), "--llc", "--llc_draws", "7", "--llc_lr", "3e-5", "--llc_batch_size", "4"]
    assert main(argv) == 2
    assert seen == dict(num_chains=2, num_draws=7, lr=3e-5, n_beta=None, batch_size=4, localization=100.0)


def test_learning_coefficient_is_larger_at_the_optimum(markov_run):
    """At the true chain the loss rises around the weights (LLC > 0); far above the optimum SGLD
    walks downhill, so the estimate is lower (negative)."""
    pytest.importorskip("devinterp", reason="devinterp not installed (optional: pip install devinterp)")
    run, chain, series = markov_run
    tokens = load_dataset(json.loads((run / "config.json").read_text())["data_dir"]).val[:16]
    settings = dict(num_chains=2, num_draws=5, lr=1e-4, n_beta=None, batch_size=8, localization=100.0)
    exact = bigram_gpt(series[100], 12)
    before = {name: value.clone() for name, value in exact.state_dict().items()}
    at_optimum = learning_coefficient(exact, tokens, **settings)
    far = learning_coefficient(bigram_gpt(series[0], 12), tokens, **settings)
    assert set(at_optimum) == {"mean", "std", "seconds"}
    assert at_optimum["mean"] > 0 > far["mean"]
    assert all(torch.equal(before[name], value) for name, value in exact.state_dict().items())


def test_a_sweep_report_runs_dynamics_where_a_run_kept_snapshots(markov_run, tmp_path):
    runs = tmp_path / "runs"
    one_snapshot_copy(markov_run[0], runs / "with")
    (runs / "without").mkdir()
    for name in ("with", "without"):
        (runs / name / "done.json").write_text("{}")
    lines = []
    assert write_dynamics_reports(runs, lines.append) == [str(runs / "with")]
    assert strict_json(runs / "with" / "dynamics.json")["snapshots"]
    assert not (runs / "without" / "dynamics.json").exists()
    assert any("dynamics written in 1 run(s)" in line for line in lines)
    assert write_dynamics_reports(runs, lines.append) == []  # newer than every snapshot: a rerun leaves it


def test_a_snapshot_with_broken_weights_is_null_not_nan(markov_run, tmp_path):
    run = one_snapshot_copy(markov_run[0], tmp_path / "run")
    broken = bigram_gpt(np.full((4, 4), np.nan), 12)
    (snapshot,) = (run / "snapshots").iterdir()
    snapshot.unlink()
    save_snapshot(broken, run, 5, 550)
    assert main(["dynamics", str(run)]) == 0
    (entry,) = strict_json(run / "dynamics.json")["snapshots"]
    assert entry["outputs_finite"] is False
    assert entry["val_loss"] is None and entry["optimal_kl"] is None and entry["loss_by_position"] is None


def test_a_snapshot_of_another_architecture_is_refused_before_any_work(markov_run, tmp_path, capsys):
    """One snapshot copied in from a run with another width: one line naming it and the field, nothing written."""
    run = one_snapshot_copy(markov_run[0], tmp_path / "run")
    save_snapshot(bigram_gpt(np.zeros((4, 4)), 12), run, 20, 2200)
    wider = GPTConfig(n_layer=0, n_head=1, n_embd=8, vocab_size=4, block_size=11, use_ln=False, pos_ape=False)
    odd = save_snapshot(GPT(wider), run, 50, 5500)
    (run / "dynamics.json").unlink(missing_ok=True)  # the module's run may have left one
    assert main(["dynamics", str(run)]) == 2
    err = capsys.readouterr().err
    assert odd.name in err and "n_embd: 8 vs 4" in err and "remove it" in err and err.count("\n") == 1
    assert not (run / "dynamics.json").exists()


def test_data_of_another_process_or_chain_is_refused_but_a_copy_is_not(markov_run, tmp_path, capsys):
    run = one_snapshot_copy(markov_run[0], tmp_path / "run")
    generate_dataset(tmp_path / "korder", 3, 4, 8, seq_len=12, seed=4, process="korder")
    assert main(["dynamics", str(run), "--data", str(tmp_path / "korder")]) == 2
    err = capsys.readouterr().err
    assert "korder K=3" in err and "markov K=3" in err and err.count("\n") == 1
    # The run records its dataset's sha256 (train writes it in config.json): eval's check, so another
    # chain of the same process and K is refused, naming the dataset the run expects.
    config = json.loads((run / "config.json").read_text())
    trained_on = load_dataset(config["data_dir"]).meta["sha256"]
    (run / "config.json").write_text(json.dumps({**config, "dataset_sha256": trained_on}))
    (run / "dynamics.json").unlink(missing_ok=True)  # the module's run may have left one
    generate_dataset(tmp_path / "other", 3, 4, 8, seq_len=12, alpha=0.3, seed=9)  # same process and K, new chain
    assert main(["dynamics", str(run), "--data", str(tmp_path / "other"), "--val_sequences", "4"]) == 2
    err = capsys.readouterr().err
    assert "trained on other data than" in err and config["data_dir"] in err and err.count("\n") == 1
    assert trained_on["val.bin"][:12] in err and not (run / "dynamics.json").exists()
    shutil.copytree(config["data_dir"], tmp_path / "copy")
    assert main(["dynamics", str(run), "--data", str(tmp_path / "copy"), "--val_sequences", "4"]) == 0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d.write_text("weights"), "a file, not a run folder"),
        (lambda d: (d.mkdir(), (d / "meta.json").write_text("{}")), "a dataset folder"),
    ],
)
def test_a_file_or_a_dataset_given_as_the_run_is_named_so(tmp_path, capsys, make, message):
    make(tmp_path / "given")
    assert main(["dynamics", str(tmp_path / "given")]) == 2
    err = capsys.readouterr().err
    assert message in err and "run folder" in err and err.count("\n") == 1


def test_out_on_a_file_names_the_dynamics(markov_run, tmp_path, capsys):
    run = one_snapshot_copy(markov_run[0], tmp_path / "run")
    (tmp_path / "afile").write_text("")
    assert main(["dynamics", str(run), "--out", str(tmp_path / "afile"), "--val_sequences", "4"]) == 2
    err = capsys.readouterr().err
    assert "cannot write the dynamics to" in err and "evaluation" not in err and err.count("\n") == 1


def test_an_hmm_run_gets_the_belief_probe_on_a_subset_of_val(tmp_path, capsys):
    """More val sequences than --val_sequences (the default 256): the probe reads the first ones' beliefs."""
    generate_dataset(tmp_path / "data", 3, 20, 300, seq_len=12, process="hmm", preset="mess3", seed=5)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data_dir": str(tmp_path / "data")}))
    save_snapshot(bigram_gpt(np.zeros((4, 4)), 12), run, 0, 0)
    assert main(["dynamics", str(run)]) == 0
    assert "belief R²" in capsys.readouterr().out
    (entry,) = strict_json(run / "dynamics.json")["snapshots"]
    # The residual stream is the one-hot of the current token: it says something about the belief, not all.
    assert 0.05 < entry["belief_r2"]["r2"][-1] < 0.95


def test_a_users_own_dynamics_json_is_not_taken_for_earlier_dynamics(tmp_path):
    """A folder of dynamics is told by what dynamics writes in dynamics.json, not by the file's name."""
    (tmp_path / "dynamics.json").write_text('{"mine": true}')
    with pytest.raises(NanoMarkovError, match=r"holds files that are not a dynamics \(dynamics.json\).*--force"):
        check_dynamics_folder(tmp_path)
    assert (tmp_path / "dynamics.json").read_text() == '{"mine": true}'
