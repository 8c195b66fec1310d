#!/usr/bin/env python3
"""The seed's training entry point: `python train_mm.py config.py [--key=value ...]`.

A thin wrapper over `nanomarkov train`; also accepts a chain id (`python train_mm.py 100 42`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from nanomarkov.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
