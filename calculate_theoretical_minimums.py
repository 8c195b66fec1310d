#!/usr/bin/env python3
"""The seed's theory table: the exact optimum of every dataset under ./data (or the folders given).

A thin wrapper over `nanomarkov theory`; unlike the seed's script it reports the
optimum of the training format (position-wise from the start distribution),
not a uniform-weighted entropy.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from nanomarkov.cli import main  # noqa: E402

if __name__ == "__main__":
    folders = sys.argv[1:] or sorted(str(meta.parent) for meta in Path("data").glob("*/meta.json"))
    if not folders:
        print(
            "error: no datasets under ./data; create one with: nanomarkov generate 10 --train 10000 --val 1000",
            file=sys.stderr,
        )
        sys.exit(2)
    sys.exit(main(["theory", *folders]))
