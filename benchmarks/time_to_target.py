"""Time to a target excess, with fixed data (the train split) and online data (fresh from the process),
side by side in one run.

    python benchmarks/time_to_target.py [--record] [--skip-mm1000]

MM-100 (benchmarks/train.py's dataset: 50k train sequences): each recipe of MM100_RUNS, once on
fixed and once on online data, and the time at which it first evaluates at or below each target
(issue 24: excess <= 0.001 nats within 120 s; DESIGN: <= 0.003 within 120 s). MM-1000 (10k train +
1k val sequences, `nanomarkov generate 1000`'s default): its default recipe (online), then the recipe
it replaced (256 wide, batch 32) online for the same training time (benchmarks/rank_floor.py gives the
floor that width sets). Every time is the run's own elapsed_s (log.jsonl),
evaluations on the whole val split included; the excess is the val loss minus the true process's
loss on the same val split.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from nanomarkov.config import TrainConfig, preset
from nanomarkov.data import generate_dataset
from nanomarkov.model import GPT
from nanomarkov.train import train

try:
    from record import machine, publish
except ImportError:
    from benchmarks.record import machine, publish

ROOT = Path("runs/bench")
TARGETS = ((0.003, 120), (0.001, 120))  # (excess in nats, seconds allowed): DESIGN's and issue 24's
SOURCES = ("fixed", "online")
MM100_RUNS = {  # label: (changes to the default preset, steps)
    "default (zero layers, 128 wide, batch 64, lr 1e-2)": (dict(), 6000),
    "1 MLP-only layer, batch 32, lr 3e-3 (the default before), shorter": (
        dict(n_layer=1, pos_ape=True, batch_size=32, learning_rate=3e-3),
        2700,
    ),
}
MM1000_BEFORE = dict(n_embd=256, batch_size=32)  # the MM-1000 recipe the default replaced (0.1455 in 20 min)
MM1000_EVALS = 6
EVALS_PER_RUN = 8


def dataset(k, n_train):
    path = ROOT / "data" / f"mm{k}-{n_train}"
    generate_dataset(path, k, n_train, n_train // 10)
    return path


def train_run(name, k, source, iters, n_train=50000, evals=EVALS_PER_RUN, **changes):
    """One run of the recipe for K on `source` data, `iters` steps and `evals` evaluations after the
    first; returns its eval lines (log.jsonl)."""
    values = preset("default", k)
    values.update(changes)
    values.update(
        data_dir=str(dataset(k, n_train)),
        out_dir=str(ROOT / "time-to-target" / f"{name}-{source}"),
        data_source=source,
        max_iters=iters,
        lr_decay_iters=iters,
        min_lr=values["learning_rate"] / 100,
        eval_interval=max(1, iters // evals),
        log_interval=max(1, iters // 50),
    )
    train(TrainConfig.from_dict(values), overwrite=True, show_progress=False)
    log = map(json.loads, (Path(values["out_dir"]) / "log.jsonl").read_text().splitlines())
    return [r for r in log if r["kind"] == "eval"]


def first_time_at(evals, excess):
    """The elapsed seconds of the first evaluation at or below `excess`, or None."""
    return next((r["elapsed_s"] for r in evals if r["excess"] <= excess), None)


def seconds(value, allowed=None):
    if value is None:
        return "not reached"
    return f"{value:.0f} s" + ("" if allowed is None else (" ✓" if value <= allowed else " ✗"))


def mm100_rows():
    """Each MM-100 recipe on both data sources: time to each target, final excess, and the curves."""
    rows = [
        "| recipe | data | steps | tokens | time to <= 0.003 (target 120 s) | time to <= 0.001 (target 120 s) "
        "| final excess | total |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    curves = []
    for index, (label, (changes, iters)) in enumerate(MM100_RUNS.items()):
        for source in SOURCES:
            evals = train_run(f"mm100-{index}", 100, source, iters, **changes)
            last = evals[-1]
            hits = [seconds(first_time_at(evals, excess), allowed) for excess, allowed in TARGETS]
            rows.append(
                f"| {label} | {source} | {iters} | {last['tokens'] / 1e6:.1f} M | {hits[0]} | {hits[1]} "
                f"| {last['excess']:.4f} | {last['elapsed_s']:.0f} s |"
            )
            curves.append(f"- MM-100 {label}, {source}: " + curve_text(evals))
            print(rows[-1], flush=True)
    return rows, curves


def curve_text(evals):
    return ", ".join(f"({r['elapsed_s']:.0f}, {r['excess']:.4f})" for r in evals)


def step_seconds(k, changes, steps=6):
    """Seconds per training step of the recipe on random tokens (the median of `steps` after one warm-up)."""
    cfg = TrainConfig.from_dict({**preset("default", k), **changes})
    model = GPT(cfg.gpt_config(k + 1, 255))
    optimizer = model.configure_optimizer(0.0, cfg.learning_rate, (cfg.beta1, cfg.beta2), "cpu")
    x = torch.randint(0, k + 1, (cfg.batch_size, 255))
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return sorted(times[1:])[steps // 2]


def mm1000_rows():
    """MM-1000's default recipe online, then the recipe it replaced online for as long: the excess along each."""
    rows = ["| recipe | steps | tokens | final excess | total |", "|---|---:|---:|---:|---:|"]
    curves = []
    default_iters = preset("default", 1000)["max_iters"]
    evals = train_run("mm1000-default", 1000, "online", default_iters, n_train=10000, evals=MM1000_EVALS)
    # The recipe before gets the default's training time (its evaluations cost less: a narrower head).
    before_iters = int(default_iters * step_seconds(1000, {}) / step_seconds(1000, MM1000_BEFORE))
    runs = (("default", default_iters, evals), ("256 wide, batch 32 (before), same training time", before_iters, None))
    for label, iters, done in runs:
        if done is None:
            done = train_run("mm1000-before", 1000, "online", iters, n_train=10000, evals=MM1000_EVALS, **MM1000_BEFORE)
        last = done[-1]
        rows.append(
            f"| {label} | {iters} | {last['tokens'] / 1e6:.1f} M | {last['excess']:.4f} | {last['elapsed_s']:.0f} s |"
        )
        curves.append(f"- MM-1000 {label}: " + curve_text(done))
        print(rows[-1], flush=True)
    return rows, curves


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="write the tables into BENCHMARKS.md")
    parser.add_argument("--skip-mm1000", action="store_true", help="leave out MM-1000's two long runs")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())  # as a user's run: the default thread count
    mm100, curves = mm100_rows()
    text = [
        "## Time to target (`python benchmarks/time_to_target.py --record`)",
        "",
        f"Machine: {machine()}. Each recipe is the default preset of its K with the changes named, its "
        "cosine schedule as long as the run, trained once on the train split (fixed: 50k sequences, "
        "12.8 M tokens) and once on fresh sequences from the process (online); times are the run's own "
        "elapsed seconds, evaluations of the whole val split included. The default above K = 10 has zero "
        "layers: the token embedding, the final LayerNorm and the head, i.e. the bigram table itself, which "
        "trains on its vocab x vocab table (docs/training.md).",
        "",
        *mm100,
    ]
    if not args.skip_mm1000:
        mm1000, mm1000_curves = mm1000_rows()
        curves += mm1000_curves
        text += [
            "",
            "MM-1000 (10k train + 1k val sequences, online data; target: <= 0.05 nats in 20 minutes, goal 0.03):",
            "",
            *mm1000,
        ]
    text += ["", "Curves (elapsed s, excess nats) at each evaluation:", "", *curves]
    publish("time-to-target", "\n".join(text), args.record)


if __name__ == "__main__":
    main()
