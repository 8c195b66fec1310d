"""A training run in its own process, for tests/test_train.py (kill, Ctrl-C, torchrun, srun).

    python tests/train_worker.py CONFIG_JSON [SLEEP_S]

CONFIG_JSON is a dict of TrainConfig fields. SLEEP_S (default 0) pauses before
every optimizer step, so a test can signal the run mid-way; it changes nothing
the run computes. Torch uses one thread, as the in-process runs of the tests do,
so that results compare bit for bit. Prints train()'s result as JSON (rank 0).
"""

import json
import sys
import time

import torch
import torch.distributed as dist

import nanomarkov.train as train_module
from nanomarkov.config import TrainConfig


def main():
    torch.set_num_threads(1)
    cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
    sleep_s = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    if sleep_s > 0:
        real = train_module.learning_rate_at

        def slow(it, cfg):
            time.sleep(sleep_s)
            return real(it, cfg)

        train_module.learning_rate_at = slow
    result = train_module.train(cfg, overwrite=cfg.init_from != "resume", show_progress=False)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
