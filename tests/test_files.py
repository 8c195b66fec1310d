"""nanomarkov/files.py: atomic replaces and strict JSON."""

import json
import math
import os
import subprocess
import sys

import pytest

from nanomarkov import NanoMarkovError
from nanomarkov.files import (
    json_text,
    partial_path,
    read_json,
    read_json_or_none,
    write_atomic,
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
