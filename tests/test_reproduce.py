"""nanomarkov reproduce: papers/*.toml read and refused, claims judged on hand-built numbers, the
quantities read from hand-built dynamics records, and one paper run end to end at a tiny scale."""

import json
import math

import pytest

from nanomarkov import NanoMarkovError
from nanomarkov.cli import main
from nanomarkov.files import json_text
from nanomarkov.processes import incontext
from nanomarkov.reproduce import claims_table, paper_names, read_paper, reproduce
from nanomarkov.reproduce.claims import judge, read_claim
from nanomarkov.reproduce.paper import PAPERS_DIR, paper_grid
from nanomarkov.reproduce.quantities import check_quantity, formed_tokens, measure
from nanomarkov.reproduce.report import report_text
from nanomarkov.sweep import run as sweep_run
from nanomarkov.sweep import run_sweep
from nanomarkov.sweep.grid import MAX_GRID_BYTES

# A paper file small enough to run in a test: the smoke scale of shai2024-mess3, smaller still.
TINY = """
[paper]
title = "A tiny paper"
authors = "Nobody"
year = 2026

[[datasets]]
process = "mess3"
n_states = 3
seq_len = 6

[[experiments]]
tag = "only"

[scales.smoke]
train = 16
val = 8
seeds = [1, 2]
defaults = { n_layer = 1, n_embd = 8, n_head = 1, max_iters = 3, lr_decay_iters = 3, warmup_iters = 1, eval_interval = 3, batch_size = 4, snapshots = 2, device = "cpu" }

[[figures]]
file = "dynamics_loss.png"
paper = "Fig. 1"

[[claims]]
id = "impossible"
claim = "the loss is below the optimum"
source = "Fig. 1"
paper = "never"
quantity = "final_excess"
op = "<"
value = -1.0

[[claims]]
id = "probe_finite"
claim = "the probe's R² is at most 1"
source = "Fig. 1"
paper = "always"
quantity = "probe_r2_final"
op = "<="
value = 1.0
over = "every"
"""


def claim(**changes):
    entry = {"id": "c", "claim": "x", "source": "Fig. 1", "paper": "y", "quantity": "final_excess", "op": "<="}
    return read_claim(entry | changes, ["only"])


def table(**columns):
    n = len(next(iter(columns.values())))
    return [{name: values[i] for name, values in columns.items()} for i in range(n)]


def test_a_claim_holds_on_the_mean_or_on_every_seed_as_it_says():
    on_mean, on_every = claim(value=0.01), claim(value=0.01, over="every")
    spread_out = table(final_excess=[0.005, 0.012])  # mean 0.0085: under 0.01, one seed over it
    assert judge(on_mean, spread_out)["holds"] is True
    assert judge(on_every, spread_out)["holds"] is False
    assert judge(on_mean, table(final_excess=[0.02, 0.03]))["holds"] is False
    assert judge(on_every, table(final_excess=[0.001, 0.002]))["holds"] is True


def test_a_claim_against_another_quantity_pairs_the_seeds_and_scales_the_reference():
    halved = claim(quantity="probe_mse_final", op="<=", than="probe_mse_untrained", times=0.5, over="every")
    rows = table(probe_mse_final=[0.01, 0.01], probe_mse_untrained=[0.03, 0.015])  # 0.01 <= 0.015; 0.01 > 0.0075
    assert judge(halved, rows)["holds"] is False
    assert judge(halved, rows)["against"] == "probe_mse_untrained 0.0225 ± 0.011 (2 seeds)"
    assert judge(halved, table(probe_mse_final=[0.01, 0.01], probe_mse_untrained=[0.03, 0.025]))["holds"] is True


def test_margin_strengthens_and_tolerance_eases_a_check():
    rows = table(probe_r2_final=[0.85, 0.87])  # mean 0.86
    assert judge(claim(quantity="probe_r2_final", op=">=", value=0.9), rows)["holds"] is False
    assert judge(claim(quantity="probe_r2_final", op=">=", value=0.9, tolerance=0.05), rows)["holds"] is True
    assert judge(claim(quantity="probe_r2_final", op=">=", value=0.8, margin=0.07), rows)["holds"] is False
    assert judge(claim(value=0.01, tolerance=0.005), table(final_excess=[0.014]))["holds"] is True


def test_a_quantity_a_run_could_not_give_fails_the_claim_and_says_so():
    result = judge(claim(value=0.01, if_not="more steps"), table(final_excess=[0.001, None]))
    assert result["holds"] is False
    assert result["ours"] == "0.001 ± 0 (1 seed); not measured in 1 of 2 seeds" and result["if_not"] == "more steps"
    against = claim(quantity="probe_r2_all_layers", op=">", than="probe_r2_final")
    unpaired = judge(against, table(probe_r2_all_layers=[0.9, 0.8], probe_r2_final=[None, 0.7]))
    assert unpaired["holds"] is False and unpaired["ours"].endswith("not measured in 1 of 2 seeds")
    assert judge(claim(value=0.01), [])["holds"] is False


def test_ours_is_the_mean_and_sample_sd_over_seeds():
    ours = judge(claim(value=1.0), table(final_excess=[0.1, 0.2, 0.6]))["ours"]
    sd = math.sqrt(((0.1 - 0.3) ** 2 + (0.2 - 0.3) ** 2 + (0.6 - 0.3) ** 2) / 2)
    assert ours == f"0.3 ± {sd:.2g} (3 seeds)"


def snapshot(iter_num, tokens, induction, stage_kl=None):
    return {"iter": iter_num, "tokens": tokens, "attention_scores": {"induction": induction}, "stage_kl": stage_kl}


def test_quantities_read_a_dynamics_record():
    entries = [snapshot(0, 0, [[0.1]]), snapshot(10, 100, [[0.2], [0.3]]), snapshot(20, 200, [[0.9], [0.5]])]
    dynamics = {"snapshots": entries, "stage_events": {"unigram": {"entered": {"tokens": 100}, "left": None}}}
    # halfway from 0.1 to 0.9 is 0.5: first reached at 200 tokens (0.3 at 100 is short of it)
    assert formed_tokens(dynamics, "induction") == 200
    assert measure("induction_score", dynamics, None) == 0.9
    assert measure("stage_entered_tokens.unigram", dynamics, None) == 100
    assert measure("stage_left_tokens.unigram", dynamics, None) is None
    assert measure("final_excess", dynamics, {"cross_entropy": {"excess": 0.25}}) == 0.25
    # per layer: block 1's heads only ("layers" holds the block indices); a block the model lacks gives None
    entries[-1]["attention_scores"]["layers"] = [0, 1]
    assert measure("induction_score.0", dynamics, None) == 0.9 and measure("induction_score.1", dynamics, None) == 0.5
    assert (
        measure("previous_token_score.1", dynamics, None) is None
        and measure("induction_score.2", dynamics, None) is None
    )
    assert check_quantity("induction_score.1") == "induction_score.1"
    with pytest.raises(NanoMarkovError, match="induction_score.LAYER"):
        check_quantity("induction_score.last")
    flat = {"snapshots": [snapshot(0, 0, [[0.4]]), snapshot(5, 50, [[0.3]])]}
    assert formed_tokens(flat, "induction") is None  # the score never rose


def test_the_middle_snapshot_is_the_one_nearest_half_the_run():
    # log-spaced iterations: the middle of the list (iter 7) is early; half of 2000 is nearest 1062
    iters = [0, 1, 2, 4, 7, 13, 24, 1062, 2000]
    entries = [{"iter": i, "belief_probe": {"mse": [float(i)]}} for i in iters]
    assert measure("probe_mse_middle", {"snapshots": entries}, None) == 1062.0
    assert measure("probe_mse_untrained", {"snapshots": entries}, None) == 0.0


@pytest.mark.parametrize("name", paper_names())
def test_every_shipped_paper_reads_and_makes_its_grids(name):
    paper = read_paper(name)
    assert paper.claims and set(paper.scales) >= {"smoke", "cpu"}
    for scale in paper.scales:
        grid = paper_grid(paper, scale)
        assert len(grid["experiments"]) == len(paper.experiments)
        assert all(e["seeds"] == paper.scales[scale]["seeds"] for e in grid["experiments"])


def test_a_scale_s_seq_len_replaces_every_dataset_s(tmp_path):
    second = '[[datasets]]\nprocess = "mess3"\nn_states = 3\nx = 0.1\nseq_len = 9\n\n[[experiments]]\ntag = "only"'
    text = TINY.replace('[[experiments]]\ntag = "only"', second).replace(
        "seeds = [1, 2]", "seeds = [1, 2]\nseq_len = 4"
    )
    paper = read_paper(write_paper(tmp_path, text))
    grid = paper_grid(paper, "smoke")
    assert [d["seq_len"] for d in grid["datasets"]] == [4, 4]
    setting = report_text(paper, "smoke", grid, {}, [], [], (0.0, 0.0, 1))
    assert '"seq_len": 4' in setting and '"seq_len": 9' not in setting  # the report says what ran
    assert [d["seq_len"] for d in paper_grid(read_paper(write_paper(tmp_path, TINY)), "smoke")["datasets"]] == [6]


def write_paper(tmp_path, text):
    path = tmp_path / "paper.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "old, new, said",
    [
        ('quantity = "final_excess"', 'quantity = "final_loss"', "[[claims]] entry 0 (impossible): unknown quantity"),
        ('op = "<"', 'op = "=="', "[[claims]] entry 0 (impossible): op must be one of"),
        ('source = "Fig. 1"\npaper = "never"', 'paper = "never"', "[[claims]] entry 0 (impossible): lacks source"),
        ("value = -1.0", 'value = -1.0\nthan = "final_excess"', "give exactly one of value"),
        ("[scales.smoke]", "[scales.huge]", "[scales]: unknown key 'huge'"),
        ("snapshots = 2, ", "", "keeps no snapshots"),
        ("seeds = [1, 2]", "seeds = [1, 2]\nseq_len = 1", "[scales]: smoke: seq_len must be an integer >= 2"),
        ('tag = "only"', 'tag = "only"\ndataset = 3', "[[experiments]] entry 0: dataset must be an index 0..0"),
        ('file = "dynamics_loss.png"', 'file = "loss.png"', "[[figures]] entry 0: file 'loss.png' is no dynamics"),
    ],
)
def test_a_bad_paper_is_refused_naming_the_file_and_the_entry(tmp_path, old, new, said):
    assert old in TINY
    path = write_paper(tmp_path, TINY.replace(old, new, 1))
    with pytest.raises(NanoMarkovError) as caught:
        read_paper(path)
    assert str(caught.value).startswith(str(path)) and said in str(caught.value)


def test_an_unreachable_slurm_is_one_line_of_ours_and_makes_no_folder(tmp_path, capsys, monkeypatch):
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "sbatch").write_text(
        "#!/bin/sh\necho 'sbatch: error: Unable to contact slurm controller' >&2\nexit 1\n"
    )
    (bin_folder / "scontrol").write_text("#!/bin/sh\necho 'Slurmctld(primary) at vm is DOWN'\nexit 1\n")
    for tool in ("sbatch", "scontrol"):
        (bin_folder / tool).chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_folder))
    assert main(["reproduce", "shai2024-mess3", "--out", str(tmp_path / "u" / "r7"), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SLURM's controller does not answer" in err[0] and "--launcher local" in err[0], err
    assert not (tmp_path / "u").exists()


def test_the_command_line_refuses_in_one_line_and_lists_the_papers(tmp_path, capsys):
    assert main(["reproduce", "no-such-paper", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no paper 'no-such-paper'" in err and not (tmp_path / "out").exists()
    assert (
        main(["reproduce", "shai2024-mess3", "--out", str(tmp_path / "out"), "--launcher", "slurm", "--jobs", "2"]) == 2
    )
    assert "--array_parallelism" in capsys.readouterr().err and not (tmp_path / "out").exists()
    for flag, value in [("--jobs", "0"), ("--jobs", "-1"), ("--threads", "0"), ("--threads", "-1")]:
        # checked before the folder is made, as train checks --threads
        assert main(["reproduce", "shai2024-mess3", "--out", str(tmp_path / "u" / "r7"), flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "an integer >= 1" in err and not (tmp_path / "u").exists(), err
    assert main(["reproduce", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in paper_names()) and PAPERS_DIR.is_dir()


def test_reproduce_and_sweep_refuse_threads_and_jobs_below_one(tmp_path):
    # The library's own check, for callers that skip the command line: nothing is written.
    for jobs, threads in [(1, 0), (1, -1), (1, "many"), (0, None)]:
        with pytest.raises(NanoMarkovError, match="must be"):
            reproduce("shai2024-mess3", tmp_path / "r", jobs=jobs, threads=threads)
        with pytest.raises(NanoMarkovError, match="must be"):
            run_sweep(paper_grid(read_paper("shai2024-mess3"), "smoke"), tmp_path / "s", jobs=jobs, threads=threads)
    assert not any(tmp_path.iterdir())


def test_a_paper_files_errors_say_paper_and_give_a_papers_fix(tmp_path):
    (tmp_path / "p.toml").write_bytes(b"#" * (MAX_GRID_BYTES + 1))
    (tmp_path / "bad.toml").write_text("[paper\n")
    for name, said in [("p.toml", "paper "), ("missing.toml", "cannot read paper "), ("bad.toml", "paper ")]:
        with pytest.raises(NanoMarkovError) as caught:
            read_paper(tmp_path / name)
        message = str(caught.value)
        assert message.startswith(said) and "grid" not in message and "sweep --out" not in message, message
    with pytest.raises(NanoMarkovError, match=r"a few kilobytes; give a paper's name \(nanomarkov reproduce --list\)"):
        read_paper(tmp_path / "p.toml")


def dynamics_without_plots(record, folder):
    """write_dynamics's dynamics.json and an empty loss plot: the plots are test_dynamics's, and cost seconds."""
    (folder / "dynamics.json").write_text(json_text(record))
    (folder / "dynamics_loss.png").write_bytes(b"")


def test_a_paper_runs_end_to_end_resumes_and_its_claims_are_judged(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_run, "write_sweep_report", lambda root, progress: None)  # test_report's
    monkeypatch.setattr(sweep_run, "write_dynamics", dynamics_without_plots)
    path, out = write_paper(tmp_path, TINY), tmp_path / "out"
    outcome = reproduce(path, out, scale="smoke", progress=lambda line: None)
    claims = json.loads((out / "claims.json").read_text())
    assert [c["holds"] for c in claims] == [False, True] and outcome["failed"] == []
    assert all({"id", "claim", "paper", "ours", "holds"} <= set(c) for c in claims)
    assert claims[0]["ours"].endswith("(2 seeds)")
    report = (out / "report.md").read_text()
    assert "**1 of 2 claims hold**" in report and "(figures/only-dynamics_loss.png)" in report
    assert (out / "figures" / "only-dynamics_loss.png").is_file()
    assert "impossible" in claims_table([outcome])
    dynamics = sorted(out.rglob("dynamics.json"))
    stamps = [p.stat().st_mtime_ns for p in dynamics]
    again = reproduce(path, out, scale="smoke", progress=lambda line: None)  # resumed: nothing to redo
    assert again["claims"] == outcome["claims"] and [p.stat().st_mtime_ns for p in dynamics] == stamps
    record = json.loads((out / "reproduce.json").read_text())
    assert record["calls"] == 2 and record["seconds"] >= outcome["seconds"] + again["seconds"] - 0.2
    other = tmp_path / "other.toml"
    other.write_text(TINY)
    with pytest.raises(NanoMarkovError, match="holds paper at scale smoke; give --out a new folder for other"):
        reproduce(other, out, scale="smoke", progress=lambda line: None)


@pytest.mark.parametrize("name", paper_names())
def test_every_shipped_paper_runs_at_smoke_scale(name, tmp_path, monkeypatch):
    """CI's smoke run of each paper: the runner and every claim's check go through (holds is whatever it is)."""
    monkeypatch.setattr(sweep_run, "write_sweep_report", lambda root, progress: None)
    monkeypatch.setattr(
        incontext, "THEORY_SEQUENCES", incontext.MIN_THEORY_SEQUENCES
    )  # its precision: test_incontext's
    monkeypatch.setattr(sweep_run, "write_dynamics", dynamics_without_plots)
    outcome = reproduce(name, tmp_path / "out", scale="smoke", progress=lambda line: None)
    claims = json.loads((tmp_path / "out" / "claims.json").read_text())
    assert outcome["failed"] == [] and [c["id"] for c in claims] == [c.id for c in read_paper(name).claims]
    assert all(isinstance(c["holds"], bool) and c["ours"] for c in claims)


def test_a_folder_of_other_files_is_refused_and_left_as_it_was(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["reproduce", "shai2024-mess3", "--scale", "smoke", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "notes.txt" in err and "--force" in err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"
