#!/usr/bin/env python3
"""The seed's evaluation command, over `nanomarkov eval`:

    python scripts/mm_eval.py --ckpt_path trainings/MM/MM-100/MM-100-42/ckpt.pt
    python scripts/mm_eval.py 100 --seeds 42 123 999 [--sparse 75] [--summary]
    python scripts/mm_eval.py c4 [--sparse 75]          (an ablation: MM-100[-sparse-S]-extra, as in the seed)

Several runs of one chain are evaluated together, so their agreement (metric 4) is
measured. Each run gets eval.json and eval.md next to its checkpoint; --summary
prints one short table instead of the full one per run.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from nanomarkov import NanoMarkovError  # noqa: E402
from nanomarkov.cli import OneLineParser, guarded  # noqa: E402
from nanomarkov.config import EXTRA, parse_mm_id, preset  # noqa: E402
from nanomarkov.evaluate import evaluate_checkpoints, format_eval  # noqa: E402


def checkpoints(args):
    """The ckpt.pt files the arguments name, each checked to exist."""
    if args.ckpt_path:
        if args.target or args.seeds or args.sparse is not None:
            raise NanoMarkovError("give either --ckpt_path or a chain id with --seeds, not both")
        return args.ckpt_path
    if not args.target:
        raise NanoMarkovError("name the runs: --ckpt_path trainings/MM/MM-100/MM-100-42/ckpt.pt, or 100 --seeds 42 123")
    if args.target in EXTRA:  # the seed's ablations c1..c12 were all trained on MM-100 (dense or sparse)
        name, n_states, sparsity = args.target, 100, None
    else:
        name, (n_states, sparsity) = "default", parse_mm_id(args.target)
    sparsity = args.sparse if args.sparse is not None else sparsity
    paths = []
    for seed in args.seeds or [42]:
        path = Path(preset(name, n_states, sparsity, seed)["out_dir"]) / "ckpt.pt"
        if not path.is_file():
            extra = f" --preset {name}" if name != "default" else ""
            raise NanoMarkovError(
                f"no checkpoint at {path}; train it with: nanomarkov train {n_states} {seed}"
                f"{f' --sparse {sparsity}' if sparsity else ''}{extra}"
            )
        paths.append(path)
    return paths


def summary(written):
    lines = ["run                            val loss     excess   accuracy  transition KL"]
    for folder, r in written:
        lines.append(
            f"{str(folder):30} {r['cross_entropy']['val_loss']:.6f}  {r['cross_entropy']['excess']:+.6f}  "
            f"{100 * r['accuracy']['accuracy']:7.3f} %  {r['transition_fidelity']['mean_kl']:.6f}"
        )
    ce, agreement = written[0][1]["cross_entropy"], written[0][1]["agreement"]
    lines.append(f"true loss on val {ce['true_loss_val']:.6f}, expected optimum {ce['optimal_loss']:.6f} nats/token")
    lines.append(
        "agreement: n/a (one run)"
        if agreement is None
        else f"agreement across seeds: top-1 {100 * agreement['top1_agreement']:.2f} %, "
        f"mean JSD {agreement['mean_jsd']:.6f}"
    )
    return "\n".join(lines)


def main(argv=None):
    parser = OneLineParser(prog="mm_eval.py", description="Evaluate trained runs against the exact theory.")
    parser.add_argument("target", nargs="?", help="chain id (100, 100-sparse-75) or ablation c1..c12")
    parser.add_argument("--ckpt_path", nargs="+", help="checkpoint file(s) to evaluate")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds of the runs (default 42)")
    parser.add_argument("--sparse", type=int, help="sparsity percent of the chain")
    parser.add_argument("--summary", action="store_true", help="one short table: loss, excess, accuracy, agreement")
    parser.add_argument("--device", default="cpu", help="device to evaluate on (default cpu)")
    parser.add_argument("--data", help="dataset folder (default: the one each run was trained on)")
    args = parser.parse_args(argv)
    written = evaluate_checkpoints(checkpoints(args), data_dir=args.data, device=args.device)
    if args.summary:
        print(summary(written))
    else:
        for folder, result in written:
            print(format_eval(result) + f"\n\nwritten: {folder}/eval.json, eval.md\n")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
