"""nanomarkov/files.py: atomic replaces and strict JSON."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import nanomarkov.files
from nanomarkov import NanoMarkovError, files
from nanomarkov.files import (
    json_text,
    partial_path,
    read_json,
    read_json_or_none,
    write_atomic,
    write_atomic_together,
    write_json,
    writer_lock,
)


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
with writer_lock(sys.argv[1], "run"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_while_the_first_holds_the_lock_and_not_after_it_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(NanoMarkovError, match=rf"another run is writing here \(pid {holder.pid} on"):
            with writer_lock(tmp_path, "run"):
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
        (2**60, "1,024.0 PiB"),
    ],
)
def test_format_bytes_shows_a_small_size_in_a_unit_that_shows_it(n_bytes, text):
    assert files.format_bytes(n_bytes) == text
