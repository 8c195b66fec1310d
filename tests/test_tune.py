"""nanomarkov tune: a tiny study writes its storage, best recipe and report; train takes the recipe as it is;
a trial left RUNNING by a dead worker is failed on rerun and no finished trial runs again; bad space input."""

import dataclasses
import socket
import subprocess
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from tune_worker_bodies import one_killed_one_survives

from nanomarkov.cli import main
from nanomarkov.config import load_config_file
from nanomarkov.data import generate_dataset
from nanomarkov.errors import NanoMarkovError
from nanomarkov.tune import (
    TuneSettings,
    base_recipe,
    check_space,
    check_storage,
    is_tune_folder,
    open_study,
    parse_space,
    run_local_workers,
    start_study,
    trial_config,
    tune,
)

# One MLP layer 16 wide on 16-token sequences: each trial is 8 optimizer steps.
TINY_SPACE = ["lr=1e-3:3e-2", "n_layer=1", "n_embd=16", "n_head=1", "batch_size=8", "mlp_only=True", "wd=0"]
TOKENS = 8 * 15 * 8


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("tune") / "mm3"
    generate_dataset(path, n_states=3, train_sequences=64, val_sequences=32, seq_len=16, seed=1)
    return path


def settings_for(data, out, trials):
    return TuneSettings(str(data), str(out), trials, TOKENS, parse_space(TINY_SPACE), "", evals=4)


@pytest.fixture(scope="module")
def tiny_study(tiny_data, tmp_path_factory):
    settings = settings_for(tiny_data, tmp_path_factory.mktemp("study") / "study", 3)
    code, best = tune(settings)
    return settings, code, best


def test_a_study_writes_its_storage_best_recipe_and_report(tiny_study):
    settings, code, best = tiny_study
    out = settings.out
    assert code == 0 and "best: trial" in best
    study = open_study(settings)
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 3
    for name in ("study.db", "best_recipe.py", "report.md", "history.png", "best_curve.png", "trials/0000/done.json"):
        assert Path(out, name).is_file(), name
    report = Path(out, "report.md").read_text()
    assert "| 0 (default) |" in report and "optuna-dashboard" in report


def test_the_first_trial_is_the_default_recipe_so_the_best_is_no_worse(tiny_study):
    settings, _, _ = tiny_study
    study = open_study(settings)
    first = study.trials[0]
    assert first.user_attrs.get("default") and first.params["learning_rate"] == pytest.approx(3e-3)
    if first.state == TrialState.COMPLETE:
        assert study.best_value <= first.value


def test_train_takes_the_best_recipe_as_it_is(tiny_study, tmp_path, monkeypatch):
    settings, _, _ = tiny_study
    recipe = f"{settings.out}/best_recipe.py"
    best = open_study(settings).best_trial.user_attrs["config"]
    assert {k: v for k, v in load_config_file(recipe).items() if k != "out_dir"} == {
        k: v for k, v in best.items() if k != "out_dir"
    }
    monkeypatch.chdir(tmp_path)
    assert main(["train", recipe]) == 0
    assert list(tmp_path.glob("trainings/*/*/done.json"))


def test_a_killed_trial_is_failed_on_rerun_and_no_finished_trial_runs_again(tiny_data, tmp_path):
    settings = settings_for(tiny_data, tmp_path / "study", 2)
    study = start_study(settings)
    done = study.ask()
    study.tell(done, 0.0)  # told through Optuna's API, better than any run: no config, so it is never the recipe
    killed = study.ask()  # a worker that died mid-trial: a pid that has exited
    dead = subprocess.Popen(["true"])
    dead.wait()
    killed.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    code, best_line = tune(settings)
    trials = open_study(settings).trials
    assert code == 0
    assert trials[done.number].state == TrialState.COMPLETE and trials[done.number].value == 0.0
    assert trials[killed.number].state == TrialState.FAIL
    assert len([t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 2
    assert "trial 0," not in best_line  # the best recipe is a trial that ran


@pytest.mark.parametrize(
    "entry, said",
    [
        ("lr", "not name=SPEC"),
        ("lr=1e-2:1e-4", "low <= high"),
        ("max_iters=1:9", "not a recipe field the tuner searches"),
        ("mlp_only=maybe", "is not True or False"),
        ("n_layer=a:b", "invalid literal"),
    ],
)
def test_bad_space_input_is_one_line_naming_the_syntax(entry, said):
    with pytest.raises(NanoMarkovError) as caught:
        parse_space([entry])
    assert said in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "space, said",
    [
        ("n_embd=16,17", "n_embd 17 does not divide"),
        ("batch_size=1:100000000000000", "--space batch_size=100000000000000: training"),
        ("data_source=fixed,bogus", "--space data_source=bogus: data_source must be"),
    ],
)
def test_a_space_no_trial_could_train_is_refused_before_anything_is_said_or_written(
    tiny_data, tmp_path, capsys, space, said
):
    out = tmp_path / "tqn"
    assert main(["tune", str(tiny_data), "--trials", "1", "--out", str(out), "--space", space, "--tokens", "999"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and said in err[0] and not captured.out and not out.exists(), captured
    assert "--batch_size" not in err[0]  # a fix tune has: narrow the space, not a flag of train's
    settings = dataclasses.replace(settings_for(tiny_data, out, 1), space=parse_space([space]))
    with pytest.raises(NanoMarkovError, match="--space"):
        start_study(settings)  # the library's own entry: the same check, before the folder is made
    assert not out.exists()


def test_the_default_space_passes_the_space_check(tiny_data, tmp_path):
    check_space(TuneSettings(str(tiny_data), str(tmp_path / "t"), 1, TOKENS, parse_space([]), ""))
    assert not (tmp_path / "t").exists()


def test_a_rerun_with_other_settings_is_refused(tiny_study):
    settings, _, _ = tiny_study
    other = TuneSettings(settings.data_dir, settings.out, 3, TOKENS * 2, settings.space, "", evals=4)
    with pytest.raises(NanoMarkovError, match="tokens differ"):
        start_study(other)


def test_optuna_is_the_library_opening_the_study(tiny_study):
    settings, _, _ = tiny_study
    assert optuna.load_study(study_name="nanomarkov-tune", storage=f"sqlite:///{settings.out}/study.db").trials


def test_a_users_own_tune_json_is_not_taken_for_a_study(tmp_path):
    (tmp_path / "tune.json").write_text('{"identity": "mine"}')
    assert not is_tune_folder(tmp_path)


def fake_slurm(folder, scontrol_rc):
    """A PATH folder with an sbatch that must never run and an scontrol whose ping exits `scontrol_rc`."""
    folder.mkdir()
    (folder / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: it ran' >&2\nexit 1\n")
    (folder / "scontrol").write_text(f"#!/bin/sh\necho 'Slurmctld(primary) at vm is DOWN'\nexit {scontrol_rc}\n")
    for tool in ("sbatch", "scontrol"):
        (folder / tool).chmod(0o755)
    return folder


def test_a_bad_storage_or_an_unreachable_slurm_is_refused_before_the_folder_is_made(
    tiny_data, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "t"
    assert main(["tune", str(tiny_data), "--out", str(out), "--storage", "postgresql://x/y", "--trials", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot open the study storage postgresql://x/y" in err[0], err
    assert not out.exists()
    monkeypatch.setenv("PATH", str(fake_slurm(tmp_path / "bin", 1)))
    assert main(["tune", str(tiny_data), "--out", str(out), "--launcher", "slurm", "--trials", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "controller does not answer (scontrol ping: Slurmctld(primary) at vm is DOWN)" in err[0]
    assert not out.exists()


def test_a_killed_local_worker_leaves_the_other_running(tmp_path, capsys):
    code = run_local_workers(str(tmp_path), 2, body=one_killed_one_survives)
    assert code == 1
    assert (tmp_path / "survived").exists()  # a pool that dies with one worker never writes it
    assert "1 of 2 workers died (signal/exit 9)" in capsys.readouterr().out


def test_each_trial_runs_with_the_threads_asked_for(tiny_data, tmp_path):
    settings = dataclasses.replace(settings_for(tiny_data, tmp_path / "study", 1), threads=2)
    base = base_recipe(settings)
    assert trial_config(settings, base, {}, 0, 16)["threads"] == 2


def test_a_trial_without_attention_drops_the_alibi_of_its_recipe_but_not_a_searched_one(tiny_data, tmp_path):
    settings = settings_for(tiny_data, tmp_path / "study", 1)
    base = {**base_recipe(settings), "alibi": True, "alibi_trained": True, "mlp_only": False}
    assert trial_config(settings, base, {"mlp_only": True}, 0, 16)["alibi"] is False
    assert trial_config(settings, base, {"mlp_only": False}, 1, 16)["alibi"] is True
    with pytest.raises(NanoMarkovError, match="mlp_only blocks have no attention"):  # a failed trial, its reason
        trial_config(settings, base, {"mlp_only": True, "alibi": True}, 2, 16)


def test_a_storage_file_in_a_system_folder_or_not_a_file_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(NanoMarkovError, match="system folder"):
        check_storage("sqlite:////etc/nanomarkov-study.db")
    with pytest.raises(NanoMarkovError, match="not a regular file"):
        check_storage(f"sqlite:///{tmp_path}")  # a folder where the database file would be
    check_storage(f"sqlite:///{tmp_path / 'study.db'}")  # a file of the user's: fine
    assert not Path("/etc/nanomarkov-study.db").exists()


def test_a_space_file_that_is_a_device_is_refused_unread(tmp_path):
    (tmp_path / "z.toml").symlink_to("/dev/zero")
    with pytest.raises(NanoMarkovError, match="cannot read the space file"):
        parse_space([str(tmp_path / "z.toml")])
