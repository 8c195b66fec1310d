"""The default recipe on each named process of the literature: the excess it reaches.

    python benchmarks/named_processes.py [--record] [--max_iters N] [--only NAME ...]

For each process of nanomarkov.processes.literature, with its default parameters,
generates its default dataset under runs/bench-named/data/ (10,000 train + 1,000
val sequences of 128 tokens, seed 42), trains it as `nanomarkov train DIR` would
(config.dataset_preset: the default recipe with the process's RECIPE), evaluates
the checkpoint and prints one row per process. The excess is the model's val loss
minus optimal_loss (the exact optimum's expected loss per token, from theory) and,
beside it, minus true_loss_val (the optimal predictor's loss on the same val
sequences, which removes the val split's sampling noise). --max_iters caps
every run's iterations (the cosine schedule with them) when the whole benchmark
would take too long; the recorded section then says so.
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
from nanomarkov.processes.literature import NAMED_PROCESSES
from nanomarkov.train import train

try:
    from record import machine, publish, record
except ImportError:
    from benchmarks.record import machine, publish, record

ROOT = Path("runs/bench-named")
LARGE_EXCESS = 0.01  # nats: a default recipe that leaves this much has not fit the process


def run(cls, max_iters):
    """Generate, train and evaluate one named process; returns its row."""
    data = ROOT / "data" / cls.process
    meta = generate_dataset(data, cls.N_STATES, 10000, 1000, process=cls.process)
    fields = {**dataset_preset("default", data), "out_dir": str(ROOT / cls.process)}
    recipe_iters = fields["max_iters"]
    if max_iters is not None and max_iters < recipe_iters:
        fields.update(max_iters=max_iters, lr_decay_iters=max_iters, eval_interval=max(1, max_iters // 4))
    cfg = TrainConfig.from_dict(fields)
    started = time.perf_counter()
    train(cfg, overwrite=True, show_progress=False)
    ((_, result),) = evaluate_checkpoints([ROOT / cls.process / "ckpt.pt"])
    wall = time.perf_counter() - started
    theory, loss = meta["theory"], result["cross_entropy"]
    return {
        "process": cls.process,
        "K": cls.N_STATES,
        "model": f"{cfg.n_layer}L {cfg.n_embd}d {'MLP-only' if cfg.mlp_only else f'{cfg.n_head}H'}",
        "iters": cfg.max_iters,
        "recipe_iters": recipe_iters,
        "entropy_rate": theory["entropy_rate"],
        "optimal_loss": theory["optimal_loss"],
        "true_loss_val": theory["true_loss_val"],
        "val_loss": loss["val_loss"],
        "excess_optimal": loss["val_loss"] - theory["optimal_loss"],
        "excess_val": loss["excess"],
        "wall_s": wall,
    }


def table(rows, command):
    """The BENCHMARKS.md section: what ran, the table, and which processes the recipe does not fit."""
    lines = [
        "## Default recipe per named process",
        "",
        f"`{command}` on {date.today()}, {machine()}.",
        "Each process with its default parameters; each dataset 10,000 train + 1,000 val sequences of",
        "128 tokens, seed 42; trained as `nanomarkov train DIR` does (default recipe + the process's RECIPE).",
        "Iterations marked * are fewer than the recipe's (`--max_iters`, the cosine schedule shortened",
        "with them): that row's excess is a shortened run's, not the full recipe's.",
        "Entropy rate and optimal loss (the exact optimum's expected loss per token over a sequence) from",
        "theory, in nats; excess = val loss − optimal loss, and − true on val (the optimum's loss on the same",
        "val sequences). Wall time (training + evaluation) depends on what else the machine runs:",
        "the excess is what matters, the times are not comparable between rows or with other sections.",
        "",
        "| process | K | model | iters | entropy rate | optimal loss | val loss | excess | excess vs true on val | wall |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['process']} | {r['K']} | {r['model']} | {r['iters']}{'*' if r['iters'] < r['recipe_iters'] else ''} | "
            f"{r['entropy_rate']:.4f} | "
            f"{r['optimal_loss']:.4f} | {r['val_loss']:.4f} | {r['excess_optimal']:.4f} | {r['excess_val']:.4f} | "
            f"{r['wall_s']:.0f} s |"
        )
    lines += ["", verdict(rows)]
    missing = [cls.process for cls in NAMED_PROCESSES if cls.process not in {r["process"] for r in rows}]
    if missing:
        lines.append(f"Not measured in this run: {', '.join(missing)}.")
    return "\n".join(lines)


def verdict(rows):
    """Which processes are left more than LARGE_EXCESS from the optimum, by the full recipe or a capped run."""
    full = [r["process"] for r in rows if not r["excess_val"] <= LARGE_EXCESS and r["iters"] >= r["recipe_iters"]]
    capped = [r["process"] for r in rows if not r["excess_val"] <= LARGE_EXCESS and r["iters"] < r["recipe_iters"]]
    sentences = []
    if full:
        sentences.append(
            f"The default recipe leaves more than {LARGE_EXCESS} nats of excess on {', '.join(full)}: it does not "
            "fit there, and which recipe does is an open question."
        )
    elif any(r["iters"] >= r["recipe_iters"] for r in rows):
        sentences.append(f"Every full-recipe run here comes within {LARGE_EXCESS} nats of the optimum.")
    if capped:
        sentences.append(
            f"Capped runs above {LARGE_EXCESS} nats (the full recipe may or may not close it): {', '.join(capped)}."
        )
    return " ".join(sentences)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    parser.add_argument("--max_iters", type=int, default=None, help="cap every run at this many iterations")
    parser.add_argument("--only", nargs="+", default=None, help="these named processes only (default: all)")
    args = parser.parse_args()
    command = "python benchmarks/named_processes.py " + " ".join(sys.argv[1:])
    rows = []
    for cls in NAMED_PROCESSES:
        if args.only is None or cls.process in args.only:
            rows.append(run(cls, args.max_iters))
            print(json.dumps(rows[-1]), flush=True)
            if args.record:  # after each process, so a run stopped early keeps what it measured
                record("named_processes", table(rows, command))
    publish("named_processes", table(rows, command), args.record)


if __name__ == "__main__":
    main()
