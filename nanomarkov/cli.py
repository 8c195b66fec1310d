"""`nanomarkov <verb>`: argument parsing and error messages only; the work is in the modules.

A verb imports the modules that do its work when it runs (`cmd_train` imports train.py...): --help,
--version, generate, theory and import-hmmlearn never load torch, and answer in a fraction of a second.

Exit codes: 0 ok, 2 bad input (one line on stderr, no traceback; out of memory too: the fix is a
smaller input), 1 failure (a diverged run; stdout that cannot be written, e.g. `> /dev/full`: the
command's work is done whole -- a dataset, a training run -- but its output is lost, and the same
command succeeds where stdout has room, as coreutils exit 1 on a write error), 130 Ctrl-C, 143 SIGTERM, 141 stdout
closed early (`nanomarkov train ... | head -1`: the command still finishes its work -- the run trains to its
end and checkpoints, the dataset is written whole -- printing nothing more, then exits quietly, as a tool
killed by SIGPIPE exits in a shell, so `set -o pipefail` still sees that not all output was read). A warning from any layer is one `note:` line on stderr.
"""

import argparse
import contextlib
import functools
import json
import os
import re
import signal
import sys
import threading
import warnings
from contextlib import nullcontext, redirect_stdout, suppress
from pathlib import Path

from nanomarkov.config import (
    AUTO_THREADS_MAX,
    DEFAULT_VAL_SEQUENCES,
    LLC_COUNTS,
    LLC_DEFAULTS,
    TrainConfig,
    dataset_preset,
    is_run_folder,
    is_threads_setting,
    load_config_file,
    merge_settings,
    parse_mm_id,
    parse_overrides,
    preset,
)
from nanomarkov.data import (
    dataset_theory,
    default_data_dir,
    default_seq_len,
    estimate_text,
    generate_dataset,
    headline,
    import_hmmlearn,
    load_dataset,
)
from nanomarkov.errors import NanoMarkovError, TrainingDiverged
from nanomarkov.files import check_output_folder, format_bytes, json_text, writer_lock
from nanomarkov.processes import (
    DEFAULT_PROCESS,
    PROCESSES,
    load_plugins,
    noting_user_signals,
    plugin_failure,
    raised_by_plugin,
    signal_of_user,
)
from nanomarkov.processes.spec import process_from_file
from nanomarkov.progress import Heartbeat, StopDeadline, stopped_line
from nanomarkov.version import VERSION


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit 2, like every other bad input."""

    def error(self, message):
        raise NanoMarkovError(f"{self.prog}: {message} (see --help)")


EXIT_CLOSED_STDOUT = 128 + 13  # 128 + SIGPIPE, as a shell reports a tool that SIGPIPE ended
MAX_SEED = 2**32 - 1  # numpy's RandomState, which hmmlearn samples with, takes no larger seed


def seed_type(text):
    """argparse type of a seed: an integer in [0, MAX_SEED], refused at parse time otherwise."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a seed is an integer in [0, {MAX_SEED}], got {text!r}") from None
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"a seed is an integer in [0, {MAX_SEED}], got {seed}")
    return seed


def threads_type(text):
    """argparse type of --threads: 'auto' or an integer >= 1 (torch's intra-op threads)."""
    value = text if text == "auto" else int(text) if text.isdigit() else None
    if not is_threads_setting(value):
        raise argparse.ArgumentTypeError(f"threads are 'auto' or an integer >= 1, got {text!r}")
    return value


def jobs_type(text):
    """argparse type of --jobs: an integer >= 1 (processes or workers at once)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"jobs are an integer >= 1, got {text!r}")
    return int(text)


THREADS_HELP = (
    "torch's intra-op threads on a CPU: N, or auto (default): torch's own count (OMP_NUM_THREADS, a rank's share), "
    "at most {most} (docs/training.md#threads)"
)


def _add_threads(parser, default):
    parser.add_argument(
        "--threads",
        type=threads_type,
        default=default,
        metavar="N|auto",
        help=THREADS_HELP.format(most=AUTO_THREADS_MAX),
    )


def _progress(total, out):
    """Lines on stderr while a generation takes long (the heartbeat): the tokens written, or before any, that the
    process and its theory are being built."""
    return Heartbeat(f"generate {out}", total, "tokens", waiting="building the process and its exact theory")


def states_to_generate(process, n_states):
    """K: the one given, or the process's own where it fixes K (a K that contradicts it is refused)."""
    fixed = PROCESSES[process].N_STATES
    if fixed is None:
        if n_states is None:
            raise NanoMarkovError(f"--process {process} needs K, the number of states: nanomarkov generate K ...")
        return n_states
    if n_states not in (None, fixed):
        raise NanoMarkovError(
            f"--process {process} has K = {fixed} tokens, fixed by the process; got K = {n_states} (leave K out)"
        )
    return fixed


def cmd_generate(args):
    if args.spec:
        return _generate_from_spec(args)
    process = args.process or DEFAULT_PROCESS
    options = {option.name: getattr(args, option.name) for option in _all_options()}
    n_states = states_to_generate(process, args.n_states)
    out = Path(args.out) if args.out else default_data_dir(n_states, args.sparsity, process, **options)
    seq_len = args.seq_len
    total = (args.train + args.val) * (seq_len or default_seq_len(n_states))
    with _progress(total, out) as bar:
        meta = generate_dataset(
            out,
            n_states,
            args.train,
            args.val,
            sparsity=args.sparsity,
            alpha=1.0 if args.alpha is None else args.alpha,
            seq_len=seq_len,
            seed=args.seed,
            dtype=args.dtype,
            force=args.force,
            progress=bar.advance,
            process=process,
            **options,
        )
    _print_generated(out, meta)
    return 0


def _generate_from_spec(args):
    """`generate --spec FILE`: the process is the spec's, so a flag that also gives it is refused."""
    given = [("K", args.n_states), ("--process", args.process), ("--alpha", args.alpha), ("--sparsity", args.sparsity)]
    given += [(f"--{option.name}", getattr(args, option.name)) for option in _all_options()]
    contradicting = [flag for flag, value in given if value is not None]
    if contradicting:
        raise NanoMarkovError(
            f"{', '.join(contradicting)} and --spec both give the process; the spec gives all of it: drop "
            f"{', '.join(contradicting)} (or change {args.spec})"
        )
    out = Path(args.out) if args.out else Path("data") / Path(args.spec).stem
    total = (args.train + args.val) * args.seq_len if args.seq_len else None
    with _progress(total, out) as bar:
        meta = generate_dataset(
            out,
            None,
            args.train,
            args.val,
            seq_len=args.seq_len,
            seed=args.seed,
            dtype=args.dtype,
            force=args.force,
            progress=bar.advance,
            spec=args.spec,
        )
    _print_generated(out, meta)
    return 0


def _print_generated(out, meta):
    theory = meta["theory"]
    kind = "".join(
        f", {name} {meta[name]}" for name in PROCESSES[meta["process"]].option_names() if meta.get(name) is not None
    )
    print(
        f"{out}: {meta['train_sequences']} train + {meta['val_sequences']} val sequences of {meta['seq_len']} "
        f"tokens, K={meta['n_states']}{kind}, vocab {meta['vocab_size']} (BOS={meta['bos_token']}), {meta['dtype']}"
    )
    print(
        f"optimal_loss {estimate_text(theory, 'optimal_loss')}  true_loss_val {theory['true_loss_val']:.6f}  "
        f"entropy_rate {estimate_text(theory, 'entropy_rate')}  uniform {theory['uniform_loss']:.6f} nats/token"
    )


THEORY_COLUMNS = [
    ("entropy_rate", "entropy_rate"),
    ("optimal_loss", "optimal_loss"),
    ("true_loss_val", "true_loss_val"),
    ("optimal_accuracy", "optimal_acc"),
    ("uniform_loss", "uniform"),
    ("unigram_loss", "unigram"),
]


def theory_rows(paths):
    """One dict per dataset folder: identity, then the exact theory recomputed from the chain."""

    rows = []
    for path in paths:
        dataset = load_dataset(path)
        meta = dataset.meta
        process = meta.get("process", DEFAULT_PROCESS)
        options = {name: meta[name] for name in PROCESSES[process].option_names() if meta.get(name) is not None}
        rows.append(
            {
                "dataset": str(path),
                "process": process,
                "options": options,
                "order": meta.get("order"),
                "n_states": meta["n_states"],
                "sparsity": meta["sparsity"],
                "seq_len": meta["seq_len"],
                **dataset_theory(dataset),
                "note": dataset.chain.theory_note(meta["seq_len"]),
            }
        )
    return rows


def spec_theory_row(path, seq_len=None):
    """The theory row of the process a spec file gives (no dataset: no true_loss_val); writes nothing."""
    _, process = process_from_file(path)
    options = {name: value for name, value in process.options().items() if value is not None}
    seq_len = default_seq_len(process.n_states) if seq_len is None else seq_len
    return {
        "dataset": None,
        "spec": str(path),
        "process": process.process,
        "options": options,
        "order": options.get("order"),
        "n_states": process.n_states,
        "sparsity": None,
        "seq_len": seq_len,
        **process.theory(seq_len),
        "note": process.theory_note(seq_len),
    }


def _estimate(row, key):
    """A theory number; a Monte-Carlo or bracketed one (a nonzero *_se key) with its error; "-" where there is none."""
    return estimate_text(row, key) if key in row else "-"


def format_theory_table(rows):
    header = ["dataset", "process", "K", "sparsity", "seq_len"] + [title for _, title in THEORY_COLUMNS]
    lines = [header]
    for row in rows:
        process = " ".join([row["process"]] + [f"{k}={v}" for k, v in row["options"].items()])
        lines.append(
            [
                row["dataset"] or row["spec"],
                process,
                str(row["n_states"]),
                "-" if row["sparsity"] is None else f"{row['sparsity']:g}",
                str(row["seq_len"]),
            ]
            + [_estimate(row, key) for key, _ in THEORY_COLUMNS]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in lines
    ]
    notes = [f"{row['dataset'] or row['spec']}: {row['note']}" for row in rows if row.get("note")]
    return "\n".join(text + notes) + (
        "\n(losses in nats per predicted token; accuracy of the true model's argmax; "
        "±: the error of a Monte-Carlo estimate or half a bracket, theory's *_se)"
    )


def cmd_theory(args):
    if args.spec and args.datasets:
        raise NanoMarkovError("nanomarkov theory: give dataset folders or --spec FILE, not both")
    if args.seq_len is not None and not args.spec:
        raise NanoMarkovError(
            "nanomarkov theory: --seq_len goes with --spec (a dataset's theory is at its own seq_len)"
        )
    if not args.spec and not args.datasets:
        raise NanoMarkovError("nanomarkov theory: dataset folders (or --spec FILE) are required (see --help)")
    with Heartbeat(f"theory of {args.spec or ', '.join(args.datasets)}", waiting="computing"):
        rows = [spec_theory_row(args.spec, args.seq_len)] if args.spec else theory_rows(args.datasets)
    print(json.dumps(rows, indent=2) if args.json else format_theory_table(rows))
    return 0


def _train_configs(args, overrides):
    """The TrainConfig of every run a `train` call asks for (one per seed)."""

    target = args.target
    if target.endswith(".py") or Path(target).is_file():
        if args.seeds or args.seed is not None or args.sparse is not None or args.preset:
            raise NanoMarkovError(
                "with a config file, set the seed and the rest as --key=value "
                "(SEED, --seeds, --sparse and --preset go with a chain id: nanomarkov train 100 42)"
            )
        return [
            TrainConfig.from_dict(
                merge_settings(merge_settings({}, load_config_file(target)), overrides), f"config file {target}"
            )
        ]
    if args.seeds and args.seed is not None:
        raise NanoMarkovError("give either SEED or --seeds, not both")
    seeds = args.seeds or [42 if args.seed is None else args.seed]
    name = args.preset or "default"
    if Path(target).is_dir() and not re.fullmatch(r"\d+(-sparse-\d+)?", target):  # a dataset folder
        if args.sparse is not None:
            raise NanoMarkovError(
                f"{target} is a dataset folder: its sparsity is its own (--sparse goes with a chain id)"
            )
        return [
            TrainConfig.from_dict(
                merge_settings(dataset_preset(name, target, seed), overrides), f"preset {name} on {target}"
            )
            for seed in seeds
        ]
    if not re.fullmatch(r"\d+(-sparse-\d+)?", target):
        raise NanoMarkovError(
            f"{target} is no dataset folder, config file or chain id (100, 100-sparse-75); "
            "make the dataset first with nanomarkov generate, which prints its folder"
        )
    n_states, sparsity = parse_mm_id(target)
    if args.sparse is not None:
        if sparsity is not None and sparsity != args.sparse:
            raise NanoMarkovError(f"{target} and --sparse {args.sparse} disagree on the sparsity")
        sparsity = args.sparse
    return [
        TrainConfig.from_dict(merge_settings(preset(name, n_states, sparsity, seed), overrides), f"preset {name}")
        for seed in seeds
    ]


def cmd_train(args, extra):
    from nanomarkov.train import train

    overrides = parse_overrides(extra)
    if args.resume:
        overrides["init_from"] = "resume"
    overrides.update(
        {
            k: v
            for k, v in (
                ("snapshots", args.snapshots),
                ("snapshot_every", args.snapshot_every),
                ("data_source", args.data_source),
                ("threads", args.threads),
            )
            if v is not None
        }
    )
    results = []
    for cfg in _train_configs(args, overrides):
        done = train(cfg, overwrite=args.force)
        results.append((cfg.out_dir, done))
        if done["status"] == "interrupted":
            if done["stop_line"]:  # where it stopped and how to go on, on stderr as every command's stop line
                say(done["stop_line"])
            return 128 + getattr(signal, done.get("stopped_by") or "", signal.SIGINT)
    if len(results) > 1:
        print("\n".join(f"{out}: {headline(d)}" for out, d in results))
    return 0


# What the training lines mean, printed once before them: the demo is a newcomer's first output.
DEMO_LEGEND = (
    "    reading the lines below: `iter N: train loss` is the mean loss (nats/token) of the training batches since the "
    "line before;\n    `eval iter N: val` is the loss on the whole val split, and `excess` how far it is above "
    "true_loss_val, the true chain's loss on the same sequences (0 is perfect)"
)


def cmd_demo(args, extra):
    """generate MM-10 -> train with the default recipe -> evaluate -> plots."""
    from nanomarkov.evaluate import evaluate_checkpoints, format_eval
    from nanomarkov.report import write_report
    from nanomarkov.train import train

    data_dir = default_data_dir(10)
    cfg = TrainConfig.from_dict(merge_settings(preset("default", 10), parse_overrides(extra)), "demo")
    # The demo takes no --force or --out: its way out of a folder of other files is another folder.
    fix = f"run the demo from another folder (it writes {data_dir} and {cfg.out_dir} below the current one)"
    check_output_folder(cfg.out_dir, "training run", is_run_folder, force=None, flag="--out_dir", fix=fix)
    print(f"1/4 generate {data_dir}: 10,000 train + 1,000 val sequences from a random 10-state chain")
    generate_dataset(data_dir, 10, 10000, 1000, fix=fix)
    print(f"2/4 train {cfg.out_dir} with the default recipe")
    print(DEMO_LEGEND)
    done = train(cfg, overwrite=True)
    if done["status"] != "done":
        if done["stop_line"]:
            say(done["stop_line"])
        return 130
    print(
        f"\nval loss      {done['val_loss']:.6f} nats/token\n"
        f"true loss     {done['true_loss_val']:.6f}  (the true chain on the same val sequences: the floor)\n"
        f"optimal loss  {done['optimal_loss']:.6f}  (the true chain's loss expected over all val sets of this size)\n"
        f"excess        {done['excess']:+.6f}  nats, val loss − true loss, in {done['elapsed_s']:.0f}s\n"
        f"captured      {100 * done['learnable_fraction']:.1f} %  of the learnable structure: "
        "(uniform − val) / (uniform − true), 0 % for a model that learned nothing\n"
    )
    run_dir = Path(cfg.out_dir)
    print("3/4 evaluate against the exact theory\n")
    ((_, result),) = evaluate_checkpoints([run_dir / "ckpt.pt"])
    print(format_eval(result))
    print("\n4/4 plots")
    report = write_report(run_dir)
    for path in report["files"]:
        if path.endswith(".png") and Path(path).parent == run_dir:
            print(f"  {path}")
    print(f"\nrun folder {run_dir}: config.json, log.jsonl, training.log, ckpt.pt, done.json, eval.json, eval.md")
    return 0


def cmd_eval(args):
    from nanomarkov.distributed import torch_threads
    from nanomarkov.evaluate import evaluate_checkpoints, format_eval, nonfinite_message

    with torch_threads(args.threads):
        written = evaluate_checkpoints(args.checkpoints, data_dir=args.data, out=args.out, force=args.force)
    for folder, result in written:
        print(format_eval(result))
        arrays = "".join(
            f", {name}"
            for name in ("learned_matrix.npy", "per_state.npz", "loss_by_position.npz")
            if (folder / name).is_file()
        )
        print(f"\nwritten: {folder}/eval.json, eval.md{arrays}\n")
    broken = nonfinite_message(written)  # a model that cannot be measured failed, as a diverged run does: exit 1
    if broken:
        say(f"error: {broken}")
    return 1 if broken else 0


def cmd_report(args):
    from nanomarkov.report import format_summary, write_report

    report = write_report(args.root)
    print(format_summary(report["summary"]))
    print(
        f"\n{len(report['runs'])} run(s); written: {Path(args.root) / 'report'}/summary.md, summary.csv, "
        "comparison.png, and learning_curve.png (+ loss_by_position.png, and transition_matrix.png, per_state_kl.png for a first-order chain, once evaluated) in each run"
    )
    for run in report["missing_eval"] + report["stale_eval"]:
        print(
            f"{'not evaluated' if run in report['missing_eval'] else 'trained on since its eval'}: "
            f"nanomarkov eval {Path(run) / 'ckpt.pt'}"
        )
    for skip in report["skipped"]:
        say(f"skipped {Path(skip['run']) / skip['plot']}: {skip['why']}")
    return 0


# The learning coefficient's settings on the command line: flag -> config.LLC_DEFAULTS key.
LLC_FLAGS = {
    "llc_chains": "num_chains",
    "llc_draws": "num_draws",
    "llc_batch_size": "batch_size",
    "llc_lr": "lr",
    "llc_localization": "localization",
}


def cmd_dynamics(args):
    from nanomarkov.distributed import torch_threads
    from nanomarkov.dynamics import (
        check_dynamics_folder,
        format_dynamics,
        is_dynamics_folder,
        llc_settings,
        run_dynamics,
        write_dynamics,
    )

    given = {name: getattr(args, flag) for flag, name in LLC_FLAGS.items() if getattr(args, flag) is not None}
    if given and not args.llc:
        flag = next(flag for flag, name in LLC_FLAGS.items() if name in given)
        raise NanoMarkovError(f"--{flag} sets the learning coefficient's estimate; add --llc to estimate it")
    llc = llc_settings(**given) if args.llc else None
    folder = args.out or args.run
    if args.out or is_dynamics_folder(folder):  # (what is not a run, run_dynamics names)
        check_dynamics_folder(folder, args.force)  # before the work, which takes a while
    # One writer: a second dynamics, or a train still writing the run's snapshots, is refused. (A run folder
    # that is not there is run_dynamics's to name, not a folder to make.)
    lock = writer_lock(folder, "dynamics") if args.out or os.path.isdir(folder) else contextlib.nullcontext()
    with lock, torch_threads(args.threads):
        record = run_dynamics(
            args.run,
            data_dir=args.data,
            val_sequences=args.val_sequences,
            llc=llc,
            show_progress=sys.stderr.isatty(),
            simplex_iters=args.simplex_iters,
        )
        written = write_dynamics(record, folder, force=args.force)
    if args.json:
        print(json_text(record), end="")
    else:
        print(format_dynamics(record))
        print(f"\nwritten: {', '.join(str(path) for path in written)}")
    return 0


def _iteration_list(text):
    """--simplex_iters: comma-separated iterations (integers >= 0)."""
    parts = text.split(",")
    if not all(part.strip().isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated iterations like 0,400,1000, got {text!r}")
    return [int(part) for part in parts]


def _add_dynamics(verbs):
    dyn = verbs.add_parser(
        "dynamics",
        help="every snapshot of a run against the exact theory: stages crossed, KLs, probes, attention",
        epilog="example: nanomarkov train data/icl3 --snapshots 30, then nanomarkov dynamics trainings/icl3/icl3-42",
    )
    dyn.add_argument("run", help="a run folder trained with --snapshots N")
    dyn.add_argument("--data", default=None, help="dataset folder (default: the one the run trained on)")
    dyn.add_argument("--out", default=None, help="output folder (default: the run folder)")
    dyn.add_argument("--force", action="store_true", help="write into an --out that holds other files")
    dyn.add_argument("--json", action="store_true", help="print dynamics.json instead of the table")
    dyn.add_argument(
        "--val_sequences",
        type=int,
        default=DEFAULT_VAL_SEQUENCES,
        help=f"val sequences evaluated per snapshot, the first ones (default {DEFAULT_VAL_SEQUENCES})",
    )
    dyn.add_argument(
        "--simplex_iters",
        type=_iteration_list,
        default=None,
        help="hmm: the snapshots whose belief simplex dynamics_simplex.png draws, e.g. 0,400,1000 "
        "(default: the first, the one nearest half the run, and the last)",
    )
    _add_threads(dyn, "auto")
    dyn.add_argument("--llc", action="store_true", help="estimate the learning coefficient too (needs devinterp; slow)")
    for flag, name in LLC_FLAGS.items():
        kind = int if name in LLC_COUNTS else float
        dyn.add_argument(
            f"--{flag}", type=kind, default=None, help=f"with --llc: devinterp's {name} (default {LLC_DEFAULTS[name]})"
        )
    dyn.set_defaults(func=cmd_dynamics)


def cmd_sweep(args):
    from nanomarkov.sweep import run_sweep
    from nanomarkov.sweep.slurm import SLURM_FLAGS
    from nanomarkov.sweep.status import format_status, sweep_status

    if args.target == "status":
        if not args.folder or args.out or args.dry_run or args.force or args.jobs != 1:
            raise NanoMarkovError("usage: nanomarkov sweep status DIR (the folder a sweep wrote, its --out)")
        print(format_status(sweep_status(args.folder)))
        return 0
    if args.folder:
        raise NanoMarkovError(f"unexpected {args.folder!r}: nanomarkov sweep GRID --out DIR [--jobs N] [--dry-run]")
    if not args.out:
        raise NanoMarkovError("say where the sweep goes: nanomarkov sweep GRID --out DIR")
    slurm = slurm_options(args, SLURM_FLAGS)
    if args.launcher == "slurm" and args.jobs != 1:
        raise NanoMarkovError("--jobs is the local launcher's; on SLURM use --array_parallelism N")
    manifest = run_sweep(
        args.target,
        args.out,
        jobs=args.jobs,
        dry_run=args.dry_run,
        launcher=args.launcher,
        slurm=slurm if args.launcher == "slurm" else None,
        notes=lambda line: print(line, file=sys.stderr, flush=True),
        force=args.force,
    )
    if not args.dry_run:
        print(format_status(sweep_status(args.out)))
    states = {run["state"] for run in manifest["runs"].values()}
    return 1 if states & {"failed", "cancelled"} else 0


def cmd_reproduce(args):
    from nanomarkov.reproduce import claims_table, paper_names, read_paper, reproduce
    from nanomarkov.sweep.slurm import SLURM_FLAGS

    if args.list:
        for name in paper_names():
            paper = read_paper(name)
            c = paper.citation
            print(f"{name:<18} {c['authors']} {c['year']}, {c['title']} ({len(paper.claims)} claims)")
        return 0
    if bool(args.name) == args.all:
        raise NanoMarkovError("usage: nanomarkov reproduce NAME --out DIR, --all --out DIR, or --list")
    if not args.out:
        raise NanoMarkovError("say where the reproduction goes: nanomarkov reproduce NAME --out DIR")
    slurm = slurm_options(args, SLURM_FLAGS)
    if args.launcher == "slurm" and (args.jobs != 1 or args.threads != "auto"):
        raise NanoMarkovError("--jobs and --threads are the local launcher's; on SLURM use --array_parallelism N")
    outcomes = []
    for name in paper_names() if args.all else [args.name]:
        out = Path(args.out) / name if args.all else Path(args.out)
        outcome = reproduce(
            name,
            out,
            scale=args.scale,
            jobs=args.jobs,
            launcher=args.launcher,
            slurm=slurm if args.launcher == "slurm" else None,
            force=args.force,
            threads=args.threads,
        )
        held = sum(c["holds"] for c in outcome["claims"])
        print(f"{name}: {held} of {len(outcome['claims'])} claims hold; report: {out / 'report.md'}")
        outcomes.append(outcome)
    print(claims_table(outcomes))
    return 1 if any(outcome["failed"] for outcome in outcomes) else 0


def cmd_export(args):
    from nanomarkov.checkpoint import checkpoint_path, export_safetensors
    from nanomarkov.interp.hf import export_hf

    args.checkpoint = checkpoint_path(args.checkpoint)  # a run folder stands for its ckpt.pt, as in eval
    if not args.checkpoint.is_file():
        raise NanoMarkovError(f"{args.checkpoint}: no checkpoint there; give a ckpt.pt, or a run folder holding one")
    if args.format == "hf":
        if args.force:
            raise NanoMarkovError(
                "--force goes with --format safetensors: a Hugging Face export replaces its folder whole, "
                "so give --out a new or empty folder (or an earlier hf export)"
            )
        out = export_hf(args.checkpoint, args.out)
        print(f"written: {out} (GPT-2); in Python: transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
        return 0
    out = export_safetensors(args.checkpoint, args.out, force=args.force)
    print(f"written: {out}/model.safetensors, {out}/config.json; in Python: nanomarkov.load({str(out)!r})")
    return 0


def cmd_import_hmmlearn(args):
    meta = import_hmmlearn(
        args.pickle,
        args.out,
        trust_pickle=args.trust_pickle,
        train_sequences=args.train,
        val_sequences=args.val,
        seq_len=args.seq_len,
        seed=args.seed,
        force=args.force,
    )
    theory = meta["theory"]
    print(
        f"{args.out}: the {meta['n_states']}-state chain of {args.pickle}, {meta['train_sequences']} train + "
        f"{meta['val_sequences']} val sequences of {meta['seq_len']} tokens; optimal_loss {theory['optimal_loss']:.6f} "
        f"entropy_rate {theory['entropy_rate']:.6f} nats/token"
    )
    return 0


def _all_options():
    """Every registered process's generation options, each name once (the first process declaring it wins)."""
    options = {}
    for process, cls in PROCESSES.items():
        for option in cls.OPTIONS:
            options.setdefault(option.name, (process, option))
    return [option for _, option in options.values()]


def _add_generate(verbs):
    gen = verbs.add_parser("generate", help="sample a random chain's train/val sequences into a dataset folder")
    gen.add_argument(
        "n_states",
        type=int,
        nargs="?",
        default=None,
        help="number of states K (vocabulary K+1 with BOS); left out for a named process, which fixes its K, "
        "and with --spec",
    )
    gen.add_argument(
        "--spec",
        default=None,
        metavar="FILE",
        help="the process given exactly by a .json or .npz spec file (docs/specs.md); default --out data/<its stem>",
    )
    gen.add_argument("--train", type=int, default=10000, help="training sequences (default 10000)")
    gen.add_argument("--val", type=int, default=1000, help="validation sequences (default 1000)")
    gen.add_argument(
        "--process",
        choices=list(PROCESSES),
        default=None,
        help=f"(default {DEFAULT_PROCESS}) " + "; ".join(f"{name}: {cls.SUMMARY}" for name, cls in PROCESSES.items()),
    )
    _add_process_options(gen)
    gen.add_argument("--sparsity", type=float, default=None, help="percent of each row's transitions set to zero")
    gen.add_argument("--alpha", type=float, default=None, help="Dirichlet concentration of each row (default 1)")
    gen.add_argument(
        "--seq_len", type=int, default=None, help="tokens per sequence incl. BOS (default 128 for K<=10, else 256)"
    )
    gen.add_argument(
        "--seed",
        type=seed_type,
        default=42,
        help="seed of the chain and of the samples (a named process: the samples only; default 42)",
    )
    gen.add_argument(
        "--dtype", choices=["uint16", "uint32"], default=None, help="token type (default: smallest that fits)"
    )
    gen.add_argument(
        "--out",
        default=None,
        help="dataset folder (default data/ + the process's folder name [-sparse-{S}], e.g. data/mm{K}, "
        "data/mm{K}-order{k}, data/icl{K}, data/mess3, data/hmm{K}-h{H})",
    )
    gen.add_argument(
        "--force", action="store_true", help="replace an existing dataset with other parameters (or files of yours)"
    )
    gen.set_defaults(func=cmd_generate)


def _add_process_options(gen):
    """One flag per generation option of the registered processes, its help naming the processes that take it."""
    owners = {}
    for process, cls in PROCESSES.items():
        for option in cls.OPTIONS:
            owners.setdefault(option.name, []).append(process)
    for option in _all_options():
        gen.add_argument(
            f"--{option.name}",
            type=option.type,
            default=None,
            choices=option.choices,
            help=f"with --process {', '.join(owners[option.name])}: {option.help}",
        )


def _add_launcher(parser, unit, help):
    """--launcher and the SLURM launcher's flags (sweep: per run; tune: per worker), read back by slurm_options."""
    parser.add_argument("--launcher", choices=["local", "slurm"], default="local", help=help)
    cl = parser.add_argument_group("SLURM (with --launcher slurm)")
    cl.add_argument(
        "--slurm_partition", default=None, metavar="P", help="partition to submit to (default: the cluster's)"
    )
    cl.add_argument(
        "--time",
        type=int,
        default=None,
        metavar="MIN",
        help=f"time limit per {unit} in minutes (default 60); a sweep's run that reaches it checkpoints and is requeued",
    )
    cl.add_argument(
        "--cpus_per_task",
        type=int,
        default=None,
        metavar="N",
        help=f"CPUs per {unit} (default 1); a sweep's runs use them as torch threads",
    )
    cl.add_argument("--gpus_per_task", type=int, default=None, metavar="N", help=f"GPUs per {unit}")
    cl.add_argument("--mem", default=None, metavar="X", help=f"memory per {unit}, e.g. 4G")
    cl.add_argument("--array_parallelism", type=int, default=None, metavar="N", help=f"{unit}s at once at most")
    cl.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other sbatch option, repeatable: --sbatch account=mylab --sbatch qos=low",
    )


def slurm_options(args, flags):
    """{flag: value} of the SLURM flags given (sweep.slurm's SLURM_FLAGS); refused without --launcher slurm."""
    slurm = {flag: getattr(args, flag) for flag in flags if getattr(args, flag) not in (None, [])}
    if args.launcher == "local" and slurm:
        raise NanoMarkovError(f"--{next(iter(slurm))} is a SLURM option: add --launcher slurm")
    return slurm


def _add_sweep(verbs):
    sw = verbs.add_parser(
        "sweep",
        help="train and evaluate a whole grid of runs (grids/*.toml); 'sweep status DIR' shows it",
        epilog="examples: nanomarkov sweep grids/tiny.toml --out sweeps/tiny --jobs 2 | "
        "nanomarkov sweep grids/tiny.toml --out sweeps/tiny --launcher slurm | "
        "nanomarkov sweep status sweeps/tiny",
    )
    sw.add_argument("target", help="a grid file (TOML), or 'status'")
    sw.add_argument("folder", nargs="?", help="with 'status': the sweep's folder")
    sw.add_argument("--out", default=None, help="folder for the datasets, runs, sweep.json and report")
    sw.add_argument("--force", action="store_true", help="write into an --out that holds other files")
    sw.add_argument(
        "--jobs", type=jobs_type, default=1, help="runs trained at once, each in its own process (default 1)"
    )
    sw.add_argument(
        "--dry-run", action="store_true", help="print what would be trained, resumed or skipped; write nothing"
    )
    _add_launcher(sw, "run", "local processes (default), or one SLURM job array through submitit (docs/sweeps.md)")
    sw.set_defaults(func=cmd_sweep)


def _add_reproduce(verbs):
    rp = verbs.add_parser(
        "reproduce",
        help="run a paper's experiment (papers/NAME.toml) and check its claims against the exact theory",
        epilog="examples: nanomarkov reproduce --list | nanomarkov reproduce shai2024-mess3 --out repro/mess3 | "
        "nanomarkov reproduce --all --out repro --scale smoke (docs/papers.md)",
    )
    rp.add_argument("name", nargs="?", help="a paper's name (--list shows them) or the path of a paper's .toml")
    rp.add_argument("--out", default=None, help="folder for the runs, claims.json and report.md (--all: one per paper)")
    rp.add_argument("--list", action="store_true", help="the papers there are, and stop")
    rp.add_argument("--all", action="store_true", help="every paper, each into OUT/NAME, then one table of claims")
    rp.add_argument(
        "--scale",
        choices=["smoke", "cpu", "paper"],
        default="cpu",
        help="smoke: seconds (CI); cpu (default): minutes on a 2-core CPU; paper: the paper's sizes",
    )
    rp.add_argument("--force", action="store_true", help="write into an --out that holds other files")
    rp.add_argument(
        "--jobs", type=jobs_type, default=1, help="runs trained at once, each in its own process (default 1)"
    )
    rp.add_argument(
        "--threads",
        type=threads_type,
        default="auto",
        metavar="N|auto",
        help="torch threads per local run: N, or auto (default): the cores over --jobs",
    )
    _add_launcher(rp, "run", "local processes (default), or one SLURM job array through submitit, as sweep's")
    rp.set_defaults(func=cmd_reproduce)


def _add_import_hmmlearn(verbs):
    imp = verbs.add_parser(
        "import-hmmlearn",
        help="a dataset folder from a chain the seed saved (pickled hmmlearn model)",
        epilog="example: nanomarkov import-hmmlearn data/mm10/model.pkl --trust-pickle --out data/mm10-seed",
    )
    imp.add_argument("pickle", help="model.pkl: a pickled hmmlearn CategoricalHMM with identity emissions")
    imp.add_argument(
        "--trust-pickle", action="store_true", help="load it: unpickling runs code, so only for files you made"
    )
    imp.add_argument("--out", required=True, help="dataset folder to write")
    imp.add_argument("--train", type=int, default=10000, help="training sequences (default 10000)")
    imp.add_argument("--val", type=int, default=1000, help="validation sequences (default 1000)")
    imp.add_argument(
        "--seq_len", type=int, default=None, help="tokens per sequence incl. BOS (default 128 for K<=10, else 256)"
    )
    imp.add_argument("--seed", type=seed_type, default=42, help="seed of the samples (default 42)")
    imp.add_argument("--force", action="store_true", help="replace an existing dataset with other parameters")
    imp.set_defaults(func=cmd_import_hmmlearn)


def _add_train(verbs):
    tr = verbs.add_parser(
        "train",
        help="train a GPT on a dataset; any TrainConfig field as --key=value",
        epilog="examples: nanomarkov train 100 42 --sparse 75 | nanomarkov train config.py --max_iters=500",
    )
    tr.add_argument(
        "target", help="a chain id (10, 100, 100-sparse-75), a dataset folder (any process) or a config file (.py)"
    )
    tr.add_argument("seed", nargs="?", type=seed_type, default=None, help="seed with a chain id (default 42)")
    tr.add_argument("--sparse", type=int, default=None, help="sparsity percent of the chain (data/mm{K}-sparse-{S})")
    tr.add_argument("--preset", default=None, help="recipe: default, seed, c1..c12 (default: default)")
    tr.add_argument(
        "--seeds", type=seed_type, nargs="+", default=None, help="train one run per seed, one after another"
    )
    tr.add_argument("--resume", action="store_true", help="continue the run in out_dir from its checkpoint")
    tr.add_argument(
        "--force", action="store_true", help="start over in an out_dir that holds a run (or files of yours)"
    )
    tr.add_argument(
        "--snapshots", type=int, default=None, metavar="N", help="keep N+2 weight snapshots at log-spaced iterations"
    )
    tr.add_argument(
        "--snapshot_every",
        type=int,
        default=None,
        metavar="N",
        help="also keep a weight snapshot every N iterations (and the last); with --snapshots, the union",
    )
    tr.add_argument(
        "--data_source", default=None, metavar="fixed|online", help="online: fresh sequences from the process each step"
    )
    _add_threads(tr, None)  # None: the recipe's (a config file's, a resumed run's) threads
    tr.set_defaults(func=cmd_train, takes_overrides=True)


def cmd_tune(args):
    from nanomarkov.sweep.slurm import SLURM_FLAGS, require_slurm, slurm_executor
    from nanomarkov.tune import TuneSettings, check_settings, default_tokens, parse_space, tune

    if args.trials < 1 or args.jobs < 1 or (args.tokens is not None and args.tokens < 1):
        raise NanoMarkovError("--trials, --jobs and --tokens must be at least 1")
    seq_len = load_dataset(args.data, verify=False).seq_len
    tokens = args.tokens or default_tokens(dataset_preset("default", args.data), seq_len)
    settings = TuneSettings(
        args.data, args.out, args.trials, tokens, parse_space(args.space), args.storage or "", threads=args.threads
    )
    slurm = slurm_options(args, SLURM_FLAGS)
    executor_for = functools.partial(slurm_executor, **slurm) if args.launcher == "slurm" else None
    if executor_for is not None:
        require_slurm()  # before the study's folder is made
    check_settings(settings)  # before the first line: a refused space leaves no study behind
    print(f"tuning on {args.data}: {args.trials} trials of {settings.tokens:,} tokens, {args.jobs} worker(s)")
    code, best = tune(settings, jobs=args.jobs, executor_for=executor_for)
    print(best)
    return code


def _add_tune(verbs):
    tu = verbs.add_parser(
        "tune",
        help="search the training recipe with Optuna for the least excess at a token budget (docs/tuning.md)",
        epilog="example: nanomarkov tune data/mm5 --trials 20 --jobs 2 --space lr=1e-4:1e-2 n_layer=1:2",
    )
    tu.add_argument("data", help="a dataset folder")
    tu.add_argument("--trials", type=int, default=20, help="trials in the study, all runs together (default 20)")
    tu.add_argument("--out", required=True, help="the study's folder: study.db, trials/, best_recipe.py, report.md")
    tu.add_argument(
        "--tokens", type=int, default=None, help="training tokens per trial (default: the default recipe's, ≤ 4M)"
    )
    tu.add_argument(
        "--space",
        nargs="*",
        default=[],
        metavar="NAME=SPEC",
        help="narrow the search: name=low:high, name=a,b,c, or a .toml/.json file of them",
    )
    tu.add_argument("--storage", default=None, metavar="URL", help="an Optuna storage URL (default DIR/study.db)")
    tu.add_argument("--jobs", type=jobs_type, default=1, help="workers, each running trials in turn (default 1)")
    _add_threads(tu, "auto")
    _add_launcher(tu, "worker", "workers as local processes (default), or --jobs SLURM jobs (docs/tuning.md)")
    tu.set_defaults(func=cmd_tune)


def _add_export(verbs):
    ex = verbs.add_parser(
        "export",
        help="write a checkpoint's model as model.safetensors + config.json (no pickle), or as a Hugging Face GPT-2",
        epilog="example: nanomarkov export trainings/MM/MM-10/MM-10-42/ckpt.pt --out exports/mm10",
    )
    ex.add_argument("checkpoint", help="a ckpt.pt")
    ex.add_argument(
        "--format",
        choices=["safetensors", "hf"],
        default="safetensors",
        help="safetensors: for nanomarkov.load; hf: a GPT-2 folder for transformers (the hf extra)",
    )
    ex.add_argument("--out", required=True, help="output folder (created; an earlier export there is replaced)")
    ex.add_argument(
        "--force", action="store_true", help="safetensors: write into an --out that holds other files (not hf)"
    )
    ex.set_defaults(func=cmd_export)


def build_parser():
    parser = OneLineParser(
        prog="nanomarkov", description="Train small GPTs on Markov chains; check them against exact theory."
    )
    parser.add_argument("--version", action="version", version=f"nanomarkov {VERSION}")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=OneLineParser)

    _add_generate(verbs)
    theory = verbs.add_parser("theory", help="print the exact theory of dataset folders, or of a spec file")
    theory.add_argument("datasets", nargs="*", help="dataset folders, e.g. data/mm100")
    theory.add_argument("--json", action="store_true", help="print JSON instead of a table")
    theory.add_argument(
        "--spec", default=None, metavar="FILE", help="the theory of the process a spec file gives; writes nothing"
    )
    theory.add_argument(
        "--seq_len", type=int, default=None, help="with --spec: tokens per sequence incl. BOS (default as generate's)"
    )
    theory.set_defaults(func=cmd_theory)

    _add_train(verbs)

    ev = verbs.add_parser("eval", help="the metrics of checkpoints against the exact theory (several: agreement)")
    ev.add_argument(
        "checkpoints",
        nargs="+",
        help="ckpt.pt files or run folders holding one; runs on the same dataset that differ in seed",
    )
    ev.add_argument("--data", default=None, help="dataset folder (default: the one each checkpoint was trained on)")
    ev.add_argument(
        "--out",
        default=None,
        help="output folder (default: next to each checkpoint): new, empty, an earlier evaluation or a run folder",
    )
    ev.add_argument("--force", action="store_true", help="write into an --out that holds other files")
    _add_threads(ev, "auto")
    ev.set_defaults(func=cmd_eval)

    rep = verbs.add_parser("report", help="plots for each run under DIR, and a table of mean ± sd over seeds")
    rep.add_argument("root", help="a folder of runs, e.g. trainings/MM/MM-100 (or one run folder)")
    rep.set_defaults(func=cmd_report)

    _add_sweep(verbs)
    _add_reproduce(verbs)
    _add_tune(verbs)
    _add_dynamics(verbs)

    _add_export(verbs)

    _add_import_hmmlearn(verbs)

    demo = verbs.add_parser(
        "demo",
        help="generate MM-10, train it, print the loss against the optimum (minutes on a CPU)",
        description="Generate data/mm10 (a random 10-state Markov chain), train a small GPT on it with the default "
        "recipe into trainings/MM/MM-10/MM-10-42, evaluate it against the exact theory and draw its plots: about a "
        "minute on a CPU. Training settings may follow as --key=value (e.g. --max_iters=100).",
    )
    demo.set_defaults(func=cmd_demo, takes_overrides=True)
    return parser


def say(line):
    """One line on stderr, never an exception: stderr may be a full device too, and then the exit code is all
    that can still tell what happened."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        silence(sys.stderr)


def guarded(function, *args):
    """Run a command: bad input is one line on stderr and exit 2, a failed run exit 1, Ctrl-C 130."""
    with noting_user_signals() as arrived:  # a plugin's KeyboardInterrupt is told from the user's Ctrl-C by this
        return answered(arrived, function, *args)


def answered(arrived, function, *args):
    """guarded's body: each exception of the command as its exit code and its line on stderr; `arrived`, the user's
    signals that came while it ran (noting_user_signals)."""
    try:
        return function(*args)
    except TrainingDiverged as e:
        say(f"error: {e}")
        return 1
    except NanoMarkovError as e:
        say(f"error: {e}")
        return 2
    except (KeyboardInterrupt, Terminated) as stop:
        # A plugin's own `raise KeyboardInterrupt` is its bug: taken for a Ctrl-C, it would ask the user to run
        # again what stops the same way every time. It is the plugin's where no signal of the user's arrived and
        # the plugin's code raised it (training's second Ctrl-C is raised in StopRequests' handler, not there).
        plugin = None if signal_of_user(stop, arrived) else raised_by_plugin(stop)
        if plugin is not None:
            say(f"error: {plugin}")
            return 2
        signum = signal.SIGINT if isinstance(stop, KeyboardInterrupt) else signal.SIGTERM
        # A note is what the command leaves going on (a SLURM sweep's jobs), in the same one line.
        say("; ".join([stopped_line(signum), *getattr(stop, "__notes__", ())]))
        return 128 + signum
    # Anything else is one line only where it says something to the user: memory that ran out, or a plugin's process
    # that raised (its own bug, SystemExit included); the package's own failures stay tracebacks to report.
    except BaseException as e:
        if isinstance(e, (MemoryError, RuntimeError)) and is_out_of_memory(e):
            e.__traceback__ = None  # the frames that held what filled the memory go, and that memory with them
            say(out_of_memory_message(e))
            return 2
        plugin = plugin_failure(e)
        if plugin is None:
            raise
        say(f"error: {plugin}")
        return 2


# torch's words for an allocation that failed, where it raises a plain RuntimeError (the CPU allocator,
# a CUDA error raised outside the allocator) rather than torch.OutOfMemoryError.
TORCH_OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate memory", re.IGNORECASE)


def is_out_of_memory(error):
    """Whether an exception is an allocation that failed: MemoryError (numpy's included), torch's OutOfMemoryError
    (GPU), or torch's RuntimeError from its CPU allocator."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")  # not imported: nothing of torch ran, so no torch error to recognise
    torch_oom = getattr(torch, "OutOfMemoryError", None)
    return (torch_oom is not None and isinstance(error, torch_oom)) or bool(TORCH_OUT_OF_MEMORY.search(str(error)))


OUT_OF_MEMORY_FIX = (
    "use a smaller K, --batch_size or model (--n_layer, --n_embd), fewer --train/--val sequences, or a machine "
    "with more memory"
)
# Made before any command runs: where the memory is still short, building the detailed line fails too.
OUT_OF_MEMORY_LINE = f"error: out of memory: {OUT_OF_MEMORY_FIX}"


def out_of_memory_message(error):
    """The one line for an allocation that failed: which memory, the size asked for where the error says it;
    OUT_OF_MEMORY_LINE where even that small line cannot be allocated."""
    try:
        return detailed_out_of_memory_message(error)
    except MemoryError:
        return OUT_OF_MEMORY_LINE


def detailed_out_of_memory_message(error):
    text = str(error)
    on_gpu = re.search(r"CUDA|GPU|MPS|XPU", text) is not None
    asked = re.search(r"allocate (\d+(?:\.\d+)? ?[KMGTPE]i?B)", text, re.IGNORECASE)
    asked_bytes = re.search(r"allocate (\d+) bytes", text)
    size = asked.group(1) if asked else format_bytes(int(asked_bytes.group(1))) if asked_bytes else None
    return f"error: out of {'GPU' if on_gpu else 'memory'}{f' (asked for {size} more)' if size else ''}: {OUT_OF_MEMORY_FIX}"


# The flags whose value is a path: only theirs (and a bare word, a verb's path argument) have ~ expanded.
PATH_FLAGS = frozenset({"--out", "--out_dir", "--data", "--data_dir", "--spec"})


def expand_home(argv):
    """Every path argument starting with ~ (`~/x`, `--out=~/x`, `--out_dir=~alice/x`) with ~ expanded.

    A shell expands ~ at the start of a word, as here, but not after `=`, so `--out_dir=~/x` (or a
    quoted '~/x') would otherwise make a folder literally named ~ in the current folder. After `=`
    only a path flag's value is expanded (PATH_FLAGS): `--wandb_run_name=~name` stays as it is."""
    expanded = []
    for arg in argv:
        flag, equals, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        is_path = flag in PATH_FLAGS if equals else not flag
        expanded.append(flag + equals + os.path.expanduser(value) if is_path and value.startswith("~") else arg)
    return expanded


def _dispatch(argv):
    load_plugins()  # NANOMARKOV_PROCESSES: a researcher's own processes, registered before --process is built
    parser = build_parser()
    args, extra = parser.parse_known_args(expand_home(sys.argv[1:] if argv is None else argv))
    if getattr(args, "takes_overrides", False):
        return args.func(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


class Terminated(BaseException):
    """SIGTERM (kill, a scheduler's time limit), raised where the program is, so that every
    `finally` runs: a generation removes its unfinished build, locks are let go. A BaseException,
    like KeyboardInterrupt, so that no `except Exception` takes it for an ordinary failure."""


def _raise_terminated(signum, frame):
    raise Terminated


class CheckedStdout:
    """sys.stdout that outlives a failed write (a full device, an I/O error): the first failure is kept in
    `failure` and what follows is dropped, so that the command's work (a dataset, a training run) still
    ends whole, and main reports the lost output at the end. A closed pipe (`| head -1`) is kept in
    `closed` and dropped the same way: the reader has gone, but the work it started -- a training run and
    its checkpoint, a dataset, a sweep -- is worth more than its printout, so the command finishes it and
    exits as a tool that SIGPIPE ends does (141), quietly."""

    def __init__(self, stream):
        self.stream, self.failure, self.closed = stream, None, False

    def write(self, text):
        self.checked(self.stream.write, text)
        return len(text)

    def flush(self):
        self.checked(self.stream.flush)

    def checked(self, operation, *args):
        if self.failure is not None or self.closed:
            return
        try:
            operation(*args)
        except BrokenPipeError:
            self.closed = True
        except OSError as e:
            self.failure = e.strerror or str(e)

    def __getattr__(self, name):  # isatty, fileno, encoding: the stream's own
        return getattr(self.stream, name)


def show_note(message, category, filename, lineno, file=None, line=None):
    """warnings.showwarning for the command line: the message as one `note:` line, without Python's source line."""
    say(f"note: {' '.join(str(message).split())}")


def silence(stream):
    """Point a stream that failed at /dev/null, so that Python's own flush at exit does not fail again on what is
    left in its buffer (and turn the exit code into 120)."""
    with suppress(OSError, ValueError):  # no file descriptor (a test's captured stream): nothing is flushed at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def run_and_flush(argv):
    """The command's exit code, with stdout flushed here rather than at exit, so that a failed write is seen
    in main; also after argparse's --help, which ends through SystemExit."""
    try:
        return guarded(_dispatch, argv)
    except SystemExit as e:  # only argparse's: a plugin's sys.exit is refused where plugins load
        return 0 if e.code is None else e.code
    finally:
        sys.stdout.flush()


def stop_deadline(env):
    """progress.StopDeadline for a command run alone; none for a rank of torchrun or srun (`env` names it as
    distributed.launch_from_env reads it): the ranks stop together, after the same step, through their
    collectives, which one rank ended alone would leave the others waiting in."""
    tasks = env.get("SLURM_STEP_NUM_TASKS", "1")
    if "RANK" in env or (tasks.isdigit() and int(tasks) > 1):
        return nullcontext()
    return StopDeadline()


def main(argv=None):
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)  # training installs its own while it trains
    stdout = CheckedStdout(sys.stdout)
    try:
        with stop_deadline(os.environ), warnings.catch_warnings(), redirect_stdout(stdout):
            warnings.showwarning = show_note  # restored by catch_warnings
            code = run_and_flush(argv)
    except BrokenPipeError:  # a write that bypassed CheckedStdout (a library's own reference to the stream)
        stdout.closed = True
    if stdout.closed:
        silence(sys.stdout)  # the reader left (`| head -1`): nothing to report, the work is done
        return code or EXIT_CLOSED_STDOUT
    if stdout.failure is None:
        return code
    silence(sys.stdout)
    say(f"error: cannot write to stdout ({stdout.failure}); free space where stdout goes, or redirect it elsewhere")
    return code or 1


if __name__ == "__main__":
    sys.exit(main())
