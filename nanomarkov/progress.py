"""Long work that says how far it is, and that ends soon after it is asked to stop.

`Heartbeat`: a line on stderr every few seconds, once a piece of work has taken a few, from a thread of
its own, so that it speaks even while the main thread is inside one long computation (a 15000x15000
linear solve, a forward pass over 100,000-token sequences): work that is quick says nothing.

`StopDeadline`: Python runs a signal's handler only between two bytecodes of the main thread, so a
Ctrl-C or SIGTERM that lands inside one long call into numpy or torch waits for that call to return
(minutes). The signal also wakes a thread here (through signal.set_wakeup_fd); if the command has not
ended `grace` seconds later, or a second signal comes, the process ends there with the signal's exit code.
That is safe because nothing the package writes is ever half-written in place: a dataset is built in a
hidden folder swapped in whole (the next `generate` removes a build a stop left), a checkpoint is
written under a temporary name and renamed, so a run resumes from its last checkpoint.

A command that trains in worker processes (a sweep's --jobs, tune's --jobs) passes a stop on to them:
`start_worker` starts one with SIGINT/SIGTERM held back until `worker_signals` (its first act) can hear them;
`stop_workers` sends SIGTERM to each and waits for them, each stopping as a lone `train` does (after its step,
with a checkpoint), within STOP_GRACE_SECONDS; a worker whose parent is gone ends at once, so no stop of
the parent, however hard, leaves a worker training alone.

This module imports nothing of the package, so that every layer may use it.
"""

import contextlib
import multiprocessing
import os
import select
import signal
import sys
import threading
import time
from multiprocessing import resource_tracker

# A stop's handler has this long to end the command (finish a step, save a checkpoint, remove a build).
STOP_GRACE_SECONDS = 10.0
# How long a command waits for its workers to stop: longer than a training step and the checkpoint after it,
# with 2 s of STOP_GRACE_SECONDS left for the command's own last writes (the sweep's manifest) and its exit.
WORKERS_STOP_SECONDS = STOP_GRACE_SECONDS - 2.0
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
# A heartbeat's first line comes after this many seconds of work, the next ones this far apart.
HEARTBEAT_AFTER_SECONDS, HEARTBEAT_EVERY_SECONDS = 5.0, 10.0


def stopped_line(signum, when=""):
    """The one line of a command a signal stopped: what is kept, and what to do."""
    return (
        f"stopped by {signal.Signals(signum).name}{when}: nothing is half-written (a dataset is whole or absent, "
        "a run resumes from its last checkpoint); run the same command again"
    )


def say_on_stderr(line):
    """One line on stderr, never an exception (stderr may be gone)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def duration_text(seconds):
    """A duration a person reads at a glance: 42 s, 7.5 min, 3.2 h, 12 days, 3.4e+05 years."""
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.0f} s"


class Heartbeat:
    """While its block runs: `say(f"{what}: {status}, {seconds}s")` every `every` seconds once `after` have passed.

    `advance(n)` counts work done (tokens, batches): the status is then "done of total unit (pct %, about T
    left)" at the rate so far; before any, `waiting` (what the work is doing before it can count)."""

    def __init__(self, what, total=None, unit="", waiting="working", say=say_on_stderr, after=None, every=None):
        self.what, self.total, self.unit, self.waiting, self.say = what, total, unit, waiting, say
        self.after = HEARTBEAT_AFTER_SECONDS if after is None else after
        self.every = HEARTBEAT_EVERY_SECONDS if every is None else every
        self.done, self.started = 0, time.monotonic()
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self.beat, name=f"heartbeat of {what}", daemon=True)

    def advance(self, n=1):
        self.done += n

    def status(self):
        if not self.done:
            return self.waiting
        if not self.total:
            return f"{self.done:,} {self.unit}".rstrip()
        left = (time.monotonic() - self.started) * (self.total - self.done) / self.done
        share = f"{100 * self.done / self.total:.0f} %, about {duration_text(left)} left"
        return f"{self.done:,} of {self.total:,} {self.unit} ({share})".replace("  ", " ")

    def beat(self):
        wait = self.after
        while not self.finished.wait(wait):
            self.say(f"{self.what}: {self.status()}, {time.monotonic() - self.started:.0f}s")
            wait = self.every

    def __enter__(self):
        self.started = time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.finished.set()
        self.thread.join()


class StopDeadline:
    """In its block (in the main thread): a SIGINT or SIGTERM that the command's own handlers have not ended it
    for within `grace` seconds, or a second one, ends the process with the signal's exit code (128 + its number)
    and one line on stderr saying what is kept."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, grace=None, say=say_on_stderr):
        self.grace = STOP_GRACE_SECONDS if grace is None else grace
        self.say = say
        self.read_end = self.write_end = None
        self.previous_fd = -1
        self.thread = None

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set the wakeup fd; a thread's command has no signals
        self.read_end, self.write_end = os.pipe()
        os.set_blocking(self.write_end, False)  # the C handler must never block on a full pipe
        self.previous_fd = signal.set_wakeup_fd(self.write_end, warn_on_full_buffer=False)
        self.thread = threading.Thread(target=self.watch, name="stop deadline", daemon=True)
        self.thread.start()
        return self

    def watch(self):
        stops = self.next_stops(None)
        if not stops:
            return
        # Two stops may come in one read (a second Ctrl-C while this thread waited for a busy CPU): that is the second.
        later = stops[1:] or self.next_stops(time.monotonic() + self.grace)
        if later == "closed":
            return
        late = "" if later else f" ({self.grace:.0f}s after it, inside a long computation)"
        self.say(stopped_line(stops[0], late))
        os._exit(128 + stops[0])

    def next_stops(self, deadline):
        """The numbers of the next SIGINTs/SIGTERMs read at once; [] at the deadline (or, without one, once the
        block has ended); 'closed' once the block has ended before the deadline."""
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if deadline is not None and timeout == 0.0:
                return []
            readable, _, _ = select.select([self.read_end], [], [], timeout)
            if not readable:
                return []
            data = os.read(self.read_end, 64)
            if not data:
                return "closed" if deadline is not None else []
            stops = [number for number in data if number in self.SIGNALS]
            if stops:
                return stops

    def __exit__(self, *exc):
        if self.thread is None:
            return
        signal.set_wakeup_fd(self.previous_fd)
        os.close(self.write_end)  # the watching thread reads the end of the pipe and returns
        self.thread.join()
        os.close(self.read_end)


class WorkerStopped(BaseException):
    """A worker process's SIGINT or SIGTERM outside training (training's own handlers stop it after a step): the
    worker ends quietly, the stop's one line being its parent's. A BaseException, like KeyboardInterrupt, so that
    no `except Exception` takes it for a run's failure."""


def raise_worker_stopped(signum, frame):
    raise WorkerStopped(signum)


def start_worker(process):
    """process.start() with SIGINT and SIGTERM blocked in the child until worker_signals: a Ctrl-C that reaches the
    process group while the child imports torch would otherwise end it with a traceback. They are blocked in this
    thread only while it starts the child (which inherits the mask); a stop that comes then is delivered after."""
    if threading.current_thread() is not threading.main_thread():
        process.start()
        return process
    # The first spawned process starts multiprocessing's resource tracker, which unblocks both signals once it has
    # started (not restoring the mask it found): started here first, it cannot undo the block below.
    resource_tracker.ensure_running()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return process


def worker_signals():
    """In a worker process, first: SIGINT/SIGTERM raise WorkerStopped (outside training), and the worker ends at
    once when its parent does (a parent ended hard, by a second stop or SIGKILL, must not leave it training).
    A signal the worker was started ignoring stays ignored (see inherited_ignored)."""
    handle_stops(raise_worker_stopped)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=end_with_parent, args=(parent.sentinel,), name="parent watch", daemon=True).start()


def inherited_ignored():
    """The stop signals this process was started ignoring: a shell without job control starts a command it runs in
    the background (`&`) with SIGINT ignored, so that the terminal's Ctrl-C leaves it running, and Python then
    leaves SIGINT ignored. The command's workers and its training loop keep them ignored too: a worker that took
    the Ctrl-C its parent ignores would end in the middle of its run, and the parent would report it failed."""
    return {sig for sig in STOP_SIGNALS if signal.getsignal(sig) == signal.SIG_IGN}


def handle_stops(handler):
    """`handler` for each stop signal this process was not started ignoring; returns the handlers it replaced."""
    return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS - inherited_ignored()}


def end_with_parent(sentinel):
    select.select([sentinel], [], [])  # readable once the parent has ended
    os._exit(128 + signal.SIGTERM)


def stop_workers(processes, wait_s=None):
    """SIGTERM to each worker still alive, then up to `wait_s` (WORKERS_STOP_SECONDS) for all to end; those still
    alive then are killed (SIGKILL: a checkpoint is never half-written, the run resumes from its last one).
    Returns how many were killed."""
    deadline = time.monotonic() + (WORKERS_STOP_SECONDS if wait_s is None else wait_s)
    for process in processes:
        if process.is_alive():
            process.terminate()  # SIGTERM
    killed = 0
    with stops_left_to_the_deadline():
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
                killed += 1
    return killed


@contextlib.contextmanager
def stops_left_to_the_deadline():
    """In its block, a further Ctrl-C or SIGTERM raises nothing in the main thread: the stop under way is being
    acted on, and a second one is StopDeadline's to end the process with (its one line), not a second exception
    whose line would follow the first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, ignore_signal) for number in StopDeadline.SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)


def ignore_signal(signum, frame):
    """A Python-level handler that does nothing: the C handler has already told StopDeadline's wakeup pipe."""
