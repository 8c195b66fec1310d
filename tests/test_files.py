"""nanomarkov/files.py: atomic replaces and strict JSON."""

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import nanomarkov.files
from nanomarkov import NanoMarkovError, files
from nanomarkov.config import load_config_file
from nanomarkov.files import (
    check_output_folder,
    check_own_files,
    json_text,
    partial_path,
    protected_folder,
    read_json,
    read_json_or_none,
    write_atomic,
    write_atomic_together,
    write_json,
    writer_lock,
)
from nanomarkov.processes.spec import read_spec
from nanomarkov.sweep.grid import load_grid


def strict_loads(text):
    def refuse(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_are_written_as_null_at_any_depth():
    record = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": (2.5, "x"), "e": 3}
    assert strict_loads(json_text(record)) == {"a": None, "b": [1.0, None, {"c": None}], "d": [2.5, "x"], "e": 3}


def test_write_json_replaces_and_leaves_no_partial(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"v": 1})
    write_json(path, {"v": 2})
    assert read_json(path) == {"v": 2}
    assert not partial_path(path).exists()


def test_a_failed_write_keeps_the_old_file_and_removes_its_partial(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    write_json(path, {"v": 1})

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(NanoMarkovError, match="No space left on device.*free some space"):
        write_atomic(path, "{}", what="record")
    assert read_json(path) == {"v": 1}
    assert not partial_path(path).exists()


def test_a_write_stopped_midway_by_ctrl_c_keeps_the_old_file_and_removes_its_partial(tmp_path, monkeypatch):
    """A Ctrl-C (or a stop a signal handler raises) mid-write, not an OSError: the stop goes on, and no
    .partial is left behind (a stopped sweep left sweep.json.partial while saying nothing is half-written)."""
    path = tmp_path / "sweep.json"
    write_json(path, {"v": 1})

    def stopped(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", stopped)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "{}", what="record")
    assert read_json(path) == {"v": 1}
    assert not partial_path(path).exists()


@pytest.mark.parametrize("refused", ["open", "fsync"])
def test_a_write_on_a_read_only_file_system_is_one_error_however_the_cleanup_fails(tmp_path, monkeypatch, refused):
    """A read-only file system refuses open() and, even for a file that does not exist, unlink() (EROFS);
    one remounted read-only mid-write refuses the fsync and the unlink of the partial."""

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    if refused == "open":
        monkeypatch.setattr(nanomarkov.files, "open", read_only, raising=False)
    else:
        monkeypatch.setattr(os, "fsync", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(NanoMarkovError, match="Read-only file system"):
        write_atomic(tmp_path / "r.json", "{}", what="record")


def test_a_write_together_that_fails_on_one_file_replaces_none(tmp_path, monkeypatch):
    old = {tmp_path / "a": "old a", tmp_path / "b": "old b"}
    write_atomic_together(old)
    real_fsync, calls = os.fsync, []

    def full_on_the_second(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_on_the_second)
    with pytest.raises(NanoMarkovError, match="No space left on device"):
        write_atomic_together({path: "new" for path in old})
    assert {path: path.read_text() for path in old} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


@pytest.mark.parametrize("content", ["null", "[1, 2]", "{not json", b"\xff\xfe"])
def test_read_json_refuses_anything_but_an_object_with_the_fix(tmp_path, content):
    path = tmp_path / "meta.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(NanoMarkovError, match="meta.json: not a.*regenerate it"):
        read_json(path, what="dataset record", fix="regenerate it")
    assert read_json_or_none(path) is None


def test_read_json_names_a_missing_file(tmp_path):
    with pytest.raises(NanoMarkovError, match="no done record there; train it"):
        read_json(tmp_path / "done.json", what="done record", fix="train it")
    assert read_json_or_none(tmp_path / "done.json") is None


LOCK_HOLDER = """
import sys, time
from nanomarkov.files import writer_lock
with writer_lock(sys.argv[1], sys.argv[2]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_while_the_first_holds_the_lock_and_not_after_it_dies(tmp_path):
    command = [sys.executable, "-c", LOCK_HOLDER, str(tmp_path), "training run"]
    holder = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        # The holder's command is named, not the refused one's: a train holds the folder that dynamics wants.
        with pytest.raises(NanoMarkovError, match=rf"another training run is writing here \(pid {holder.pid} on"):
            with writer_lock(tmp_path, "dynamics"):
                pass
    finally:
        holder.kill()  # like kill -9: no clean-up code runs
        holder.wait()
    with writer_lock(tmp_path, "run"):  # the kernel released the dead holder's lock
        assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()
    assert not (tmp_path / ".lock").exists()  # released and removed


def test_a_lock_on_a_new_folder_that_stays_empty_leaves_no_folder(tmp_path):
    with pytest.raises(NanoMarkovError, match="refused"):
        with writer_lock(tmp_path / "run", "run"):
            raise NanoMarkovError("refused")
    assert not (tmp_path / "run").exists()


def test_a_lock_that_made_parent_folders_removes_those_left_empty(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(NanoMarkovError, match="refused"):
        with writer_lock(tmp_path / "kept" / "data" / "mm4", "generation"):
            raise NanoMarkovError("refused")  # e.g. not enough disk space for the dataset
    assert list((tmp_path / "kept").iterdir()) == []


def test_what_a_command_writes_is_never_put_over_what_it_did_not_write(tmp_path):
    (tmp_path / "train.bin").mkdir()  # a folder of the user's where the dataset has a file
    (tmp_path / "train.bin" / "thesis.tex").write_text("mine")
    with pytest.raises(NanoMarkovError, match=r"train.bin is not a file .* the dataset would replace it; move it"):
        check_own_files(tmp_path, ("meta.json", "train.bin"), "dataset")
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.md").write_text("my notes")  # no eval.json beside it: no evaluation wrote it
    with pytest.raises(
        NanoMarkovError, match=r"holds eval.md, which no model evaluation .* \(its eval.json is not there\)"
    ):
        check_own_files(run, ("eval.json", "eval.md"), "model evaluation", record="eval.json", marks=("run",))
    (run / "eval.json").write_text('{"mine": 1}')  # the user's eval.json: not an evaluation's
    with pytest.raises(NanoMarkovError, match=r"\(its eval.json is not its own\)"):
        check_own_files(run, ("eval.json", "eval.md"), "model evaluation", record="eval.json", marks=("run",))
    (run / "eval.json").write_text('{"run": {}}')  # an evaluation's: what it wrote beside it is its own
    check_own_files(run, ("eval.json", "eval.md"), "model evaluation", record="eval.json", marks=("run",))


def test_a_lock_in_a_folder_that_is_a_file_is_one_error(tmp_path):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(NanoMarkovError, match="cannot write in .*taken.*choose a folder you can write"):
        with writer_lock(tmp_path / "taken", "run"):
            pass


class NoRenameat2:
    """A C library without renameat2, as on systems where exchange_folders falls back to two renames."""


@pytest.mark.parametrize("has_renameat2", [True, False])
def test_exchange_folders_swaps_the_two_folders(tmp_path, monkeypatch, has_renameat2):
    if not has_renameat2:
        monkeypatch.setattr(files.ctypes, "CDLL", lambda *args, **kwargs: NoRenameat2())
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "data").write_text("new")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "data").write_text("old")
    files.exchange_folders(tmp_path / "new", tmp_path / "old")
    assert (tmp_path / "old" / "data").read_text() == "new" and (tmp_path / "new" / "data").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "old"]


@pytest.mark.parametrize(
    "n_bytes, text",
    [
        (0, "0 bytes"),
        (1023, "1023 bytes"),
        (1024, "1.0 KiB"),
        (8400, "8.2 KiB"),
        (5 * 2**20, "5.0 MiB"),
        (int(1.5 * 2**30), "1.5 GiB"),
        (3 * 2**40, "3.0 TiB"),
        (2**60, "1.0 EiB"),
        (2**100, "1,048,576.0 YiB"),
    ],
)
def test_format_bytes_shows_a_small_size_in_a_unit_that_shows_it(n_bytes, text):
    assert files.format_bytes(n_bytes) == text


def never_a_kind(folder):
    return False


@pytest.mark.parametrize("content", [{}, {".lock": "pid 1 on box\n"}, {".lock": ""}])
def test_a_new_or_empty_folder_is_written_into(tmp_path, content):
    folder = tmp_path / "out"
    assert check_output_folder(folder, "training run", never_a_kind) == folder  # new
    folder.mkdir()
    for name, text in content.items():  # the lock a killed writer leaves is no file of the user's
        (folder / name).write_text(text)
    assert check_output_folder(folder, "training run", never_a_kind) == folder


@pytest.mark.parametrize(
    "name, text", [("x.partial", "mine"), ("config.json.partial", "{"), (".x.partial-1", ""), (".lock", "my notes")]
)
def test_partial_files_and_a_lock_of_other_content_are_the_users(tmp_path, name, text):
    """Someone else's unfinished write, or their own .lock, is not a writer's leftover: the folder is not empty."""
    (tmp_path / name).write_text(text)
    with pytest.raises(NanoMarkovError, match=rf"holds files that are not a dataset \({name}\)"):
        check_output_folder(tmp_path, "dataset", never_a_kind)


@pytest.mark.parametrize("link", [False, True])
def test_a_lock_of_other_content_or_a_link_is_never_taken_over(tmp_path, link):
    (tmp_path / "out").mkdir()
    (tmp_path / "notes").write_text("pid 1 on box\n")  # a lock's content, but behind a link: truncated if opened
    if link:
        (tmp_path / "out" / ".lock").symlink_to(tmp_path / "notes")
    else:
        (tmp_path / "out" / ".lock").write_text("my notes")
    with pytest.raises(NanoMarkovError, match=r"\.lock is not a lock of nanoMarkov's .*move it away"):
        with writer_lock(tmp_path / "out", "generation"):
            pass
    assert (tmp_path / "notes").read_text() == "pid 1 on box\n"
    assert (tmp_path / "out" / ".lock").read_text() == ("pid 1 on box\n" if link else "my notes")


def test_a_record_is_told_by_its_content_not_its_name(tmp_path):
    (tmp_path / "meta.json").write_text('{"format_version": 1, "mine": true}')
    assert files.holds_record(tmp_path, "meta.json", ("format_version",))
    assert not files.holds_record(tmp_path, "meta.json", ("format_version", "theory"))
    assert not files.holds_record(tmp_path, "absent.json", ())


def test_a_link_to_a_folder_is_written_through_and_a_broken_one_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    assert check_output_folder(tmp_path / "link", "dataset", never_a_kind) == tmp_path / "real"
    assert check_output_folder(tmp_path / "link" / "sub", "dataset", never_a_kind) == tmp_path / "real" / "sub"
    (tmp_path / "dangling").symlink_to("nowhere")
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "file").write_text("mine")
    for folder, why in [
        (tmp_path / "dangling", "dangling is a link to nowhere, which does not exist"),
        (tmp_path / "loop" / "sub", "loop is a link to loop, which does not exist"),
        (tmp_path / "file" / "sub", "file is a file, not a folder"),
    ]:
        with pytest.raises(NanoMarkovError, match=f"cannot write the dataset to {folder}: .*{why}"):
            check_output_folder(folder, "dataset", never_a_kind, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "file", "link", "loop", "real"]


def test_the_current_folder_is_never_replaced_whole(tmp_path, monkeypatch):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "data" / "sub")
    for folder, parent, name in [
        (".", tmp_path / "data", "sub"),
        ("..", tmp_path, "data"),
        (tmp_path, tmp_path.parent, tmp_path.name),
    ]:
        with pytest.raises(NanoMarkovError, match=f"is the current folder .*; cd {parent} and give --out {name}$"):
            files.refuse_the_current_folder(folder, "generate", "a dataset")
    files.refuse_the_current_folder(tmp_path / "data" / "other", "generate", "a dataset")


def test_a_folder_of_other_files_is_refused_unless_it_is_of_the_kind_or_forced(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "config.json").write_text('{"mine": 1}')
    with pytest.raises(NanoMarkovError) as refused:
        check_output_folder(folder, "training run", never_a_kind, flag="--out_dir")
    message = str(refused.value)
    assert message.startswith(f"{folder} holds files that are not a training run (config.json)")
    assert "--out_dir a new or empty folder" in message and "--force" in message
    with pytest.raises(NanoMarkovError, match="new or empty folder$"):  # a command without --force says so
        check_output_folder(folder, "export", never_a_kind, force=None)
    check_output_folder(folder, "training run", lambda f: (f / "config.json").is_file())
    check_output_folder(folder, "training run", never_a_kind, force=True, writes=("ckpt.pt", "*.partial"))
    with pytest.raises(NanoMarkovError, match="a file, not a folder"):
        check_output_folder(folder / "config.json", "training run", never_a_kind, force=True)


def test_force_never_writes_over_or_removes_a_users_file(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "config.json").write_text('{"mine": 1}')
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(NanoMarkovError) as refused:  # a name the command writes: theirs would be replaced
        check_output_folder(folder, "training run", never_a_kind, force=True, writes=("config.json", "ckpt.pt"))
    assert str(refused.value).startswith(f"{folder} holds files of yours (config.json) and the training run would")
    assert "--force never replaces a file nanoMarkov did not write" in str(refused.value)
    with pytest.raises(NanoMarkovError, match=r"\(config.json, notes.txt\) and the dataset would replace the folder"):
        check_output_folder(folder, "dataset", never_a_kind, force=True)  # replaced whole: every entry is theirs
    with pytest.raises(NanoMarkovError, match=r"\(notes.txt\)"):  # fnmatch patterns
        check_output_folder(folder, "export", never_a_kind, force=True, writes=("*.txt",))
    assert check_output_folder(folder, "export", never_a_kind, force=True, writes=("model.safetensors",)) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "notes.txt"]


@pytest.mark.parametrize(
    "folder, why",
    [
        ("/", "the root folder"),
        ("/etc", "a system folder"),
        ("/usr/local/share/runs", "inside /usr, a system folder"),
        ("/proc/self", "inside /proc, a system folder"),
        ("/home", "a system folder"),
        ("/var", "a system folder"),
        ("/tmp/../", "the root folder"),
        ("/var/log", "inside /var, a system folder"),
        ("/var/lib/dpkg/new", "inside /var, a system folder"),
        ("/run/user", "inside /run, a system folder"),
        ("/opt", "a system folder"),
        ("/opt/some-package", "a system folder"),
        ("/srv/www", "a system folder"),
        ("/mnt/disk", "a system folder"),
        ("/media/usb", "a system folder"),
        ("/private/etc/x", "inside /private/etc, a system folder"),  # macOS's /etc, once its link is followed
        ("/Library/Preferences", "inside /Library, a system folder"),
        ("/tmp", "a system folder"),
        ("/var/tmp", "a system folder"),
        ("/home/someone", "a home folder"),
        ("/home/someone/.ssh", "a hidden folder of a home folder"),
        ("/root/.ssh", "a hidden folder of a home folder"),
        ("/root/.config/nanomarkov", "inside /root/.config, a hidden folder of a home folder"),
    ],
)
def test_the_root_and_system_folders_are_refused_even_with_force(folder, why):
    with pytest.raises(NanoMarkovError, match=f"is {why}: nanoMarkov writes no dataset there, even with --force"):
        check_output_folder(folder, "dataset", lambda f: True, force=True)


def test_a_home_folder_is_refused_even_with_force_but_a_folder_in_it_is_not(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    (tmp_path / "link").symlink_to(home)
    for folder in (home, tmp_path / "link", tmp_path / "link" / "."):
        with pytest.raises(NanoMarkovError, match="is a home folder"):
            check_output_folder(folder, "sweep", never_a_kind, force=True)
    assert protected_folder(home / "runs") == "" and protected_folder("/root/runs") == ""
    assert protected_folder(home / ".ssh") == "a hidden folder of a home folder"
    assert protected_folder(home / ".config" / "x") == f"inside {home / '.config'}, a hidden folder of a home folder"


@pytest.mark.parametrize(
    "folder", ["/tmp/runs", "/var/tmp/runs/mm10", "/opt/some-package/runs", "/mnt/disk/runs", "/home/someone/runs"]
)
def test_a_folder_of_its_own_below_a_temporary_or_holding_folder_is_writable(folder):
    """Only the predicate is asked: nothing is created outside the test's own folders."""
    assert protected_folder(folder) == ""


def within_seconds(call, seconds=5):
    """What `call()` raised, run in a thread that must finish within `seconds` (a hang fails, never blocks)."""
    outcome = []

    def run():
        try:
            call()
            outcome.append(None)
        except Exception as e:  # the test inspects what was raised
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still reading after {seconds} s"
    return outcome[0]


def user_named_readers():
    """Every reader of a file the user names that reads it whole, by a readable name."""
    return {
        "read_json": lambda path: read_json(path.with_suffix(".json")),
        "spec.json": lambda path: read_spec(path.with_suffix(".json")),
        "spec.npz": lambda path: read_spec(path.with_suffix(".npz")),
        "config": lambda path: load_config_file(path.with_suffix(".py")),
        "grid": lambda path: load_grid(path.with_suffix(".toml")),
    }


@pytest.mark.parametrize("reader", sorted(user_named_readers()))
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "/dev/urandom", "folder"])
def test_a_file_that_is_not_a_regular_file_is_refused_unread(tmp_path, reader, kind):
    suffix = {"read_json": ".json", "spec.json": ".json", "spec.npz": ".npz", "config": ".py", "grid": ".toml"}[reader]
    path = tmp_path / f"input{suffix}"
    if kind == "fifo":
        os.mkfifo(path)  # no writer: opening it for reading the usual way blocks forever
    elif kind == "folder":
        path.mkdir()
    else:
        path.symlink_to(kind)  # endless: read whole, it takes every byte of memory
    error = within_seconds(lambda: user_named_readers()[reader](path))
    expected = {"fifo": "a FIFO (named pipe)", "folder": "a folder"}.get(kind, "a character device")
    assert isinstance(error, NanoMarkovError), error
    assert f"{expected}, not a regular file" in str(error) and "\n" not in str(error)
    assert str(path) in str(error)


def test_a_regular_file_is_read_whole_only_up_to_its_cap(tmp_path):
    path = tmp_path / "big.json"
    text = '{"a": "' + "x" * 100 + '"}'
    path.write_text(text)
    assert files.read_capped(path, max_bytes=len(text)) == text.encode()
    with pytest.raises(OSError, match=rf"{len(text)} bytes, more than the 100 "):
        files.read_capped(path, max_bytes=100)
    with pytest.raises(
        NanoMarkovError, match=rf"big.json: not a readable file \({len(text)} bytes, more than the 100 "
    ):
        read_json(path, max_bytes=100)
