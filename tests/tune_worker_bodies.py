"""Stand-ins for tune's worker body, for tests/test_tune.py: light (no torch), importable by a spawned process.

`settings` is a folder path: the first worker to create its `first` file kills itself with SIGKILL (a worker
killed by the OOM killer or `kill -9`); the other waits for that death, then writes `survived` and reports 0.
"""

import os
import signal
import time
from pathlib import Path


def one_killed_one_survives(folder, results):
    try:
        (Path(folder) / "first").touch(exist_ok=False)
    except FileExistsError:
        time.sleep(1.0)  # long enough for the other worker's SIGKILL to land while this one still runs
        (Path(folder) / "survived").touch()
        results.send(("code", 0))
        return
    os.kill(os.getpid(), signal.SIGKILL)
