"""load_checkpoint / load_model refuse every file that is not a nanoMarkov checkpoint in one line
naming the file, the problem and the fix, without torch's warnings and without running pickled code."""

import dataclasses
import pickle
import subprocess
import sys

import pytest
import torch

from nanomarkov import NanoMarkovError
from nanomarkov.checkpoint import load_checkpoint, load_model
from nanomarkov.model import GPT, GPTConfig

FIX = "give a ckpt.pt that `nanomarkov train` wrote"


def small_model():
    return GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=3))


def save(path, model=None, **changes):
    """A checkpoint of `model` (a fresh small one by default) with some entries replaced by `changes`."""
    model = model or small_model()
    state = {"model": model.state_dict(), "model_args": dataclasses.asdict(model.config), "data_dir": "d"}
    state.update(changes.pop("entries", {}), **changes)
    torch.save(state, path)
    return path


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_good_checkpoint_loads(tmp_path):
    model = small_model()
    loaded, ckpt = load_model(save(tmp_path / "ckpt.pt", model))
    assert ckpt["data_dir"] == "d" and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_a_run_folder_stands_for_its_ckpt_pt(tmp_path):
    model = small_model()
    save(tmp_path / "ckpt.pt", model)
    loaded, ckpt = load_model(tmp_path)
    assert ckpt["data_dir"] == "d"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(NanoMarkovError, match="no checkpoint there") as err:
        load_checkpoint(empty)
    assert str(err.value).startswith(str(empty / "ckpt.pt"))


def weights_without_wte():
    state = small_model().state_dict()
    return {name: tensor for name, tensor in state.items() if name != "wte.weight"}


ARGS = dataclasses.asdict(small_model().config)
BAD_CHECKPOINTS = {
    "text": (lambda p: p.write_text("3\n"), r"a text file \(it starts '3\\n'\)"),
    "empty": (lambda p: p.write_bytes(b""), "an empty file"),
    "raw pickle": (lambda p: p.write_bytes(pickle.dumps({"model": 1})), "a raw pickle, not torch.save's format"),
    "not a dict": (lambda p: torch.save([1, 2], p), "it holds a list"),
    "no model": (lambda p: torch.save({"iter": 1}, p), "no 'model'"),
    "missing weight": (lambda p: save(p, entries={"model": weights_without_wte()}), "missing: wte.weight"),
    "extra weight": (
        lambda p: save(p, entries={"model": {**small_model().state_dict(), "head.bias": torch.zeros(3)}}),
        "extra: head.bias",
    ),
    "mis-shaped": (
        lambda p: save(p, model_args={**ARGS, "vocab_size": 5}),
        r"mis-shaped: wte.weight \(3, 8\) where the model has \(5, 8\)",
    ),
    "foreign args": (
        lambda p: save(p, model_args={"n_ctx": 4, "d_model": 8}),
        "model_args are not nanoMarkov's GPTConfig \\(unknown field\\(s\\) n_ctx, d_model; no n_layer",
    ),
    "invalid args": (lambda p: save(p, model_args={**ARGS, "n_layer": -1}), "invalid model_args .*n_layer"),
    "args not a dict": (lambda p: save(p, model_args=[1]), "model_args is a list, not a dict"),
    "weights not tensors": (lambda p: save(p, entries={"model": {"wte.weight": 1}}), "not a dict of tensors"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoints_are_refused_in_one_line(tmp_path, case):
    write, needle = BAD_CHECKPOINTS[case]
    path = tmp_path / "ckpt.pt"
    write(path)
    with pytest.raises(NanoMarkovError, match=needle) as err:
        load_model(path)
    message = str(err.value)
    assert message.startswith(str(path)) and FIX in message and "\n" not in message
    assert "weights_only" not in message


def test_an_unsafe_pickle_never_runs_and_torch_advice_is_dropped(tmp_path):
    marker = tmp_path / "code-ran"
    path = save(tmp_path / "ckpt.pt", payload=RunsCode(marker))
    with pytest.raises(NanoMarkovError, match=r"pickled object \(io.open\)") as err:
        load_checkpoint(path)
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("case", ["raw pickle", "text", "mis-shaped"])
def test_eval_of_a_bad_checkpoint_is_one_line_without_torch_warnings(tmp_path, case):
    path = tmp_path / "ckpt.pt"
    BAD_CHECKPOINTS[case][0](path)
    if case == "raw pickle":  # protocol 4: torch.load warns about it before failing
        path.write_bytes(pickle.dumps({"model": {"w": [1.0]}}, protocol=4))
    done = subprocess.run(
        [sys.executable, "-m", "nanomarkov", "export", str(path), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"error: {path}: ")
    assert "Warning" not in done.stderr and "Traceback" not in done.stderr
