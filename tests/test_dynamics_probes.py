"""dynamics' belief-state probe: MSE beside R², the untrained and shuffled baselines, all layers, the simplex."""

import json

import numpy as np
import pytest
from test_dynamics import bigram_gpt, logit_table, strict_json

from nanomarkov import dynamics
from nanomarkov.checkpoint import load_snapshot, save_snapshot
from nanomarkov.cli import main
from nanomarkov.data import generate_dataset, load_dataset
from nanomarkov.dynamics import SIMPLEX_PLOT, belief_baselines, drawable_simplex, format_probes, simplex_choice
from nanomarkov.interp.linear_probes import belief_state_probe


@pytest.fixture(scope="module")
def hmm_run(tmp_path_factory):
    """An hmm run whose snapshots are bigram models (their residual stream: the current token's one-hot)."""
    root = tmp_path_factory.mktemp("dynamics_probes")
    generate_dataset(root / "data", 3, 20, 60, seq_len=12, process="hmm", preset="mess3", seed=5)
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data_dir": str(root / "data")}))
    rows = np.full((4, 3), 1 / 3)
    for iter_num, table in ((0, np.zeros((4, 4))), (10, logit_table(rows)), (20, logit_table(rows))):
        save_snapshot(bigram_gpt(table, 12), run, iter_num, iter_num * 100)
    return run


@pytest.fixture
def no_rendering(monkeypatch):
    """Plots built but not rendered (rendering six PNGs takes seconds; the simplex's is rendered in
    tests/interp/test_linear_probes.py): each file holds its figure's suptitle or first title."""

    def title(fig):
        return (fig.get_suptitle() or fig.axes[0].get_title()).encode()

    monkeypatch.setattr(dynamics, "png_bytes", title)


def test_each_snapshot_has_the_probe_its_baselines_and_the_simplex(hmm_run, no_rendering, capsys):
    assert main(["dynamics", str(hmm_run), "--val_sequences", "40"]) == 0
    out = capsys.readouterr().out
    assert "belief-state probe, held-out positions" in out
    assert "untrained (iter 0): embed R² " in out and "iter 20: all layers MSE" in out
    record = strict_json(hmm_run / "dynamics.json")
    dataset = load_dataset(record["dataset"])
    for entry in record["snapshots"]:
        probe = belief_state_probe(load_snapshot(entry["file"])[0], dataset, n_sequences=40)
        numbers = entry["belief_probe"]
        assert numbers["layers"] == ["embed"] and entry["belief_r2"]["r2"] == pytest.approx(numbers["r2"])
        for key in ("r2", "mse", "r2_all", "mse_all", "shuffled_r2", "shuffled_mse", "shuffled_mse_all"):
            assert numbers[key] == pytest.approx(np.asarray(probe[key]).tolist(), rel=1e-9), key
        assert numbers["shuffled_mse"][0] > numbers["mse"][0]  # the token says something about the belief
    baselines = record["belief_baselines"]
    assert baselines == {"untrained": {"iter": 0, **record["snapshots"][0]["belief_probe"]}, "shuffle_seed": 0}
    assert record["simplex"] == {"iters": [0, 10, 20], "file": SIMPLEX_PLOT}
    assert b"belief states and the linear probe" in (hmm_run / SIMPLEX_PLOT).read_bytes()
    labels = [ax.get_ylabel() for ax in dynamics.plot_metrics(record).axes]
    assert "belief-state probe MSE" in labels and "belief-state probe R²" in labels


def test_simplex_choice_and_its_refusals(hmm_run, capsys):
    dataset = load_dataset(hmm_run.parent / "data")
    # the middle one is the nearest half the run (9 of 20), not the middle of the log-spaced list (3)
    assert simplex_choice(dataset, [0, 1, 3, 9, 20]) == {"iters": [0, 9, 20], "file": SIMPLEX_PLOT}
    assert simplex_choice(dataset, [7])["iters"] == [7] and simplex_choice(dataset, [0, 5], [5])["iters"] == [5]
    entries = [{"iter": 0, "outputs_finite": False}, {"iter": 5, "outputs_finite": True}]
    assert drawable_simplex({"iters": [0, 5], "file": SIMPLEX_PLOT}, entries)["iters"] == [5]
    assert drawable_simplex({"iters": [0], "file": SIMPLEX_PLOT}, entries) is None
    for flags, message in (
        (["--simplex_iters", "5"], "no snapshot at that iteration; this run has snapshots at 0,10,20"),
        (["--simplex_iters", "a,1"], "expected comma-separated iterations"),
    ):
        assert main(["dynamics", str(hmm_run), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_no_untrained_snapshot_no_untrained_baseline():
    probe = {"layers": ["embed"], "r2": [0.5], "mse": [0.1], "r2_all": 0.5, "mse_all": 0.1, "shuffled_mse": [0.2]}
    entries = [{"iter": 20, "belief_probe": probe}]
    assert belief_baselines(entries) == {"untrained": None, "shuffle_seed": 0}
    record = {"snapshots": entries, "belief_baselines": belief_baselines(entries)}
    assert format_probes(record)[-1] == "untrained baseline: none (no snapshot at iter 0)"
    half = dict(probe, mse=[0.05], mse_all=0.025)
    record = {"snapshots": [{"iter": 0, "belief_probe": probe}, {"iter": 20, "belief_probe": half}]}
    record["belief_baselines"] = belief_baselines(record["snapshots"])
    assert format_probes(record)[-2:] == [
        "iter 20: embed MSE 0.05000 = 0.500 x untrained",
        "iter 20: all layers MSE 0.02500 = 0.250 x untrained",
    ]


def test_simplex_iters_on_a_process_without_beliefs_is_one_line(tmp_path, capsys):
    generate_dataset(tmp_path / "data", 3, 20, 20, seq_len=12, seed=4)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data_dir": str(tmp_path / "data")}))
    save_snapshot(bigram_gpt(np.zeros((4, 4)), 12), run, 0, 0)
    assert main(["dynamics", str(run), "--simplex_iters", "0"]) == 2
    err = capsys.readouterr().err
    assert "--simplex_iters draws belief states" in err and "markov" in err and err.count("\n") == 1
