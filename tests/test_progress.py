"""nanomarkov/progress.py: long work says how far it is once it takes a while (and nothing before), and a stop
ends the process within its grace even when the main thread is inside one long call."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nanomarkov import data
from nanomarkov.cli import stop_deadline
from nanomarkov.data import generate_dataset
from nanomarkov.progress import Heartbeat, StopDeadline, duration_text, stopped_line


def test_a_heartbeat_says_nothing_for_quick_work():
    said = []
    with Heartbeat("quick", 10, "tokens", say=said.append, after=5) as beat:
        beat.advance(10)
    assert said == []


def test_a_heartbeat_says_how_far_long_work_is_from_its_own_thread():
    said = []
    with Heartbeat("generate d", 200, "tokens", waiting="building", say=said.append, after=0.02, every=0.02) as beat:
        time.sleep(0.1)  # the main thread busy elsewhere: the lines still come
        first = len(said)
        beat.advance(50)
        time.sleep(0.1)
    assert first >= 1 and said[0].startswith("generate d: building, ")
    assert "generate d: 50 of 200 tokens (25 %, about " in said[-1] and said[-1].endswith("s")


def test_a_heartbeat_tells_the_time_left_at_the_rate_so_far():
    beat = Heartbeat("trial 0", 200, "iterations")
    beat.started -= 100  # 50 iterations in 100 s: the other 150 take 300 s
    beat.advance(50)
    assert beat.status() == "50 of 200 iterations (25 %, about 5 min left)"


def test_a_duration_is_told_in_the_unit_a_person_reads():
    assert [duration_text(s) for s in (5, 130, 7200, 3 * 86400, 1e13)] == [
        "5 s",
        "2.17 min",
        "2 h",
        "3 days",
        "3.17e+05 years",
    ]


# A command whose handler for SIGTERM does not end it (as a main thread inside one long numpy call cannot
# run the handler that would): the deadline must.
STUCK = """
import signal, sys, time
from nanomarkov.progress import StopDeadline
signal.signal(signal.SIGTERM, lambda *args: None)
with StopDeadline(grace=float(sys.argv[1])):
    print("ready", flush=True)
    time.sleep(30)
"""


def stuck_command(grace, signals):
    child = subprocess.Popen(
        [sys.executable, "-c", STUCK, str(grace)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert child.stdout.readline() == "ready\n"
    started = time.monotonic()
    for signum in signals:
        child.send_signal(signum)
        time.sleep(0.2)  # two at once would be one pending signal
    _, err = child.communicate(timeout=20)
    return child.returncode, err, time.monotonic() - started


def test_a_stop_the_command_cannot_act_on_ends_the_process_at_its_deadline():
    code, err, seconds = stuck_command(0.3, [signal.SIGTERM])
    assert code == 128 + signal.SIGTERM and 0.3 <= seconds < 5
    assert err == stopped_line(signal.SIGTERM, " (0s after it, inside a long computation)") + "\n"


def test_a_second_stop_ends_the_process_at_once():
    code, err, seconds = stuck_command(60, [signal.SIGTERM, signal.SIGTERM])
    assert code == 128 + signal.SIGTERM and seconds < 5 and err.startswith("stopped by SIGTERM: nothing is half")


def test_the_theory_that_may_take_minutes_comes_before_the_build_folder(tmp_path, monkeypatch):
    """A stop the deadline ends inside the theory's numpy calls then leaves no build behind."""

    real, seen = data.theory_record, []

    def theory_record(chain, seq_len):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        return real(chain, seq_len)

    monkeypatch.setattr(data, "theory_record", theory_record)
    generate_dataset(tmp_path / "d", 3, 4, 2, seq_len=8)
    assert seen == [["d"]]  # only the folder its lock holds: no .d.partial-* build yet


def test_the_ranks_of_a_process_group_have_no_deadline():
    """They stop together through their collectives; one ended alone would leave the others waiting."""
    assert isinstance(stop_deadline({}), StopDeadline)
    assert isinstance(stop_deadline({"SLURM_STEP_NUM_TASKS": "1"}), StopDeadline)
    assert not isinstance(stop_deadline({"RANK": "0", "WORLD_SIZE": "2"}), StopDeadline)
    assert not isinstance(stop_deadline({"SLURM_STEP_NUM_TASKS": "4"}), StopDeadline)


def test_two_stops_read_at_once_are_the_second_stop(monkeypatch):
    """A second Ctrl-C that comes before the watching thread has read the first (a busy CPU) is in the same read."""
    said, exits = [], []
    deadline = StopDeadline(grace=2, say=said.append)
    deadline.read_end, write_end = os.pipe()
    os.write(write_end, bytes([signal.SIGINT, signal.SIGINT]))
    monkeypatch.setattr(os, "_exit", exits.append)
    try:
        deadline.watch()
    finally:
        os.close(deadline.read_end)
        os.close(write_end)
    assert exits == [128 + signal.SIGINT] and said == [stopped_line(signal.SIGINT)]  # at once, not "2s after it"


def test_a_worker_starts_with_the_stop_signals_held_back_even_the_first_one():
    """The first worker a command starts also starts multiprocessing's resource tracker, which unblocks SIGINT
    and SIGTERM behind start_worker's back; a Ctrl-C during the worker's imports would then end it with a
    traceback. A fresh interpreter, so that no test has started the tracker before."""
    script = Path(__file__).with_name("held_back_worker.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{sorted(int(sig) for sig in (signal.SIGINT, signal.SIGTERM))}\n"
