#!/usr/bin/env python3
"""The seed's transition-matrix check (metrics 5 and 6) of one run:

    python scripts/mm_eval_transition_matrix.py --ckpt_path trainings/MM/MM-100/MM-100-42/ckpt.pt [--output m.json]

Prints KL(true row || learned row) averaged over states (plain and stationary-weighted),
the worst states and the Markov spread; writes learned_matrix.npy (the model's
next-state distribution after [BOS, s], one row per state) and transition_matrix.png
next to the checkpoint. The seed's --transformer_path and --formal_model_path still work
(the latter names the dataset folder, or a file in it).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from nanomarkov.cli import OneLineParser, guarded  # noqa: E402
from nanomarkov.evaluate import evaluate_checkpoints  # noqa: E402
from nanomarkov.report import load_run, plot_transition_matrix  # noqa: E402


def report_lines(result, folder):
    tf, mp = result["transition_fidelity"], result["markov_property"]
    lines = [
        f"transition fidelity of {result['run']['checkpoint']} (K={result['run']['n_states']})",
        f"  mean KL(true row || learned row), prompts [BOS, s]: {tf['mean_kl']:.6f} nats "
        f"(stationary-weighted {tf['weighted_kl']:.6f})",
        f"  the same over real val contexts:                 {tf['context_mean_kl']:.6f} "
        f"(weighted {tf['context_weighted_kl']:.6f})",
        f"  start distribution KL (after BOS):               {tf['start_kl']:.6f}",
        "  worst states: " + ", ".join(f"{w['state']} ({w['kl']:.4f})" for w in tf["worst_states"]),
    ]
    if mp["mean_spread"] is not None:
        lines.append(
            f"Markov spread (how much the prediction after a state changes with the states before it): mean {mp['mean_spread']:.6f}, max {mp['max_spread']:.6f} "
            f"(state {mp['max_spread_state']}); 0 for a memoryless model"
        )
    lines.append(f"written: {folder}/learned_matrix.npy, eval.json")
    return lines


def main(argv=None):
    parser = OneLineParser(prog="mm_eval_transition_matrix.py", description="Transition-matrix fidelity of a run.")
    parser.add_argument("--ckpt_path", "--transformer_path", dest="ckpt", required=True, help="the run's ckpt.pt")
    parser.add_argument(
        "--formal_model_path",
        "--data",
        dest="data",
        help="dataset folder or a file in it (default: the one the run was trained on)",
    )
    parser.add_argument("--output", help="also write the fidelity and Markov numbers to this JSON file")
    args = parser.parse_args(argv)
    data = args.data and (Path(args.data) if Path(args.data).is_dir() else Path(args.data).parent)
    ((folder, result),) = evaluate_checkpoints([args.ckpt], data_dir=data)
    print("\n".join(report_lines(result, folder)))
    print(f"written: {plot_transition_matrix(load_run(folder), Path(folder) / 'transition_matrix.png')}")
    if args.output:
        part = {k: result[k] for k in ("run", "transition_fidelity", "markov_property")}
        Path(args.output).write_text(json.dumps(part, indent=2) + "\n")
        print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
