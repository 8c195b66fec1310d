"""The local launcher: a sweep's runs on this machine, one at a time or a few at once.

It is handed what to run, `run(spec, threads) -> result dict` (which must never raise), and
reports through on_start(spec) and on_finish(spec, result).

A stop of the sweep (Ctrl-C, SIGTERM, or on_finish raising because a run came back stopped) reaches each
worker (progress.stop_workers): each stops as a lone `train` does, with a checkpoint after its step, and
the sweep waits for them before it ends, so that none goes on training alone.
"""

from contextlib import suppress
from multiprocessing import get_context
from multiprocessing.connection import wait

from nanomarkov.progress import WorkerStopped, start_worker, stop_workers, worker_signals


def run_here(run, specs, threads, on_start, on_finish):
    """Each run in this process: no start-up cost, and tracebacks stay readable under a debugger."""
    for spec in specs:
        on_start(spec)
        on_finish(spec, run(spec, threads))


def serve(run, threads, connection):
    """A worker process's body: run each spec the parent sends, send back its result; end at None or a stop."""
    try:
        worker_signals()  # a stop held back while the worker started is raised here
        while (spec := connection.recv()) is not None:
            connection.send(run(spec, threads))
    except (WorkerStopped, KeyboardInterrupt, EOFError, BrokenPipeError):
        pass  # stopped, or the parent has gone: the parent says the one line, and the run resumes next time


class Worker:
    """One worker process and its end of the pipe to it; `spec`: the run it is on (None: idle)."""

    def __init__(self, context, run, threads):
        self.connection, theirs = context.Pipe()
        self.process = start_worker(context.Process(target=serve, args=(run, threads, theirs)))
        theirs.close()
        self.spec = None

    def give(self, spec):
        """Send the worker a spec (None: end once the run under way is over)."""
        with suppress(OSError):  # a worker that died has no end to send to; wait() then sees its pipe closed
            self.connection.send(spec)

    def last(self):
        self.give(None)

    def result(self):
        """The result of its run, or a failure where the worker died without sending one."""
        try:
            return self.connection.recv()
        except (EOFError, OSError):
            self.process.join()
            code = self.process.exitcode
            return {"state": "failed", "error": f"worker died (exit code {code}) during the run", "seconds": 0}


def run_in_pool(run, specs, jobs, threads, on_start, on_finish):
    """`jobs` runs at a time, each in a worker process; `run` must be picklable (a module-level function)."""
    # 'spawn': a fresh interpreter per worker, safe with torch's threads (fork is not).
    context, queue, workers = get_context("spawn"), list(specs), []
    try:
        while queue or any(w.spec is not None for w in workers):
            workers = [w for w in workers if w.spec is not None or w.process.is_alive()]
            while len(workers) < min(jobs, len(queue) + len(workers)):
                workers.append(Worker(context, run, threads))
            for worker in workers:
                if worker.spec is None and queue:
                    worker.spec = queue.pop(0)
                    on_start(worker.spec)
                    worker.give(worker.spec)
            busy = {w.connection: w for w in workers if w.spec is not None}
            for connection in wait(list(busy)):
                worker = busy[connection]
                spec, worker.spec = worker.spec, None
                on_finish(spec, worker.result())
    except BaseException:
        for worker in workers:
            worker.last()  # a worker whose run stops goes back for its next spec: this one ends it
        stop_workers([w.process for w in workers])
        raise
    for worker in workers:
        worker.last()
        worker.process.join()
