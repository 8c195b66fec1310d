"""What a width allows on MM-1000: the least KL from the chain to a logit table of each rank.

    python benchmarks/rank_floor.py [--record] [--steps 500]

A model n_embd wide predicts through a logit table of rank at most n_embd (its head reads an
n_embd-dimensional stream). For the chain `nanomarkov generate 1000` draws (seed 42), each rank's
best table is searched by Adam on the exact loss: the KL per token from the chain's transition
matrix to the table's softmax, weighted by the stationary law (no data, no sampling noise). The
least KL seen over the steps is recorded: what a model that wide reaches at best with unlimited
data (its LayerNorm before the head can only add to it). docs/training.md reads it to choose the
default width above K = 100.
"""

import argparse
import time

import torch

from nanomarkov.processes.markov import MarkovChain

try:
    from record import machine, publish
except ImportError:
    from benchmarks.record import machine, publish

RANKS = (256, 512, 768, 1000)
LEARNING_RATE = 1e-2


def least_kl(chain, rank, steps, seed=0):
    """The least KL per token over `steps` Adam steps on a rank-`rank` table (left @ right)."""
    torch.manual_seed(seed)
    target = torch.tensor(chain.transmat, dtype=torch.float32)
    weight = torch.tensor(chain.stationary(), dtype=torch.float32)[:, None] * target
    entropy = -torch.xlogy(weight, target).sum()
    left = torch.nn.Parameter(0.02 * torch.randn(chain.n_states, rank))
    right = torch.nn.Parameter(0.02 * torch.randn(rank, chain.n_states))
    optimizer = torch.optim.Adam([left, right], lr=LEARNING_RATE)
    least = float("inf")
    for _ in range(steps):
        kl = -(weight * torch.log_softmax(left @ right, dim=-1)).sum() - entropy
        least = min(least, kl.item())
        optimizer.zero_grad()
        kl.backward()
        optimizer.step()
    return least


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    parser.add_argument("--steps", type=int, default=500, help="Adam steps per rank (default 500)")
    args = parser.parse_args()
    chain = MarkovChain.random(1000, seed=42)
    rows = ["| rank (width) | least KL to the chain (nats) | search |", "|---:|---:|---:|"]
    for rank in RANKS:
        started = time.perf_counter()
        kl = least_kl(chain, rank, args.steps)
        rows.append(f"| {rank} | {kl:.4f} | {time.perf_counter() - started:.0f} s |")
        print(rows[-1], flush=True)
    text = [
        "## What a width allows (`python benchmarks/rank_floor.py --record`)",
        "",
        f"Machine: {machine()}. MM-1000's chain (seed 42); for each rank, the least KL per token from its "
        f"transition matrix to a logit table of that rank, over {args.steps} full-batch Adam steps (lr "
        f"{LEARNING_RATE:g}) on the exact loss under the stationary law: a model that wide cannot go below it.",
        "",
        *rows,
    ]
    publish("rank-floor", "\n".join(text), args.record)


if __name__ == "__main__":
    main()
