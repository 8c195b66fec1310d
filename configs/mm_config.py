#!/usr/bin/env python3
"""Print a training config file for MM-{K}, as the seed's configs/mm_config.py did.

    python configs/mm_config.py 100 42 > mm100.py
    python configs/mm_config.py 100-sparse-75 42 --preset default

MM_ID is K or K-sparse-S; SEED defaults to 42; the preset defaults to 'seed' (the
seed's recipe, with its 40x gradient accumulation written out).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from nanomarkov import NanoMarkovError  # noqa: E402
from nanomarkov.config import parse_mm_id, preset_file  # noqa: E402

USAGE = "usage: python configs/mm_config.py MM_ID [SEED] [--preset NAME]   (MM_ID: 100 or 100-sparse-75)"


def main(argv) -> int:
    args = list(argv)
    name = "seed"
    if "--preset" in args:
        i = args.index("--preset")
        if i + 1 >= len(args):
            raise NanoMarkovError("--preset needs a name, e.g. --preset default")
        name = args.pop(i + 1)
        args.pop(i)
    if not 1 <= len(args) <= 2 or any(a.startswith("-") for a in args):
        raise NanoMarkovError(USAGE)
    n_states, sparsity = parse_mm_id(args[0])
    if len(args) == 2 and not args[1].isdigit():
        raise NanoMarkovError(f"SEED must be a non-negative integer, got {args[1]!r}")
    seed = int(args[1]) if len(args) == 2 else 42
    sys.stdout.write(preset_file(name, n_states, sparsity, seed))
    return 0


def run(main, argv) -> int:
    """main(argv), with a NanoMarkovError turned into one line on stderr and exit code 2."""
    try:
        return main(argv)
    except NanoMarkovError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run(main, sys.argv[1:]))
