"""The training loop: `train(config)`, a few named steps read top to bottom.

A run lives in `config.out_dir`:
  config.json    every TrainConfig field, plus the model's vocab_size and block_size
  log.jsonl      one JSON object per log line ("train") and per evaluation ("eval")
  training.log   the same lines for a person
  ckpt.pt        the last good state: model, optimizer, RNG, data position (torch.load(weights_only=True))
  snapshots/     with --snapshots N / --snapshot_every M: weights-only safetensors at log-spaced / evenly spaced
                 iterations (checkpoint.save_snapshot)
  done.json      written once the run has finished: final val loss next to the exact optimum

The data (the train split's order, or with data_source 'online' the sequences
sampled from the process) is a pure function of (seed, iteration), and the
checkpoint holds every other piece of state, so a run killed at any moment and resumed ends
bit-identical on CPU to one never stopped.
"""

import contextlib
import dataclasses
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
from tqdm import tqdm

from nanomarkov.batches import FixedSequences, OnlineSequences, to_inputs_targets, whole_split_batches
from nanomarkov.checkpoint import CHECKPOINT, SNAPSHOTS, list_snapshots, load_checkpoint, save_checkpoint, save_snapshot
from nanomarkov.config import RUN_CONFIG_FILE, RUN_FILES, TrainConfig, config_changes, is_run_folder
from nanomarkov.data import Dataset, estimate_text, headline, learnable_fraction, load_dataset
from nanomarkov.distributed import Distributed, init_distributed, torch_threads
from nanomarkov.errors import NanoMarkovError, TrainingDiverged
from nanomarkov.files import check_output_folder, check_own_files, json_text, write_json, writer_lock
from nanomarkov.gpt_config import GPTConfig, training_bytes, weight_count
from nanomarkov.memory import check_fits
from nanomarkov.model import GPT
from nanomarkov.progress import STOP_GRACE_SECONDS, Heartbeat, handle_stops, say_on_stderr

EVAL_BATCH_SEQUENCES = 64
# An eval batch holds at most this many tokens (64 sequences of 256), so that sequences of 100,000 tokens are
# evaluated a few at a time: each batch's memory stays bounded, and a stop is heard between two of them.
EVAL_BATCH_TOKENS = EVAL_BATCH_SEQUENCES * 256


class EvaluationStopped(Exception):
    """A stop (Ctrl-C, SIGTERM) that came while the val split was being evaluated: the evaluation is dropped."""


def eval_batch_sequences(seq_len):
    """The sequences in one eval batch: EVAL_BATCH_SEQUENCES, fewer for long sequences, at least one."""
    return max(1, min(EVAL_BATCH_SEQUENCES, EVAL_BATCH_TOKENS // seq_len))


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
    check_device_available(device)
    if cfg.dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    else:
        dtype = cfg.dtype
    autocast = None if dtype == "float32" else getattr(torch, dtype)
    # Measured on this 2-core CPU: compiling costs tens of seconds, so a short run (the MM-10 demo:
    # 109 s vs 66 s) loses; long CPU runs may gain from --compile=True (not measured yet).
    use_compile = device_type == "cuda" if cfg.compile == "auto" else cfg.compile
    return device, autocast, use_compile


def check_device_available(device):
    """Refuse a device this machine's torch cannot use (before torch says so in a traceback): cuda without a CUDA GPU
    or cuda:N past the last one, mps without Apple's GPU."""
    device_type, _, index = device.partition(":")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise NanoMarkovError(f"device is {device_type} but torch sees no CUDA GPU; use --device=cpu or --device=auto")
    if device_type == "cuda" and index and int(index) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise NanoMarkovError(
            f"device is {device} but torch sees {count} CUDA GPU{'s' if count > 1 else ''} (cuda:0 to cuda:{count - 1}); "
            "use one of them or --device=cuda"
        )
    mps = getattr(torch.backends, "mps", None)
    if device_type == "mps" and not (mps is not None and mps.is_available()):
        raise NanoMarkovError(
            "device is mps (an Apple GPU) but this torch cannot use one here; use --device=cpu or --device=auto"
        )


def snapshot_iters(n_snapshots, max_iters, every=0):
    """The iterations --snapshots N keeps: 0 (before any step), and N+1 log-spaced ones from 1 to max_iters;
    with --snapshot_every M (every > 0) also 0, M, 2M, ... and max_iters: the union, sorted.

    A pure function of its arguments, so a resumed run continues the same series. Rounding
    would merge the first few, so each is pushed past the one before (and kept below the ones
    after): they stay distinct, and all of 1..max_iters when N+1 >= max_iters.
    """
    evenly = {*range(0, max_iters + 1, every), max_iters} if every > 0 else set()
    return sorted(evenly.union(log_spaced_iters(n_snapshots, max_iters)))


def log_spaced_iters(n_snapshots, max_iters):
    """--snapshots N's part of snapshot_iters: 0 and N+1 log-spaced iterations from 1 to max_iters ([] for N=0)."""
    if n_snapshots <= 0:
        return []
    count = min(n_snapshots + 1, max_iters)
    points = np.rint(np.geomspace(1, max_iters, count)).astype(int) if count > 0 else []
    iters = []
    for i, point in enumerate(points):
        pushed = max(point, iters[-1] + 1) if iters else point
        iters.append(int(min(pushed, max_iters - (count - 1 - i))))
    return [0, *iters]


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


def schedule_text(cfg):
    """The learning-rate schedule in words, for a run's first log line."""
    if not cfg.decay_lr:
        return f"lr {cfg.learning_rate:g} constant"
    text = (
        f"lr warm-up {cfg.warmup_iters} iters to {cfg.learning_rate:g}, "
        f"cosine decay until iter {cfg.lr_decay_iters} to min_lr {cfg.min_lr:g}"
    )
    if cfg.lr_decay_iters < cfg.max_iters:
        text += f" (held there for the last {cfg.max_iters - cfg.lr_decay_iters} of {cfg.max_iters} iters)"
    return text


@torch.no_grad()
def split_loss(model, tokens, device, autocast, ddp, stopped=None, progress=None):
    """Mean cross-entropy over a whole split (every predicted position of every sequence).

    Between two batches, `stopped()` (if given) is asked whether to give up (EvaluationStopped); a single
    process only, as the ranks of several must all take part in the reduction. `progress(1)` after each batch."""
    model.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(whole_split_batches(tokens, eval_batch_sequences(tokens.shape[1]))):
        if stopped is not None and ddp.world_size == 1 and stopped():
            model.train()
            raise EvaluationStopped
        if i % ddp.world_size != ddp.rank:
            continue
        x, y = to_inputs_targets(batch, device)
        with _autocast(device, autocast):
            _, loss = model(x, y)
        total += loss.item() * y.numel()
        count += y.numel()
        if progress is not None:
            progress(1)
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


class StopRequests:
    """SIGINT/SIGTERM set a flag that the loop reads between steps, so a checkpoint is
    never written from the middle of an optimizer step. A second Ctrl-C stops at once.
    `count`: the signals so far, so that an evaluation can tell one that came while it ran."""

    def __init__(self):
        self.requested = None
        self.count, self.since = 0, None
        self._previous = {}

    def __enter__(self):
        # Python only lets the main thread install signal handlers.
        if threading.current_thread() is threading.main_thread():
            self._previous = handle_stops(self.handle)  # a run started in the background keeps ignoring Ctrl-C
        return self

    def handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        # The first stop names it (a sweep's worker gets the terminal's SIGINT, then its parent's SIGTERM).
        self.requested = self.requested or signal.Signals(signum).name
        self.count += 1
        self.since = self.since or time.monotonic()

    def evaluation_stopped(self, count_before):
        """Whether an evaluation that began after `count_before` signals should give up: another signal came
        since, or the stop it runs for was asked long enough ago (the command has STOP_GRACE_SECONDS in all)."""
        if self.requested is None:
            return False
        return self.count > count_before or time.monotonic() - self.since > STOP_GRACE_SECONDS / 2

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
        try:
            if record is not None:
                with open(self.jsonl, "a") as f:
                    f.write(json_text(record, indent=None) + "\n")
            with open(self.text, "a") as f:
                f.write(text + "\n")
        except OSError as e:  # a full disk: the checkpoint's log sizes cut any half-written line on resume
            raise NanoMarkovError(
                f"cannot append to the log in {self.text.parent} ({e.strerror or e}); free some space, then --resume"
            ) from None
        if echo:
            self.echo(text)


@dataclasses.dataclass
class RunSetup:
    """What a run is, fixed before its first step: the process group, the device, the data, the model's shape."""

    cfg: TrainConfig
    ddp: Distributed
    device: str
    autocast: object  # a torch dtype, or None for float32
    use_compile: bool
    dataset: Dataset
    gpt_config: GPTConfig

    @property
    def out_dir(self):
        return Path(self.cfg.out_dir)

    @property
    def ckpt_path(self):
        return self.out_dir / CHECKPOINT

    @property
    def theory(self):
        return self.dataset.meta["theory"]

    @property
    def global_batch(self):
        return self.cfg.batch_size * self.cfg.grad_accum_steps * self.ddp.world_size

    @property
    def tokens_per_iter(self):
        return self.global_batch * self.gpt_config.block_size


@dataclasses.dataclass
class ModelAndOptimizer:
    """The model as saved and as called, and its optimizer."""

    raw: GPT  # the module whose weights are saved
    wrapped: torch.nn.Module  # what the steps call: the raw model, compiled and/or wrapped for DDP
    optimizer: torch.optim.Optimizer


@dataclasses.dataclass
class RunOutputs:
    """Where the run reports: its log files, a progress bar, wandb."""

    log: _RunLog
    bar: object  # a tqdm progress bar on a terminal, else None
    wandb_run: object  # None unless wandb_log


QUIET_BEAT_SECONDS = 300  # a run off the terminal: its log lines say the rest


def train(cfg: TrainConfig, overwrite=False, show_progress=None, on_eval=None, on_step=None):
    """Train a GPT on cfg.data_dir; returns the done.json dict (status 'done' or 'interrupted').

    on_eval, if given, is called with each eval record once its checkpoint is saved (the tuner reports
    the excess to its pruner there); an exception it raises stops the run and propagates. on_step, if
    given, is called with the iteration after each step (the tuner's heartbeat counts them)."""
    setup = set_up_run(cfg)
    if setup.ddp.is_main:
        writes = (*RUN_FILES, SNAPSHOTS, "*.partial")
        check_output_folder(
            setup.out_dir, "training run", is_run_folder, force=overwrite, flag="--out_dir", writes=writes
        )
        check_own_files(setup.out_dir, RUN_FILES, "training run")
    # One writer per run folder: a second `train` into it is refused, not interleaved with this one.
    lock = writer_lock(setup.out_dir, "training run") if setup.ddp.is_main else contextlib.nullcontext()
    with lock, torch_threads(cfg.threads):
        resume_state = read_resume_state(setup, overwrite)
        model = build_model(setup, resume_state)
        if setup.ddp.is_main:
            write_run_folder(
                setup, resumed=resume_state is not None, start_iter=resume_state["iter"] if resume_state else 0
            )
        outputs = open_outputs(setup, model.raw, resume_state, show_progress)
        beat = quiet_run_heartbeat(setup, outputs, resume_state, show_progress, on_step)
        if beat is not None:
            on_step = lambda it: beat.advance()  # noqa: E731
        loop = TrainingLoop(setup, model, outputs, resume_state, on_eval, on_step)
        with StopRequests() as stop, contextlib.closing(loop.sequences), beat or contextlib.nullcontext():
            status = loop.run(stop)
        return finish(loop, status)


def quiet_run_heartbeat(setup, outputs, resume_state, show_progress, on_step):
    """A run with no progress bar (not on a terminal) that no caller counts says how far it is on stderr,
    with the time left, once a minute has passed (and every few minutes): so that a step that takes hours
    (a huge --grad_accum_steps, say) is seen at once. A sweep or tune (show_progress False) says its own."""
    if outputs.bar is not None or show_progress is not None or on_step is not None or not setup.ddp.is_main:
        return None
    left = setup.cfg.max_iters - (resume_state["iter"] if resume_state else 0)
    return Heartbeat(
        f"train {setup.out_dir}",
        left,
        "iterations",
        waiting="its first step not done yet",
        after=60,
        every=QUIET_BEAT_SECONDS,
    )


def set_up_run(cfg):
    """Join the process group, choose the device and load the dataset; nothing is written yet."""
    wants_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    ddp = init_distributed("cuda" if wants_cuda else "cpu")
    device, autocast, use_compile = resolve_device(cfg, ddp.local_rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)  # nccl's barrier and stray .cuda() calls use this process's GPU
    dataset = load_dataset(cfg.data_dir)
    if cfg.wandb_log and ddp.is_main:
        _import_wandb()  # fail before anything is written
    gpt_config = cfg.gpt_config(vocab_size=dataset.vocab_size, block_size=dataset.seq_len - 1)
    check_training_fits(gpt_config, cfg.batch_size, device)
    return RunSetup(cfg, ddp, device, autocast, use_compile, dataset, gpt_config)


def check_training_fits(gpt_config, batch_size, device, fix="use a smaller --batch_size, --n_embd or --n_layer"):
    """Refuse, before the model is built, a model and batch whose training step will not fit in the
    memory of `device` (a GPU's own free memory; the machine's for the CPU and MPS); `fix`, the way out."""
    free, where = None, "this machine"
    if device.startswith("cuda"):
        free, where = torch.cuda.mem_get_info(device)[0], f"the GPU {device}"
    check_fits(
        training_bytes(gpt_config, batch_size),
        f"training {weight_count(gpt_config):,} weights (n_embd {gpt_config.n_embd}, n_layer {gpt_config.n_layer}) "
        f"on batches of {batch_size} sequences of {gpt_config.block_size} tokens",
        fix,
        free,
        where,
    )


def read_resume_state(setup, overwrite):
    """The checkpoint a resumed run continues from, None for a fresh one (which may not replace a run unasked)."""
    if setup.cfg.init_from == "resume":
        state = load_checkpoint(setup.ckpt_path)
        _check_resumable(state, setup.cfg, setup.dataset, setup.ckpt_path)
        return state
    if setup.ckpt_path.exists() and not overwrite:
        raise NanoMarkovError(
            f"{setup.out_dir} already holds a run (ckpt.pt); pass --resume to continue it, "
            "--force to start it over, or --out_dir=DIR to train elsewhere"
        )
    return None


def build_model(setup, resume_state):
    """The seeded model and its optimizer, with the checkpoint's weights, moments and RNG state when resuming."""
    cfg, device = setup.cfg, setup.device
    torch.manual_seed(cfg.seed)
    raw = GPT(setup.gpt_config).to(device)
    optimizer = raw.configure_optimizer(
        cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.split(":")[0]
    )
    if resume_state is not None:
        raw.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        _set_rng_state(resume_state["rng"])
    wrapped = torch.compile(raw) if setup.use_compile else raw
    if setup.ddp.world_size > 1:
        wrapped = DistributedDataParallel(
            wrapped, device_ids=[setup.ddp.local_rank] if device.startswith("cuda") else None
        )
    return ModelAndOptimizer(raw, wrapped, optimizer)


def write_run_folder(setup, resumed, start_iter):
    """Create out_dir, remove what an earlier run left there that this one writes anew, write config.json.

    A resumed run keeps done.json until its first new checkpoint (TrainingLoop.evaluate_and_checkpoint),
    so a resume that fails at once (a full disk, a kill) leaves the finished run as it was."""
    setup.out_dir.mkdir(parents=True, exist_ok=True)
    if not resumed:
        for stale in ("log.jsonl", "training.log", "done.json"):
            (setup.out_dir / stale).unlink(missing_ok=True)
    # Snapshots past the start (all of them for a fresh run) are written again, if the series has them.
    for iter_num, _, path in list_snapshots(setup.out_dir):
        if iter_num > start_iter or not resumed:
            path.unlink()
    config_record = dict(
        setup.cfg.to_dict(),
        vocab_size=setup.gpt_config.vocab_size,
        block_size=setup.gpt_config.block_size,
        device_resolved=setup.device,
        threads_resolved=torch.get_num_threads(),  # torch's intra-op threads, TrainConfig.threads resolved
        autocast=str(setup.autocast),
        compiled=setup.use_compile,
        world_size=setup.ddp.world_size,
        tokens_per_iter=setup.tokens_per_iter,
        dataset_sha256=setup.dataset.meta["sha256"],  # what eval and dynamics check a dataset against
    )
    write_json(setup.out_dir / RUN_CONFIG_FILE, config_record, what="run config")


def threads_text():
    """torch's intra-op threads, as the first log line says them: '1 thread', '2 threads'."""
    threads = torch.get_num_threads()
    return f"{threads} thread{'s' if threads > 1 else ''}"


def model_text(config):
    """The model's shape as the first log line says it, e.g. '2 layers 32 wide, 4 heads, alibi, no position table'."""
    plural = "s" if config.n_layer != 1 else ""
    heads = "MLP-only" if config.mlp_only else f"{config.n_head} head{'s' if config.n_head > 1 else ''}"
    parts = [f"{config.n_layer} layer{plural} {config.n_embd} wide"] + ([heads] if config.n_layer else [])
    parts += [("trained " if config.alibi_trained else "") + "alibi"] if config.alibi else []
    parts += [] if config.pos_ape else ["no position table"]
    return ", ".join(parts)


def open_outputs(setup, raw_model, resume_state, show_progress):
    """The progress bar, the run's log (cut back to the checkpoint when resuming) with its first line, and wandb."""
    cfg, ddp = setup.cfg, setup.ddp
    interactive = (sys.stdout.isatty() if show_progress is None else show_progress) and ddp.is_main
    start_iter = 0 if resume_state is None else resume_state["iter"]
    bar = (
        tqdm(total=cfg.max_iters, initial=start_iter, unit="it", dynamic_ncols=True, leave=False)
        if interactive
        else None
    )
    log = _RunLog(setup.out_dir, ddp.is_main, bar.write if bar is not None else print)
    log.truncate_to({} if resume_state is None else resume_state["log_sizes"])
    wandb_run = _start_wandb(cfg, setup.out_dir) if cfg.wandb_log and ddp.is_main else None
    autocast, theory = setup.autocast, setup.theory
    log.line(
        f"{setup.out_dir}: {model_text(setup.gpt_config)}, {raw_model.num_params():,} parameters, "
        f"{setup.tokens_per_iter:,} tokens/iter "
        f"({setup.global_batch} sequences x {setup.gpt_config.block_size}), device {setup.device}, {threads_text()}"
        f"{', ' + str(autocast).replace('torch.', '') if autocast else ''}{', compiled' if setup.use_compile else ''}"
        f"{', online data from the process' if cfg.data_source == 'online' else ''}, "
        f"{'resuming at iter ' + str(start_iter) if resume_state else 'from scratch'}; {schedule_text(cfg)}; "
        f"optimal_loss {estimate_text(theory, 'optimal_loss')}, true_loss_val {theory['true_loss_val']:.6f}"
    )
    return RunOutputs(log, bar, wandb_run)


class TrainingLoop:
    """The steps, the log lines and the evaluations (each followed by a checkpoint), and the state they share:
    the iteration, the loss windows the logged means cover, the last evaluation and the clock."""

    def __init__(self, setup, model, outputs, resume_state, on_eval=None, on_step=None):
        self.setup, self.model, self.outputs = setup, model, outputs
        self.on_eval, self.on_step = on_eval, on_step
        self.resumed = resume_state is not None
        self.sequences = training_sequences(setup)
        self.snapshot_iters = set(snapshot_iters(setup.cfg.snapshots, setup.cfg.max_iters, setup.cfg.snapshot_every))
        self.it = resume_state["iter"] if self.resumed else 0
        self.elapsed_before = resume_state["elapsed_s"] if self.resumed else 0.0
        self.started = time.perf_counter()
        self.window_start, self.window_tokens = time.perf_counter(), 0
        # Resumed, the logged loss means cover the same steps as if the run had never stopped.
        windows = resume_state["loss_windows"] if self.resumed else {"log": [], "eval": []}
        self.window_losses, self.eval_window = list(windows["log"]), list(windows["eval"])
        self.last_eval = None
        self.saved_checkpoint = False  # by this run; a resumed run's done.json goes once it has one
        self.checkpoint_iter = resume_state["iter"] if self.resumed else None
        self.stop = None  # the run's StopRequests, once it runs
        self.stop_line = None  # where a stopped run stopped and how to go on: in training.log, and train's stderr

    def elapsed(self):
        return self.elapsed_before + time.perf_counter() - self.started

    def evaluated_now(self):
        return self.last_eval is not None and self.last_eval["iter"] == self.it

    def run(self, stop):
        """Train to max_iters, or until `stop` is requested: 'done' or 'interrupted'; either end is evaluated and saved,
        but for a stop that comes during an evaluation: the steps taken are saved without it (stopped_in_evaluation)."""
        self.stop = stop
        try:
            return self.train_to_the_end(stop)
        except EvaluationStopped:
            return self.stopped_in_evaluation()

    def stopped_in_evaluation(self):
        """A stop during an evaluation (of 100,000-token sequences, minutes): the evaluation is dropped, the
        steps since the last checkpoint are saved; 'interrupted'."""
        if self.it > 0 and self.checkpoint_iter != self.it:
            self.save_checkpoint()
            kept = "checkpoint saved; continue with --resume"
        elif self.it > 0:
            kept = "its checkpoint is saved; continue with --resume"
        else:
            kept = "no checkpoint yet (the first is after a step): run the same command to start again"
        self.say_stopped(f"stopped by {self.stop.requested} at iter {self.it}, during its evaluation; {kept}")
        return "interrupted"

    def say_stopped(self, line):
        """The stop line goes into training.log only: the command says it on stderr, as every command's stop
        line is (finish hands it back in done), and a sweep's or a study's runs keep it in their logs."""
        self.stop_line = line
        self.outputs.log.line(line, echo=False)

    def train_to_the_end(self, stop):
        cfg = self.setup.cfg
        self.snapshot()  # resumed, the checkpoint's weights: the same file again, or one a new series adds
        if self.it % cfg.eval_interval == 0 and not self.resumed:
            self.evaluate_and_checkpoint()
        while self.it < cfg.max_iters:
            lr = learning_rate_at(self.it, cfg)
            step_loss, stopping = self.step(lr, stop)
            self.count_step(step_loss, lr)
            self.snapshot()
            if self.it % cfg.eval_interval == 0 or self.it == cfg.max_iters:
                self.evaluate_and_checkpoint()
            if stopping:
                if not self.evaluated_now():
                    self.evaluate_and_checkpoint(scheduled=False)
                self.say_stopped(
                    f"stopped by {stop.requested or 'a signal to another process'} at iter {self.it}; "
                    "checkpoint saved; continue with --resume"
                )
                return "interrupted"
        if not self.evaluated_now():
            self.evaluate_and_checkpoint()
        return "done"

    def step(self, lr, stop):
        """One optimizer step at learning rate lr: (its mean loss, whether any of the processes was asked to stop)."""
        setup, optimizer = self.setup, self.model.optimizer
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = self.accumulate_gradients()
        # The processes stop after the same step, whichever of them got the signal: one that
        # stopped alone would leave the others waiting for it in a collective.
        stopping = stop.requested is not None
        if setup.ddp.world_size > 1:  # on the device: nccl reduces GPU tensors only
            shared = torch.tensor([step_loss.item(), stopping], dtype=torch.float64, device=setup.device)
            dist.all_reduce(shared)
            step_loss, stopping = shared[0] / setup.ddp.world_size, shared[1].item() > 0
        step_loss = step_loss.item()
        if not math.isfinite(step_loss):
            raise self.diverged("training loss", step_loss)
        if setup.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.raw.parameters(), setup.cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return step_loss, stopping

    def accumulate_gradients(self):
        """Forward and backward over the step's micro-batches; their mean loss (float64, on the CPU)."""
        setup, cfg, ddp = self.setup, self.setup.cfg, self.setup.ddp
        step_loss = torch.zeros((), dtype=torch.float64)
        for micro in range(cfg.grad_accum_steps):
            x, y = to_inputs_targets(self.sequences.batch(self.it, micro * ddp.world_size + ddp.rank), setup.device)
            last_micro = micro == cfg.grad_accum_steps - 1
            # DDP averages gradients across processes; only the last micro-batch needs to.
            sync = contextlib.nullcontext() if last_micro or ddp.world_size == 1 else self.model.wrapped.no_sync()
            with sync:
                with _autocast(setup.device, setup.autocast):
                    _, loss = self.model.wrapped(x, y)
                (loss / cfg.grad_accum_steps).backward()
            step_loss += loss.detach().double().cpu() / cfg.grad_accum_steps
        return step_loss

    def count_step(self, step_loss, lr):
        """Advance the iteration and the loss windows; a log line every log_interval steps and at the last."""
        cfg, bar = self.setup.cfg, self.outputs.bar
        self.it += 1
        self.window_losses.append(step_loss)
        self.eval_window.append(step_loss)
        self.window_tokens += self.setup.tokens_per_iter
        if bar is not None:
            bar.update(1)
        if self.on_step is not None:
            self.on_step(self.it)
        if self.it % cfg.log_interval == 0 or self.it == cfg.max_iters:
            self.log_training(lr)

    def log_training(self, lr):
        """The mean training loss since the last log line, and the speed."""
        bar, it = self.outputs.bar, self.it
        now = time.perf_counter()
        rate = self.window_tokens / max(now - self.window_start, 1e-9)
        record = {
            "kind": "train",
            "iter": it,
            "tokens": it * self.setup.tokens_per_iter,
            "elapsed_s": round(self.elapsed(), 3),
            "loss": float(np.mean(self.window_losses)),
            "lr": lr,
            "tokens_per_s": round(rate),
        }
        text = f"iter {it}: train loss {record['loss']:.4f} lr {lr:.2e} {rate / 1e3:.1f}k tok/s"
        if bar is not None:
            bar.set_postfix_str(f"loss {record['loss']:.4f}")
        # On a terminal the bar shows progress; the files get every line regardless.
        self.outputs.log.line(text, record, echo=bar is None)
        if self.outputs.wandb_run is not None:
            self.outputs.wandb_run.log({"train/loss": record["loss"], "lr": lr, "tokens_per_s": rate}, step=it)
        self.window_losses, self.window_start, self.window_tokens = [], now, 0

    def snapshot(self):
        """The model's weights into snapshots/ when this iteration is one of the series (before its checkpoint,
        so a run resumed from that checkpoint has every earlier snapshot)."""
        if self.setup.ddp.is_main and self.it in self.snapshot_iters:
            save_snapshot(self.model.raw, self.setup.out_dir, self.it, self.it * self.setup.tokens_per_iter)

    def evaluate_and_checkpoint(self, scheduled=True):
        """The val loss next to the optimum, logged; then a checkpoint (never of iteration 0)."""
        self.last_eval = self.evaluate(scheduled)
        if self.it > 0:
            self.save_checkpoint()
        if self.on_eval is not None:
            self.on_eval(self.last_eval)

    def save_checkpoint(self):
        """ckpt.pt of this iteration (by the main process)."""
        if self.setup.ddp.is_main:
            save_checkpoint(self.setup.ckpt_path, self.checkpoint_state())
            if not self.saved_checkpoint:
                (self.setup.out_dir / "done.json").unlink(missing_ok=True)  # the run has moved past it
            self.saved_checkpoint = True
        self.checkpoint_iter = self.it

    def diverged(self, what, value):
        """The error for a non-finite loss, saying truthfully whether a checkpoint is left to resume from."""
        kept = (
            f"the last good checkpoint ({self.setup.ckpt_path}) is kept"
            if self.saved_checkpoint or self.resumed
            else "no checkpoint was saved before it"
        )
        return TrainingDiverged(
            f"{what} is {value} at iter {self.it}; {kept}; lower learning_rate or raise warmup_iters"
        )

    def evaluate(self, scheduled):
        """The eval record; an extra evaluation (scheduled=False, on Ctrl-C) leaves the train-loss window
        to the next scheduled one."""
        setup, it, theory = self.setup, self.it, self.setup.theory
        eval_started = time.perf_counter()
        val = setup.dataset.val
        count_before = self.stop.count if self.stop is not None else 0
        batches = -(-val.shape[0] // eval_batch_sequences(val.shape[1]))
        say = say_on_stderr if setup.ddp.is_main else (lambda line: None)
        with Heartbeat(f"eval iter {it}", batches, "batches", say=say) as heartbeat:
            val_loss = split_loss(
                self.model.wrapped,
                val,
                setup.device,
                setup.autocast,
                setup.ddp,
                stopped=None if self.stop is None else lambda: self.stop.evaluation_stopped(count_before),
                progress=heartbeat.advance,
            )
        if not math.isfinite(val_loss):
            raise self.diverged("val loss", val_loss)
        record = {
            "kind": "eval",
            "iter": it,
            "tokens": it * setup.tokens_per_iter,
            "elapsed_s": round(self.elapsed(), 3),
            "train_loss": float(np.mean(self.eval_window)) if self.eval_window else None,
            "val_loss": val_loss,
            "optimal_loss": theory["optimal_loss"],
            "true_loss_val": theory["true_loss_val"],
            "excess": val_loss - theory["true_loss_val"],
            "learnable_fraction": learnable_fraction(val_loss, theory),
            "lr": learning_rate_at(it, setup.cfg),
            "eval_s": round(time.perf_counter() - eval_started, 3),
        }
        if scheduled:
            self.eval_window.clear()
        # No training step has been taken at the first eval, so there is no train loss to show yet; after it, the
        # mean over every step since the last eval, early ones included: above the iter lines' recent loss.
        train_text = (
            "no training step yet"
            if record["train_loss"] is None
            else f"train loss since the last eval {record['train_loss']:.4f}"
        )
        self.outputs.log.line(
            f"eval iter {it}: val {val_loss:.6f} excess {record['excess']:+.6f} nats over "
            f"true_loss_val {theory['true_loss_val']:.6f} (expected optimum {estimate_text(theory, 'optimal_loss')}); "
            f"{train_text}; at {record['elapsed_s']:.1f}s",
            record,
        )
        if self.outputs.wandb_run is not None:
            self.outputs.wandb_run.log({k: v for k, v in record.items() if k != "kind"}, step=it)
        return record

    def checkpoint_state(self):
        """Everything a resumed run needs to continue bit-identically."""
        setup, it = self.setup, self.it
        return {
            "model": self.model.raw.state_dict(),
            "model_args": dataclasses.asdict(setup.gpt_config),
            "optimizer": self.model.optimizer.state_dict(),
            "iter": it,
            "tokens": it * setup.tokens_per_iter,
            "config": setup.cfg.to_dict(),
            "rng": _rng_state(),
            "data_dir": str(setup.cfg.data_dir),
            "data_position": it * setup.global_batch,
            "dataset_sha256": setup.dataset.meta["sha256"],
            "elapsed_s": self.elapsed(),
            "log_sizes": self.outputs.log.sizes(),
            "world_size": setup.ddp.world_size,
            "loss_windows": {"log": list(self.window_losses), "eval": list(self.eval_window)},
        }


def training_sequences(setup):
    """Where this process's micro-batches come from: the train split (FixedSequences) or the process
    itself (OnlineSequences); either way every micro-batch of every rank is its own slot of the global batch."""
    cfg, ddp = setup.cfg, setup.ddp
    slots = cfg.grad_accum_steps * ddp.world_size
    if cfg.data_source == "online":
        mine = [micro * ddp.world_size + ddp.rank for micro in range(cfg.grad_accum_steps)]
        return OnlineSequences(setup.dataset.chain, setup.dataset.seq_len, cfg.batch_size, slots, cfg.seed, mine)
    return FixedSequences(setup.dataset.train, cfg.batch_size, slots, cfg.seed)


def finish(loop, status):
    """done.json and its log line (for a finished run), and a barrier so that no process leaves early."""
    setup, outputs, last_eval, theory = loop.setup, loop.outputs, loop.last_eval, loop.setup.theory
    if outputs.bar is not None:
        outputs.bar.close()
    val_loss = None if last_eval is None else last_eval["val_loss"]  # None: stopped in the first evaluation
    done = {
        "status": status,
        "iters": loop.it,
        "tokens": loop.it * setup.tokens_per_iter,
        "elapsed_s": round(loop.elapsed(), 3),
        "val_loss": val_loss,
        "optimal_loss": theory["optimal_loss"],
        "true_loss_val": theory["true_loss_val"],
        "excess": None if last_eval is None else last_eval["excess"],
        "learnable_fraction": None if val_loss is None else learnable_fraction(val_loss, theory),
        "pct_of_optimum": None if val_loss is None else 100 * theory["true_loss_val"] / val_loss,
    }
    if status == "interrupted":
        done["stopped_by"] = loop.stop.requested  # SIGINT or SIGTERM: the command's exit code
        done["stop_line"] = loop.stop_line if setup.ddp.is_main else None  # one process says it
    if setup.ddp.is_main and status == "done":
        write_json(setup.out_dir / "done.json", done, what="run summary")
        outputs.log.line(f"done: {headline(done)} in {done['elapsed_s']:.1f}s")
    if outputs.wandb_run is not None:
        outputs.wandb_run.finish()
    if setup.ddp.world_size > 1:
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
