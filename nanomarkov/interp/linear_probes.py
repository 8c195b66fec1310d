"""Linear probes: is a quantity the optimal predictor needs linearly readable from the residual stream?

- linear_probe: least squares with a bias, fit on the first rows, R² on the rest.
- belief_state_probe (hmm): every residual stream (the embeddings, then each
  block's output) against the belief state P(h_t | x_1..x_t) after each prefix,
  the geometry Shai et al. 2024 found in transformers trained on mess3.
- context_probe (korder): every residual stream against a one-hot of each of
  the last k states, the context a k-th order chain's next state depends on.
- plot_belief_state_probe: the true beliefs and the probe's predictions in the
  2-D simplex (the mess3 fractal, once the model has learned it).

Rows are positions of whole val sequences; the probe is fit on the first
TRAIN_FRACTION of the sequences and scored on the others, so no held-out
position shares a sequence with a fitted one. Position t is the stream the
model computes on reading tokens[:, t] (BOS at t = 0), matched with what is
known after x_1..x_t.
"""

import numpy as np
from matplotlib.figure import Figure

from nanomarkov.data import load_val_beliefs
from nanomarkov.errors import NanoMarkovError
from nanomarkov.interp.readouts import forward_capturing

TRAIN_FRACTION = 0.8


def linear_probe(features, targets, n_train):
    """Fit targets ~ features @ weights + bias on rows [:n_train]; score R² on rows [n_train:].

    features (n, d), targets (n, m). R² is 1 - SS_res / SS_tot with both sums
    over every held-out row and every target column (the variance-weighted R²
    of all targets together), the total around the held-out mean. Returns
    {"weights" (d, m), "bias" (m,), "r2", "predictions" (n - n_train, m)}.
    """
    features = np.asarray(features, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    if features.ndim != 2 or targets.ndim != 2 or features.shape[0] != targets.shape[0]:
        raise NanoMarkovError(
            f"features (n, d) and targets (n, m) must share their rows, got shapes {features.shape} and {targets.shape}"
        )
    if not 0 < n_train < features.shape[0]:
        raise NanoMarkovError(f"n_train must leave rows on both sides, got {n_train} of {features.shape[0]}")
    design = np.hstack([features, np.ones((features.shape[0], 1))])
    coef, *_ = np.linalg.lstsq(design[:n_train], targets[:n_train], rcond=None)
    predictions = design[n_train:] @ coef
    held_out = targets[n_train:]
    total = ((held_out - held_out.mean(axis=0)) ** 2).sum()
    residual = ((held_out - predictions) ** 2).sum()
    r2 = 1.0 - residual / total if total > 0 else float("nan")
    return {"weights": coef[:-1], "bias": coef[-1], "r2": float(r2), "predictions": predictions}


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
    """R² of a linear probe from each residual stream to the belief state, on an hmm dataset.

    The targets are the dataset's saved val_beliefs.npy (position t: the
    belief after x_1..x_t; the prior at BOS). `layer` (a name from "layers";
    default the last) is the one whose held-out predictions come back for the
    plot. Returns {"layers", "r2" (n_layer+1,), "layer", "true", "predicted"},
    the last two (held-out positions, H).
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
    if layer not in names:
        raise NanoMarkovError(f"unknown layer {layer!r}; this model has {', '.join(names)}")
    targets = beliefs.reshape(-1, beliefs.shape[-1])
    rows = n_train * beliefs.shape[1]
    r2, predicted = [], None
    for name, stream in zip(names, streams):
        fit = linear_probe(stream.reshape(len(targets), -1), targets, rows)
        r2.append(fit["r2"])
        if name == layer:
            predicted = fit["predictions"]
    return {"layers": names, "r2": np.array(r2), "layer": layer, "true": targets[rows:], "predicted": predicted}


def context_probe(model, dataset, n_sequences=1000):
    """Per layer and lag j = 0..k-1, how well a linear probe reads x_{t-j} from the stream at position t.

    On a korder dataset (order k). The target is a one-hot over K+1 classes,
    the last meaning "no state there" (BOS, or before it); a held-out position
    counts as right when the probe's largest output is the true class.
    Returns {"layers", "lags" (k,), "accuracy" and "r2" (n_layer+1, k)}.
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
    accuracy, r2 = np.zeros((len(names), order)), np.zeros((len(names), order))
    for lag in range(order):
        classes = np.full(inputs.shape, k)
        classes[:, lag:] = inputs[:, : inputs.shape[1] - lag]
        classes = classes.ravel()
        for i, stream in enumerate(streams):
            fit = linear_probe(stream.reshape(len(classes), -1), np.eye(k + 1)[classes], rows)
            r2[i, lag] = fit["r2"]
            accuracy[i, lag] = np.mean(fit["predictions"].argmax(axis=1) == classes[rows:])
    return {"layers": names, "lags": np.arange(order), "accuracy": accuracy, "r2": r2}


def _simplex_points(beliefs, reference):
    """2-D coordinates: barycentric on an equilateral triangle for 3 states, else the reference's top-2 PCA."""
    if beliefs.shape[1] == 3:
        return beliefs @ np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])
    mean = reference.mean(axis=0)
    _, _, vt = np.linalg.svd(reference - mean, full_matrices=False)
    return (beliefs - mean) @ vt[:2].T


def plot_belief_state_probe(result):
    """True beliefs and the probe's predictions in the simplex, each point coloured by its true belief; R² per layer."""
    true, predicted = result["true"], result["predicted"]
    if true.shape[1] == 3:  # the literature's colouring: the belief itself as RGB
        colours = np.clip(true, 0, 1)
    else:
        colours = np.array([f"C{i % 10}" for i in true.argmax(axis=1)])
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    axes = fig.subplots(1, 3)
    best = result["r2"][result["layers"].index(result["layer"])]
    for ax, beliefs, title in (
        (axes[0], true, "true belief states (held-out positions)"),
        (axes[1], predicted, f"probe of {result['layer']}: R² {best:.3f}"),
    ):
        points = _simplex_points(beliefs, true)
        ax.scatter(points[:, 0], points[:, 1], c=colours, s=2, linewidths=0)
        if true.shape[1] == 3:
            corners = _simplex_points(np.eye(3), true)
            ax.plot(*np.vstack([corners, corners[:1]]).T, color="0.6", lw=0.8)
        ax.set_aspect("equal")
        ax.set_axis_off()
        ax.set_title(title)
    steps = np.arange(len(result["layers"]))
    axes[2].bar(steps, result["r2"], color="C0")
    axes[2].set_xticks(steps, result["layers"])
    axes[2].set_ylim(min(0.0, float(np.nanmin(result["r2"]))), 1.0)
    axes[2].set_xlabel("residual stream after")
    axes[2].set_ylabel("held-out R²")
    axes[2].set_title("linear probe to the belief state, per layer")
    return fig
