"""Evaluation speed: all six metrics for an MM-100 checkpoint, and the time of each part.

    python benchmarks/evaluate.py [--record] [--ckpt PATH ...]

Default checkpoint: the MM-100 default-recipe run that `benchmarks/train.py` leaves in
runs/bench/mm100-default (run that first). With several --ckpt, agreement is included.
Target (DESIGN.md section 9): <= 15 s on this CPU for one MM-100 checkpoint, 5,000 val sequences.
"""

import argparse
import time
from pathlib import Path

from nanomarkov.evaluate import evaluate_checkpoints

try:
    from record import machine, publish
except ImportError:
    from benchmarks.record import machine, publish

DEFAULT_CKPT = Path("runs/bench/mm100-default/ckpt.pt")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    parser.add_argument("--ckpt", nargs="+", default=[str(DEFAULT_CKPT)], help="checkpoints (same dataset)")
    args = parser.parse_args()
    out = Path("runs/bench/eval")
    started = time.perf_counter()
    ((_, result), *_) = evaluate_checkpoints(args.ckpt, out=out)
    total = time.perf_counter() - started
    run, timing = result["run"], result["timing"]
    lines = ["| part | seconds |", "|---|---:|"]
    lines += [f"| {name} | {seconds:.2f} |" for name, seconds in timing.items()]
    lines.append(f"| **total, loading included** | **{total:.2f}** |")
    text = "\n".join(
        [
            "## Evaluation (`python benchmarks/evaluate.py --record`)",
            "",
            f"Machine: {machine()}. All six metrics for {len(args.ckpt)} checkpoint(s) of K={run['n_states']}, "
            f"{run['val_sequences']} val sequences of {run['seq_len']} tokens (the default-recipe run of "
            "`benchmarks/train.py`). The val pass computes metrics 1-3 and 5-6 (real contexts) for every model "
            "at once, and agreement (4) when there are several; the prompts [BOS, s] and the summaries are per model. "
            "Target: <= 15 s.",
            "",
            *lines,
        ]
    )
    publish("evaluate", text, args.record)


if __name__ == "__main__":
    main()
