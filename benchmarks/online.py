"""Training speed with fixed data (the train split) and online data (fresh from the process), side by side.

    python benchmarks/online.py [--iters 300] [--repeats 2] [--record]

For MM-10 and MM-100 (default recipe, datasets under runs/bench/data as benchmarks/train.py
makes them), trains `--iters` steps with each data source, alternating fixed and online
`--repeats` times so that a change in the machine's load hits both alike, and reports the
median tokens/s of the log lines (the first one, warm-up, left out). A second table
times the sampling alone: one chunk of online data (data.ONLINE_CHUNK_ITERS steps' batches)
against the training steps it feeds, i.e. what online data would cost without sampling ahead.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from nanomarkov.config import TrainConfig, preset
from nanomarkov.data import ONLINE_CHUNK_ITERS, OnlineSequences, generate_dataset, load_dataset
from nanomarkov.train import train

try:
    from record import machine, publish
except ImportError:
    from benchmarks.record import machine, publish

ROOT = Path("runs/bench")
CHAINS = ((10, 10000), (100, 50000))  # K, train sequences (benchmarks/train.py's datasets)


def tokens_per_s(k, data_dir, source, iters):
    """Median tokens/s of a short default-recipe run on `source` data (evaluations only at the ends)."""
    out = ROOT / f"online-mm{k}-{source}"
    values = preset("default", k)
    values.update(
        data_dir=str(data_dir),
        out_dir=str(out),
        data_source=source,
        max_iters=iters,
        lr_decay_iters=iters,
        eval_interval=iters,
        log_interval=max(1, iters // 10),
    )
    train(TrainConfig.from_dict(values), overwrite=True, show_progress=False)
    rates = [r["tokens_per_s"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]
    return statistics.median([r for r in rates[1:] if r is not None] or rates)


def sampling_cost(k, data_dir, fixed_rate):
    """(seconds to sample one chunk, that as a fraction of the time its steps train at fixed_rate tokens/s)."""
    dataset = load_dataset(data_dir, verify=False)
    batch_size = preset("default", k)["batch_size"]
    step_s = batch_size * (dataset.seq_len - 1) / fixed_rate
    stream = OnlineSequences(dataset.chain, dataset.seq_len, batch_size, 1, seed=0)
    try:
        started = time.perf_counter()
        stream.sample_chunk(0)
        chunk_s = time.perf_counter() - started
    finally:
        stream.close()
    return chunk_s, chunk_s / (ONLINE_CHUNK_ITERS * step_s)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=300, help="training steps per run (default 300)")
    parser.add_argument("--repeats", type=int, default=2, help="fixed/online pairs per chain (default 2)")
    parser.add_argument("--record", action="store_true", help="write the tables into BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())  # as a user's run: all cores
    speed = ["| chain | fixed tokens/s | online tokens/s | online / fixed |", "|---|---:|---:|---:|"]
    sampling = ["| chain | one chunk sampled | of the time its steps train |", "|---|---:|---:|"]
    for k, n_train in CHAINS:
        data_dir = ROOT / "data" / f"mm{k}"
        generate_dataset(data_dir, k, n_train, n_train // 10)
        rates = {"fixed": [], "online": []}
        for _ in range(args.repeats):
            for source in rates:
                rates[source].append(tokens_per_s(k, data_dir, source, args.iters))
                print(f"MM-{k} {source}: {rates[source][-1]:,.0f} tokens/s", flush=True)
        fixed, online = (float(np.median(rates[s])) for s in ("fixed", "online"))
        speed.append(f"| MM-{k} | {fixed / 1e3:.1f} k | {online / 1e3:.1f} k | {online / fixed:.3f} |")
        chunk_s, fraction = sampling_cost(k, data_dir, fixed)
        sampling.append(f"| MM-{k} | {chunk_s * 1e3:.1f} ms | {100 * fraction:.1f} % |")
    text = "\n".join(
        [
            "## Online data (`python benchmarks/online.py --record`)",
            "",
            f"Machine: {machine()}. Default recipe, {args.iters} steps per run, fixed and online alternated "
            f"{args.repeats} times; median tokens/s of the log lines.",
            "",
            *speed,
            "",
            f"Sampling alone: one chunk ({ONLINE_CHUNK_ITERS} steps' batches), which a background thread "
            "samples while the previous chunk trains:",
            "",
            *sampling,
        ]
    )
    publish("online", text, args.record)


if __name__ == "__main__":
    main()
