"""`nanomarkov tune`: an Optuna search over the training recipe that minimises the excess over the true loss
on the val split at a token budget (docs/tuning.md).

A study lives in an Optuna storage (DIR/study.db, SQLite, unless --storage names another), so that any
Optuna tool opens it and workers on several machines share it; its folder holds:
  tune.json        the search's settings: a rerun with other settings is refused, the same one continues it
  trials/NNNN/     each trial's training run (train.py's run folder)
  best_recipe.py   the best trial's full config: `nanomarkov train DIR/best_recipe.py` trains it as it is
  report.md        the trials, their plots (history, importances) and the best trial's curve against the stages

Each trial trains through `train()`, which calls back after every evaluation: the excess is reported to
Optuna's MedianPruner there, and a hopeless trial stops. The default recipe is the first trial, so the best
recipe found is at least as good as the default on the val split at this budget whenever the space holds it.
"""

import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import socket
import time
import tomllib
import warnings
from pathlib import Path

import numpy as np
import optuna
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from nanomarkov.config import TrainConfig, dataset_preset, format_config_file
from nanomarkov.data import load_dataset, stage_losses
from nanomarkov.errors import NanoMarkovError, TrainingDiverged
from nanomarkov.files import (
    check_output_folder,
    holds_record,
    protected_folder,
    read_capped,
    read_json_or_none,
    write_atomic,
    write_json,
)
from nanomarkov.progress import Heartbeat, WorkerStopped, start_worker, stop_workers, worker_signals
from nanomarkov.report import png_bytes
from nanomarkov.train import check_training_fits, resolve_device, train

# The default search: every name but warmup_fraction is a TrainConfig field. A range low:high is searched
# uniformly (log-uniformly for LOG_SCALE), a list is a choice; each holds the default recipe's value too.
DEFAULT_SPACE = {
    "learning_rate": "1e-4:3e-2",
    "n_layer": "1:3",
    "n_embd": "16,32,64,128",
    "n_head": "1,2,4",
    "batch_size": "16,32,64,128",
    "warmup_fraction": "0:0.2",
    "weight_decay": "0:0.1",
    "data_source": "fixed,online",
    "mlp_only": "False,True",
}
LOG_SCALE = {"learning_rate"}
ALIASES = {"lr": "learning_rate", "batch": "batch_size", "warmup": "warmup_fraction", "wd": "weight_decay"}
# Fixed by the tuner from the budget and the trial's folder, never searched.
SET_BY_TUNER = {"data_dir", "out_dir", "init_from", "max_iters", "lr_decay_iters", "eval_interval", "warmup_iters"}
SPACE_SYNTAX = "write name=low:high (a range) or name=a,b,c (a choice), e.g. lr=1e-4:1e-2 data_source=fixed,online"
FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
# A trial of the default recipe's shape in one to two minutes on a busy 2-core CPU with one thread (MM-5, 1-layer
# MLP 32 wide: 300k tokens in 10 s measured, ~30k tok/s); a wider or attention model of the space takes longer.
DEFAULT_TOKENS_CAP = 4_000_000
DEFAULT_EVALS = 10
TRIAL_BEAT_SECONDS = 60  # a trial's progress line on stderr once a minute, after the first few seconds
STUDY_NAME = "nanomarkov-tune"
SPACE_FILE_MAX_BYTES = 1 << 20  # a space file is a few lines; a larger "file" is a device or a mistake
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclasses.dataclass
class TuneSettings:
    """What a study is: a rerun of the same settings continues it (tune.json)."""

    data_dir: str
    out: str
    trials: int
    tokens: int
    space: dict  # name: its spec text (name=SPEC on the command line)
    storage: str
    evals: int = DEFAULT_EVALS
    seed: int = 42
    threads: int | str = "auto"  # each trial's TrainConfig.threads (--threads); not part of the study's identity

    def identity(self):
        """The settings a continued study must share with the one that began it."""
        return {"data_dir": str(Path(self.data_dir).resolve()), "tokens": self.tokens, "space": self.space}


def parse_space(entries):
    """{name: spec text} of the default space with the user's entries (name=SPEC, or a .toml/.json file of
    name = "SPEC") in place of the defaults; each checked by space_distribution."""
    given = {}
    for entry in entries:
        if entry.endswith((".toml", ".json")):
            given.update(read_space_file(entry))
            continue
        name, sep, spec = entry.partition("=")
        if not sep or not name or not spec:
            raise NanoMarkovError(f"--space entry {entry!r} is not name=SPEC; {SPACE_SYNTAX}")
        given[ALIASES.get(name, name)] = spec
    for name, spec in given.items():
        space_distribution(name, spec)
    return {**DEFAULT_SPACE, **given}


def read_space_file(path):
    """A space file: TOML or JSON of name = "SPEC" (the command line's syntax), e.g. lr = "1e-4:1e-2"."""
    try:
        text = read_capped(path, SPACE_FILE_MAX_BYTES).decode()
        values = tomllib.loads(text) if path.endswith(".toml") else json.loads(text)
    except (OSError, ValueError) as e:
        raise NanoMarkovError(f"cannot read the space file {path} ({e}); {SPACE_SYNTAX}") from None
    if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
        raise NanoMarkovError(f'space file {path}: every entry must be a string, e.g. lr = "1e-4:1e-2"')
    return {ALIASES.get(name, name): spec for name, spec in values.items()}


def space_distribution(name, spec):
    """The Optuna distribution of one space entry; NanoMarkovError in one line for a bad one."""
    kind = float if name == "warmup_fraction" else FIELD_TYPES.get(name)
    if kind is None or name in SET_BY_TUNER:
        known = ", ".join(sorted({*FIELD_TYPES, "warmup_fraction"} - SET_BY_TUNER))
        raise NanoMarkovError(f"--space {name}: not a recipe field the tuner searches; choose among {known}")
    low, sep, high = spec.partition(":")
    try:
        if sep:
            if kind not in (int, float):
                raise ValueError(f"a range needs a number field, {name} is {kind}")
            low, high = kind(low), kind(high)
            if not low <= high or (name in LOG_SCALE and low <= 0):
                raise ValueError(f"the range must have low <= high{' and low > 0' if name in LOG_SCALE else ''}")
            if kind is int:
                return IntDistribution(low, high)
            return FloatDistribution(low, high, log=name in LOG_SCALE)
        return CategoricalDistribution([field_value(kind, text) for text in spec.split(",")])
    except ValueError as e:
        raise NanoMarkovError(f"--space {name}={spec}: {e}; {SPACE_SYNTAX}") from None


def field_value(kind, text):
    """One value of a choice, as its field's type."""
    text = text.strip()
    if kind is bool or kind == "bool":
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{text!r} is not True or False")
        return text.lower() == "true"
    if kind in (int, float):
        return kind(text)
    return text


def distributions(space, base):
    """{name: distribution}, the defaults widened to hold the default recipe's value (`base`)."""
    found = {name: space_distribution(name, spec) for name, spec in space.items()}
    for name, spec in space.items():
        value, dist = base.get(name), found[name]
        if spec != DEFAULT_SPACE.get(name) or value is None or holds(dist, value):
            continue
        if isinstance(dist, CategoricalDistribution):
            found[name] = CategoricalDistribution(sorted({*dist.choices, value}, key=str))
        else:
            found[name] = type(dist)(min(dist.low, value), max(dist.high, value), log=dist.log)
    check_heads(found)
    return found


def check_heads(found):
    """Refuse a space whose widths and head counts do not divide (n_embd % n_head)."""
    embd, head = found.get("n_embd"), found.get("n_head")
    for dist in (embd, head):
        if dist is not None and not isinstance(dist, CategoricalDistribution):
            return
    widths = embd.choices if embd else [TrainConfig.n_embd]
    heads = head.choices if head else [TrainConfig.n_head]
    bad = [(w, h) for w in widths for h in heads if w % h]
    if bad:
        raise NanoMarkovError(
            f"--space: n_embd {bad[0][0]} does not divide into n_head {bad[0][1]} heads; "
            "give widths that are multiples of every head count"
        )


def base_recipe(settings):
    """The dataset's default recipe, the one every trial changes."""
    return dataset_preset("default", settings.data_dir, settings.seed)


def default_tokens(base, seq_len):
    """The default recipe's own budget, capped so that a trial takes about a minute on a small CPU."""
    return min(base["max_iters"] * base["batch_size"] * base["grad_accum_steps"] * (seq_len - 1), DEFAULT_TOKENS_CAP)


def trial_config(settings, base, params, number, seq_len):
    """A trial's complete TrainConfig dict: the default recipe, the trial's values, the budget's schedule."""
    cfg = {**base, **{k: v for k, v in params.items() if k != "warmup_fraction"}}
    # A trial without attention has nothing for the recipe's alibi to bias (the model refuses the pair): it goes.
    # An alibi the space searches stays as drawn, so that what the study records is what the trial trained.
    if "alibi" not in params and cfg["mlp_only"]:
        cfg["alibi"] = cfg["alibi_trained"] = False
    tokens_per_iter = cfg["batch_size"] * cfg["grad_accum_steps"] * (seq_len - 1)
    max_iters = max(1, settings.tokens // tokens_per_iter)
    fraction = params.get("warmup_fraction", base["warmup_iters"] / base["max_iters"])
    cfg.update(
        data_dir=settings.data_dir,
        out_dir=str(Path(settings.out) / "trials" / f"{number:04d}"),
        init_from="scratch",
        max_iters=max_iters,
        lr_decay_iters=max_iters,
        warmup_iters=min(max_iters, round(fraction * max_iters)),
        min_lr=cfg["learning_rate"] * base["min_lr"] / base["learning_rate"],
        eval_interval=max(1, max_iters // settings.evals),
        log_interval=max(1, max_iters // settings.evals),
        threads=settings.threads,
    )
    return TrainConfig.from_dict(cfg, f"trial {number}").to_dict()


def default_params(found, base):
    """The default recipe's values of the searched names, where the space holds them: the first trial."""
    values = {**base, "warmup_fraction": base["warmup_iters"] / base["max_iters"]}
    return {name: values[name] for name, dist in found.items() if name in values and holds(dist, values[name])}


def holds(dist, value):
    """Whether a distribution of the space can give `value`."""
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    return isinstance(value, (int, float)) and dist.low <= value <= dist.high


def is_tune_folder(folder):
    """A folder a tuning study wrote (its tune.json, by what `tune` writes in it: not a user's own)."""
    return holds_record(folder, "tune.json", ("identity", "data_dir", "space", "trials"))


def storage_url(settings):
    """The study's storage: --storage as given, else DIR/study.db (SQLite)."""
    return settings.storage or f"sqlite:///{(Path(settings.out) / 'study.db').resolve()}"


def check_storage(url):
    """Refuse an SQLite storage whose file would land in a folder no command writes into (the root, a home, a
    system folder) or is not a regular file; other URLs are the database server's business."""
    if not url.startswith("sqlite:///"):
        return
    path = Path(url[len("sqlite:///") :] or ".")
    why = protected_folder(path.parent)
    if why:
        raise NanoMarkovError(f"--storage {url}: {path.parent} is {why}; give a file in a folder of yours")
    if path.exists() and not path.is_file():
        raise NanoMarkovError(f"--storage {url}: {path} is not a regular file; give an SQLite file")


def open_study(settings):
    """The study in its storage, created with the default recipe as its first trial when new."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # trials are reported in our own lines
    url = storage_url(settings)
    # Several workers write one SQLite file: wait for its lock rather than fail at once.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except (ImportError, ValueError, optuna.exceptions.OptunaError) as e:
        raise NanoMarkovError(f"cannot open the study storage {url} ({e}); give --storage an Optuna URL") from None
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(1, settings.evals // 3))
    # Unseeded: workers that shared a seed would sample the same recipes.
    sampler = optuna.samplers.TPESampler(n_startup_trials=5)
    return optuna.create_study(
        study_name=STUDY_NAME, storage=storage, sampler=sampler, pruner=pruner, load_if_exists=True
    )


def check_settings(settings):
    """Every check of a study's settings that writes nothing: its storage, its folder against a study already
    there, and its space (check_space). `tune` calls it before its first line, start_study before writing."""
    out = Path(settings.out)
    check_storage(storage_url(settings))
    check_output_folder(out, "tuning study", is_tune_folder, force=None, flag="--out")
    saved = read_json_or_none(out / "tune.json")
    if saved is not None and saved.get("identity") != settings.identity():
        changed = sorted(k for k, v in settings.identity().items() if saved.get("identity", {}).get(k) != v)
        raise NanoMarkovError(
            f"{out} holds a study of other settings ({', '.join(changed)} differ); rerun it with the same "
            "DATA, --tokens and --space to continue it, or give another --out"
        )
    check_space(settings)


def check_space(settings):
    """Refuse a space with a value no trial could train: each choice and each end of a range, on the default
    recipe, must make a TrainConfig that train accepts, and a training step that fits in memory. Otherwise the
    study's folder would be made, and the corrected command refused as a study of other settings."""
    dataset = load_dataset(settings.data_dir, verify=False)
    base = base_recipe(settings)
    sizes = {"vocab_size": dataset.vocab_size, "block_size": dataset.seq_len - 1}
    for name, dist in distributions(settings.space, base).items():
        ends = dist.choices if isinstance(dist, CategoricalDistribution) else (dist.low, dist.high)
        for value in ends:
            try:
                cfg = TrainConfig.from_dict(trial_config(settings, base, {name: value}, 0, dataset.seq_len))
                fix = f"give --space a smaller {name} (its range or choices)"
                check_training_fits(cfg.gpt_config(**sizes), cfg.batch_size, resolve_device(cfg)[0], fix)
            except NanoMarkovError as e:
                raise NanoMarkovError(f"--space {name}={value}: {e}") from None


def start_study(settings):
    """Check the settings (check_settings); make the folder and open the study; fail the trials of dead
    workers; enqueue the default recipe into a new study. Returns the study."""
    out = Path(settings.out)
    check_settings(settings)
    # A --storage of its own is opened before the folder is made: a bad URL leaves nothing behind.
    # The default one (DIR/study.db) needs the folder first.
    study = open_study(settings) if settings.storage else None
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "tune.json", {"identity": settings.identity(), **dataclasses.asdict(settings)}, "tune settings")
    if study is None:
        study = open_study(settings)
    failed = fail_dead_trials(study)
    if failed:
        print(f"trial(s) {', '.join(map(str, failed))} left running by a worker that died: marked failed")
    if not study.trials:
        dataset = load_dataset(settings.data_dir, verify=False)
        base = base_recipe(settings)
        study.enqueue_trial(default_params(distributions(settings.space, base), base), user_attrs={"default": True})
        study.set_user_attr("tokens", settings.tokens)
        study.set_user_attr("seq_len", dataset.seq_len)
    return study


def worker_name():
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_dead_trials(study):
    """Mark FAIL the RUNNING trials whose worker, a process of this machine, is gone (killed): their numbers."""
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid)):
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            failed.append(trial.number)
    return failed


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process holds the number: alive, and not ours
        return True
    return True


def run_worker(settings):
    """Run trials until the study has settings.trials of them (complete, pruned or running)."""
    study = open_study(settings)
    base = base_recipe(settings)
    found = distributions(settings.space, base)
    seq_len = study.user_attrs["seq_len"]
    failures = 0
    while len(study.get_trials(deepcopy=False, states=COUNTED)) < settings.trials and failures < settings.trials:
        outcome = run_trial(study, settings, base, found, seq_len)
        failures += outcome == "failed"
        if outcome == "interrupted":
            return 130
    return 0


def run_trial(study, settings, base, found, seq_len):
    """Ask for a trial, train it, tell the study: 'complete', 'pruned', 'failed' or 'interrupted'."""
    trial = study.ask(fixed_distributions=found)
    trial.set_user_attr("worker", worker_name())
    if "SLURM_JOB_ID" in os.environ:  # which job ran it, for sacct and the job's log in DIR/slurm
        trial.set_user_attr("slurm_job", os.environ["SLURM_JOB_ID"])
    try:
        cfg = trial_config(settings, base, trial.params, trial.number, seq_len)
    except NanoMarkovError as e:  # a combination the model refuses (e.g. one_hot_embed narrower than K+1)
        return tell_failed(study, trial, str(e))
    trial.set_user_attr("config", cfg)
    reported = set()

    def report(record):
        step = record["iter"] // cfg["eval_interval"]
        if step in reported or not math.isfinite(record["excess"]):
            return
        reported.add(step)
        trial.report(record["excess"], step)
        if trial.should_prune():
            raise optuna.TrialPruned

    beat = Heartbeat(
        f"trial {trial.number}",
        cfg["max_iters"],
        "iterations",
        waiting="its first step not done yet",
        every=TRIAL_BEAT_SECONDS,
    )
    try:
        # The run's lines go to its training.log; the heartbeat says how far it is and how long is left.
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), beat:
            done = train(
                TrainConfig.from_dict(cfg),
                overwrite=True,
                show_progress=False,
                on_eval=report,
                on_step=lambda it: beat.advance(),
            )
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        print(f"trial {trial.number}: pruned at {max(reported)}/{settings.evals} of the budget; {show(trial.params)}")
        return "pruned"
    except TrainingDiverged as e:
        return tell_failed(study, trial, f"diverged: {e}")
    if done["status"] != "done":
        study.tell(trial, state=TrialState.FAIL)
        print(f"trial {trial.number}: interrupted, marked failed; run the same command again to continue")
        return "interrupted"
    study.tell(trial, done["excess"])
    print(f"trial {trial.number}: excess {done['excess']:.6f} nats in {done['elapsed_s']:.0f}s; {show(trial.params)}")
    return "complete"


def tell_failed(study, trial, reason):
    trial.set_user_attr("error", reason)
    study.tell(trial, state=TrialState.FAIL)
    print(f"trial {trial.number}: failed: {reason}")
    return "failed"


def show(params):
    """A trial's values in one short line."""
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def tune(settings, jobs=1, executor_for=None):
    """Run the study to settings.trials trials with `jobs` workers: local processes or, given `executor_for`
    (a folder -> a submitit executor: the sweep's SLURM launcher), SLURM jobs whose scripts and logs go in
    DIR/slurm; then write best_recipe.py and report.md. Returns (exit code, the best trial's summary line)."""
    start_study(settings)
    if executor_for is not None:
        code = run_slurm_workers(settings, jobs, executor_for(Path(settings.out) / "slurm"))
    else:
        code = run_worker(settings) if jobs == 1 else run_local_workers(settings, jobs)
    try:
        return code, write_outputs(settings, open_study(settings))
    except NanoMarkovError:
        if code == 0:
            raise
        # Stopped (Ctrl-C, SIGTERM, a dead worker) before any trial finished: that, not "more trials", is the news.
        return code, "stopped before any trial finished; run the same command again to continue the study"


def run_slurm_workers(settings, jobs, executor, poll_s=1.0):
    """`jobs` workers submitted as one SLURM job array, each running trials until the study has enough; waits for
    them, printing the count of finished trials as it grows. Returns the workers' worst exit code, 1 where a job
    failed or died."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        with executor.batch():
            submitted = [executor.submit(run_worker, settings) for _ in range(jobs)]
    except (FailedJobError, OSError) as e:
        raise NanoMarkovError(f"SLURM submission failed: {(str(e).strip().splitlines() or [''])[-1]}") from None
    print(f"{jobs} worker(s) submitted to SLURM as jobs {' '.join(job.job_id for job in submitted)}")
    try:
        wait_for_slurm_workers(settings, submitted, poll_s)
    except BaseException as stop:  # Ctrl-C, SIGTERM: the jobs are the cluster's and go on; the one line says so
        left = [job.job_id for job in submitted if not job.done()]
        if left:
            stop.add_note(
                f"SLURM job(s) {' '.join(left)} go on running trials (scancel them to stop them too); "
                "the same command continues the study"
            )
        raise
    lost, codes = [], [0]
    for job in submitted:
        try:
            codes.append(job.result())
        except (FailedJobError, UncompletedJobError) as e:
            lost.append(f"{job.job_id} ({str(e).strip().splitlines()[0][:120]})")
    if lost:
        print(f"SLURM job(s) {', '.join(lost)} ended without finishing; run the same command again to continue")
        return 1
    return max(codes)


def wait_for_slurm_workers(settings, submitted, poll_s):
    """Until every job is over, printing the count of finished trials as it grows."""
    study, reported = open_study(settings), 0
    while not all(job.done() for job in submitted):
        finished = len(study.get_trials(deepcopy=False, states=FINISHED))
        if finished != reported:
            print(f"{finished} of {settings.trials} trials finished")
            reported = finished
        time.sleep(poll_s)


def worker_process(settings, results):
    """A local worker's body: its exit code, or its one-line error, sent back through `results`; a stop outside
    training ends it quietly (its trial, RUNNING, is failed by the next run's fail_dead_trials)."""
    try:
        worker_signals()  # a stop held back while the worker started is raised here
        results.send(("code", run_worker(settings)))
    except NanoMarkovError as e:
        results.send(("error", str(e)))
    except (KeyboardInterrupt, WorkerStopped):
        with contextlib.suppress(OSError):  # the parent may be gone
            results.send(("code", 130))


def run_local_workers(settings, jobs, body=worker_process):
    """`jobs` worker processes sharing the study, each running `body(settings, results)`; one that dies (kill -9)
    leaves the others running. Returns the worst exit code; a worker's NanoMarkovError is raised here once all
    have stopped."""
    # Separate processes: each its own torch threads and its own connection to the shared storage.
    context = multiprocessing.get_context("spawn")
    workers = []
    try:
        for _ in range(jobs):
            receive, send = context.Pipe(duplex=False)
            workers.append((start_worker(context.Process(target=body, args=(settings, send))), receive))
            send.close()
        for worker, _ in workers:
            worker.join()
    except BaseException:  # Ctrl-C, SIGTERM: each worker stops as a lone `train` does, and is waited for
        stop_workers([worker for worker, _ in workers])
        raise
    outcomes = []
    for worker, receive in workers:
        try:
            outcomes.append(receive.recv() if receive.poll() else ("died", worker.exitcode))
        except EOFError:  # poll() is true at the end of a pipe whose writer died without a word
            outcomes.append(("died", worker.exitcode))
    errors = [detail for kind, detail in outcomes if kind == "error"]
    if errors:
        raise NanoMarkovError(errors[0])
    died = [-detail if detail < 0 else detail for kind, detail in outcomes if kind == "died"]
    if died:
        print(
            f"{len(died)} of {jobs} workers died (signal/exit {', '.join(map(str, died))}); the others ran on. "
            "Run the same command again to continue the study: a dead worker's trial is marked failed"
        )
        return 1
    return max(detail for _, detail in outcomes)


def write_outputs(settings, study):
    """best_recipe.py, the plots and report.md; returns the best trial's line."""
    out = Path(settings.out)
    # A trial told a value by another tool (Optuna's own API, a dashboard) carries no run config: it cannot be a recipe.
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "config" in t.user_attrs]
    if not complete:
        raise NanoMarkovError(
            f"no trial of the study in {out} has finished yet (all pruned, failed or running); "
            "run the same command again with more --trials"
        )
    best = min(complete, key=lambda t: t.value)
    write_atomic(out / "best_recipe.py", best_recipe_text(settings, best, len(complete)).encode(), "best recipe")
    plots = {
        "history.png": plot_history(study),
        "importances.png": plot_importances(study, complete),
        "best_curve.png": plot_best_curve(settings, best),
    }
    for name, figure in plots.items():
        if figure is not None:
            write_atomic(out / name, png_bytes(figure), "plot")
    write_atomic(out / "report.md", report_text(settings, study, best, plots).encode(), "report")
    return (
        f"best: trial {best.number}, excess {best.value:.6f} nats at {settings.tokens:,} tokens "
        f"({show(best.params)}); {out / 'best_recipe.py'}, {out / 'report.md'}"
    )


def best_recipe_text(settings, best, n_complete):
    """The best trial's config as a config file `nanomarkov train` takes as it is."""
    cfg = dict(best.user_attrs["config"])
    name = Path(settings.data_dir).resolve().name
    cfg["out_dir"] = f"trainings/{name}/{name}-tuned-{cfg['seed']}"
    header = (
        f"The best of {n_complete} finished trials of nanomarkov tune {settings.data_dir} (trial {best.number}, "
        f"study {storage_url(settings)}):\nexcess {best.value:.6f} nats over the true loss of the val split "
        f"at {settings.tokens:,} tokens.\nTrain with: nanomarkov train {Path(settings.out) / 'best_recipe.py'}"
    )
    return format_config_file(cfg, header)


def plot_history(study):
    """Each finished trial's excess by trial number, and the best so far."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    numbers = [t.number for t in trials]
    values = np.array([t.value for t in trials])
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(numbers, values, "o", label="trial (complete)")
    ax.step(numbers, np.minimum.accumulate(values), where="post", color="C3", label="best so far")
    ax.set_yscale("log" if (values > 0).all() else "linear")
    ax.set_xlabel("trial")
    ax.set_ylabel("excess over the true loss of val (nats)")
    ax.set_title("optimisation history")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    return fig


def plot_importances(study, complete):
    """Optuna's parameter importances (fANOVA), or None with fewer than two complete trials or without
    scikit-learn, which Optuna's fANOVA needs and the tune extra does not bring."""
    if len(complete) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna warns that a constant parameter has no importance
        try:
            importances = optuna.importance.get_param_importances(study)
        except ImportError:
            return None
        except (RuntimeError, ValueError):  # every searched value the same in the complete trials
            return None
    if not importances:
        return None
    fig = Figure(figsize=(7, 0.4 * len(importances) + 1.5), layout="constrained")
    ax = fig.subplots()
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance (fANOVA, share of the excess's variance)")
    ax.set_title(f"parameter importances over {len(complete)} complete trials")
    return fig


def plot_best_curve(settings, best):
    """The best trial's excess against tokens seen, beside the gap of each of the process's stages."""
    log = Path(best.user_attrs["config"]["out_dir"]) / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    evals = [r for r in records if r.get("kind") == "eval" and r["excess"] is not None and r["excess"] > 0]
    if not evals:
        return None
    dataset = load_dataset(settings.data_dir, verify=False)
    optimal = dataset.meta["theory"]["optimal_loss"]
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot([r["tokens"] for r in evals], [r["excess"] for r in evals], "o-", label=f"trial {best.number}")
    for i, (stage, loss) in enumerate(stage_losses(dataset).items()):
        if loss - optimal > 1e-6:
            ax.axhline(loss - optimal, ls="--", lw=1, color=f"C{i + 1}", label=f"{stage} stage")
    ax.set_yscale("log")
    ax.set_xlabel("tokens seen")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_ylabel("excess over the optimum (nats, log)")
    ax.set_title("the best trial against the stages of its process")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return fig


def report_text(settings, study, best, plots):
    """report.md: the study's settings, its trials, the best recipe and the plots."""
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    lines = [
        f"# nanomarkov tune {settings.data_dir}",
        "",
        f"{len(trials)} trials ({', '.join(f'{n} {k}' for k, n in counts.items() if n)}) at a budget of "
        f"{settings.tokens:,} tokens each; study in `{storage_url(settings)}` (open it with any Optuna tool, "
        f"e.g. `optuna-dashboard {storage_url(settings)}`).",
        "",
        f"Best: trial {best.number}, excess **{best.value:.6f}** nats over the true loss of the val split; "
        f"`nanomarkov train {Path(settings.out) / 'best_recipe.py'}` trains it.",
        "",
        "| trial | state | excess (nats) | " + " | ".join(settings.space) + " |",
        "|---" * (3 + len(settings.space)) + "|",
    ]
    for t in trials:
        value = "" if t.value is None else f"{t.value:.6f}"
        cells = [show({k: t.params[k]}).partition("=")[2] if k in t.params else "" for k in settings.space]
        mark = " (default)" if t.user_attrs.get("default") else ""
        lines.append(f"| {t.number}{mark} | {t.state.name.lower()} | {value} | " + " | ".join(cells) + " |")
    for name, figure in plots.items():
        lines += ["", f"![{name[:-4]}]({name})" if figure is not None else f"({name[:-4]}: not enough trials yet)"]
    return "\n".join(lines) + "\n"
