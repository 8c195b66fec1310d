"""The CUDA path, run on a GPU: bf16 autocast, torch.compile, nccl, and a short MM-100 run.

    python benchmarks/gpu.py [--iters 600] [--record]

On MM-100 (50k train sequences, dense, seed 42, as benchmarks/train.py makes it):
  1. trains the default recipe's model for `--iters` steps four ways, side by side on one machine:
     CPU float32 (all cores), CUDA float32, CUDA bf16 autocast, CUDA bf16 autocast + torch.compile;
  2. trains the whole default recipe with `nanomarkov train`'s own CUDA choices (device, dtype and compile
     all 'auto': bf16 + compile on a GPU that has bf16) and evaluates it on the GPU and on the CPU;
  3. checks nccl: a one-rank process group, an all_reduce, and the gradients of DDP(GPT) on one batch
     against the plain model's (one GPU cannot hold two nccl ranks: NCCL refuses a GPU shared by ranks).
Needs a CUDA GPU; exits with one line where torch sees none.
"""

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from nanomarkov.batches import to_inputs_targets
from nanomarkov.config import TrainConfig, preset
from nanomarkov.data import generate_dataset, load_dataset
from nanomarkov.evaluate import evaluate_checkpoints
from nanomarkov.model import GPT
from nanomarkov.train import train

try:
    from record import machine, publish
except ImportError:
    from benchmarks.record import machine, publish

ROOT = Path("runs/bench-cuda")
K, N_TRAIN = 100, 50000
VARIANTS = (  # name, device, dtype, compile
    ("CPU float32", "cpu", "float32", False),
    ("CUDA float32", "cuda", "float32", False),
    ("CUDA bf16 autocast", "cuda", "bfloat16", False),
    ("CUDA bf16 autocast + compile", "cuda", "bfloat16", True),
)


def run(name, data, **overrides):
    """Train the default MM-100 recipe with `overrides`; (config, done.json, wall s, log records)."""
    out = ROOT / name.replace(" ", "-").replace("+", "and")
    cfg = TrainConfig.from_dict({**preset("default", K), "data_dir": str(data), "out_dir": str(out), **overrides})
    started = time.perf_counter()
    done = train(cfg, overwrite=True, show_progress=False)
    wall = time.perf_counter() - started
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return cfg, done, wall, log


def side_by_side(data, iters):
    """The same `iters` steps, same seed, in each VARIANT: tokens/s (median log interval after the first), wall."""
    rows = []
    for name, device, dtype, compiled in VARIANTS:
        cfg, done, wall, log = run(
            name,
            data,
            device=device,
            dtype=dtype,
            compile=compiled,
            max_iters=iters,
            lr_decay_iters=iters,
            eval_interval=iters,
            log_interval=max(1, iters // 20),
        )
        rates = [r["tokens_per_s"] for r in log if r["kind"] == "train"]
        rows.append((name, statistics.median(rates[1:] or rates), wall, done["excess"]))
        print(rows[-1], flush=True)
    return rows


def full_run(data):
    """The default recipe with every system choice 'auto', then eval of its checkpoint on the GPU and the CPU."""
    cfg, done, wall, log = run("default auto", data)
    ckpt = Path(cfg.out_dir) / "ckpt.pt"
    evals = {}
    for device in ("cuda", "cpu"):
        started = time.perf_counter()
        _, result = evaluate_checkpoints([ckpt], out=ROOT / f"eval-{device}", device=device)[0]
        evals[device] = (result["cross_entropy"], time.perf_counter() - started)
    rates = [r["tokens_per_s"] for r in log if r["kind"] == "train"]
    chosen = json.loads((Path(cfg.out_dir) / "config.json").read_text())
    return cfg, done, wall, statistics.median(rates[1:] or rates), chosen, evals


def nccl_check(data):
    """One-rank nccl group: all_reduce of ones, and DDP(GPT) gradients against the plain model's."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        ones = torch.ones(4, device="cuda")
        dist.all_reduce(ones)
        dataset = load_dataset(data, verify=False)
        cfg = TrainConfig.from_dict(preset("default", K))
        torch.manual_seed(0)
        plain = GPT(cfg.gpt_config(dataset.vocab_size, dataset.seq_len - 1)).cuda()
        wrapped = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(plain), device_ids=[0])
        x, y = to_inputs_targets(torch.from_numpy(dataset.train[:32].astype("int64")))
        x, y = x.cuda(), y.cuda()
        for model in (plain, wrapped):
            model(x, y)[1].backward()
        diff = max(
            (a.grad - b.grad).abs().max().item()
            for a, b in zip(plain.parameters(), wrapped.module.parameters())
            if a.grad is not None
        )
        version = torch.cuda.nccl.version()
        return ones.tolist(), diff, ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    finally:
        dist.destroy_process_group()


def report(iters, rows, full, nccl):
    cfg, done, wall, rate, chosen, evals = full
    base = rows[1][1]
    gpu = torch.cuda.get_device_name(0)
    lines = [
        "## CUDA path (`python benchmarks/gpu.py --record`)",
        "",
        f"Machine: {machine()}, {gpu}, CUDA {torch.version.cuda}. MM-100 (50k train sequences), the default "
        f"recipe's model ({cfg.n_layer}L {cfg.n_embd}d, batch {cfg.batch_size} x {chosen['block_size']} tokens).",
        "",
        f"{iters} steps of one model, same seed, each way (tokens/s: median log interval after the first; "
        "wall: the whole call, start-up, compilation and the two evaluations included):",
        "",
        "| run | tokens/s | vs CUDA float32 | wall | excess after the steps (nats) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, tokens_per_s, run_wall, excess in rows:
        lines.append(
            f"| {name} | {tokens_per_s / 1e3:,.0f} k | {tokens_per_s / base:.2f}x | {run_wall:.1f} s | {excess:.4f} |"
        )
    cuda_eval, cpu_eval = evals["cuda"], evals["cpu"]
    lines += [
        "",
        f"The whole default recipe with device/dtype/compile 'auto' ({cfg.max_iters} steps; the run chose "
        f"{chosen['device_resolved']}, autocast {chosen['autocast']}, compiled {chosen['compiled']}): {rate / 1e3:,.0f} k tokens/s, {done['elapsed_s']:.0f} s in the run "
        f"({wall:.0f} s wall), excess {done['excess']:.4f} nats.",
        f"Its checkpoint evaluated on the GPU in {cuda_eval[1]:.1f} s and on the CPU in {cpu_eval[1]:.1f} s; "
        f"val loss {cuda_eval[0]['val_loss']:.6f} (GPU) vs {cpu_eval[0]['val_loss']:.6f} (CPU), "
        f"excess {cuda_eval[0]['excess']:.6f} vs {cpu_eval[0]['excess']:.6f}.",
        "",
        f"nccl {nccl[2]}: a one-rank group's all_reduce of ones gave {nccl[0]}; DDP(GPT) "
        f"gradients on one batch differ from the plain model's by at most {nccl[1]:.1e}.",
    ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=600, help="steps of each side-by-side run")
    parser.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: torch sees no CUDA GPU; run it on a machine with one")
    data = ROOT / "data" / f"mm{K}"
    generate_dataset(data, K, N_TRAIN, N_TRAIN // 10)
    rows = side_by_side(data, args.iters)
    full = full_run(data)
    nccl = nccl_check(data)
    publish("cuda", report(args.iters, rows, full, nccl), args.record)


if __name__ == "__main__":
    main()
