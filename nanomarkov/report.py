"""Plots and one table over training runs: `nanomarkov report DIR`.

Every run folder under DIR (one holding done.json or ckpt.pt) gets, next to its files:
  learning_curve.png     val and train loss against tokens seen, with the floor, the optimum and the
                         bigram baseline; below it the excess over the floor on a log scale
  transition_matrix.png  true vs learned transition matrix, and their difference (needs eval.json)
  per_state_kl.png       each state's KL(true row || model) against its stationary probability (needs eval.json)
  loss_by_position.png   the model's loss at each position against the expected optimum there and the
                         process's stage losses, and below its excess over the optimal predictor on the
                         same val sequences; log position axis: the in-context-learning curve (needs eval.json)

Runs that differ only in seed form a family; DIR/report/ gets summary.md, summary.csv
(mean and sd over seeds of every headline number) and comparison.png (excess per family).
Numbers come from eval.json when the run has been evaluated, else from done.json, else
from the last evaluation in log.jsonl (a run still going or interrupted).
"""

import csv
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np

# Figure directly, not pyplot: no global state, no GUI backend, safe in threads and on headless machines.
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator

from nanomarkov.data import load_dataset
from nanomarkov.errors import NanoMarkovError
from nanomarkov.files import read_json, write_atomic, write_atomic_together

TARGET_EXCESS = 0.003  # nats: the project's quality target (DESIGN.md section 9)
REPORT_FOLDER = "report"
# Config fields that may differ between the seeds of one experiment; every other field defines the
# family. They do not change what a run computes: the seed (what a family varies), names, and where
# it ran (the global batch, which does matter, is in tokens_per_iter).
NOT_FAMILY = (
    "seed",
    "out_dir",
    "wandb_run_name",
    "init_from",
    "device",
    "device_resolved",
    "autocast",
    "compiled",
    "compile",
    "world_size",
    "wandb_log",
    "wandb_project",
    "log_interval",
)
# Summary columns: (name, where it sits in eval.json, its key in done.json / log.jsonl or None if eval-only,
# markdown title, format).
METRICS = [
    ("val_loss", ("cross_entropy", "val_loss"), "val_loss", "val loss", "{:.6f}"),
    ("excess", ("cross_entropy", "excess"), "excess", "excess (nats)", "{:.6f}"),
    (
        "learnable_fraction",
        ("cross_entropy", "learnable_fraction"),
        "learnable_fraction",
        "learnable captured",
        "{:.2%}",
    ),
    ("accuracy", ("accuracy", "accuracy"), None, "accuracy", "{:.4f}"),
    ("mean_kl", ("transition_fidelity", "mean_kl"), None, "transition KL", "{:.6f}"),
    ("mean_spread", ("markov_property", "mean_spread"), None, "Markov spread", "{:.6f}"),
    ("agreement", ("agreement", "top1_agreement"), None, "agreement", "{:.4f}"),
]
OPTIMUM = [("optimal_loss", ("cross_entropy", "optimal_loss")), ("true_loss_val", ("cross_entropy", "true_loss_val"))]
WORST_LABELLED = 5
# nats: stage losses closer than this share one line in loss_by_position.png (an estimate's noise, not a difference).
STAGE_TOLERANCE = 1e-3
STAGE_LABELS = {"optimal": "optimal (mean over positions)"}  # a line, unlike the optimum curve beside it


# ------------------------------------------------------------------ reading runs


def find_runs(root):
    """Every run folder under root (root itself included): a folder holding done.json or ckpt.pt."""
    root = Path(root)
    if not root.is_dir():
        raise NanoMarkovError(f"{root}: no such folder; give the folder your runs are in, e.g. trainings/MM/MM-100")
    marks = [*root.rglob("done.json"), *root.rglob("ckpt.pt")]
    return sorted({mark.parent for mark in marks})


def _read_run_file(path):
    """A run file's JSON object, None when it is absent; one clear error when it is damaged."""
    if not path.is_file():
        return None
    return read_json(path, what="run file", fix="delete it and rerun the command that writes it")


def _dig(record, keys):
    for key in keys:
        if not isinstance(record, dict):
            return None
        record = record.get(key)
    return record


def load_run(folder):
    """Everything the report needs from one run folder, as a dict; missing files give None."""
    folder = Path(folder)
    config = _read_run_file(folder / "config.json") or {}
    evaluation, done = _read_run_file(folder / "eval.json"), _read_run_file(folder / "done.json")
    log = []
    if (folder / "log.jsonl").is_file():
        for line in (folder / "log.jsonl").read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a process killed mid-write leaves half a line; the rest is still good
                continue
            if record.get("kind") == "eval":
                log.append(record)
    # The headline numbers: from the fullest source there is.
    if evaluation is not None:
        values = {name: _dig(evaluation, path) for name, path, *_ in METRICS}
        values.update({name: _dig(evaluation, path) for name, path in OPTIMUM})
    else:
        last = done or (log[-1] if log else {})
        values = {name: last.get(key) if key else None for name, _, key, *_ in METRICS}
        values.update({name: last.get(name) for name, _ in OPTIMUM})
    seed = config.get("seed", _dig(evaluation, ("run", "seed")))
    return {
        "folder": folder,
        "config": config,
        "eval": evaluation,
        "done": done,
        "log": log,
        "seed": seed,
        "values": values,
    }


def family_key(config):
    """What runs of one family share: their config without the NOT_FAMILY fields (the sweep uses it too)."""
    return json.dumps({k: v for k, v in config.items() if k not in NOT_FAMILY}, sort_keys=True)


def group_families(runs, root):
    """[(family name, [runs])]: runs whose configs agree on everything but NOT_FAMILY fields."""
    groups = {}
    for run in runs:
        # A run without config.json cannot be matched with anything: it is its own family.
        key = family_key(run["config"]) if run["config"] else str(run["folder"])
        groups.setdefault(key, []).append(run)

    def base(run):  # MM-100-42 -> MM-100: the folder name without its seed
        name = run["folder"].resolve().name
        for sep in "-_":
            if run["seed"] is not None and name.endswith(f"{sep}{run['seed']}"):
                return name[: -len(f"{sep}{run['seed']}")]
        return name

    names = {key: base(members[0]) for key, members in groups.items()}
    clashes = Counter(names.values())
    for key, members in groups.items():
        if clashes[names[key]] > 1:  # one name, several configs: say where each lives
            names[key] = str(members[0]["folder"].resolve().relative_to(Path(root).resolve()).parent / names[key])
    clashes = Counter(names.values())
    for i, key in enumerate(groups):
        if clashes[names[key]] > 1:  # same place too (configs edited in place): number them
            names[key] += f" [{i + 1}]"
    return sorted(((names[key], members) for key, members in groups.items()), key=lambda item: item[0])


# ------------------------------------------------------------------ the table


def _mean_sd(values):
    """(mean, sd with ddof=1) of the numbers present; sd None for fewer than two, both None for none."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def summarize(families, root):
    """One row per family: counts, seeds, mean and sd over seeds of each metric, the optimum."""
    rows = []
    for name, members in families:
        members = sorted(members, key=lambda r: (r["seed"] is None, r["seed"] or 0))  # 42 123 999, not 123 42 999
        row = {
            "family": name,
            "n_runs": len(members),
            "n_evaluated": sum(r["eval"] is not None for r in members),
            "seeds": [r["seed"] for r in members],
            "runs": [str(r["folder"].resolve().relative_to(Path(root).resolve())) for r in members],
            "data_dir": members[0]["config"].get("data_dir"),
        }
        for metric, *_ in METRICS:
            values = [r["values"][metric] for r in members]
            if metric == "agreement":
                # One eval of several seeds stores the same agreement in each of them: count it once.
                values = list(
                    {
                        json.dumps(_dig(r["eval"], ("agreement", "runs"))): v
                        for r, v in zip(members, values)
                        if v is not None
                    }.values()
                )
            row[f"{metric}_mean"], row[f"{metric}_sd"] = _mean_sd(values)
        row["optimal_loss"] = _mean_sd([r["values"]["optimal_loss"] for r in members])[0]
        row["true_loss_val_mean"] = _mean_sd([r["values"]["true_loss_val"] for r in members])[0]
        rows.append(row)
    return rows


def format_summary(rows):
    """The summary as a markdown table: mean ± sd over seeds (no sd for one run), blank when not measured."""

    def cell(row, key, fmt):
        mean, sd = row[f"{key}_mean"], row[f"{key}_sd"]
        if mean is None:
            return ""
        return fmt.format(mean) + ("" if sd is None else " ± " + fmt.format(sd))

    head = ["family", "runs", "seeds"] + [m[3] for m in METRICS] + ["optimal_loss", "true_loss_val"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---|" + "---:|" * (len(head) - 3)]
    for row in rows:
        runs = f"{row['n_runs']}" + (
            "" if row["n_evaluated"] == row["n_runs"] else f" ({row['n_evaluated']} evaluated)"
        )
        cells = [row["family"], runs, " ".join(str(s) for s in row["seeds"])]
        cells += [cell(row, key, fmt) for key, _, _, _, fmt in METRICS]
        cells += ["" if row[k] is None else f"{row[k]:.6f}" for k in ("optimal_loss", "true_loss_val_mean")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_text(rows):
    """summary.csv: one column per number (mean and sd apart), blanks for what was not measured; floats keep every digit."""
    columns = ["family", "n_runs", "n_evaluated", "seeds", "runs", "data_dir"]
    columns += [f"{m[0]}_{s}" for m in METRICS for s in ("mean", "sd")] + ["optimal_loss", "true_loss_val_mean"]
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(columns)
    for row in rows:
        out = dict(row, seeds=" ".join(str(s) for s in row["seeds"]), runs=" ".join(row["runs"]))
        writer.writerow(
            ["" if out[c] is None else (repr(out[c]) if isinstance(out[c], float) else out[c]) for c in columns]
        )
    return text.getvalue()


def write_csv(rows, path):
    """summary.csv at `path`, replacing its predecessor whole (files.write_atomic)."""
    return write_atomic(path, csv_text(rows), "summary table")


# ------------------------------------------------------------------ plots


def png_bytes(fig):
    """The figure as a PNG, rendered in memory: a file then replaces its predecessor whole."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getbuffer()


def _save(fig, path):
    return write_atomic(path, png_bytes(fig), "plot")


def plot_learning_curve(run, path):
    """Loss against tokens seen next to floor, optimum and bigram baseline; excess on a log scale below."""
    log = run["log"]
    tokens = np.array([r["tokens"] for r in log], dtype=float)
    val = np.array([r["val_loss"] for r in log])
    train = np.array([np.nan if r.get("train_loss") is None else r["train_loss"] for r in log])
    floor, optimum = log[-1]["true_loss_val"], log[-1]["optimal_loss"]
    fig = Figure(figsize=(8, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    top.plot(tokens, val, "o-", ms=3, color="C0", label="val loss (whole val split)")
    top.plot(tokens, train, "s-", ms=3, color="C1", alpha=0.8, label="train loss (mean since last eval)")
    top.axhline(floor, color="k", lw=1.2, label=f"true chain on val (floor) {floor:.4f}")
    top.axhline(optimum, color="0.4", ls="--", lw=1, label=f"optimal loss (expected) {optimum:.4f}")
    bigram = _dig(run["eval"], ("cross_entropy", "bigram_baseline"))
    if bigram is not None:
        top.axhline(bigram, color="C2", ls=":", lw=1.5, label=f"bigram baseline (train counts) {bigram:.4f}")
    top.set_ylabel("cross-entropy (nats/token)")
    data = _dataset_path(run)
    top.set_title(
        f"{run['folder'].name}{f' on {data}' if data else ''}: final val {val[-1]:.4f}, "
        f"excess {val[-1] - floor:.4f} nats"
    )
    top.legend(fontsize=8)
    top.grid(alpha=0.3)

    excess = val - floor
    shown = excess > 0  # a log axis cannot show a model that lands on or (by luck) just below the floor
    bottom.plot(tokens[shown], excess[shown], "o-", ms=3, color="C0", label="val loss − floor")
    bottom.axhline(TARGET_EXCESS, color="C3", ls="--", lw=1, label=f"target {TARGET_EXCESS} nats")
    if bigram is not None and bigram > floor:  # on the top panel it sits on the floor; here it stands apart
        bottom.axhline(
            bigram - floor, color="C2", ls=":", lw=1.5, label=f"bigram baseline − floor {bigram - floor:.4f}"
        )
    bottom.set_yscale("log")
    bottom.set_ylabel("excess over floor (nats, log)")
    bottom.set_xlabel("tokens seen")
    bottom.xaxis.set_major_formatter(EngFormatter())
    hidden = int((~shown).sum())
    bottom.legend(
        fontsize=8, title=f"{hidden} eval(s) at or below the floor not shown" if hidden else None, title_fontsize=8
    )
    bottom.grid(alpha=0.3, which="both")
    return _save(fig, path)


def _dataset_path(run):
    """The run's dataset folder, as eval.json or config.json names it."""
    return _dig(run["eval"], ("run", "dataset")) or run["config"].get("data_dir")


def plot_transition_matrix(run, path):
    """True and learned matrices on one colour scale, and learned − true on a diverging one."""
    data = _dataset_path(run)
    if not data or not Path(data).is_dir():
        raise NanoMarkovError(f"dataset {data} not found (run the report from the folder you trained in)")
    # Sizes are checked, the tokens are not re-hashed: the plot needs only the chain.
    true = load_dataset(data, verify=False).chain.transition_rows()[:-1]  # the last row is the one after BOS
    learned = np.load(run["folder"] / "learned_matrix.npy", allow_pickle=False)
    if learned.shape != true.shape:
        raise NanoMarkovError(
            f"learned_matrix.npy is {learned.shape}, the chain of {data} is {true.shape}: "
            "rerun nanomarkov eval on this run"
        )
    k = true.shape[0]
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    axes = fig.subplots(1, 3)
    vmax = max(true.max(), learned.max())
    diff = learned - true
    limit = max(np.abs(diff).max(), 1e-12)
    panels = [
        (true, f"true P (K={k})", "viridis", 0, vmax, "probability"),
        (learned, "learned: model after [BOS, i]", "viridis", 0, vmax, "probability"),
        (diff, f"learned − true (max |Δ| {limit:.3g})", "RdBu_r", -limit, limit, "probability difference"),
    ]
    for ax, (matrix, title, cmap, lo, hi, unit) in zip(axes, panels):
        image = ax.imshow(matrix, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        fig.colorbar(image, ax=ax, shrink=0.85, label=unit)
        ax.set_title(title)
        ax.set_xlabel("next state j")
        ax.set_ylabel("current state i")
        for axis in (ax.xaxis, ax.yaxis):  # states are whole numbers, never 0.5
            axis.set_major_locator(MaxNLocator(integer=True))
        if k <= 10:  # small chains: the numbers themselves are readable
            for (i, j), value in np.ndenumerate(matrix):
                pale = value > 0.6 * hi if cmap == "viridis" else abs(value) < 0.6 * hi  # dark text on pale cells
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color="k" if pale else "w")
    fig.suptitle(
        f"{run['folder'].name}: transition matrix, mean KL(true row ‖ learned row) {run['values']['mean_kl']:.4g} nats"
    )
    return _save(fig, path)


def plot_loss_by_position(run, path):
    """The in-context-learning plot: above, the model's val loss at each position against the expected
    optimum there (with its standard-error band where estimated), the optimal predictor on this val split,
    the process's stage losses and the entropy rate (the optimum's limit); below, the model's excess over
    the optimal predictor on the same val sequences. Log position axis."""
    summary = run["eval"]["loss_by_position"]
    with np.load(run["folder"] / summary["file"], allow_pickle=False) as npz:
        val, optimal, se, true_val = (npz[k] for k in ("val_loss", "optimal_loss", "optimal_loss_se", "true_loss_val"))
    positions = np.arange(1, len(val) + 1)
    fig = Figure(figsize=(8, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    top.plot(positions, val, "-", color="C0", lw=1.5, label="model (val)")
    top.plot(positions, true_val, "-", color="0.6", lw=0.8, label="optimal predictor on this val split")
    top.plot(positions, optimal, "-", color="k", lw=1.2, label="optimum (expected)")
    if se.any():
        top.fill_between(positions, optimal - se, optimal + se, color="k", alpha=0.2, lw=0, label="optimum ± 1 s.e.")
    styles = ["--", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (8, 2))]
    for i, (label, value) in enumerate(stage_lines(summary).items()):
        top.axhline(value, color=f"C{i + 2}", ls=styles[i % len(styles)], lw=1, label=f"{label} {value:.4f}")
    top.set_xscale("log")
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if t <= len(val)]
    top.set_xticks(ticks, [str(t) for t in ticks])
    top.set_ylabel("cross-entropy at position t (nats)")
    process, data = _dig(run["eval"], ("run", "process")), _dataset_path(run)
    top.set_title(f"{run['folder'].name}: loss by position, process {process} ({data})")
    top.legend(fontsize=8)
    top.grid(alpha=0.3, which="both")
    bottom.plot(
        positions, val - true_val, "-", color="C0", lw=1.2, label="model − optimal predictor (same val sequences)"
    )
    bottom.axhline(0, color="k", lw=1)
    bottom.set_ylabel("excess over the optimal predictor (nats)")
    bottom.set_xlabel("predicted position t (x_t given x_1..x_{t-1}; log scale)")
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3, which="both")
    return _save(fig, path)


def stage_lines(summary):
    """{label: loss} of the horizontal lines: the process's stage losses (uniform and unigram for an eval.json
    from before they were recorded) and the entropy rate; stages of equal loss share one line and label."""
    stages = summary.get("stage_losses") or {"uniform": summary["uniform_loss"], "unigram": summary["unigram_loss"]}
    stages = {STAGE_LABELS.get(name, name.replace("_", " ")): loss for name, loss in stages.items()}
    stages["entropy rate (the optimum's limit)"] = summary["entropy_rate"]
    lines = {}
    for name, loss in stages.items():
        same = [label for label, value in lines.items() if abs(value - loss) <= STAGE_TOLERANCE]
        if same:
            lines[f"{same[0]} = {name}"] = lines.pop(same[0])
        else:
            lines[name] = loss
    return lines


def plot_per_state_kl(run, path):
    """Per-state KL against stationary probability: are the rare states the badly learned ones?"""
    with np.load(run["folder"] / "per_state.npz", allow_pickle=False) as npz:
        pi, prompt_kl, context_kl = npz["stationary"], npz["prompt_kl"], npz["context_kl"]
    fig = Figure(figsize=(8, 6), layout="constrained")
    ax = fig.subplots()
    ax.scatter(pi, prompt_kl, s=22, color="C0", label="prompt [BOS, s]")
    ax.scatter(pi, context_kl, s=22, marker="x", color="C1", label="real val contexts ending in s (mean)")
    mean = float(np.mean(prompt_kl))
    ax.axhline(mean, color="C0", ls="--", lw=1, label=f"mean over states {mean:.4g}")
    for s in np.argsort(-prompt_kl)[:WORST_LABELLED]:
        ax.annotate(f"s={s}", (pi[s], prompt_kl[s]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    # Log axes only when the numbers span a decade or more and are all positive; else they hide the spread.
    for values, set_scale in ((pi, ax.set_xscale), (np.concatenate([prompt_kl, context_kl]), ax.set_yscale)):
        values = values[np.isfinite(values)]
        if values.size and values.min() > 0 and values.max() / values.min() >= 10:
            set_scale("log")
    ax.set_xlabel("stationary probability π(s)")
    ax.set_ylabel("KL(true row s ‖ model's next-state distribution) (nats)")
    ax.set_title(f"{run['folder'].name}: per-state transition KL, worst {min(WORST_LABELLED, pi.size)} labelled")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def comparison_figure(rows, families):
    """Excess per family: bar = mean over seeds, error bar = sd, dots = the seeds themselves."""
    pairs = [(row, members) for row, (_, members) in zip(rows, families) if row["excess_mean"] is not None]
    fig = Figure(figsize=(max(6, 1.1 * len(pairs) + 2), 5), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(pairs))
    means = np.array([row["excess_mean"] for row, _ in pairs])
    ax.bar(
        x,
        means,
        yerr=[row["excess_sd"] or 0.0 for row, _ in pairs],
        capsize=4,
        color="C0",
        alpha=0.7,
        label="mean over seeds (± sd)",
    )
    for i, (_, members) in enumerate(pairs):
        seeds = [r["values"]["excess"] for r in members if r["values"]["excess"] is not None]
        ax.plot([i + 0.2] * len(seeds), seeds, "k.", ms=6, label="one seed" if i == 0 else None)
    ax.axhline(TARGET_EXCESS, color="C3", ls="--", lw=1, label=f"target {TARGET_EXCESS} nats")
    if means.size and means.min() > 0 and means.max() / means.min() >= 30:
        ax.set_yscale("log")  # families orders of magnitude apart: a linear axis would flatten the good ones
    labels = [f"{row['family']} (n={row['n_runs']})" for row, _ in pairs]
    crowded = sum(len(label) for label in labels) > 60  # long or many names: tilt them so they do not overlap
    ax.set_xticks(x, labels, rotation=30 if crowded else 0, ha="right" if crowded else "center", fontsize=8)
    ax.set_ylabel("excess val loss over floor (nats/token)")
    ax.set_title("excess over the true chain's val loss, per run family")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y", which="both")
    return fig


# ------------------------------------------------------------------ everything


def plot_runs(runs):
    """Each run's plots in its folder: (files written, [{run, plot, why}] of the plots that could not be made)."""
    files, skipped = [], []
    for run in runs:
        folder = run["folder"]
        plots = [("learning_curve.png", plot_learning_curve)] if run["log"] else []
        # The other two read what `nanomarkov eval` writes, for first-order chains (a k-th order one has no
        # matrix) whose model could be measured (a model with NaN outputs has no matrix worth drawing).
        if (
            _dig(run["eval"], ("transition_fidelity",)) is not None
            and _dig(run["eval"], ("outputs_finite",)) is not False
        ):
            plots += [("transition_matrix.png", plot_transition_matrix), ("per_state_kl.png", plot_per_state_kl)]
        if _dig(run["eval"], ("loss_by_position",)) is not None and _dig(run["eval"], ("outputs_finite",)) is not False:
            plots.append(("loss_by_position.png", plot_loss_by_position))
        for name, plot in plots:
            try:
                files.append(plot(run, folder / name))
            except (NanoMarkovError, OSError, KeyError, ValueError) as e:  # one bad run must not sink the report
                skipped.append({"run": str(folder), "plot": name, "why": str(e)})
    return files, skipped


def summary_notes(runs, missing, stale):
    """The lines under the summary table: what the columns are, and which runs lack a (usable) evaluation."""
    broken = [str(r["folder"]) for r in runs if _dig(r["eval"], ("outputs_finite",)) is False]
    notes = [
        "",
        "Mean ± sd over seeds (sd with ddof=1; none for a single run). Losses in nats per predicted token; "
        "excess = val loss − true_loss_val; learnable captured = (uniform − val loss) / (uniform − true_loss_val), "
        "0 % for a model that learned nothing; accuracy a fraction; "
        "transition KL = transition_fidelity.mean_kl; Markov spread = markov_property.mean_spread; "
        "agreement = top-1 agreement between seeds. Blank: not measured (run nanomarkov eval).",
    ]
    return notes + [
        f"{what}: " + ", ".join(names)
        for what, names in (
            ("Not evaluated", missing),
            ("Evaluated before more training", stale),
            ("Outputs not finite (NaN or inf: broken weights, nothing measured, left blank)", broken),
        )
        if names
    ]


def write_report(root):
    """Per-run plots, then summary.md, summary.csv and comparison.png in root/report/.

    Every file replaces its predecessor whole, and the three in root/report/ replace theirs together
    (files.write_atomic_together): a full disk is one NanoMarkovError and leaves the previous report
    as it was, never an empty or partial file, nor a new table beside an old one.
    """
    root = Path(root)
    folders = find_runs(root)
    if not folders:
        raise NanoMarkovError(
            f"no training runs under {root} (folders with done.json or ckpt.pt); train one with: nanomarkov train 10"
        )
    runs = [load_run(folder) for folder in folders]
    files, skipped = plot_runs(runs)
    families = group_families(runs, root)
    rows = summarize(families, root)
    out = root / REPORT_FOLDER
    try:
        out.mkdir(exist_ok=True)
    except OSError as e:
        raise NanoMarkovError(
            f"cannot write the report to {out} ({e.strerror or e}); make {root} writable or free some space"
        ) from None
    missing = [str(r["folder"]) for r in runs if r["eval"] is None]
    # Trained on (resumed) after it was evaluated: its eval.json describes an older checkpoint.
    stale = [
        str(r["folder"])
        for r in runs
        if r["eval"] and r["done"] and _dig(r["eval"], ("run", "iter")) not in (None, r["done"]["iters"])
    ]
    summary = f"# Runs under {root}\n\n" + format_summary(rows) + "\n" + "\n".join(summary_notes(runs, missing, stale))
    together = {
        out / "comparison.png": png_bytes(comparison_figure(rows, families)),
        out / "summary.csv": csv_text(rows),
        out / "summary.md": summary + "\n",
    }
    write_atomic_together(together, "report")
    files += list(together)
    return {
        "runs": [str(f) for f in folders],
        "files": [str(f) for f in files],
        "summary": rows,
        "missing_eval": missing,
        "stale_eval": stale,
        "skipped": skipped,
    }
