"""Shared by the benchmarks: machine facts and writing a result section into BENCHMARKS.md."""

import os
import platform
import re
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def machine():
    import numpy
    import torch

    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"numpy {numpy.__version__}, torch {torch.__version__}"
    )


def record(section, text):
    """Replace (or append) the block between `<!-- section -->` markers in BENCHMARKS.md."""
    begin, end = f"<!-- {section} -->", f"<!-- /{section} -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    doc = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    doc = pattern.sub(lambda _: block, doc) if pattern.search(doc) else doc.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(doc)


def publish(section, text, save):
    """Print a result section; with `save` (--record) also write it into BENCHMARKS.md."""
    print()
    print(text)
    if save:
        record(section, text)
