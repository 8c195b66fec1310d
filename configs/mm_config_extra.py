#!/usr/bin/env python3
"""Print the config file of one of the seed's MM-100 ablations c1..c12.

    python configs/mm_config_extra.py c4 42 > c4.py
    python configs/mm_config_extra.py c12 42 -sparse-75

VARIANT is c1..c12 (see EXTRA in nanomarkov/config.py); SEED defaults to 42;
DATA_SUFFIX '-sparse-S' trains on data/mm100-sparse-S, as in the seed. The same
as `python configs/mm_config.py 100[-sparse-S] SEED --preset VARIANT`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling mm_config.py

import mm_config  # noqa: E402

from nanomarkov import NanoMarkovError  # noqa: E402
from nanomarkov.config import EXTRA  # noqa: E402

USAGE = (
    f"usage: python configs/mm_config_extra.py VARIANT [SEED] [DATA_SUFFIX]   "
    f"(VARIANT: {', '.join(EXTRA)}; DATA_SUFFIX: e.g. -sparse-75)"
)


def main(argv) -> int:
    if not 1 <= len(argv) <= 3:
        raise NanoMarkovError(USAGE)
    variant = argv[0].lower()
    if variant not in EXTRA:
        raise NanoMarkovError(f"unknown variant {argv[0]!r}; choose one of {', '.join(EXTRA)}")
    suffix = argv[2] if len(argv) == 3 else ""
    if suffix and not suffix.startswith("-"):
        suffix = "-" + suffix  # accept 'sparse-75' as well as the seed's '-sparse-75'
    return mm_config.main([f"100{suffix}", *argv[1:2], "--preset", variant])


if __name__ == "__main__":
    sys.exit(mm_config.run(main, sys.argv[1:]))
