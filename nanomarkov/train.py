"""The training loop: one function, `train(config)`, read top to bottom.

A run lives in `config.out_dir`:
  config.json    every TrainConfig field, plus the model's vocab_size and block_size
  log.jsonl      one JSON object per log line ("train") and per evaluation ("eval")
  training.log   the same lines for a person
  ckpt.pt        the last good state: model, optimizer, RNG, data position (torch.load(weights_only=True))
  done.json      written once the run has finished: final val loss next to the exact optimum

The data order is a pure function of (seed, position), and the checkpoint holds
every other piece of state, so a run killed at any moment and resumed ends
bit-identical on CPU to one never stopped.
"""

import contextlib
import dataclasses
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from nanomarkov.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from nanomarkov.config import TrainConfig, config_changes
from nanomarkov.data import SequenceOrder, load_dataset, to_inputs_targets, whole_split_batches
from nanomarkov.distributed import init_distributed
from nanomarkov.errors import NanoMarkovError, TrainingDiverged
from nanomarkov.model import GPT

EVAL_BATCH_SEQUENCES = 64


def resolve_device(cfg, local_rank=0):
    """(device string, autocast dtype or None, compile?) from the config's 'auto' choices."""
    # A process's GPU: by its local rank among the GPUs it sees, which are all of its node's, or
    # only its own when the launcher binds one per task (srun --gpus-per-task=1: always cuda:0).
    gpu = f"cuda:{local_rank % max(1, torch.cuda.device_count())}"
    if cfg.device == "auto":
        if torch.cuda.is_available():
            device = gpu
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    else:
        device = gpu if cfg.device == "cuda" else cfg.device
    device_type = device.split(":")[0]
    if device_type == "cuda" and not torch.cuda.is_available():
        raise NanoMarkovError("device is cuda but torch sees no CUDA GPU; use --device=cpu or --device=auto")
    if cfg.dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    else:
        dtype = cfg.dtype
    autocast = None if dtype == "float32" else getattr(torch, dtype)
    # Measured on this 2-core CPU: compiling costs tens of seconds, so a short run (the MM-10 demo:
    # 109 s vs 66 s) loses; long CPU runs may gain from --compile=True (not measured yet).
    use_compile = device_type == "cuda" if cfg.compile == "auto" else cfg.compile
    return device, autocast, use_compile


def learning_rate_at(it, cfg):
    """Linear warmup to learning_rate, then cosine down to min_lr at lr_decay_iters."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def split_loss(model, tokens, device, autocast, ddp):
    """Mean cross-entropy over a whole split (every predicted position of every sequence)."""
    model.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(whole_split_batches(tokens, EVAL_BATCH_SEQUENCES)):
        if i % ddp.world_size != ddp.rank:
            continue
        x, y = to_inputs_targets(batch, device)
        with _autocast(device, autocast):
            _, loss = model(x, y)
        total += loss.item() * y.numel()
        count += y.numel()
    model.train()
    if ddp.world_size > 1:
        sums = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        total, count = sums.tolist()
    return total / count


def _autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


class _StopRequests:
    """SIGINT/SIGTERM set a flag that the loop reads between steps, so a checkpoint is
    never written from the middle of an optimizer step. A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = None
        self._previous = {}

    def __enter__(self):
        # Python only lets the main thread install signal handlers.
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _RunLog:
    """log.jsonl for machines and training.log for people, both appended line by line."""

    def __init__(self, out_dir, enabled, echo):
        self.enabled, self.echo = enabled, echo
        self.jsonl = out_dir / "log.jsonl"
        self.text = out_dir / "training.log"

    def sizes(self):
        return {p.name: p.stat().st_size if p.exists() else 0 for p in (self.jsonl, self.text)}

    def truncate_to(self, sizes):
        """On resume, drop lines written after the checkpoint: they will be written again."""
        for p in (self.jsonl, self.text):
            if self.enabled and p.exists():
                with open(p, "r+b") as f:
                    f.truncate(sizes.get(p.name, 0))

    def line(self, text, record=None, echo=True):
        if not self.enabled:
            return
        if record is not None:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(record) + "\n")
        with open(self.text, "a") as f:
            f.write(text + "\n")
        if echo:
            self.echo(text)


def train(cfg: TrainConfig, overwrite=False, show_progress=None):
    """Train a GPT on cfg.data_dir; returns the done.json dict (status 'done' or 'interrupted')."""
    wants_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    ddp = init_distributed("cuda" if wants_cuda else "cpu")
    device, autocast, use_compile = resolve_device(cfg, ddp.local_rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)  # nccl's barrier and stray .cuda() calls use this process's GPU
    dataset = load_dataset(cfg.data_dir)
    if cfg.wandb_log and ddp.is_main:
        _import_wandb()  # fail before anything is written
    theory = dataset.meta["theory"]
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / CHECKPOINT

    global_batch = cfg.batch_size * cfg.grad_accum_steps * ddp.world_size
    gpt_config = cfg.gpt_config(vocab_size=dataset.vocab_size, block_size=dataset.seq_len - 1)
    tokens_per_iter = global_batch * gpt_config.block_size

    resume_state = None
    if cfg.init_from == "resume":
        resume_state = load_checkpoint(ckpt_path)
        _check_resumable(resume_state, cfg, dataset, ckpt_path)
    elif ckpt_path.exists() and not overwrite:
        raise NanoMarkovError(
            f"{out_dir} already holds a run (ckpt.pt); pass --resume to continue it, "
            "--force to start it over, or --out_dir=DIR to train elsewhere"
        )

    torch.manual_seed(cfg.seed)
    model = GPT(gpt_config).to(device)
    optimizer = model.configure_optimizer(
        cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.split(":")[0]
    )
    it, elapsed_before, log_sizes = 0, 0.0, {}
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        _set_rng_state(resume_state["rng"])
        it, elapsed_before, log_sizes = resume_state["iter"], resume_state["elapsed_s"], resume_state["log_sizes"]

    raw_model = model
    if use_compile:
        model = torch.compile(model)
    if ddp.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[ddp.local_rank] if device.startswith("cuda") else None)

    if ddp.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_state is None:
            for stale in ("log.jsonl", "training.log", "done.json"):
                (out_dir / stale).unlink(missing_ok=True)
        else:
            (out_dir / "done.json").unlink(missing_ok=True)
        config_record = dict(
            cfg.to_dict(),
            vocab_size=gpt_config.vocab_size,
            block_size=gpt_config.block_size,
            device_resolved=device,
            autocast=str(autocast),
            compiled=use_compile,
            world_size=ddp.world_size,
            tokens_per_iter=tokens_per_iter,
        )
        (out_dir / "config.json").write_text(json.dumps(config_record, indent=2) + "\n")

    interactive = (sys.stdout.isatty() if show_progress is None else show_progress) and ddp.is_main
    bar = None
    if interactive:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_iters, initial=it, unit="it", dynamic_ncols=True, leave=False)
    log = _RunLog(out_dir, ddp.is_main, bar.write if bar is not None else print)
    log.truncate_to(log_sizes)
    wandb_run = _start_wandb(cfg, out_dir) if cfg.wandb_log and ddp.is_main else None
    log.line(
        f"{out_dir}: {raw_model.num_params():,} parameters, {tokens_per_iter:,} tokens/iter "
        f"({global_batch} sequences x {gpt_config.block_size}), device {device}"
        f"{', ' + str(autocast).replace('torch.', '') if autocast else ''}{', compiled' if use_compile else ''}, "
        f"{'resuming at iter ' + str(it) if resume_state else 'from scratch'}; optimal_loss "
        f"{theory['optimal_loss']:.6f}, true_loss_val {theory['true_loss_val']:.6f}"
    )

    order = SequenceOrder(dataset.train.shape[0], cfg.seed)
    started = time.perf_counter()
    window_losses, window_start, window_tokens = [], time.perf_counter(), 0
    last_eval = None

    def elapsed():
        return elapsed_before + time.perf_counter() - started

    def evaluate_and_checkpoint(scheduled=True):
        nonlocal last_eval
        eval_started = time.perf_counter()
        val_loss = split_loss(model, dataset.val, device, autocast, ddp)
        if not math.isfinite(val_loss):
            raise TrainingDiverged(
                f"val loss is {val_loss} at iter {it}; the last good checkpoint "
                f"({ckpt_path}) is kept; lower learning_rate or check the data"
            )
        record = {
            "kind": "eval",
            "iter": it,
            "tokens": it * tokens_per_iter,
            "elapsed_s": round(elapsed(), 3),
            "train_loss": float(np.mean(eval_window)) if eval_window else None,
            "val_loss": val_loss,
            "optimal_loss": theory["optimal_loss"],
            "true_loss_val": theory["true_loss_val"],
            "excess": val_loss - theory["true_loss_val"],
            "lr": learning_rate_at(it, cfg),
            "eval_s": round(time.perf_counter() - eval_started, 3),
        }
        if scheduled:  # an extra eval (on Ctrl-C) leaves the window to the next scheduled one
            eval_window.clear()
        train_text = "-" if record["train_loss"] is None else f"{record['train_loss']:.4f}"
        log.line(
            f"eval iter {it}: train {train_text} val {val_loss:.6f} optimal {theory['optimal_loss']:.6f} "
            f"excess {record['excess']:+.6f} nats ({record['elapsed_s']:.1f}s)",
            record,
        )
        if wandb_run is not None:
            wandb_run.log({k: v for k, v in record.items() if k != "kind"}, step=it)
        last_eval = record
        if ddp.is_main and it > 0:
            save_checkpoint(
                ckpt_path,
                {
                    "model": raw_model.state_dict(),
                    "model_args": dataclasses.asdict(gpt_config),
                    "optimizer": optimizer.state_dict(),
                    "iter": it,
                    "tokens": it * tokens_per_iter,
                    "config": cfg.to_dict(),
                    "rng": _rng_state(),
                    "data_dir": str(cfg.data_dir),
                    "data_position": it * global_batch,
                    "dataset_sha256": dataset.meta["sha256"],
                    "elapsed_s": elapsed(),
                    "log_sizes": log.sizes(),
                    "world_size": ddp.world_size,
                    "loss_windows": {"log": list(window_losses), "eval": list(eval_window)},
                },
            )

    eval_window = []
    if resume_state is not None:  # the logged loss means then cover the same steps as if never stopped
        window_losses = list(resume_state["loss_windows"]["log"])
        eval_window = list(resume_state["loss_windows"]["eval"])
    status = "done"
    with _StopRequests() as stop:
        if it % cfg.eval_interval == 0 and resume_state is None:
            evaluate_and_checkpoint()
        while it < cfg.max_iters:
            lr = learning_rate_at(it, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), dtype=torch.float64)
            for micro in range(cfg.grad_accum_steps):
                start = it * global_batch + (micro * ddp.world_size + ddp.rank) * cfg.batch_size
                x, y = to_inputs_targets(dataset.train[order.indices(start, cfg.batch_size)], device)
                last_micro = micro == cfg.grad_accum_steps - 1
                # DDP averages gradients across processes; only the last micro-batch needs to.
                sync = contextlib.nullcontext() if last_micro or ddp.world_size == 1 else model.no_sync()
                with sync:
                    with _autocast(device, autocast):
                        _, loss = model(x, y)
                    (loss / cfg.grad_accum_steps).backward()
                step_loss += loss.detach().double().cpu() / cfg.grad_accum_steps
            # The processes stop after the same step, whichever of them got the signal: one that
            # stopped alone would leave the others waiting for it in a collective.
            stopping = stop.requested is not None
            if ddp.world_size > 1:  # on the device: nccl reduces GPU tensors only
                shared = torch.tensor([step_loss.item(), stopping], dtype=torch.float64, device=device)
                dist.all_reduce(shared)
                step_loss, stopping = shared[0] / ddp.world_size, shared[1].item() > 0
            step_loss = step_loss.item()
            if not math.isfinite(step_loss):
                raise TrainingDiverged(
                    f"training loss is {step_loss} at iter {it}; the last good checkpoint "
                    f"({ckpt_path}) is kept; lower learning_rate or raise warmup_iters"
                )
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            it += 1
            window_losses.append(step_loss)
            eval_window.append(step_loss)
            window_tokens += tokens_per_iter
            if bar is not None:
                bar.update(1)
            if it % cfg.log_interval == 0 or it == cfg.max_iters:
                now = time.perf_counter()
                rate = window_tokens / max(now - window_start, 1e-9)
                record = {
                    "kind": "train",
                    "iter": it,
                    "tokens": it * tokens_per_iter,
                    "elapsed_s": round(elapsed(), 3),
                    "loss": float(np.mean(window_losses)),
                    "lr": lr,
                    "tokens_per_s": round(rate),
                }
                text = f"iter {it}: loss {record['loss']:.4f} lr {lr:.2e} {rate / 1e3:.1f}k tok/s"
                if bar is not None:
                    bar.set_postfix_str(f"loss {record['loss']:.4f}")
                # On a terminal the bar shows progress; the files get every line regardless.
                log.line(text, record, echo=bar is None)
                if wandb_run is not None:
                    wandb_run.log({"train/loss": record["loss"], "lr": lr, "tokens_per_s": rate}, step=it)
                window_losses, window_start, window_tokens = [], now, 0
            if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                evaluate_and_checkpoint()
            if stopping:
                if last_eval is None or last_eval["iter"] != it:
                    evaluate_and_checkpoint(scheduled=False)
                status = "interrupted"
                log.line(
                    f"stopped by {stop.requested or 'a signal to another process'} at iter {it}; "
                    "checkpoint saved; continue with --resume"
                )
                break
        if last_eval is None or last_eval["iter"] != it:
            evaluate_and_checkpoint()

    if bar is not None:
        bar.close()
    done = {
        "status": status,
        "iters": it,
        "tokens": it * tokens_per_iter,
        "elapsed_s": round(elapsed(), 3),
        "val_loss": last_eval["val_loss"],
        "optimal_loss": theory["optimal_loss"],
        "true_loss_val": theory["true_loss_val"],
        "excess": last_eval["excess"],
        "pct_of_optimum": 100 * theory["true_loss_val"] / last_eval["val_loss"],
    }
    if ddp.is_main and status == "done":
        (out_dir / "done.json").write_text(json.dumps(done, indent=2) + "\n")
        log.line(
            f"done: val {done['val_loss']:.6f} vs true {done['true_loss_val']:.6f} (excess "
            f"{done['excess']:.6f} nats, {done['pct_of_optimum']:.2f}% of optimum) in {done['elapsed_s']:.1f}s"
        )
    if wandb_run is not None:
        wandb_run.finish()
    if ddp.world_size > 1:
        # No process exits before process 0 has saved: srun --kill-on-bad-exit ends the others as
        # soon as one exits non-zero, as an interrupted run does.
        dist.barrier()
    return done


def _check_resumable(state, cfg, dataset, ckpt_path):
    changed = config_changes(state.get("config", {}), cfg)
    if changed:
        raise NanoMarkovError(
            f"{ckpt_path} was trained with another config ({', '.join(changed)}); "
            "resume with the same settings or start a new run with --out_dir=DIR"
        )
    if state.get("dataset_sha256") != dataset.meta["sha256"]:
        raise NanoMarkovError(
            f"{ckpt_path} was trained on other data than {cfg.data_dir} (sha256 differs); "
            "resume with the dataset it was trained on"
        )


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise NanoMarkovError("wandb_log=True needs wandb: pip install wandb (or set wandb_log=False)") from None
    return wandb


def _start_wandb(cfg, out_dir):
    return _import_wandb().init(
        project=cfg.wandb_project, name=cfg.wandb_run_name or out_dir.name, config=cfg.to_dict(), dir=str(out_dir)
    )
