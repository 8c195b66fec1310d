"""The command line with a slow training step, for tests that stop a command whose runs train in worker processes.

    NANOMARKOV_TEST_STEP_S=0.2 python tests/slow_cli.py sweep GRID --out DIR --jobs 2

The patch is made when this file is imported, so it holds in the command's spawned workers too (a spawned
process imports its parent's main script); it pauses before every optimizer step and changes nothing
the run computes. The sweep's report (plots, tested in test_report.py) is left out: it would only cost time.
"""

import os
import sys
import time

import nanomarkov.train as train_module
from nanomarkov import cli
from nanomarkov.sweep import run as sweep_run

STEP_S = float(os.environ.get("NANOMARKOV_TEST_STEP_S", "0"))
real_learning_rate_at = train_module.learning_rate_at


def slow_learning_rate_at(it, cfg):
    time.sleep(STEP_S)
    return real_learning_rate_at(it, cfg)


if STEP_S > 0:
    train_module.learning_rate_at = slow_learning_rate_at
sweep_run.write_sweep_report = lambda root, progress: None

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
