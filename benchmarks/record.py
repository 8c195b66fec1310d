"""Shared by the benchmarks: machine facts and writing a result section into BENCHMARKS.md."""

import os
import platform
import re
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
# Issue 24's target for every default recipe (each kind, each named process): within this excess...
LARGE_EXCESS = 0.01  # nats: a default recipe that leaves more has not fit its process
TIME_BUDGET_S = 300  # ...in 5 minutes of training and evaluation on a 2-core CPU


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


def recorded_rows(section):
    """The rows of the first table in BENCHMARKS.md's `section`, each a dict from column header to cell
    text ([] when the section or its table is absent): what an earlier run measured, to keep beside a new one."""
    doc = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else ""
    found = re.search(f"<!-- {re.escape(section)} -->(.*?)<!-- /{re.escape(section)} -->", doc, re.S)
    lines = [line.strip() for line in (found.group(1) if found else "").splitlines()]
    table = [line for line in lines if line.startswith("|")]
    if len(table) < 2:
        return []
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in table[2:]]


def over_recorded(section, mine, columns, order, keep=True):
    """This run's rows (cells by column, keyed by their first column) in `order` (the keys), over those the
    section's table holds when it has the same columns (with `keep`: what `--only` writes). The table is read
    again at each write, so that two runs measuring different rows side by side (one per core) keep each other's."""
    key = columns[0]
    kept = {row[key]: row for row in recorded_rows(section) if tuple(row) == tuple(columns)} if keep else {}
    rows = {**kept, **mine}
    return [rows[name] for name in order if name in rows]


def recipe_text(cfg):
    """A run's whole recipe in a line: model, batch, steps, learning-rate schedule and data source."""
    blocks = ("MLP-only" if cfg.mlp_only else f"{cfg.n_head}H") if cfg.n_layer else "(no blocks)"
    model = f"{cfg.n_layer}L {cfg.n_embd}d {blocks}" + ("" if cfg.pos_ape else ", no positions")
    model += (", ALiBi trained" if cfg.alibi_trained else ", ALiBi") if cfg.alibi else ""
    batch = f"{cfg.batch_size} x {cfg.grad_accum_steps}" if cfg.grad_accum_steps > 1 else f"{cfg.batch_size}"
    lr = f"lr {cfg.learning_rate:g}"
    schedule = f"{lr} (warm-up {cfg.warmup_iters}, cosine to {cfg.min_lr:g})" if cfg.decay_lr else f"{lr} fixed"
    return f"{model}, batch {batch}, {cfg.max_iters} iters, {schedule}, {cfg.data_source} data"
