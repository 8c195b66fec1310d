"""Training speed with fixed data (the train split) and online data (fresh from the process), side by side.

    python benchmarks/online.py [--iters 300] [--repeats 2] [--rounds 8] [--record]

For MM-10 and MM-100 (default recipe, datasets under runs/bench/data as benchmarks/train.py
makes them), trains `--iters` steps with each data source, alternating fixed and online
`--repeats` times so that a change in the machine's load hits both alike, and reports the
median tokens/s of the log lines (the first one, warm-up, left out). A second table times
training steps of one model fed fixed and online batches in alternating blocks, the
comparison least moved by other load on the machine. A third times the sampling alone: one chunk of online data (batches.ONLINE_CHUNK_ITERS steps' batches)
against the training steps it feeds, i.e. what online data would cost without sampling ahead.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from nanomarkov.batches import ONLINE_CHUNK_ITERS, FixedSequences, OnlineSequences, to_inputs_targets
from nanomarkov.config import TrainConfig, preset
from nanomarkov.data import generate_dataset, load_dataset
from nanomarkov.model import GPT
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
    log = map(json.loads, (out / "log.jsonl").read_text().splitlines())
    rates = [r["tokens_per_s"] for r in log if r["kind"] == "train"]
    return statistics.median(rates[1:] or rates)


def interleaved_steps(k, data_dir, rounds, block=16):
    """ms per training step with fixed and with online batches, in alternating blocks of `block` steps of one
    model (so that load changes hit both alike): (median fixed, median online, median and range of the
    per-round ratio online / fixed)."""
    dataset = load_dataset(data_dir, verify=False)
    cfg = TrainConfig.from_dict(preset("default", k))
    torch.manual_seed(0)
    model = GPT(cfg.gpt_config(dataset.vocab_size, dataset.seq_len - 1))
    optimizer = model.configure_optimizer(0.0, cfg.learning_rate, (cfg.beta1, cfg.beta2), "cpu")
    sources = {
        "fixed": FixedSequences(dataset.train, cfg.batch_size, 1, seed=0),
        "online": OnlineSequences(dataset.chain, dataset.seq_len, cfg.batch_size, 1, seed=0),
    }
    times = {name: [] for name in sources}
    try:
        for r in range(rounds + 1):
            for name, source in sources.items():
                started = time.perf_counter()
                for it in range(r * block, (r + 1) * block):
                    x, y = to_inputs_targets(source.batch(it, 0))
                    _, loss = model(x, y)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                times[name].append((time.perf_counter() - started) / block)
    finally:
        sources["online"].close()
    fixed, online = (np.array(times[name][1:]) for name in ("fixed", "online"))  # round 0 warms up
    ratios = online / fixed
    return 1e3 * np.median(fixed), 1e3 * np.median(online), np.median(ratios), ratios.min(), ratios.max()


def end_to_end(k, data_dir, iters, repeats):
    """The table row of whole runs, fixed and online alternated `repeats` times."""
    rates = {"fixed": [], "online": []}
    for _ in range(repeats):
        for source in rates:
            rates[source].append(tokens_per_s(k, data_dir, source, iters))
            print(f"MM-{k} {source}: {rates[source][-1]:,.0f} tokens/s", flush=True)
    fixed, online = (float(np.median(rates[s])) for s in ("fixed", "online"))
    return f"| MM-{k} | {fixed / 1e3:.1f} k | {online / 1e3:.1f} k | {online / fixed:.3f} |"


def sampling_cost(k, data_dir, step_s):
    """(seconds to sample one chunk, that as a fraction of the time its steps train at step_s each)."""
    dataset = load_dataset(data_dir, verify=False)
    batch_size = preset("default", k)["batch_size"]
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
    parser.add_argument("--repeats", type=int, default=2, help="fixed/online run pairs per chain (default 2)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of interleaved step blocks (default 8)")
    parser.add_argument("--record", action="store_true", help="write the tables into BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())  # as a user's run: all cores
    steps = [
        "| chain | fixed ms/step | online ms/step | online / fixed (median, range over rounds) |",
        "|---|---:|---:|---:|",
    ]
    speed = ["| chain | fixed tokens/s | online tokens/s | online / fixed |", "|---|---:|---:|---:|"]
    sampling = ["| chain | one chunk sampled | of the time its steps train |", "|---|---:|---:|"]
    for k, n_train in CHAINS:
        data_dir = ROOT / "data" / f"mm{k}"
        generate_dataset(data_dir, k, n_train, n_train // 10)
        fixed_ms, online_ms, ratio, low, high = interleaved_steps(k, data_dir, args.rounds)
        steps.append(f"| MM-{k} | {fixed_ms:.1f} | {online_ms:.1f} | {ratio:.3f} ({low:.2f} to {high:.2f}) |")
        print(steps[-1], flush=True)
        if args.repeats > 0:
            speed.append(end_to_end(k, data_dir, args.iters, args.repeats))
        chunk_s, fraction = sampling_cost(k, data_dir, fixed_ms / 1e3)
        sampling.append(f"| MM-{k} | {chunk_s * 1e3:.1f} ms | {100 * fraction:.1f} % |")
    text = "\n".join(
        [
            "## Online data (`python benchmarks/online.py --record`)",
            "",
            f"Machine: {machine()}. Default recipe, {args.iters} steps per run, fixed and online alternated "
            f"{args.repeats} times; median tokens/s of the log lines.",
            "",
            *(speed if args.repeats > 0 else ["(whole runs not measured: --repeats 0)"]),
            "",
            f"Training steps alone, one model, fixed and online batches in alternating blocks of 16 steps "
            f"({args.rounds} rounds):",
            "",
            *steps,
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
