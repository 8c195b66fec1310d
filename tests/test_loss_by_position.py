"""The optimum at every position: meta.json's compact record (against a closed form), eval's loss
by position (against a hand computation), and report's plot of it."""

import dataclasses

import matplotlib.image
import numpy as np
import pytest
import torch
from test_evaluate import TableModel, true_table

from nanomarkov.cli import main
from nanomarkov.data import (
    BY_POSITION_TOLERANCE,
    compact_by_position,
    expand_by_position,
    generate_dataset,
    load_dataset,
    optimal_loss_by_position,
    stage_loss_errors,
    stage_losses,
)
from nanomarkov.dynamics import stage_theory
from nanomarkov.evaluate import evaluate_models, format_eval, write_eval
from nanomarkov.files import read_json
from nanomarkov.model import GPT, GPTConfig
from nanomarkov.processes import incontext
from nanomarkov.processes.numerics import entropy
from nanomarkov.report import STAGE_TOLERANCE, load_run, plot_runs, stage_lines


@pytest.fixture(scope="module")
def markov(tmp_path_factory):
    path = tmp_path_factory.mktemp("position") / "mm4"
    generate_dataset(path, 4, 50, 60, seq_len=40, seed=3)
    return load_dataset(path)


def closed_form(chain, seq_len):
    """Position 1 costs H(startprob); position t > 1 costs sum_s mu_{t-1}(s) H(P_s), mu_1 = startprob, mu_t = mu_{t-1} P."""
    row_entropy, marginal, losses = entropy(chain.transmat, axis=1), chain.startprob.copy(), [entropy(chain.startprob)]
    for _ in range(seq_len - 2):
        losses.append(marginal @ row_entropy)
        marginal = marginal @ chain.transmat
    return np.array(losses)


def test_meta_records_the_markov_optimum_compactly(markov):
    record = markov.meta["optimal_loss_by_position"]
    exact = closed_form(markov.chain, 40)
    kept = len(record["values"])
    assert record["se"] is None and record["limit_se"] is None  # exact theory
    assert record["limit"] == pytest.approx(markov.chain.entropy_rate(), abs=1e-12)
    assert 2 <= kept < 39 and record["converged_at"] == kept + 1  # a random 4-state chain mixes within 39 steps
    np.testing.assert_allclose(record["values"], exact[:kept], rtol=0, atol=1e-12)
    losses, errors = optimal_loss_by_position(markov)
    assert losses.shape == errors.shape == (39,) and not errors.any()
    np.testing.assert_allclose(losses, exact, rtol=0, atol=BY_POSITION_TOLERANCE)
    assert np.abs(losses[kept:] - exact[kept:]).max() > 0  # the tail really is the limit, not the values


def by_hand_stages(chain, seq_len):
    """uniform log K; unigram H of the law of x_t averaged over t = 1..L-1; optimal the mean optimum."""
    marginals = [chain.startprob @ np.linalg.matrix_power(chain.transmat, t) for t in range(seq_len - 1)]
    unigram = entropy(np.mean(marginals, axis=0))
    return {"uniform": np.log(chain.n_states), "unigram": unigram, "optimal": closed_form(chain, seq_len).mean()}


def test_meta_records_the_stage_losses(markov):
    assert markov.meta["stage_losses"] == pytest.approx(by_hand_stages(markov.chain, 40), abs=1e-12)
    assert markov.meta["stage_loss_errors"] == {"uniform": 0.0, "unigram": 0.0, "optimal": 0.0}  # all exact


def test_dynamics_reads_the_recorded_stages(markov):
    """dynamics takes the stages from meta.json: an icl process would otherwise draw theory's sample again."""
    recorded = {"uniform": 9.0, "unigram": 8.0, "optimal": 7.0}
    errors = {"uniform": 0.0, "unigram": 0.5, "optimal": 0.25}
    meta = dict(markov.meta, stage_losses=recorded, stage_loss_errors=errors)
    theory = stage_theory(dataclasses.replace(markov, meta=meta))
    assert theory["stages"] == recorded and theory["stage_errors"] == errors


def test_an_older_dataset_falls_back_to_its_process(markov):
    recorded = ("optimal_loss_by_position", "stage_losses", "stage_loss_errors")
    meta = {k: v for k, v in markov.meta.items() if k not in recorded}
    older = type(markov)(markov.path, meta, markov.chain, markov.train, markov.val)
    losses, _ = optimal_loss_by_position(older)
    np.testing.assert_allclose(losses, closed_form(markov.chain, 40), rtol=0, atol=1e-12)
    assert stage_losses(older) == pytest.approx(by_hand_stages(markov.chain, 40), abs=1e-12)
    assert stage_loss_errors(older) == {"uniform": 0.0, "unigram": 0.0, "optimal": 0.0}


def test_compact_and_expand_round_trip():
    limit = 0.5
    losses = limit + 0.1 * 0.5 ** np.arange(40)  # within 1e-6 of the limit from the 18th position on
    record = compact_by_position(losses, np.zeros(40), limit)
    first_close = int(np.argmax(np.abs(losses - limit) <= BY_POSITION_TOLERANCE))
    assert len(record["values"]) == first_close and record["converged_at"] == first_close + 1
    expanded, errors = expand_by_position(record, 41)
    np.testing.assert_array_equal(expanded[:first_close], losses[:first_close])
    assert np.abs(expanded - losses).max() <= BY_POSITION_TOLERANCE and not errors.any()
    # An estimate is kept whole while its error bound reaches past the tolerance; its errors come back too.
    estimated = compact_by_position(losses, np.full(40, 1e-4), limit, limit_se=2e-4)
    assert len(estimated["values"]) == 40 and estimated["converged_at"] is None
    np.testing.assert_array_equal(expand_by_position(estimated, 41)[1], np.full(40, 1e-4))
    # A loss that never settles (a periodic chain's) is kept whole.
    assert len(compact_by_position(limit + 0.1 * (-1) ** np.arange(40), np.zeros(40), limit)["values"]) == 40
    # A tail that leaves the limit again after approaching it: only the positions after the last excursion go.
    bumpy = np.where(np.arange(40) == 30, limit + 1e-3, losses)
    assert len(compact_by_position(bumpy, np.zeros(40), limit)["values"]) == 31


def test_eval_loss_by_position_matches_a_hand_computation(markov, tmp_path):
    k = markov.chain.n_states
    table = np.random.default_rng(0).normal(size=(k + 1, k + 1))
    result = evaluate_models({"m": TableModel(table)}, markov)["m"]
    val = np.asarray(markov.val, dtype=np.int64)
    by_hand = np.zeros(val.shape[1] - 1)
    for seq in val:
        for t, (x, y) in enumerate(zip(seq[:-1], seq[1:])):
            by_hand[t] += np.log(np.exp(table[x]).sum()) - table[x, y]
    by_hand /= len(val)
    arrays = result["arrays"]["loss_by_position"]
    np.testing.assert_allclose(arrays["val_loss"], by_hand, rtol=1e-12)
    assert arrays["val_loss"].mean() == pytest.approx(result["cross_entropy"]["val_loss"], rel=1e-12)
    np.testing.assert_allclose(arrays["optimal_loss"], optimal_loss_by_position(markov)[0], rtol=0, atol=0)
    assert arrays["true_loss_val"].mean() == pytest.approx(markov.meta["theory"]["true_loss_val"], rel=1e-9)
    summary = result["loss_by_position"]
    assert [e["position"] for e in summary["at"]] == [1, 10, 39]
    assert summary["at"][1]["val_loss"] == pytest.approx(by_hand[9], rel=1e-12)
    chain, optimal_by_hand = markov.chain, np.zeros(val.shape[1] - 1)
    for seq in val:  # the chain's own loss on these sequences: -log startprob(x1), then -log P(x_{t-1}, x_t)
        optimal_by_hand[0] -= np.log(chain.startprob[seq[1]])
        optimal_by_hand[1:] -= np.log(chain.transmat[seq[1:-1], seq[2:]])
    optimal_by_hand /= len(val)
    worst = int(np.argmax(by_hand - optimal_by_hand)) + 1
    assert summary["furthest_above_optimum"][0]["position"] == worst
    assert summary["at"][1]["excess"] == pytest.approx(by_hand[9] - optimal_by_hand[9], rel=1e-9)
    assert "loss at position t" in format_eval(result)
    write_eval(result, tmp_path)
    with np.load(tmp_path / "loss_by_position.npz") as npz:
        np.testing.assert_array_equal(npz["val_loss"], arrays["val_loss"])


def test_report_draws_the_loss_by_position(tmp_path, monkeypatch):
    """An icl dataset: its optimum is estimated, so the plot carries the error band."""
    monkeypatch.setattr(incontext, "THEORY_SEQUENCES", 1000)
    generate_dataset(tmp_path / "icl", 2, 20, 30, seq_len=9, process="icl")
    dataset = load_dataset(tmp_path / "icl")
    table = np.zeros((3, 3))
    result = evaluate_models({"m": TableModel(table)}, dataset)["m"]
    assert result["loss_by_position"]["estimated"]
    stages = result["loss_by_position"]["stage_losses"]
    assert list(stages) == ["uniform", "unigram", "in_context_unigram", "optimal", "oracle"]
    run_folder = tmp_path / "run"
    run = {"checkpoint": str(run_folder / "ckpt.pt"), "dataset": str(tmp_path / "icl"), "iter": 0, "n_states": 2}
    run |= {"process": "icl", "order": 1, "seq_len": 9, "val_sequences": 30, "seed": 1}
    write_eval(result | {"run": run}, run_folder)
    (run_folder / "ckpt.pt").touch()  # what marks a run folder
    files, skipped = plot_runs([load_run(run_folder)])
    assert skipped == [] and files == [run_folder / "loss_by_position.png"]
    image = matplotlib.image.imread(files[0])
    assert image.shape[0] >= 300 and image.std() > 0.01


def test_a_model_with_nan_outputs_has_no_loss_by_position(markov):
    table = np.zeros((markov.chain.n_states + 1,) * 2)
    table[2, 0] = np.nan  # after state 2 the model's logits are broken
    result = evaluate_models({"m": TableModel(table)}, markov)["m"]
    summary = result["loss_by_position"]
    assert not result["outputs_finite"] and summary["furthest_above_optimum"] == []
    assert all(entry["val_loss"] is None and entry["excess"] is None for entry in summary["at"])
    assert all(entry["optimal_loss"] is not None for entry in summary["at"])  # the theory stays
    assert "1: not finite" in format_eval(result)


def test_the_optimal_predictor_has_no_excess_at_any_position(markov):
    """The excess is measured on the same val sequences: the chain itself as the model has none, up to float
    error, while its distance from the expected optimum is the val split's sampling noise."""
    result = evaluate_models({"m": TableModel(true_table(markov.chain))}, markov)["m"]
    arrays, summary = result["arrays"]["loss_by_position"], result["loss_by_position"]
    noise = np.abs(arrays["val_loss"] - arrays["optimal_loss"]).max()
    assert noise > 1e-3  # 60 val sequences: the expected optimum is far off at some position
    for entry in summary["at"] + summary["furthest_above_optimum"]:
        assert abs(entry["excess"]) < 1e-12
        assert entry["optimal_loss"] == pytest.approx(arrays["optimal_loss"][entry["position"] - 1], abs=0)
    assert "furthest above the optimal predictor on these val sequences" in format_eval(result)


def test_stage_lines_merge_equal_losses():
    summary = {"stage_losses": {"uniform": 1.0986, "unigram": 1.0984, "in_context_unigram": 0.9, "optimal": 0.7}}
    summary["entropy_rate"] = 0.7 + STAGE_TOLERANCE / 2
    lines = stage_lines(summary)
    assert lines == {
        "uniform = unigram": 1.0986,
        "in context unigram": 0.9,
        "optimal (mean over positions) = entropy rate (the optimum's limit)": 0.7,
    }
    older = stage_lines({"uniform_loss": 1.5, "unigram_loss": 1.2, "entropy_rate": 1.0})
    assert list(older) == ["uniform", "unigram", "entropy rate (the optimum's limit)"]


def test_eval_takes_a_run_folder(markov, tmp_path):
    """`nanomarkov eval RUN` evaluates RUN/ckpt.pt and writes next to it."""
    config = GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=40, vocab_size=markov.vocab_size)
    state = {"model": GPT(config).state_dict(), "model_args": dataclasses.asdict(config), "data_dir": str(markov.path)}
    run = tmp_path / "run-42"
    run.mkdir()
    torch.save(state, run / "ckpt.pt")
    assert main(["eval", str(run)]) == 0
    assert (run / "eval.json").is_file() and (run / "loss_by_position.npz").is_file()
    assert read_json(run / "eval.json")["run"]["checkpoint"] == str(run / "ckpt.pt")
