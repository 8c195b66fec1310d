"""The default recipe on each process: what excess it reaches, and in what time.

    python benchmarks/processes.py [--record] [--only NAME ...]

For each process generates its default dataset under runs/bench-processes/data/
(10,000 train + 1,000 val sequences of 128 tokens, seed 42), trains it exactly as
`nanomarkov train DIR` would (config.dataset_preset: the default recipe with the
process's RECIPE) and reads done.json and the evaluation. The excess is
over true_loss_val, the exact optimal predictor's loss on the same val sequences.
Processes that are not first-order also get the mean KL(optimal predictor || model)
over all val positions (evaluate's optimal_fidelity) and their own baselines.
--only measures those datasets and keeps the other rows of the recorded table as
they were, each with the date it was measured.
"""

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

from nanomarkov.config import TrainConfig, dataset_preset
from nanomarkov.data import generate_dataset
from nanomarkov.evaluate import evaluate_checkpoints
from nanomarkov.train import train

try:
    from record import LARGE_EXCESS, TIME_BUDGET_S, machine, over_recorded, publish, recipe_text, record
except ImportError:
    from benchmarks.record import LARGE_EXCESS, TIME_BUDGET_S, machine, over_recorded, publish, recipe_text, record

ROOT = Path("runs/bench-processes")
# name, K, generate options, the theory keys that place the result (besides the optimum)
PROCESSES = [
    ("mm10", 10, {}, ("unigram_loss",)),
    ("mm5-order2", 5, {"process": "korder", "order": 2}, ("unigram_loss",)),
    ("icl3", 3, {"process": "icl"}, ("oracle_loss", "unigram_in_context_loss")),
    ("mess3", 3, {"process": "hmm", "preset": "mess3"}, ("unigram_loss",)),
    ("mm100", 100, {}, ("unigram_loss",)),
    ("hmm4", 4, {"process": "hmm"}, ("unigram_loss",)),
    ("bietti10", 10, {"process": "bietti"}, ("unigram_loss",)),
    ("factored4", 4, {"process": "factored"}, ("unigram_loss",)),
    ("mixture4", 4, {"process": "mixture"}, ("unigram_loss",)),
]


def run(name, k, options):
    data = ROOT / "data" / name
    generate_dataset(data, k, 10000, 1000, **options)
    cfg = TrainConfig.from_dict({**dataset_preset("default", data), "out_dir": str(ROOT / name)})
    started = time.perf_counter()
    done = train(cfg, overwrite=True, show_progress=False)
    ((_, result),) = evaluate_checkpoints([ROOT / name / "ckpt.pt"])
    return cfg, done, time.perf_counter() - started, result


COLUMNS = (
    "dataset",
    "process",
    "recipe",
    "val loss",
    "true on val",
    "excess",
    "optimal KL",
    "train time",
    "wall",
    "baselines",
    "measured",
)


def measure(name, k, options, baselines):
    """Train and evaluate one dataset's default recipe: its row, as the table's cells (COLUMNS)."""
    cfg, done, wall, result = run(name, k, options)
    theory = json.loads((ROOT / "data" / name / "meta.json").read_text())["theory"]
    kl = (result.get("optimal_fidelity") or {}).get("mean_kl")
    return {
        "dataset": name,
        "process": options.get("process", "markov"),
        "recipe": recipe_text(cfg),
        "val loss": f"{done['val_loss']:.4f}",
        "true on val": f"{done['true_loss_val']:.4f}",
        "excess": f"{done['excess']:.4f}",
        "optimal KL": "—" if kl is None else f"{kl:.4f}",
        "train time": f"{done['elapsed_s']:.0f} s",
        "wall": f"{wall:.0f} s",
        "baselines": ", ".join(f"{key} {theory[key]:.4f}" for key in baselines),
        "measured": str(date.today()),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    parser.add_argument("--only", nargs="+", default=None, help="these datasets only (default: all)")
    args = parser.parse_args()
    command = "python benchmarks/processes.py " + " ".join(sys.argv[1:])
    mine = {}
    for name, k, options, baselines in PROCESSES:
        if args.only is None or name in args.only:
            mine[name] = measure(name, k, options, baselines)
            print(json.dumps(mine[name]), flush=True)
            if args.record:  # after each dataset, so a run stopped early keeps what it measured
                record("processes", table(merged(mine, args.only), command))
    publish("processes", table(merged(mine, args.only), command), args.record)


def merged(mine, only):
    """The table's rows: this run's, over the recorded ones with --only, in PROCESSES' order."""
    return over_recorded("processes", mine, COLUMNS, [name for name, *_ in PROCESSES], keep=only)


def table(rows, command):
    """The BENCHMARKS.md section: what ran, the table and the verdict."""
    lines = [
        "## Default recipe per process",
        "",
        f"`{command}` on {machine()}. Each dataset: 10,000 train + 1,000 val",
        "sequences of 128 tokens, seed 42; trained as `nanomarkov train DIR` does (default recipe + the",
        "process's RECIPE, on its class). Excess is over the exact optimal predictor on the same",
        "val sequences; optimal KL is the mean KL(optimal predictor ‖ model) over every val position.",
        "Train time is the run's own (done.json); wall adds `nanomarkov eval`'s metrics. Target (issue 24):",
        f"excess <= {LARGE_EXCESS} nats within {TIME_BUDGET_S} s on this 2-core CPU; one thread, the default.",
        "Rows of an earlier date are kept from that run (`--only` reruns some).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|---|---|" + "---:|" * 6 + "---|---:|",
    ]
    lines += ["| " + " | ".join(row[column] for column in COLUMNS) + " |" for row in rows]
    return "\n".join([*lines, "", verdict(rows)])


def verdict(rows):
    """Which kinds miss issue 24's target, by excess or by wall time (training and evaluation)."""
    misses = [f"{r['dataset']} ({r['excess']})" for r in rows if float(r["excess"]) > LARGE_EXCESS]
    slow = [f"{r['dataset']} ({r['wall']})" for r in rows if float(r["wall"].removesuffix(" s")) > TIME_BUDGET_S]
    sentences = [
        f"Above {LARGE_EXCESS} nats: {', '.join(misses)}." if misses else f"Every row within {LARGE_EXCESS} nats."
    ]
    if slow:
        sentences.append(f"Over {TIME_BUDGET_S} s: {', '.join(slow)}.")
    return " ".join(sentences)


if __name__ == "__main__":
    main()
