"""`generate --spec` and `theory --spec`: a process given by a file, through the command line."""

import hashlib
import json

import numpy as np
import pytest

from nanomarkov.cli import main
from nanomarkov.data import generate_dataset, load_dataset
from nanomarkov.errors import NanoMarkovError

P, Q = 0.1, 0.3
SWITCHING_JSON = """{"process": "markov",
 "transmat": [[0.9, 0.1], [0.3, 0.7]],
 "startprob": "stationary"}
"""
SMALL = ["--train", "30", "--val", "20", "--seq_len", "12"]


def binary_entropy(p):
    return -p * np.log(p) - (1 - p) * np.log(1 - p)


def closed_form_entropy_rate():
    pi = np.array([Q, P]) / (P + Q)
    return pi[0] * binary_entropy(P) + pi[1] * binary_entropy(Q)


@pytest.fixture
def switching(tmp_path, monkeypatch):
    """The three-line switching chain as switching.json in a fresh working directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "switching.json").write_text(SWITCHING_JSON)
    return tmp_path / "switching.json"


def one_line_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def folder_bytes(folder):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def test_a_three_line_spec_generates_a_dataset_and_its_theory_is_the_closed_form(switching, capsys):
    assert main(["theory", "--spec", "switching.json", "--seq_len", "12", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["entropy_rate"] == pytest.approx(closed_form_entropy_rate(), rel=1e-12)
    assert row["spec"] == "switching.json" and row["seq_len"] == 12 and "true_loss_val" not in row
    assert not (switching.parent / "data").exists()  # theory writes nothing
    assert main(["theory", "--spec", "switching.json", "--seq_len", "12"]) == 0
    assert f"{row['entropy_rate']:.6f}" in capsys.readouterr().out

    assert main(["generate", "--spec", "switching.json", *SMALL]) == 0
    dataset = load_dataset(switching.parent / "data" / "switching")
    assert dataset.meta["process"] == "markov" and dataset.meta["n_states"] == 2
    assert dataset.meta["theory"]["entropy_rate"] == pytest.approx(closed_form_entropy_rate(), rel=1e-12)
    np.testing.assert_allclose(dataset.chain.startprob, np.array([Q, P]) / (P + Q), rtol=1e-12)
    assert dataset.meta["spec"]["fields"] == {"process": "markov", "startprob": "stationary"}
    assert dataset.meta["spec_file"] == {
        "path": "switching.json",
        "sha256": hashlib.sha256(SWITCHING_JSON.encode()).hexdigest(),
    }


def test_the_recorded_spec_and_seed_rebuild_the_dataset_byte_for_byte(switching, capsys):
    assert main(["generate", "--spec", "switching.json", *SMALL, "--seed", "7", "--out", "first"]) == 0
    meta = json.loads((switching.parent / "first" / "meta.json").read_text())
    (switching.parent / "first" / "val.bin").write_bytes(b"\0" * 4)  # damage it: its error prints the command
    with pytest.raises(NanoMarkovError, match="nanomarkov generate --spec switching.json") as error:
        load_dataset(switching.parent / "first")
    command = str(error.value).split("regenerate with: ")[1].split()
    assert command[:2] == ["nanomarkov", "generate"]
    assert main([*command[1:-3], "--out", "second"]) == 0  # the printed command, into another folder
    assert main(["generate", "--spec", "switching.json", *SMALL, "--seed", "7", "--out", "first", "--force"]) == 0
    first, second = folder_bytes(switching.parent / "first"), folder_bytes(switching.parent / "second")
    for name in ("chain.npz", "train.bin", "val.bin"):
        assert first[name] == second[name], name
    # From Python, a dict of the same spec: the same bytes, the same spec sha256.
    python = generate_dataset(
        switching.parent / "third", None, 30, 20, seq_len=12, seed=7, spec=json.loads(SWITCHING_JSON)
    )
    assert python["spec"] == meta["spec"] and "spec_file" not in python
    assert folder_bytes(switching.parent / "third")["train.bin"] == first["train.bin"]


def test_regenerating_the_same_spec_keeps_the_folder_and_another_spec_needs_force(switching, capsys):
    assert main(["generate", "--spec", "switching.json", *SMALL]) == 0
    before = folder_bytes(switching.parent / "data" / "switching")
    (switching.parent / "copy.json").write_text(SWITCHING_JSON.replace("\n ", " "))
    assert main(["generate", "--spec", "copy.json", *SMALL, "--out", "data/switching"]) == 0
    assert folder_bytes(switching.parent / "data" / "switching") == before
    switching.write_text(SWITCHING_JSON.replace("0.3, 0.7", "0.4, 0.6"))
    assert "already holds a different dataset (spec " in one_line_error(
        capsys, ["generate", "--spec", "switching.json", *SMALL]
    )
    assert folder_bytes(switching.parent / "data" / "switching") == before


@pytest.mark.parametrize(
    "flags, message",
    [
        (["2"], "K and --spec both give the process"),
        (["--process", "korder"], "--process and --spec both give the process"),
        (["--alpha", "2"], "--alpha and --spec both give the process"),
        (["--sparsity", "50", "--order", "2"], "--sparsity, --order and --spec both give the process"),
    ],
)
def test_flags_that_give_the_process_are_refused_beside_a_spec(switching, capsys, flags, message):
    assert message in one_line_error(capsys, ["generate", "--spec", "switching.json", *flags])
    assert not (switching.parent / "data").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["theory", "data/x", "--spec", "switching.json"], "not both"),
        (["theory", "data/x", "--seq_len", "5"], "--seq_len goes with --spec"),
        (["theory", "--spec", "switching.json", "--seq_len", "1"], "seq_len must be an integer >= 2"),
        (
            ["theory", "--spec", "switching.json", "--seq_len", str(2**28)],
            "iB table for its exact theory (at most 2.0 GiB)",
        ),
        (["generate"], "needs K"),
    ],
)
def test_theory_and_generate_usage_errors(switching, capsys, argv, message):
    assert message in one_line_error(capsys, argv)


def test_a_bad_spec_writes_nothing_and_leaves_an_existing_dataset_intact(switching, capsys):
    assert main(["generate", "--spec", "switching.json", *SMALL]) == 0
    folder = switching.parent / "data" / "switching"
    before = folder_bytes(folder)
    switching.write_text(SWITCHING_JSON.replace("0.3, 0.7", "0.3, 0.8"))
    for argv in (["generate", "--spec", "switching.json", *SMALL, "--force"], ["theory", "--spec", "switching.json"]):
        line = one_line_error(capsys, argv)
        assert "switching.json: spec field 'transmat' must sum to 1" in line and "row 1 sums to 1.1" in line, line
    assert folder_bytes(folder) == before
    assert sorted(p.name for p in switching.parent.iterdir()) == ["data", "switching.json"]
    assert sorted(p.name for p in (switching.parent / "data").iterdir()) == ["switching"]
    assert "bad.json: no spec file there" in one_line_error(capsys, ["generate", "--spec", "bad.json"])


def test_a_spec_without_arrays_is_whole_in_meta_and_an_npz_spec_is_the_json_one(switching, capsys):
    named = {"process": "switching", "p": P, "q": Q}
    meta = generate_dataset("named", None, 30, 20, seq_len=12, seed=3, spec=named)
    assert meta["spec"]["fields"] == named and meta["spec"]["arrays"] == {} and meta["process"] == "switching"
    assert generate_dataset("again", None, 30, 20, seq_len=12, seed=3, spec=meta["spec"]["fields"]) == meta
    np.savez("switching.npz", process="markov", transmat=[[1 - P, P], [Q, 1 - Q]], startprob="stationary")
    assert main(["generate", "--spec", "switching.npz", *SMALL, "--seed", "3", "--out", "npz"]) == 0
    assert main(["generate", "--spec", "switching.json", *SMALL, "--seed", "3", "--out", "json"]) == 0
    from_npz, from_json = load_dataset("npz").meta, load_dataset("json").meta
    assert from_npz["spec"] == from_json["spec"] and from_npz["sha256"] == from_json["sha256"]
    assert from_npz["spec_file"]["path"] == "switching.npz"


@pytest.mark.parametrize(
    ("spec", "field"),
    [({"process": "icl", "concentration": [1e308, 1e308, 1e308]}, "'concentration'"),
     ({"process": "icl", "concentration": [1.0, 1e13]}, "'concentration'"),
     ({"process": "markov", "n_states": 3, "alpha": 1e300}, "'alpha'")],
)  # fmt: skip
def test_a_concentration_too_large_for_float64_is_refused_naming_its_field(tmp_path, monkeypatch, capsys, spec, field):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "huge.json").write_text(json.dumps(spec))
    for argv in (["theory", "--spec", "huge.json"], ["generate", "--spec", "huge.json", *SMALL]):
        line = one_line_error(capsys, argv)  # one line: no numpy warning before it
        assert f"spec field {field}" in line and "1e+12" in line and "transmat" not in line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["huge.json"]


@pytest.mark.parametrize("process", ["markov", "icl"])
def test_an_alpha_too_large_for_float64_is_refused_naming_the_flag(tmp_path, monkeypatch, capsys, process):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, ["generate", "3", "--process", process, "--alpha", "1e308", *SMALL])
    assert line.startswith("error: --alpha") and "1e+12" in line and "transmat" not in line


def test_a_chain_with_several_closed_classes_is_one_note_line_in_the_tools_words(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    spec = {"process": "markov", "transmat": [[1, 0, 0], [0, 1, 0], [0.5, 0.25, 0.25]], "startprob": [0.2, 0.3, 0.5]}
    (tmp_path / "two.json").write_text(json.dumps(spec))
    assert main(["theory", "--spec", "two.json"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("note: the chain has 2 closed classes") and err.count("\n") == 1
    assert "Warning" not in err and ".py" not in err  # no category, no source line
