"""Training dynamics against the exact theory: `nanomarkov dynamics RUN`.

A run trained with `--snapshots N` keeps weights-only snapshots under RUN/snapshots/
(checkpoint.list_snapshots). For each one, on the first val sequences of the run's dataset
(the same ones for every snapshot), this measures:
  val loss        next to the process's stage predictors (Process.stage_losses: uniform,
                  unigram, korder's first_order, icl's in_context_unigram, the optimum,
                  icl's oracle) and the floor, the optimal predictor's loss on exactly
                  these sequences; plus accuracy
  by position     the loss at each predicted position, next to the optimum there
  optimal KL      KL(optimal predictor || model), mean over every position (all processes)
  transition KL   markov: KL(P_s || model after [BOS, s]), mean over states (evaluate.py)
  korder KL       korder: evaluate.py's korder_fidelity, beside its first-order baseline
  belief R²       hmm: the linear probe from each residual stream to the belief state
  belief probe    hmm: its held-out R² and MSE per layer and from all layers concatenated, beside the
                  same on shuffled targets; the iteration-0 snapshot's as the untrained baseline
                  (belief_baselines); the simplex of chosen snapshots (belief_simplex)
  attention       per head: the mean weight on the current token, earlier states (the previous
                  one among them) and BOS
  stage KL        per stage predictor (Process.stage_log_probs), KL(stage || model), mean over every
                  position: the distance to each strategy, and when the model entered and left
                  each (stage_events, STAGE_EVENT_RULE)
  attention scores per head: the previous-token score on val, the induction score on repeated
                  random sequences (interp.readouts)
  llc             with `llc`: the local learning coefficient (devinterp, optional)
and when the model first crosses each stage: the first snapshot whose val loss is at or
below the stage's loss, and for the optimum, the first within REACHED_EXCESS of the floor
(a stage below the optimum, like icl's oracle, is never crossed). It writes dynamics.json
(strict JSON) and the plots (PLOTS) into the run folder or `out`.
"""

import dataclasses
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter
from tqdm import tqdm

from nanomarkov.checkpoint import CHECKPOINT, list_snapshots, load_checkpoint, load_snapshot, snapshot_config
from nanomarkov.config import DEFAULT_VAL_SEQUENCES, LLC_COUNTS, LLC_DEFAULTS, is_run_folder
from nanomarkov.data import load_dataset, optimal_loss_by_position, stage_loss_errors, stage_losses
from nanomarkov.errors import NanoMarkovError
from nanomarkov.evaluate import (
    EVAL_BATCH_ELEMENTS,
    check_trained_on,
    evaluate_models,
    kl_terms,
    make_folder,
)
from nanomarkov.files import (
    check_output_folder,
    check_own_files,
    holds_record,
    json_text,
    read_json,
    read_json_or_none,
    write_atomic_together,
)
from nanomarkov.interp.linear_probes import ALL_LAYERS, SHUFFLE_SEED, belief_state_probe, plot_belief_simplex
from nanomarkov.interp.readouts import (
    attention_layers,
    attention_summary,
    induction_scores,
    previous_token_scores,
    repeated_random_tokens,
)
from nanomarkov.processes import DEFAULT_PROCESS
from nanomarkov.report import TARGET_EXCESS, png_bytes

DYNAMICS_FILE = "dynamics.json"
# What every dynamics.json holds (since the first), and a user's own file of that name is unlikely to.
DYNAMICS_MARKS = ("run", "dataset", "snapshots", "crossings", "theory")
PLOTS = (
    "dynamics_loss.png",
    "dynamics_metrics.png",
    "dynamics_by_position.png",
    "dynamics_strategies.png",
    "dynamics_attention.png",
)
ATTENTION_SEQUENCES = 64  # the attention summary needs fewer: its means settle fast
# The optimum counts as reached within this of the floor (the project's quality target).
REACHED_EXCESS = TARGET_EXCESS
# Sequences x vocabulary per batch of the stage KLs: each stage's (n, L-1, K) float64 table then stays ~8 MB.
STAGE_BATCH_ELEMENTS = EVAL_BATCH_ELEMENTS // 8
# When the model entered and left each stage (stage_events), from its distance d_i to the stage at each snapshot
# and the closest approach m = min d_i: the stage counts as approached at all when m <= APPROACH_SHARE * max d_i
# (the model came at least 4x closer than it ever was far); the "near" band is d <= ENTER_FACTOR * m + ENTER_NATS
# (twice the closest distance, plus a margin so that a distance of ~0 does not make the band vanish).
STAGE_EVENT_RULE = dict(approach_share=0.25, enter_factor=2.0, enter_nats=1e-3)
INDUCTION_SEED = 0  # the repeated random sequences of the induction score: the same ones for every snapshot
SIMPLEX_PLOT = "dynamics_simplex.png"  # hmm only: the belief simplex of the snapshots belief_simplex draws


def snapshots_of(run_folder):
    """The run's snapshots [(iter, tokens, path)]; one line naming the fix when there are none."""
    run_folder = Path(run_folder)
    if run_folder.is_file():
        raise NanoMarkovError(
            f"{run_folder}: a file, not a run folder; give the folder `nanomarkov train` wrote "
            f"(the one holding ckpt.pt and snapshots/), e.g. `nanomarkov dynamics {run_folder.parent}`"
        )
    if not run_folder.is_dir():
        raise NanoMarkovError(f"{run_folder}: no such run folder; give the folder `nanomarkov train` wrote")
    found = list_snapshots(run_folder)
    if not found and (run_folder / "meta.json").is_file() and not (run_folder / "config.json").is_file():
        raise NanoMarkovError(
            f"{run_folder}: a dataset folder (meta.json, no config.json), not a run; give the run folder "
            f"`nanomarkov train {run_folder} --snapshots 30` wrote (its --out_dir)"
        )
    if not found:
        raise NanoMarkovError(
            f"{run_folder}: no snapshots (RUN/snapshots/ is empty or missing); train with snapshots kept, "
            f"e.g. `nanomarkov train DATA --snapshots 30`"
        )
    return found


def one_architecture(run_folder, snapshots):
    """Refuse, before any work, a snapshot whose GPTConfig is not the run's (say one copied from another run).

    The run's config: config.json's model fields, and for any it lacks, the config most snapshots share.
    """
    configs = {path: dataclasses.asdict(snapshot_config(path)) for _, _, path in snapshots}
    reference = dict(max(configs.values(), key=lambda config: list(configs.values()).count(config)))
    saved = read_json_or_none(Path(run_folder) / "config.json") or {}
    reference.update({name: saved[name] for name in reference if name in saved})
    for path, config in configs.items():
        differences = [
            f"{name}: {config[name]!r} vs {value!r}" for name, value in reference.items() if config[name] != value
        ]
        if differences:
            raise NanoMarkovError(
                f"{path}: its GPTConfig differs from the run's (config.json, the other snapshots) in "
                f"{', '.join(differences)}; remove it from {path.parent} or retrain"
            )


def refuse_another_process(dataset, run_folder):
    """Refuse a --data dataset of another process or K than the one the run trained on (when that one is there)."""
    trained_on = (read_json_or_none(Path(run_folder) / "config.json") or {}).get("data_dir")
    meta = read_json_or_none(Path(trained_on) / "meta.json") if isinstance(trained_on, str) else None
    if meta is None:  # moved or deleted: pointing at it anew is what --data is for
        return
    theirs = (meta.get("process", DEFAULT_PROCESS), meta.get("n_states"))
    ours = (dataset.meta.get("process", DEFAULT_PROCESS), dataset.meta["n_states"])
    if ours != theirs:
        raise NanoMarkovError(
            f"--data {dataset.path} is {ours[0]} K={ours[1]}, but {run_folder} trained on {trained_on} "
            f"({theirs[0]} K={theirs[1]}); pass --data {trained_on}, or leave --data out to use it"
        )


def refuse_other_data(dataset, run_folder):
    """Refuse a dataset other than the one the run trained on, as eval does (evaluate.check_trained_on):
    by the sha256 its config.json records, or else its checkpoint (a run without either: any passes)."""
    run_folder = Path(run_folder)
    record = read_json_or_none(run_folder / "config.json") or {}
    if "dataset_sha256" not in record and (run_folder / CHECKPOINT).is_file():
        record = load_checkpoint(run_folder / CHECKPOINT)
    check_trained_on(run_folder, record, dataset)


def run_dataset(run_folder, data_dir=None):
    """The run's dataset (config.json's data_dir, or `data_dir`), loaded; refused when it is not the one
    the run trained on."""
    run_folder = Path(run_folder)
    if data_dir is not None:
        dataset = load_dataset(data_dir, verify=False)
        refuse_another_process(dataset, run_folder)
        refuse_other_data(dataset, run_folder)
        return dataset
    config_path = run_folder / "config.json"
    if not config_path.is_file():
        raise NanoMarkovError(f"{run_folder}: no config.json to name the dataset; pass --data DIR")
    data_dir = read_json(config_path, what="run config", fix="pass --data DIR").get("data_dir")
    if not isinstance(data_dir, str):
        raise NanoMarkovError(f"{config_path}: no data_dir; pass --data DIR")
    if not Path(data_dir).is_dir():
        raise NanoMarkovError(
            f"dataset {data_dir} of {run_folder} not found; run from the folder you trained in, or pass --data DIR"
        )
    dataset = load_dataset(data_dir, verify=False)
    refuse_other_data(dataset, run_folder)
    return dataset


def val_subset(dataset, n_sequences):
    """The dataset cut to its first n val sequences, with the theory's floor recomputed on them."""
    k, positions = dataset.chain.n_states, dataset.seq_len - 1
    if not isinstance(n_sequences, int) or n_sequences < 2:
        raise NanoMarkovError(f"--val_sequences must be an integer >= 2, got {n_sequences!r}")
    n = min(n_sequences, dataset.val.shape[0], max(2, EVAL_BATCH_ELEMENTS // (positions * (k + 1))))
    val = np.asarray(dataset.val[:n])
    theory = dict(dataset.meta["theory"], true_loss_val=dataset.chain.true_loss(val))
    # No train split: evaluate's bigram baseline (train counts) is not a stage here, and costs a pass over train.
    return dataclasses.replace(dataset, val=val, train=val[:0], meta=dict(dataset.meta, theory=theory))


def stage_theory(dataset):
    """The baselines every snapshot is compared with: stages, their errors, the floor, the optimum by position."""
    optimum_by_position, optimum_by_position_se = optimal_loss_by_position(dataset)
    return {
        "stages": stage_losses(dataset),
        "stage_errors": stage_loss_errors(dataset),
        "floor": dataset.meta["theory"]["true_loss_val"],
        "reached_excess": REACHED_EXCESS,
        "optimal_loss_by_position": optimum_by_position.tolist(),
        "optimal_loss_by_position_se": optimum_by_position_se.tolist(),
    }


class StageDistances:
    """An evaluate family (evaluate_models' extra_families) of the dynamics: per model, KL(optimal predictor ||
    model) and, for each stage of Process.stage_log_probs, KL(stage predictor || model), each the mean over every
    val position, from evaluate's own val pass and its q (state_log_probs: BOS dropped, the K state logits
    renormalised). Eval has the optimal KL itself only for a process whose METRICS name optimal_fidelity (a
    first-order chain's is per state), so every process gets it here."""

    def __init__(self, dataset, names):
        k, self.chain = dataset.chain.n_states, dataset.chain
        self.rows = max(1, STAGE_BATCH_ELEMENTS // ((dataset.seq_len - 1) * (k + 1)))
        self.stage_sums = {name: {} for name in names}
        self.optimal_sum, self.positions = dict.fromkeys(names, 0.0), 0

    def update(self, batch):
        self.positions += batch.y.numel()
        for name, log_q in batch.log_q.items():
            self.optimal_sum[name] += kl_terms(batch.optimal_log, log_q).sum().item()
        for lo in range(0, batch.tokens.shape[0], self.rows):  # stage tables of at most STAGE_BATCH_ELEMENTS
            stages = self.chain.stage_log_probs(batch.tokens[lo : lo + self.rows].numpy())
            for name, log_q in batch.log_q.items():
                sums = self.stage_sums[name]
                for stage, log_p in stages.items():
                    terms = kl_terms(torch.from_numpy(log_p), log_q[lo : lo + self.rows])
                    sums[stage] = sums.get(stage, 0.0) + terms.sum().item()

    def results(self, name, models, device, timings):
        stage_kl = {stage: total / self.positions for stage, total in self.stage_sums[name].items()}
        return {"stage_kl": stage_kl, "mean_optimal_kl": self.optimal_sum[name] / self.positions}, {}


def measure_snapshot(model, dataset):
    """Every dynamics number of one model on the (cut) dataset, as a dict of plain values."""
    result = evaluate_models({"model": model}, dataset, extra_families=[StageDistances])["model"]
    by_position = result["arrays"]["loss_by_position"]["val_loss"]
    measured = {
        "val_loss": result["cross_entropy"]["val_loss"],
        "excess": result["cross_entropy"]["excess"],
        "accuracy": result["accuracy"]["accuracy"],
        "optimal_kl": result["mean_optimal_kl"],
        "transition_kl": (result.get("transition_fidelity") or {}).get("mean_kl"),
        "korder_kl": (result.get("korder_fidelity") or {}).get("mean_kl"),
        "korder_first_order_kl": (result.get("korder_fidelity") or {}).get("first_order_kl"),
        "loss_by_position": by_position.tolist(),
        "outputs_finite": result["outputs_finite"],
    }
    if not result["outputs_finite"]:  # broken weights: nothing inside the model to probe either
        broken = {"optimal_kl": None, "loss_by_position": None, "belief_r2": None, "attention": None}
        broken |= {"belief_probe": None}
        return measured | broken | {"stage_kl": None, "attention_scores": None}
    measured["stage_kl"] = result["stage_kl"]
    measured["attention_scores"] = attention_scores(model, dataset)
    if dataset.chain.BELIEF_STATES:
        probe = belief_state_probe(model, dataset, n_sequences=dataset.val.shape[0])
        measured["belief_r2"] = {"layers": probe["layers"], "r2": probe["r2"].tolist()}
        measured["belief_probe"] = belief_probe_numbers(probe)
    attention = attention_summary(model, dataset.val[:ATTENTION_SEQUENCES])
    measured["attention"] = {key: np.asarray(value).tolist() for key, value in attention.items()}
    return measured


def attention_scores(model, dataset):
    """Per attention layer and head: the previous-token score on the first ATTENTION_SEQUENCES val
    sequences, the induction score on as many repeated random sequences of n = (block_size - 1) // 2
    states (interp.readouts; seeded, the same for every snapshot). None for a model without attention."""
    layers, half = attention_layers(model), (model.config.block_size - 1) // 2
    if not layers.size:
        return None
    rng = np.random.default_rng(INDUCTION_SEED)
    repeated = repeated_random_tokens(dataset.chain.n_states, ATTENTION_SEQUENCES, half, rng)
    return {
        "layers": layers.tolist(),
        "previous_token": previous_token_scores(model, dataset.val[:ATTENTION_SEQUENCES]).tolist(),
        "induction": induction_scores(model, repeated).tolist() if half >= 1 else None,
        "induction_half": half,
    }


def distance_events(distances, rule=STAGE_EVENT_RULE):
    """(closest, entered, left, band) of one stage's distance at each snapshot (NaN: none there): indices
    of the closest approach (the first minimum), the first snapshot in the near band (None when the
    stage was never approached, see STAGE_EVENT_RULE), and the first snapshot after the closest
    approach from which every later one stays outside the band (None while the last is in it)."""
    distances = np.asarray(distances, dtype=float)
    finite = np.flatnonzero(np.isfinite(distances))
    if not finite.size:
        return None, None, None, None
    closest = int(finite[np.argmin(distances[finite])])
    nearest = distances[closest]
    band = rule["enter_factor"] * nearest + rule["enter_nats"]
    if nearest > rule["approach_share"] * distances[finite].max():
        return closest, None, None, band
    near = finite[distances[finite] <= band]
    later = finite[finite > near[-1]]
    return closest, int(near[0]), int(later[0]) if later.size else None, band


def stage_events(entries):
    """{stage: {"closest", "entered", "left" (each {iter, tokens, kl} or None), "band"}} from each
    snapshot's stage_kl (distance_events)."""
    names = list(dict.fromkeys(name for e in entries for name in e.get("stage_kl") or {}))
    events = {}
    for name in names:
        distances = [np.nan if e.get("stage_kl") is None else e["stage_kl"].get(name, np.nan) for e in entries]
        *picked, band = distance_events(distances)
        at = [
            None if i is None else {"iter": entries[i]["iter"], "tokens": entries[i]["tokens"], "kl": distances[i]}
            for i in picked
        ]
        events[name] = dict(zip(("closest", "entered", "left"), at), band=band)
    return events


def first_crossings(values, levels):
    """{name: index of the first value at or below its level, or None}; NaN or None values never cross."""
    values = np.array([np.nan if v is None else v for v in values], dtype=float)
    crossings = {}
    for name, level in levels.items():
        below = np.flatnonzero(values <= level)
        crossings[name] = int(below[0]) if below.size else None
    return crossings


def crossing_levels(theory):
    """The level each stage is crossed at: its loss for stages above the optimum; the floor plus
    REACHED_EXCESS for the optimum; none for a stage below the optimum (it knows more than the data)."""
    stages, optimum = theory["stages"], theory["stages"]["optimal"]
    levels = {name: loss for name, loss in stages.items() if loss > optimum}
    levels["optimal"] = theory["floor"] + theory["reached_excess"]
    return levels


def run_dynamics(
    run_folder, data_dir=None, val_sequences=DEFAULT_VAL_SEQUENCES, llc=None, show_progress=None, simplex_iters=None
):
    """dynamics.json's record for a run: theory, one entry per snapshot, the crossings (see the module docstring).

    `llc` is None (no learning coefficient) or the keyword arguments of learning_coefficient.
    `simplex_iters`: the snapshots whose belief simplex write_dynamics draws (hmm; default
    simplex_choice's first, the one nearest half the run, and the last).
    """
    started = time.perf_counter()
    if llc is not None:
        import_devinterp()  # before any work: a missing library is said at once
    snapshots = snapshots_of(run_folder)
    one_architecture(run_folder, snapshots)
    full = run_dataset(run_folder, data_dir)
    dataset = val_subset(full, val_sequences)
    simplex = simplex_choice(full, [iter_num for iter_num, _, _ in snapshots], simplex_iters)
    theory = stage_theory(dataset)
    entries = []
    bar = tqdm(snapshots, desc=f"dynamics {run_folder}", unit="snapshot", leave=False, disable=not show_progress)
    for iter_num, tokens, path in bar:
        model, _ = load_snapshot(path)
        if model.config.vocab_size != dataset.vocab_size:
            raise NanoMarkovError(
                f"{path}: vocabulary {model.config.vocab_size}, but {dataset.path} has {dataset.vocab_size}; "
                "pass --data with the dataset this run trained on"
            )
        entry = {"iter": iter_num, "tokens": tokens, "file": str(path)} | measure_snapshot(model, dataset)
        if llc is not None:
            entry["llc"] = learning_coefficient(model, dataset.val, **llc)
        entries.append(entry)
    levels = crossing_levels(theory)
    crossings = {
        name: None if i is None else {"iter": entries[i]["iter"], "tokens": entries[i]["tokens"], "level": levels[name]}
        for name, i in first_crossings([e["val_loss"] for e in entries], levels).items()
    }
    seconds = time.perf_counter() - started
    return {
        "run": str(run_folder),
        "dataset": str(full.path),
        "process": full.chain.process,
        "n_states": full.chain.n_states,
        "seq_len": full.seq_len,
        "val_sequences": int(dataset.val.shape[0]),
        "val_sequences_total": int(full.val.shape[0]),
        "theory": theory,
        "snapshots": entries,
        "crossings": crossings,
        "stage_events": stage_events(entries),
        "stage_event_rule": STAGE_EVENT_RULE,
        "belief_baselines": belief_baselines(entries) if full.chain.BELIEF_STATES else None,
        "simplex": drawable_simplex(simplex, entries),
        "timing": {"total_s": round(seconds, 3), "per_snapshot_s": round(seconds / len(entries), 3)},
    }


# ------------------------------------------------------------ the learning coefficient (devinterp, optional)


def llc_settings(**changes):
    """LLC_DEFAULTS with `changes` (a None value keeps the default), checked: counts are integers >= 1,
    lr and localization finite and > 0, n_beta None or finite and > 0."""
    settings = dict(LLC_DEFAULTS)
    for name, value in changes.items():
        if name not in settings:
            raise NanoMarkovError(f"unknown learning-coefficient setting {name!r}; choose from {', '.join(settings)}")
        if value is None:
            continue
        if name in LLC_COUNTS:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        if not ok:
            kind = "an integer >= 1" if name in LLC_COUNTS else "a finite number > 0"
            raise NanoMarkovError(f"learning-coefficient setting {name} must be {kind}, got {value!r}")
        settings[name] = value
    return settings


def import_devinterp():
    """(datasets.Dataset, devinterp's llc), or one line saying how to install them."""
    try:
        # devinterp first: datasets (which it needs) may be there without it, and takes seconds to import
        import devinterp.slt.llc
        from datasets import Dataset as HFDataset
    except ImportError:
        raise NanoMarkovError(
            "--llc needs the devinterp library: pip install 'nanomarkov[devinterp]' (or pip install devinterp)"
        ) from None
    return HFDataset, devinterp.slt.llc.llc


def learning_coefficient(model, tokens, num_chains, num_draws, lr, n_beta, batch_size, localization):
    """The local learning coefficient of `model` at its weights on BOS-led `tokens`, by SGLD (devinterp).

    n_beta None: n / log n with n the number of predicted tokens, the usual inverse temperature.
    Returns {"mean", "std" (over chains), "seconds"}. devinterp is an optional dependency.
    """
    HFDataset, llc = import_devinterp()
    tokens = np.asarray(tokens, dtype=np.int64)
    n_tokens = tokens.shape[0] * (tokens.shape[1] - 1)
    started = time.perf_counter()

    def per_token_loss(net, input_ids):
        logits = net(input_ids[:, :-1])[0]
        return F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")

    with tempfile.TemporaryDirectory() as scratch:  # devinterp writes its draws to a zarr store
        result = llc(
            model,
            HFDataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch"),
            {},
            lr=lr,
            n_beta=n_beta or n_tokens / np.log(n_tokens),
            loss_fn=per_token_loss,
            num_chains=num_chains,
            num_draws=num_draws,
            batch_size=batch_size,
            localization=localization,
            device="cpu",
            output_path=Path(scratch) / "samples.zarr",
        )
        mean, std = float(result["llc_mean"]), float(result["llc_std"])
    return {
        "mean": mean,
        "std": std,
        "seconds": round(time.perf_counter() - started, 3),
    }


# ------------------------------------------------------------ text, files and plots


# Why the table's two distances to the optimum differ, most at the start (0.52 against 0.23 at iter 0).
EXCESS_VS_KL = (
    "excess = val loss − floor; optimal KL compares the model's next-state law, renormalised over the K "
    "states, with the optimal one: the gap between them is the probability the model still puts on BOS, "
    "which never comes next (−log(1 − P(BOS)) a position), plus the val sample's noise"
)


def format_dynamics(record):
    """The record as a few lines: one per snapshot, then when each stage was crossed."""
    theory, entries = record["theory"], record["snapshots"]
    extra = [("transition KL", "transition_kl"), ("korder KL", "korder_kl")]
    extra = [(title, key) for title, key in extra if any(e.get(key) is not None for e in entries)]
    head = ["iter", "tokens", "val loss", "excess", "optimal KL"] + [title for title, _ in extra]
    has_probe = any(e.get("belief_r2") for e in entries)
    head += ["belief R²"] if has_probe else []
    rows = []
    for e in entries:
        cells = [str(e["iter"]), f"{e['tokens']:,}", *(_number(e[key], ".4f") for key in ("val_loss", "excess"))]
        cells += [_number(e["optimal_kl"], ".5f")] + [_number(e[key], ".5f") for _, key in extra]
        cells += [_number(e["belief_r2"]["r2"][-1] if e.get("belief_r2") else None, ".3f")] if has_probe else []
        rows.append(cells)
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    lines = [
        f"{record['run']}: {record['process']} K={record['n_states']}, {len(entries)} snapshot(s), "
        f"on the first {record['val_sequences']} of {record['val_sequences_total']} val sequences",
        "  ".join(h.rjust(w) for h, w in zip(head, widths)),
        *("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows),
        "",
        f"floor (optimal predictor on these sequences) {theory['floor']:.4f}",
        EXCESS_VS_KL,
    ]
    for name, loss in theory["stages"].items():
        crossing = record["crossings"].get(name, "below")
        if crossing == "below":
            when = "below the optimum: not reachable from the data"
        elif crossing is None:
            when = "not crossed yet"
        elif name == "optimal":
            when = (
                f"reached at iter {crossing['iter']} ({crossing['tokens']:,} tokens): "
                f"within {theory['reached_excess']} of the floor"
            )
        else:
            when = f"crossed at iter {crossing['iter']} ({crossing['tokens']:,} tokens)"
        lines.append(f"stage {name:<20} {loss:.4f}  {when}")
    return "\n".join(lines + format_strategies(record) + format_probes(record))


def format_strategies(record):
    """The distance to each strategy per snapshot, the best previous-token and induction heads, and
    when each stage was entered and left: lines to add below the table."""
    entries, events = record["snapshots"], record.get("stage_events") or {}
    if not events:
        return []
    head = ["iter", *(f"KL {name}" for name in events), "prev-token", "induction"]
    rows = []
    for e in entries:
        kl = e.get("stage_kl") or {}
        scores = e.get("attention_scores")
        best = [None, None] if scores is None else [_best_head(scores, key) for key in ("previous_token", "induction")]
        rows.append([str(e["iter"]), *(_number(kl.get(name), ".5f") for name in events), *best])
    rows = [[cell if isinstance(cell, str) else "none" for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    rule = record["stage_event_rule"]
    lines = [
        "",
        "distance to each strategy: mean KL(stage || model) over the same positions, nats; the best head's "
        "previous-token and induction score (none: no attention)",
        "  ".join(h.rjust(w) for h, w in zip(head, widths)),
        *("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows),
        f"entered: first snapshot with KL <= {rule['enter_factor']:g} x its minimum + {rule['enter_nats']:g}; "
        f"left: from there on above that (a stage whose minimum is over {rule['approach_share']:g} x its maximum "
        "was never approached)",
    ]
    for name, event in events.items():
        closest = event["closest"]
        if closest is None:
            lines.append(f"strategy {name:<20} no finite distance")
            continue
        said = [f"closest {closest['kl']:.5f} at iter {closest['iter']}"]
        if event["entered"] is None:
            said.append("never approached")
        else:
            said.append(f"entered at iter {event['entered']['iter']} ({event['entered']['tokens']:,} tokens)")
            left = event["left"]
            said.append("not left" if left is None else f"left at iter {left['iter']} ({left['tokens']:,} tokens)")
        lines.append(f"strategy {name:<20} " + ", ".join(said))
    return lines


def _best_head(scores, key):
    """'L{layer}H{head} {score}' of the head with the highest score, or None where there is none."""
    values = scores.get(key)
    if not values or not np.asarray(values).size:
        return None
    values = np.asarray(values, dtype=float)
    layer, head = np.unravel_index(np.argmax(values), values.shape)
    return f"L{scores['layers'][layer]}H{head} {values[layer, head]:.3f}"


def _number(value, spec):
    return "n/a" if value is None else f"{value:{spec}}"


def is_dynamics_folder(folder) -> bool:
    """Whether dynamics may write into `folder` as its own: a run (its config.json or snapshots), or
    a folder holding earlier dynamics (a dynamics.json that dynamics wrote, not a user's own)."""
    folder = Path(folder)
    return is_run_folder(folder) or bool(list_snapshots(folder)) or holds_record(folder, DYNAMICS_FILE, DYNAMICS_MARKS)


def check_dynamics_folder(folder, force=False):
    """Refuse a `folder` that dynamics may not write into (files.check_output_folder)."""
    writes = (DYNAMICS_FILE, *PLOTS, SIMPLEX_PLOT)
    folder = check_output_folder(folder, "dynamics", is_dynamics_folder, force=force, writes=(*writes, "*.partial"))
    check_own_files(folder, writes, "dynamics", record=DYNAMICS_FILE, marks=DYNAMICS_MARKS)


def write_dynamics(record, folder, force=False):
    """dynamics.json and the PLOTS into `folder` (created), replaced together; returns their paths."""
    check_dynamics_folder(folder, force)
    folder = make_folder(Path(folder), what="the dynamics")
    figures = (
        plot_loss(record),
        plot_metrics(record),
        plot_by_position(record),
        plot_strategies(record),
        plot_attention_scores(record),
    )
    payloads = {folder / DYNAMICS_FILE: json_text(record)}
    payloads.update({folder / name: png_bytes(fig) for name, fig in zip(PLOTS, figures)})
    if record.get("simplex"):
        payloads[folder / SIMPLEX_PLOT] = png_bytes(belief_simplex(record))
    write_atomic_together(payloads, "dynamics")
    return list(payloads)


def _tokens_axis(axes, entries):
    """A shared log x-axis of tokens seen that still shows a snapshot at 0 tokens (linear below the first step)."""
    positive = [e["tokens"] for e in entries if e["tokens"] > 0]
    for ax in axes:
        ax.set_xscale("symlog", linthresh=min(positive) if positive else 1)
        ax.set_xlim(left=0)
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.grid(alpha=0.3, which="both")
    axes[-1].set_xlabel("tokens seen")


def plot_loss(record):
    """Val loss over tokens seen with each stage as a horizontal line, and where it was first crossed."""
    theory, entries = record["theory"], record["snapshots"]
    tokens = np.array([e["tokens"] for e in entries], dtype=float)
    loss = np.array([np.nan if e["val_loss"] is None else e["val_loss"] for e in entries])
    fig = Figure(figsize=(9, 7.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    top.plot(tokens, loss, "o-", ms=3, color="k", label="val loss")
    top.axhline(theory["floor"], color="0.3", lw=1, label=f"floor {theory['floor']:.4f}")
    excess = loss - theory["floor"]
    bottom.plot(tokens[excess > 0], excess[excess > 0], "o-", ms=3, color="k", label="val loss − floor")
    colours = {name: f"C{i}" for i, name in enumerate(theory["stages"])}
    for name, level in theory["stages"].items():
        top.axhline(level, color=colours[name], ls="--", lw=1.2, label=f"{name} {level:.4f}")
        if level > theory["floor"]:
            bottom.axhline(level - theory["floor"], color=colours[name], ls="--", lw=1.2)
    bottom.axhline(theory["reached_excess"], color=colours["optimal"], ls=":", lw=1)
    _mark_crossings((top, bottom), record["crossings"], colours)
    top.set_ylabel("cross-entropy (nats/token)")
    top.set_title(f"{record['run']}: loss against the stages ({record['val_sequences']} val sequences)")
    top.legend(fontsize=8, loc="upper right")
    bottom.set_yscale("log")
    bottom.set_ylabel("excess over floor (nats, log)")
    _tokens_axis([top, bottom], entries)
    return fig


def _mark_crossings(axes, crossings, colours):
    """A dotted vertical line where each stage was first crossed, labelled at the level crossed (the optimum's
    is the floor plus REACHED_EXCESS); stages crossed at one snapshot share a label."""
    by_iter = {}
    for name, crossing in crossings.items():
        if crossing is not None:
            by_iter.setdefault((crossing["iter"], crossing["tokens"]), []).append(name)
    for (iter_num, tokens), names in by_iter.items():
        for ax in axes:
            ax.axvline(tokens, color=colours[names[0]], ls=":", lw=1.2)
        axes[0].annotate(
            f"{', '.join(names)} @ iter {iter_num}",
            (tokens, max(crossings[name]["level"] for name in names)),
            xytext=(4, 4),
            textcoords="offset points",
            color=colours[names[0]],
            fontsize=8,
        )


def _series(entries, key):
    return np.array([np.nan if e.get(key) is None else e[key] for e in entries], dtype=float)


def plot_metrics(record):
    """KL to the optimum (and to the transition rows), accuracy, belief R² (hmm), attention per head."""
    entries = record["snapshots"]
    tokens = np.array([e["tokens"] for e in entries], dtype=float)
    finite = [e for e in entries if e["outputs_finite"]]  # the others have no probe or attention to show
    panels = ["kl", "accuracy"] + (["probe"] if finite and finite[0].get("belief_r2") else [])
    panels += ["probe_mse"] if finite and finite[0].get("belief_probe") else []
    panels += ["attention"] if finite and np.array(finite[0]["attention"]["current"]).size else []
    fig = Figure(figsize=(9, 3.2 * len(panels)), layout="constrained")
    axes = dict(zip(panels, np.atleast_1d(fig.subplots(len(panels), 1, sharex=True))))
    ax = axes["kl"]
    for key, label in (
        ("optimal_kl", "KL(optimal ‖ model), all positions"),
        ("transition_kl", "transition KL, prompts [BOS, s]"),
        ("korder_kl", "KL(row of last k ‖ model), t > k"),
    ):
        values = _series(entries, key)
        if np.isfinite(values).any():
            ax.plot(tokens, values, "o-", ms=3, label=label)
    first_order = entries[0].get("korder_first_order_kl")
    if first_order is not None:
        ax.axhline(first_order, color="C3", ls="--", lw=1.2, label=f"best first-order predictor {first_order:.4f}")
    ax.set_yscale("log")
    ax.set_ylabel("nats")
    if ax.get_legend_handles_labels()[0]:  # nothing to label when no snapshot's outputs were finite
        ax.legend(fontsize=8)
    axes["accuracy"].plot(tokens, _series(entries, "accuracy"), "o-", ms=3, color="k")
    axes["accuracy"].set_ylabel("accuracy")
    if "probe" in axes:
        r2 = np.array([e["belief_r2"]["r2"] for e in finite], dtype=float)
        for i, layer in enumerate(finite[0]["belief_r2"]["layers"]):
            axes["probe"].plot([e["tokens"] for e in finite], r2[:, i], "o-", ms=3, label=layer)
        axes["probe"].set_ylabel("belief-state probe R²")
        axes["probe"].legend(fontsize=8)
    if "probe_mse" in axes:
        plot_probe_mse(axes["probe_mse"], finite)
    if "attention" in axes:
        _plot_attention(axes["attention"], finite)
    _tokens_axis(list(axes.values()), entries)
    return fig


def plot_probe_mse(ax, entries):
    """The belief-state probe's held-out MSE per layer and from all layers (black) over tokens seen (log y),
    against the untrained model's (the first entry at iter 0; dotted) and the last layer's on shuffled
    targets (dashed grey)."""
    tokens = [e["tokens"] for e in entries]
    mse = np.array([e["belief_probe"]["mse"] for e in entries], dtype=float)
    for i, layer in enumerate(entries[0]["belief_probe"]["layers"]):
        ax.plot(tokens, mse[:, i], "o-", ms=3, label=layer)
    ax.plot(tokens, [e["belief_probe"]["mse_all"] for e in entries], "o-", ms=3, color="k", label=ALL_LAYERS)
    shuffled = [e["belief_probe"]["shuffled_mse"][-1] for e in entries]
    ax.plot(tokens, shuffled, "--", color="0.5", label="last layer, shuffled targets")
    if entries[0]["iter"] == 0:
        ax.axhline(mse[0, -1], color="C3", ls=":", lw=1.2, label=f"last layer untrained {mse[0, -1]:.4f}")
    ax.set_yscale("log")
    ax.set_ylabel("belief-state probe MSE")
    ax.legend(fontsize=7, ncol=2)


def _plot_attention(ax, entries):
    """Per head, the mean attention on the current token (solid), the state before it (dotted), BOS (dashed)."""
    layers, tokens = entries[0]["attention"]["layers"], [e["tokens"] for e in entries]
    current = np.array([e["attention"]["current"] for e in entries], dtype=float)  # (snapshots, layers, heads)
    bos = np.array([e["attention"]["bos"] for e in entries], dtype=float)
    previous = np.array([e["attention"]["previous"] for e in entries], dtype=float)
    for i, layer in enumerate(layers):
        for h in range(current.shape[2]):
            colour = f"C{(i * current.shape[2] + h) % 10}"
            ax.plot(tokens, current[:, i, h], "-", color=colour, label=f"L{layer}H{h} current")
            ax.plot(tokens, bos[:, i, h], "--", color=colour, label=f"L{layer}H{h} BOS")
            ax.plot(tokens, previous[:, i, h], ":", color=colour, label=f"L{layer}H{h} previous state")
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean attention weight")
    ax.legend(fontsize=7, ncol=2)


def plot_by_position(record):
    """Loss at each position, one line per snapshot (blue early, green late), against the optimum there."""
    theory, entries = record["theory"], record["snapshots"]
    optimum = np.array(theory["optimal_loss_by_position"])
    positions = np.arange(1, optimum.size + 1)
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.subplots()
    for i, e in enumerate(entries):
        if e["loss_by_position"] is None:  # outputs not finite
            continue
        shade = 0.15 + 0.8 * i / max(1, len(entries) - 1)
        ax.plot(positions, e["loss_by_position"], color=(0.1, 0.3 + 0.5 * shade, 1 - shade), lw=1)
    ax.plot(positions, optimum, color="k", ls="--", lw=1.5, label="optimal predictor (expected)")
    ax.plot([], [], color=(0.1, 0.4, 0.8), label=f"model, {len(entries)} snapshots (blue: early, green: late)")
    ax.set_xscale("log")
    ax.set_xlabel("predicted position t")
    ax.set_ylabel("loss (nats)")
    ax.set_title("loss by position, every snapshot, against the optimum")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return fig


def plot_strategies(record):
    """The distance to each strategy over tokens seen (log-log), one line per stage, with where the model
    entered (filled triangle) and left (open one) each stage."""
    entries, events = record["snapshots"], record.get("stage_events") or {}
    tokens = np.array([e["tokens"] for e in entries], dtype=float)
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.subplots()
    for i, name in enumerate(events):
        colour = f"C{i}"
        kl = np.array([np.nan if not e.get("stage_kl") else e["stage_kl"].get(name, np.nan) for e in entries])
        ax.plot(tokens, np.where(kl > 0, kl, np.nan), "o-", ms=3, color=colour, label=f"KL({name} ‖ model)")
        for what, marker, fill in (("entered", "v", colour), ("left", "^", "none")):
            event = events[name][what]
            if event is not None and event["kl"] > 0:
                ax.plot(event["tokens"], event["kl"], marker, ms=10, color=colour, mfc=fill, mew=1.5)
                ax.annotate(
                    f"{what} @ {event['iter']}",
                    (event["tokens"], event["kl"]),
                    xytext=(5, -12 if what == "entered" else 6),
                    textcoords="offset points",
                    color=colour,
                    fontsize=7,
                )
    ax.set_yscale("log")
    ax.set_ylabel("mean KL(stage ‖ model), nats (log)")
    ax.set_title(f"{record['run']}: distance to each strategy (▼ entered, △ left)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    _tokens_axis([ax], entries)
    return fig


def plot_attention_scores(record):
    """Each head's previous-token score (top) and induction score (bottom) over tokens seen (log y), against
    the level of a head that attends uniformly to every earlier position (dashed)."""
    entries = [e for e in record["snapshots"] if e.get("attention_scores")]
    fig = Figure(figsize=(9, 6.5), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    if not entries:
        for ax in axes:
            ax.text(0.5, 0.5, "no attention (mlp_only or 0 layers): no scores", ha="center", transform=ax.transAxes)
        return fig
    scores = entries[0]["attention_scores"]
    tokens = [e["tokens"] for e in entries]
    positions = record["seq_len"] - 1  # the val sequences' queries t = 1..L-2 of a model reading L-1 tokens
    half = scores["induction_half"]
    chance = {
        "previous_token": np.mean(1 / np.arange(2, positions + 1)),
        "induction": np.mean(1 / (half + np.arange(1, half + 1) + 1)) if half >= 1 else np.nan,
    }
    for ax, key, title in zip(axes, chance, ("previous-token score (val sequences)", "induction score (repeated)")):
        shape = np.shape(scores["previous_token"])  # (layers, heads); no induction score below 3 positions
        values = np.array([e["attention_scores"][key] or np.full(shape, np.nan) for e in entries], dtype=float)
        for i, layer in enumerate(scores["layers"]):
            for h in range(values.shape[2]):
                ax.plot(
                    tokens,
                    values[:, i, h],
                    "o-",
                    ms=3,
                    color=f"C{(i * values.shape[2] + h) % 10}",
                    label=f"L{layer}H{h}",
                )
        ax.axhline(chance[key], color="0.5", ls="--", lw=1, label="uniform attention")
        # Log y: an induction head over few states rises only a few times above the even spread (docs/dynamics.md).
        ax.set_yscale("log")
        ax.set_ylim(min(chance[key], np.nanmin(values, initial=1.0)) / 2, 1.05)
        ax.set_ylabel(title)
        ax.legend(fontsize=7, ncol=2)
    _tokens_axis(list(axes), record["snapshots"])
    return fig


# ------------------------------------------------------------ the belief-state probe and its baselines (hmm)


def belief_probe_numbers(probe):
    """A belief_state_probe result's numbers as plain values: per layer (its "layers") and for ALL_LAYERS,
    held-out R² and MSE, on the belief states and on shuffled targets (linear_probes.probe_summary)."""
    keys = ("r2", "mse", "r2_all", "mse_all", "shuffled_r2", "shuffled_mse", "shuffled_r2_all", "shuffled_mse_all")
    return {"layers": probe["layers"]} | {key: np.asarray(probe[key]).tolist() for key in keys}


def belief_baselines(entries):
    """The probe's baselines: the untrained model (the iteration-0 snapshot's belief_probe, None without one)
    and the seed of the shuffled targets (whose numbers each snapshot's belief_probe holds)."""
    untrained = next((e for e in entries if e["iter"] == 0 and e.get("belief_probe")), None)
    return {
        "untrained": None if untrained is None else {"iter": 0, **untrained["belief_probe"]},
        "shuffle_seed": SHUFFLE_SEED,
    }


def middle_index(iters):
    """The index of the snapshot nearest half the run (half the last snapshot's iteration; the earlier of two
    as near): the middle of training, not of the list, which log-spaced snapshots crowd towards the start."""
    half = iters[-1] / 2
    return min(range(len(iters)), key=lambda i: abs(iters[i] - half))


def simplex_choice(dataset, iters, chosen=None):
    """{"iters", "file"} of the snapshots whose belief simplex is drawn: `chosen` (each one of `iters`, the
    run's snapshots), by default the first, the one nearest half the run (middle_index) and the last; None
    for a process without beliefs."""
    if not dataset.chain.BELIEF_STATES:
        if chosen:
            raise NanoMarkovError(
                f"--simplex_iters draws belief states, which only a process with hidden states has (hmm); "
                f"this run's dataset is {dataset.chain.process}: leave --simplex_iters out"
            )
        return None
    if not chosen:
        chosen = sorted({iters[0], iters[middle_index(iters)], iters[-1]})
    missing = [i for i in chosen if i not in iters]
    if missing:
        raise NanoMarkovError(
            f"--simplex_iters {','.join(map(str, missing))}: no snapshot at that iteration; "
            f"this run has snapshots at {','.join(map(str, iters))}"
        )
    return {"iters": list(chosen), "file": SIMPLEX_PLOT}


def drawable_simplex(simplex, entries):
    """The simplex choice without snapshots whose outputs were not finite (nothing to probe); None if none is left."""
    finite = {e["iter"] for e in entries if e["outputs_finite"]}
    iters = [i for i in (simplex or {}).get("iters", []) if i in finite]
    return dict(simplex, iters=iters) if iters else None


def belief_simplex(record, iters=None, layer=None):
    """The belief simplex of a dynamics record's snapshots (a Figure): the true belief states of the held-out
    positions beside the probe's predictions at each of `iters` (default record["simplex"]["iters"]), from
    `layer` (default the last; or linear_probes.ALL_LAYERS). Loads those snapshots and refits their probe
    on the record's dataset and val sequences, as run_dynamics did."""
    iters = iters or (record.get("simplex") or {}).get("iters")
    files = {e["iter"]: e["file"] for e in record["snapshots"]}
    if not iters or any(i not in files for i in iters):
        raise NanoMarkovError(
            f"belief_simplex needs iterations among the record's snapshots {sorted(files)}, got {iters}"
        )
    dataset = load_dataset(record["dataset"], verify=False)
    results = [
        belief_state_probe(load_snapshot(files[i])[0], dataset, layer=layer, n_sequences=record["val_sequences"])
        for i in iters
    ]
    fig = plot_belief_simplex(results, [f"iter {i}" for i in iters])
    fig.suptitle(f"{record['run']}: belief states and the linear probe's predictions, held-out positions")
    return fig


def format_probes(record):
    """The belief-state probe per snapshot (last layer and all layers: held-out R², MSE, and MSE on shuffled
    targets) and the untrained baseline: lines to add below the table (none without beliefs)."""
    entries = [e for e in record["snapshots"] if e.get("belief_probe")]
    if not entries:
        return []
    last = entries[0]["belief_probe"]["layers"][-1]
    head = ["iter", f"R² {last}", f"MSE {last}", "shuffled MSE", f"R² {ALL_LAYERS}", f"MSE {ALL_LAYERS}"]
    rows = []
    for e in entries:
        probe = e["belief_probe"]
        numbers = (probe["r2"][-1], probe["mse"][-1], probe["shuffled_mse"][-1], probe["r2_all"], probe["mse_all"])
        rows.append(
            [str(e["iter"]), *(_number(value, ".3f" if i in (0, 3) else ".5f") for i, value in enumerate(numbers))]
        )
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    lines = [
        "",
        "belief-state probe, held-out positions: R², and MSE = mean squared distance to the true belief "
        "(shuffled: the same probe fitted on permuted targets)",
        "  ".join(h.rjust(w) for h, w in zip(head, widths)),
        *("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows),
    ]
    untrained, final = (record.get("belief_baselines") or {}).get("untrained"), entries[-1]["belief_probe"]
    if untrained is None:
        lines.append("untrained baseline: none (no snapshot at iter 0)")
        return lines
    lines.append(
        f"untrained (iter 0): {last} R² {untrained['r2'][-1]:.3f} MSE {untrained['mse'][-1]:.5f}, "
        f"{ALL_LAYERS} R² {untrained['r2_all']:.3f} MSE {untrained['mse_all']:.5f}"
    )
    for name, now, then in (
        (last, final["mse"][-1], untrained["mse"][-1]),
        (ALL_LAYERS, final["mse_all"], untrained["mse_all"]),
    ):
        ratio = "n/a" if not then else f"{now / then:.3f}"
        lines.append(f"iter {entries[-1]['iter']}: {name} MSE {now:.5f} = {ratio} x untrained")
    return lines
