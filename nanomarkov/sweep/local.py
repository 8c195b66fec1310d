"""The local launcher: a sweep's runs on this machine, one at a time or a few at once.

It is handed what to run, `run(spec, threads) -> result dict` (which must never raise), and
reports through on_start(spec) and on_finish(spec, result).
"""

from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context


def run_here(run, specs, threads, on_start, on_finish):
    """Each run in this process: no start-up cost, and tracebacks stay readable under a debugger."""
    for spec in specs:
        on_start(spec)
        on_finish(spec, run(spec, threads))


def run_in_pool(run, specs, jobs, threads, on_start, on_finish):
    """`jobs` runs at a time, each in a worker process; `run` must be picklable (a module-level function)."""
    # 'spawn': a fresh interpreter per worker, safe with torch's threads (fork is not).
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        queue, running = list(specs), {}
        while queue or running:
            while queue and len(running) < jobs:
                spec = queue.pop(0)
                on_start(spec)
                running[pool.submit(run, spec, threads)] = spec
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                spec = running.pop(future)
                try:
                    result = future.result()
                except Exception as e:  # noqa: BLE001 - the worker process itself died
                    result = {"state": "failed", "error": f"worker died: {type(e).__name__}: {e}", "seconds": 0}
                on_finish(spec, result)
