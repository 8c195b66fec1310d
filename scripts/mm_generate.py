#!/usr/bin/env python3
"""The seed's generator command: `python scripts/mm_generate.py 100 --train 50000 --val 5000 [--sparsity 75]`.

A thin wrapper over `nanomarkov generate`; writes data/mm{K}[-sparse-{S}] under the current directory.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from nanomarkov.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
