"""Every skipped test is listed at the end of the run, and a skip that tests/allowed_skips.txt does not
allow fails the run: a test that silently stops running cannot guard anything."""

import fnmatch
import os
import signal
from pathlib import Path

import pytest
import torch

ALLOWED_SKIPS = Path(__file__).with_name("allowed_skips.txt")
ALLOW_ANY_SKIP = "NANOMARKOV_ALLOW_SKIPS"  # set to 1 to list unexpected skips without failing


def read_allowed(path=ALLOWED_SKIPS):
    """[(node id glob, text the reason must contain)] from the allow-list file."""
    allowed = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        pattern, separator, reason = (part.strip() for part in line.partition("|"))
        if not separator or not pattern or not reason:
            raise pytest.UsageError(f"{path} line {number}: expected 'NODE_ID_GLOB | REASON TEXT', got {line!r}")
        allowed.append((pattern, reason))
    return allowed


def skip_reason(report) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


def is_allowed(node_id, reason, allowed) -> bool:
    return any(fnmatch.fnmatchcase(node_id, pattern) and text in reason for pattern, text in allowed)


class SkipGuard:
    def __init__(self, allowed):
        self.allowed = allowed
        self.unexpected = []

    def note(self, report):
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = skip_reason(report)
            if not is_allowed(report.nodeid, reason, self.allowed):
                self.unexpected.append(f"{report.nodeid}: {reason}")

    def pytest_runtest_logreport(self, report):
        self.note(report)

    def pytest_collectreport(self, report):
        self.note(report)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session):
        if self.unexpected and os.environ.get(ALLOW_ANY_SKIP) != "1" and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        if not self.unexpected:
            return
        failing = os.environ.get(ALLOW_ANY_SKIP) != "1"
        terminalreporter.section("skips not allowed by tests/allowed_skips.txt", red=failing, yellow=not failing)
        for line in self.unexpected:
            terminalreporter.write_line(line)
        terminalreporter.write_line(
            "these fail the run: install what they need (make test), allow them in tests/allowed_skips.txt "
            f"with the reason, or set {ALLOW_ANY_SKIP}=1 to only list them"
            if failing
            else f"{ALLOW_ANY_SKIP}=1: listed, not failing the run"
        )


def share_cores_between_workers():
    """Under pytest-xdist (`make test`), each worker takes its share of the cores: torch's default, every core in
    every process, oversubscribes them, and small models then run several times slower."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for the `python -m nanomarkov` subprocesses tests start
        torch.set_num_threads(threads)


def hear_ctrl_c():
    """The tests stand for a user at a terminal, whose Ctrl-C reaches a command in the foreground. A test runner
    started in the background (`make test &`) ignores SIGINT, and so would every command a test starts (an
    ignored signal stays ignored through exec): those tests would then test the background case instead."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_configure(config):
    hear_ctrl_c()
    share_cores_between_workers()
    config.pluginmanager.register(SkipGuard(read_allowed()), "nanomarkov-skip-guard")
