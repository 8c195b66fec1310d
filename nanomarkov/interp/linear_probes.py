"""Linear probes: is a quantity the optimal predictor needs linearly readable from the residual stream?

- linear_probe: least squares with a bias, fit on the first rows, R² and MSE on the rest.
- probe_layers: that probe from each residual stream, from all of them concatenated
  (ALL_LAYERS), and the same on shuffled targets (the baseline of a probe that
  finds structure the targets do not have).
- belief_state_probe (hmm): every residual stream (the embeddings, then each
  block's output) against the belief state P(h_t | x_1..x_t) after each prefix,
  the geometry Shai et al. 2024 found in transformers trained on mess3.
- context_probe (korder): every residual stream against a one-hot of each of
  the last k states, the context a k-th order chain's next state depends on.
- plot_belief_state_probe: the true beliefs and the probe's predictions in the
  2-D simplex (the mess3 fractal, once the model has learned it).
- plot_belief_simplex: the true beliefs beside the probe's predictions for several
  models (say snapshots over training), side by side.

Rows are positions of whole val sequences; the probe is fit on the first
TRAIN_FRACTION of the sequences and scored on the others, so no held-out
position shares a sequence with a fitted one. Position t is the stream the
model computes on reading tokens[:, t] (BOS at t = 0), matched with what is
known after x_1..x_t. MSE is the mean over held-out positions of the squared
error summed over the target's coordinates (for a belief state: the squared
Euclidean distance between the predicted and the true belief).
"""

import numpy as np
from matplotlib.figure import Figure

from nanomarkov.data import load_val_beliefs
from nanomarkov.errors import NanoMarkovError
from nanomarkov.interp.readouts import forward_capturing

TRAIN_FRACTION = 0.8
ALL_LAYERS = "all layers"  # the probe from every residual stream concatenated (Shai et al. 2024's RRXOR probe)
SHUFFLE_SEED = 0  # the permutation of the shuffled-target baseline: the same for every model probed


def linear_probe(features, targets, n_train):
    """Fit targets ~ features @ weights + bias on rows [:n_train]; score R² on rows [n_train:].

    features (n, d), targets (n, m). R² is 1 - SS_res / SS_tot with both sums
    over every held-out row and every target column (the variance-weighted R²
    of all targets together), the total around the held-out mean. MSE is
    SS_res / (n - n_train): per held-out row, the squared error summed over the
    m columns; fit_mse the same over the fitted rows. Returns {"weights" (d, m),
    "bias" (m,), "r2", "mse", "fit_mse", "predictions" (n - n_train, m)}.
    """
    return linear_probes_of(features, [targets], n_train)[0]


def linear_probes_of(features, target_sets, n_train):
    """linear_probe of each of several target sets on the same features, with one least-squares solve."""
    features = np.asarray(features, dtype=np.float64)
    target_sets = [np.asarray(targets, dtype=np.float64) for targets in target_sets]
    for targets in target_sets:
        if features.ndim != 2 or targets.ndim != 2 or features.shape[0] != targets.shape[0]:
            raise NanoMarkovError(
                f"features (n, d) and targets (n, m) must share their rows, got shapes {features.shape} and "
                f"{targets.shape}"
            )
    if not 0 < n_train < features.shape[0]:
        raise NanoMarkovError(f"n_train must leave rows on both sides, got {n_train} of {features.shape[0]}")
    design = np.hstack([features, np.ones((features.shape[0], 1))])
    stacked, *_ = np.linalg.lstsq(design[:n_train], np.hstack(target_sets)[:n_train], rcond=None)
    splits = np.cumsum([targets.shape[1] for targets in target_sets])[:-1]
    return [
        scored_probe(design, coef, targets, n_train)
        for coef, targets in zip(np.split(stacked, splits, axis=1), target_sets)
    ]


def scored_probe(design, coef, targets, n_train):
    """linear_probe's result for fitted coefficients (bias last) on the design matrix (features, then 1)."""
    predictions = design[n_train:] @ coef
    held_out = targets[n_train:]
    total = ((held_out - held_out.mean(axis=0)) ** 2).sum()
    residual = ((held_out - predictions) ** 2).sum()
    r2 = 1.0 - residual / total if total > 0 else float("nan")
    fit_mse = ((targets[:n_train] - design[:n_train] @ coef) ** 2).sum() / n_train
    return {
        "weights": coef[:-1],
        "bias": coef[-1],
        "r2": float(r2),
        "mse": float(residual / len(held_out)),
        "fit_mse": float(fit_mse),
        "predictions": predictions,
    }


def shuffled_rows(targets, seed=SHUFFLE_SEED):
    """The targets with their rows permuted (a fixed seed): what is left to find is chance."""
    return targets[np.random.default_rng(seed).permutation(len(targets))]


def probe_layers(names, streams, targets, n_train):
    """linear_probe from each stream, from all of them concatenated (ALL_LAYERS), and both on shuffled targets.

    streams: arrays whose leading axes flatten to the targets' rows. Returns
    {"layers": names, "fits": {name: fit}, "shuffled": {name: fit}}, the fits'
    names being the layers' and ALL_LAYERS.
    """
    features = [np.asarray(stream).reshape(len(targets), -1) for stream in streams]
    by_name = dict(zip(names, features)) | {ALL_LAYERS: np.hstack(features)}
    both = {name: linear_probes_of(f, [targets, shuffled_rows(targets)], n_train) for name, f in by_name.items()}
    return {
        "layers": list(names),
        "fits": {name: fits[0] for name, fits in both.items()},
        "shuffled": {name: fits[1] for name, fits in both.items()},
    }


def probe_summary(probed):
    """The numbers of probe_layers, plain: per layer "r2", "mse", their ALL_LAYERS "r2_all", "mse_all", and
    the same on shuffled targets ("shuffled_r2", ...), numpy arrays per layer, floats for all layers."""
    summary = {}
    for prefix, fits in (("", probed["fits"]), ("shuffled_", probed["shuffled"])):
        for key in ("r2", "mse"):
            summary[prefix + key] = np.array([fits[name][key] for name in probed["layers"]])
            summary[f"{prefix}{key}_all"] = fits[ALL_LAYERS][key]
    return summary


def residual_streams(model, tokens):
    """The residual stream at every layer for BOS-led sequences: (names, [(n, L-1, n_embd) float32 arrays]).

    The embeddings (token + position, the input of block 0) and each block's
    output, captured with forward hooks during one ordinary forward pass.
    """
    modules = [model.drop, *model.blocks]  # drop's output is the embeddings' sum
    batches = [[s.float().cpu().numpy() for s in streams] for _, streams in forward_capturing(model, tokens, modules)]
    names = ["embed"] + [f"block {i}" for i in range(len(model.blocks))]
    return names, [np.concatenate(layer) for layer in zip(*batches)]


def _probe_inputs(model, dataset, n_sequences):
    if model.config.vocab_size != dataset.chain.vocab_size:
        raise NanoMarkovError(
            f"the model's vocabulary is {model.config.vocab_size} but the dataset's is "
            f"{dataset.chain.vocab_size}; probe the model with the data it was trained on"
        )
    n = min(n_sequences, dataset.val.shape[0])
    if n < 2:
        raise NanoMarkovError(f"a probe needs at least 2 val sequences (one to fit, one to score), got {n}")
    n_train = max(1, min(n - 1, int(TRAIN_FRACTION * n)))
    return np.asarray(dataset.val[:n]), n_train


def belief_state_probe(model, dataset, layer=None, n_sequences=1000):
    """A linear probe from each residual stream, and from all of them concatenated, to the belief state (hmm).

    The targets are the dataset's saved val_beliefs.npy (position t: the
    belief after x_1..x_t; the prior at BOS). `layer` (a name from "layers", or
    ALL_LAYERS; default the last layer) is the one whose held-out predictions
    come back for the plot. Returns {"layers", "layer", "true", "predicted"} (the
    last two (held-out positions, H)) and probe_summary's numbers: "r2", "mse"
    (n_layer+1,), "r2_all", "mse_all", and each again on shuffled targets
    ("shuffled_r2", ...).
    """
    if not dataset.chain.BELIEF_STATES:
        raise NanoMarkovError(
            f"belief_state_probe needs hidden states (process hmm), this dataset is "
            f"{dataset.chain.process}; see context_probe for korder"
        )
    tokens, n_train = _probe_inputs(model, dataset, n_sequences)
    beliefs = np.asarray(load_val_beliefs(dataset)[: len(tokens), :-1], dtype=np.float64)
    names, streams = residual_streams(model, tokens)
    layer = names[-1] if layer is None else layer
    if layer not in (*names, ALL_LAYERS):
        raise NanoMarkovError(f"unknown layer {layer!r}; this model has {', '.join(names)} and {ALL_LAYERS!r}")
    targets = beliefs.reshape(-1, beliefs.shape[-1])
    rows = n_train * beliefs.shape[1]
    probed = probe_layers(names, streams, targets, rows)
    return {
        "layers": names,
        "layer": layer,
        "true": targets[rows:],
        "predicted": probed["fits"][layer]["predictions"],
        **probe_summary(probed),
    }


def context_probe(model, dataset, n_sequences=1000):
    """Per layer and lag j = 0..k-1, how well a linear probe reads x_{t-j} from the stream at position t.

    On a korder dataset (order k). The target is a one-hot over K+1 classes,
    the last meaning "no state there" (BOS, or before it); a held-out position
    counts as right when the probe's largest output is the true class.
    Returns {"layers", "lags" (k,), "accuracy", "r2", "mse" (n_layer+1, k)}, and
    per lag (k,) the probe from all layers concatenated ("accuracy_all",
    "r2_all", "mse_all") and the shuffled-target baseline ("shuffled_r2", ...
    as in probe_summary).
    """
    if dataset.chain.context_order is None:
        raise NanoMarkovError(
            f"context_probe reads the last k states of a chain whose next state depends on them "
            f"(process korder, or markov with k = 1); this dataset is {dataset.chain.process}"
        )
    tokens, n_train = _probe_inputs(model, dataset, n_sequences)
    k, order = dataset.chain.n_states, dataset.chain.context_order
    inputs = tokens[:, :-1].astype(np.int64)  # BOS is already class K
    names, streams = residual_streams(model, tokens)
    rows = n_train * inputs.shape[1]
    per_lag = []
    for lag in range(order):
        classes = np.full(inputs.shape, k)
        classes[:, lag:] = inputs[:, : inputs.shape[1] - lag]
        classes = classes.ravel()
        probed = probe_layers(names, streams, np.eye(k + 1)[classes], rows)
        right = {
            name: np.mean(fit["predictions"].argmax(axis=1) == classes[rows:]) for name, fit in probed["fits"].items()
        }
        accuracy = {"accuracy": np.array([right[name] for name in names]), "accuracy_all": right[ALL_LAYERS]}
        per_lag.append(probe_summary(probed) | accuracy)
    stacked = {key: np.stack([lag[key] for lag in per_lag], axis=-1) for key in per_lag[0]}
    return {"layers": names, "lags": np.arange(order), **stacked}


def _simplex_points(beliefs, reference):
    """2-D coordinates: barycentric on an equilateral triangle for 3 states, else the reference's top-2 PCA."""
    if beliefs.shape[1] == 3:
        return beliefs @ np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])
    mean = reference.mean(axis=0)
    _, _, vt = np.linalg.svd(reference - mean, full_matrices=False)
    return (beliefs - mean) @ vt[:2].T


def layer_scores(result):
    """(held-out R², MSE) of the probe whose predictions a belief_state_probe result holds (its "layer")."""
    if result["layer"] == ALL_LAYERS:
        return result["r2_all"], result["mse_all"]
    i = result["layers"].index(result["layer"])
    return result["r2"][i], result["mse"][i]


def _draw_simplex(ax, beliefs, true, colours, title):
    """Beliefs as points in 2-D (_simplex_points against the true ones), the triangle's edges for 3 states."""
    points = _simplex_points(beliefs, true)
    ax.scatter(points[:, 0], points[:, 1], c=colours, s=2, linewidths=0)
    if true.shape[1] == 3:
        corners = _simplex_points(np.eye(3), true)
        ax.plot(*np.vstack([corners, corners[:1]]).T, color="0.6", lw=0.8)
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)


def _belief_colours(true):
    if true.shape[1] == 3:  # the literature's colouring: the belief itself as RGB
        return np.clip(true, 0, 1)
    return np.array([f"C{i % 10}" for i in true.argmax(axis=1)])


def plot_belief_state_probe(result):
    """True beliefs and the probe's predictions in the simplex, each point coloured by its true belief; R² per layer."""
    true, colours = result["true"], _belief_colours(result["true"])
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    axes = fig.subplots(1, 3)
    r2, mse = layer_scores(result)
    _draw_simplex(axes[0], true, true, colours, "true belief states (held-out positions)")
    _draw_simplex(
        axes[1], result["predicted"], true, colours, f"probe of {result['layer']}: R² {r2:.3f}, MSE {mse:.2g}"
    )
    steps = np.arange(len(result["layers"]))
    axes[2].bar(steps, result["r2"], color="C0")
    axes[2].set_xticks(steps, result["layers"])
    axes[2].set_ylim(min(0.0, float(np.nanmin(result["r2"]))), 1.0)
    axes[2].set_xlabel("residual stream after")
    axes[2].set_ylabel("held-out R²")
    axes[2].set_title("linear probe to the belief state, per layer")
    return fig


def plot_belief_simplex(results, titles):
    """The true beliefs, then each result's probe predictions, side by side in the simplex.

    results: belief_state_probe results on the same held-out positions (say one
    per snapshot of a run), titles: one label each (say "iter 400"). Three
    hidden states: barycentric coordinates on a triangle; more: the top two
    principal components of the true beliefs, the same axes in every panel.
    Each point is coloured by its true belief, so a blurred picture shows where
    the probe mixes beliefs up.
    """
    if not results or len(results) != len(titles):
        raise NanoMarkovError(f"plot_belief_simplex needs one title per result, got {len(results)} and {len(titles)}")
    true = results[0]["true"]
    if any(r["true"].shape != true.shape or not np.array_equal(r["true"], true) for r in results):
        raise NanoMarkovError(
            "plot_belief_simplex draws probes of the same held-out positions; probe every model on one dataset"
        )
    colours = _belief_colours(true)
    fig = Figure(figsize=(3.6 * (len(results) + 1), 4.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(results) + 1))
    _draw_simplex(axes[0], true, true, colours, "true belief states")
    for ax, result, title in zip(axes[1:], results, titles):
        r2, mse = layer_scores(result)
        _draw_simplex(
            ax, result["predicted"], true, colours, f"{title}: probe of {result['layer']}\nR² {r2:.3f}, MSE {mse:.2g}"
        )
    # One scale in every panel: a probe's predictions spill outside the simplex, and the pictures compare.
    points = np.vstack([_simplex_points(beliefs, true) for beliefs in [true, *(r["predicted"] for r in results)]])
    low, high = points.min(axis=0), points.max(axis=0)
    for ax in axes:
        ax.set_xlim(low[0], high[0])
        ax.set_ylim(low[1], high[1])
    return fig
