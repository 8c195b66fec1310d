"""cli.main when the machine, not the input, fails: stdout on a full device, stderr full too, memory run out.
Each is one line on stderr (or silence where stderr is gone) and an exit code, never a traceback."""

import errno
import io
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from nanomarkov import cli
from nanomarkov.cli import main
from nanomarkov.data import load_dataset

SPEC = {"process": "markov", "transmat": [[0.9, 0.1], [0.5, 0.5]], "startprob": [0.5, 0.5]}


class FailingDevice(io.StringIO):
    """A stream whose every write fails as a full disk (ENOSPC) or a broken device (EIO) does."""

    def __init__(self, code):
        super().__init__()
        self.code = code

    def write(self, text):
        raise OSError(self.code, os.strerror(self.code))


@pytest.fixture
def spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chain.json").write_text(json.dumps(SPEC))
    return "chain.json"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("argv", [["theory", "--spec", "chain.json"], ["--help"]])
def test_stdout_on_a_failing_device_is_one_line_and_exit_1(spec, capsys, monkeypatch, code, argv):
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdout", FailingDevice(code))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot write to stdout")
    assert os.strerror(code) in err and "Traceback" not in err


def test_a_full_stdout_still_lets_the_command_finish_its_work(spec, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdout", FailingDevice(errno.ENOSPC))
    assert main(["generate", "3", "--train", "4", "--val", "2", "--seq_len", "6", "--out", "d"]) == 1
    assert "cannot write to stdout" in capsys.readouterr().err
    assert load_dataset("d").meta["train_sequences"] == 4  # the dataset is whole; only the summary was lost


def test_stdout_and_stderr_both_full_still_exit_1_without_raising(spec, monkeypatch):
    monkeypatch.setattr(sys, "stdout", FailingDevice(errno.ENOSPC))
    monkeypatch.setattr(sys, "stderr", FailingDevice(errno.ENOSPC))
    assert main(["theory", "--spec", "chain.json"]) == 1
    assert main(["theory", "--spec", "missing.json"]) == 2  # the error line is lost, its exit code is not


def test_a_full_stdout_at_exit_is_one_line_end_to_end(spec):
    """The real thing: block-buffered stdout on /dev/full fails when flushed, which Python otherwise does at exit."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # the buffered stdout a user has
    with open("/dev/full", "w") as full:
        child = subprocess.run(
            [sys.executable, "-m", "nanomarkov", "theory", "--spec", spec], stdout=full, stderr=subprocess.PIPE,
            text=True, env=env, timeout=120,
        )  # fmt: skip
    assert child.returncode == 1, child.stderr
    assert child.stderr.count("\n") == 1 and "No space left on device" in child.stderr


def allocate_everything(*args):
    return np.empty(2**60, dtype=np.uint8)  # numpy's own MemoryError, raised before any byte is taken


def torch_cpu_allocation(*args):
    return torch.empty(2**60, dtype=torch.uint8)  # torch's CPU allocator: a plain RuntimeError


def cuda_out_of_memory(*args):
    raise torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79 GiB"
    )


@pytest.mark.parametrize(
    ("fault", "memory", "size"),
    [(allocate_everything, "out of memory", "1.00 EiB"), (torch_cpu_allocation, "out of memory", "(asked for 1.0 EiB more)"),
     (cuda_out_of_memory, "out of GPU", "20.00 GiB")],
)  # fmt: skip
def test_out_of_memory_anywhere_in_a_verb_is_one_line_with_the_fix(spec, capsys, monkeypatch, fault, memory, size):
    monkeypatch.setattr(cli, "spec_theory_row", fault)
    assert main(["theory", "--spec", "chain.json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {memory}") and size in err and "--batch_size" in err


def test_another_runtime_error_is_not_taken_for_out_of_memory(spec, monkeypatch):
    def bug(*args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(cli, "spec_theory_row", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["theory", "--spec", "chain.json"])


class ClosedPipe(io.StringIO):
    """A stdout whose reader has gone (`| head -1`): every write fails as a closed pipe's does."""

    def write(self, text):
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


@pytest.mark.parametrize("verb", ["generate", "train"])
def test_a_closed_stdout_lets_the_command_finish_its_work_then_exits_141(spec, capsys, monkeypatch, verb):
    """A sweep prints through the same stdout: its runs go on the same way."""
    main(["generate", "3", "--train", "8", "--val", "4", "--seq_len", "8", "--out", "d"])
    argv = {
        "generate": ["generate", "3", "--train", "8", "--val", "4", "--seq_len", "8", "--out", "g"],
        "train": ["train", "d", "--out_dir=r", "--device=cpu", "--max_iters=4", "--warmup_iters=0", "--n_layer=1",
                  "--n_embd=8", "--n_head=1", "--batch_size=2", "--eval_interval=2", "--log_interval=1"],
    }[verb]  # fmt: skip
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(argv) == cli.EXIT_CLOSED_STDOUT
    assert capsys.readouterr().err == ""  # quietly, as a tool SIGPIPE ends
    if verb == "generate":
        assert load_dataset("g").meta["train_sequences"] == 8  # whole
    else:
        assert json.loads(Path("r/done.json").read_text())["iters"] == 4  # trained to its end, checkpointed
        assert torch.load("r/ckpt.pt", weights_only=True)["iter"] == 4


class Held:
    """Something a failing frame holds, whose going a weak reference sees."""


def test_out_of_memory_frees_the_failing_frames_before_its_line_and_needs_no_allocation(spec, capsys, monkeypatch):
    held = []

    class NoRoomForText(MemoryError):
        def __str__(self):
            raise MemoryError  # the detailed line cannot be built: memory is still short

    def fault(*args):
        big = Held()  # stands for what filled the memory: a local of the frames the error passes through
        held.append(weakref.ref(big))
        raise NoRoomForText

    said = []
    monkeypatch.setattr(cli, "spec_theory_row", fault)
    monkeypatch.setattr(cli, "say", lambda line: said.append((line, held[0]() is None)))
    assert main(["theory", "--spec", "chain.json"]) == 2
    assert said == [(cli.OUT_OF_MEMORY_LINE, True)]  # the fixed line, said once the frames' memory was let go


def test_a_size_in_bytes_in_an_allocation_error_is_shown_in_a_unit_that_shows_it():
    message = cli.out_of_memory_message(RuntimeError("not enough memory: you tried to allocate 8400 bytes."))
    assert "(asked for 8.2 KiB more)" in message  # not "0.0 GiB"
