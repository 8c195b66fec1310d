"""Dataset generation: our vectorised sampler against hmmlearn one sequence at a time.

    python benchmarks/generate.py [--record]

For K = 10, 100, 1000 it measures, side by side in one run:
  - hmmlearn: CategoricalHMM.sample for one sequence at a time (the seed's way);
  - ours, sampler only: MarkovChain.sample over many sequences;
  - ours, end to end: generate_dataset (sampling, writing, sha256, true loss);
and the peak RSS of a generation as its size is multiplied by 4 (it should not grow).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time

import numpy as np

from nanomarkov.data import default_seq_len, generate_dataset
from nanomarkov.processes.markov import MarkovChain

try:
    from record import machine, publish
except ImportError:  # run as a module from elsewhere
    from benchmarks.record import machine, publish


def hmmlearn_tokens_per_s(chain, seq_len, n_sequences):
    model = chain.to_hmmlearn()
    rng = np.random.RandomState(0)
    start = time.perf_counter()
    for _ in range(n_sequences):
        model.sample(seq_len - 1, random_state=rng)
    return n_sequences * (seq_len - 1) / (time.perf_counter() - start)


def sampler_tokens_per_s(chain, seq_len, n_sequences):
    rng = np.random.default_rng(0)
    chain.sample(16, seq_len, rng)  # build the alias tables outside the timing
    start = time.perf_counter()
    chain.sample(n_sequences, seq_len, rng)
    return n_sequences * seq_len / (time.perf_counter() - start)


def end_to_end_tokens_per_s(n_states, n_sequences):
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        meta = generate_dataset(tmp, n_states, n_sequences, 1)
        return (meta["train_tokens"] + meta["val_tokens"]) / (time.perf_counter() - start)


PEAK_RSS_CHILD = """
import json, resource, sys, tempfile
from nanomarkov.data import generate_dataset
with tempfile.TemporaryDirectory() as tmp:
    generate_dataset(tmp, int(sys.argv[1]), int(sys.argv[2]), 1000)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
"""


def peak_rss_mb(n_states, n_sequences):
    out = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_CHILD, str(n_states), str(n_sequences)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()

    lines = [
        "| K | hmmlearn tok/s | ours sampler tok/s | ratio | ours end-to-end tok/s | ratio |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for k in (10, 100, 1000):
        chain = MarkovChain.random(k, seed=42)
        seq_len = default_seq_len(k)
        theirs = hmmlearn_tokens_per_s(chain, seq_len, 200)
        sampler = sampler_tokens_per_s(chain, seq_len, 50000)
        end_to_end = end_to_end_tokens_per_s(k, 50000)
        lines.append(
            f"| {k} | {theirs / 1e3:,.0f} k | {sampler / 1e6:,.1f} M | {sampler / theirs:,.0f}x "
            f"| {end_to_end / 1e6:,.1f} M | {end_to_end / theirs:,.0f}x |"
        )
        print(lines[-1], flush=True)

    rss_lines = ["| K=100, train sequences | tokens | peak RSS |", "|---:|---:|---:|"]
    for n in (50000, 200000):
        rss_lines.append(f"| {n:,} | {n * 256 / 1e6:,.1f} M | {peak_rss_mb(100, n):,.0f} MB |")
        print(rss_lines[-1], flush=True)

    text = "\n".join(
        [
            "## Generation (`python benchmarks/generate.py --record`)",
            "",
            f"Machine: {machine()}. hmmlearn samples 200 sequences one at a time (the seed's way); ours samples "
            "50,000 sequences (seq_len 128 for K=10, else 256). End to end = `generate_dataset`: sampling, "
            "writing, sha256 and the exact val loss. Target: >= 100x hmmlearn at K=100.",
            "",
            *lines,
            "",
            "Peak RSS of a whole generation (a fresh process) as the dataset grows 4x; it should stay flat:",
            "",
            *rss_lines,
        ]
    )
    publish("generate", text, args.record)


if __name__ == "__main__":
    main()
