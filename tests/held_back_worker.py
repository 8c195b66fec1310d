"""A fresh interpreter (no multiprocessing resource tracker yet) that starts one worker with progress.start_worker
and prints the stop signals still blocked in the worker when its body begins, before worker_signals runs:
for tests/test_progress.py, which expects both."""

import multiprocessing
import signal

from nanomarkov.progress import STOP_SIGNALS, start_worker


def report_blocked(connection):
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    connection.send(sorted(int(sig) for sig in STOP_SIGNALS & blocked))


if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    worker = start_worker(context.Process(target=report_blocked, args=(theirs,)))
    print(ours.recv(), flush=True)
    worker.join()
