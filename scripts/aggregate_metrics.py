#!/usr/bin/env python3
"""The seed's aggregation over runs, over `nanomarkov report`:

    python scripts/aggregate_metrics.py [DIR]          (default trainings/MM)
    python scripts/aggregate_metrics.py --base_dir trainings/MM/MM-100 --output metrics.csv

Writes DIR/report/ (summary.md, summary.csv, comparison.png) and each run's plots,
prints the summary table (mean ± sd over seeds), and with --output copies the CSV there.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from nanomarkov import NanoMarkovError  # noqa: E402
from nanomarkov.cli import OneLineParser, guarded  # noqa: E402
from nanomarkov.report import format_summary, write_csv, write_report  # noqa: E402


def main(argv=None):
    parser = OneLineParser(prog="aggregate_metrics.py", description="Plots and one table over training runs.")
    parser.add_argument("dir", nargs="?", help="folder holding run folders (default trainings/MM)")
    parser.add_argument("--base_dir", help="the same as DIR (the seed's name for it)")
    parser.add_argument("--output", help="also write the summary CSV here")
    args = parser.parse_args(argv)
    if args.dir and args.base_dir and Path(args.dir) != Path(args.base_dir):
        raise NanoMarkovError("give DIR or --base_dir, not two different folders")
    written = write_report(Path(args.dir or args.base_dir or "trainings/MM"))
    print(format_summary(written["summary"]))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        write_csv(written["summary"], Path(args.output))
    print(f"\nwritten: {len(written['files'])} files" + (f", {args.output}" if args.output else ""))
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
