"""A parent whose one worker (progress.start_worker, worker_signals) waits for ever: it prints the worker's pid,
then waits too, for tests/sweep/test_stop.py to kill it with SIGKILL and see the worker end with it."""

import multiprocessing
import time

from nanomarkov.progress import start_worker, worker_signals


def wait_for_ever():
    worker_signals()
    time.sleep(600)


if __name__ == "__main__":
    worker = start_worker(multiprocessing.get_context("spawn").Process(target=wait_for_ever))
    print(worker.pid, flush=True)
    time.sleep(600)
