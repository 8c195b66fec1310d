"""The measured quantities a paper's claims may name: a closed set, each read from one run's
dynamics.json (`nanomarkov dynamics`, which the sweep writes for every run with snapshots) and
eval.json (the final checkpoint on the whole val split).

A plain name (QUANTITIES) is one number per run; a staged name FAMILY.STAGE (STAGE_FAMILIES) reads
dynamics' stage events of one stage predictor (uniform, unigram, in_context_unigram, optimal, ... as
the process's stage_log_probs names them); a per-layer name FAMILY.LAYER (LAYER_FAMILIES) reads one
attention layer's heads, LAYER a block index (0 the first). A quantity a run cannot give (a probe on a process
without hidden states, a stage never approached) is None, and a claim on it does not hold.
"""

import numpy as np

from nanomarkov.dynamics import middle_index
from nanomarkov.errors import NanoMarkovError

# A head "formed" at the first snapshot whose best score (over heads) came this share of the way
# from the untrained score (iteration 0) to the final one.
FORMED_SHARE = 0.5


def _probe(entry, key, index=None):
    probe = (entry or {}).get("belief_probe")
    if not probe or probe.get(key) is None:
        return None
    return probe[key] if index is None else probe[key][index]


def _snapshot(dynamics, where):
    """The first ("untrained", iteration 0), middle (the one nearest half the run: dynamics.middle_index) or
    last snapshot of a dynamics record (None if absent)."""
    entries = dynamics["snapshots"] if dynamics else []
    if not entries:
        return None
    if where == "untrained":
        return entries[0] if entries[0]["iter"] == 0 else None
    return entries[middle_index([e["iter"] for e in entries])] if where == "middle" else entries[-1]


def best_head(entry, key, layer=None):
    """The highest score over every attention head of a snapshot, or over those of block `layer` (None without
    attention, or without that layer)."""
    scores = (entry or {}).get("attention_scores") or {}
    values = scores.get(key)
    if values is not None and layer is not None:
        layers = scores.get("layers") or []
        values = values[layers.index(layer)] if layer in layers else None
    return None if values is None or not np.asarray(values).size else float(np.max(values))


def formed_tokens(dynamics, key):
    """Tokens seen at the first snapshot whose best `key` score is FORMED_SHARE of the way from iteration 0's
    to the last snapshot's; None when the score did not rise."""
    entries = (dynamics or {}).get("snapshots") or []
    scores = [best_head(e, key) for e in entries]
    if len(scores) < 2 or scores[0] is None or scores[-1] is None or scores[-1] <= scores[0]:
        return None
    level = scores[0] + FORMED_SHARE * (scores[-1] - scores[0])
    return next(e["tokens"] for e, s in zip(entries, scores) if s is not None and s >= level)


def _final_excess(dynamics, evaluation):
    return (evaluation or {}).get("cross_entropy", {}).get("excess")


# name -> (what it is, reader(dynamics record, eval record) -> float or None)
QUANTITIES = {
    "final_excess": (
        "val loss of the final checkpoint minus the optimal predictor's on the same val split, nats (eval.json)",
        _final_excess,
    ),
    "final_optimal_kl": (
        "KL(optimal predictor || model) at the last snapshot, mean over positions, nats",
        lambda d, e: (_snapshot(d, "last") or {}).get("optimal_kl"),
    ),
    "probe_r2_final": (
        "held-out R² of the linear probe from the last layer's residual stream to the belief state, last snapshot",
        lambda d, e: _probe(_snapshot(d, "last"), "r2", -1),
    ),
    "probe_r2_all_layers": (
        "the same probe from every layer's residual stream concatenated, last snapshot",
        lambda d, e: _probe(_snapshot(d, "last"), "r2_all"),
    ),
    "probe_r2_untrained": (
        "probe_r2_final of the untrained model (the iteration-0 snapshot)",
        lambda d, e: _probe(_snapshot(d, "untrained"), "r2", -1),
    ),
    "probe_r2_untrained_all_layers": (
        "probe_r2_all_layers of the untrained model",
        lambda d, e: _probe(_snapshot(d, "untrained"), "r2_all"),
    ),
    "probe_r2_shuffled": (
        "probe_r2_final fitted on shuffled belief states (the probe's own capacity), last snapshot",
        lambda d, e: _probe(_snapshot(d, "last"), "shuffled_r2", -1),
    ),
    "probe_mse_final": (
        "held-out mean squared distance of the last layer's probe to the true belief, last snapshot",
        lambda d, e: _probe(_snapshot(d, "last"), "mse", -1),
    ),
    "probe_mse_middle": (
        "probe_mse_final at the snapshot nearest half the run (by iterations, as tokens go)",
        lambda d, e: _probe(_snapshot(d, "middle"), "mse", -1),
    ),
    "probe_mse_untrained": (
        "probe_mse_final of the untrained model (the iteration-0 snapshot)",
        lambda d, e: _probe(_snapshot(d, "untrained"), "mse", -1),
    ),
    "previous_token_score": (
        "the best previous-token score over heads, last snapshot (interp.readouts)",
        lambda d, e: best_head(_snapshot(d, "last"), "previous_token"),
    ),
    "induction_score": (
        "the best induction score over heads on repeated random sequences, last snapshot",
        lambda d, e: best_head(_snapshot(d, "last"), "induction"),
    ),
    "previous_token_formed_tokens": (
        f"tokens seen when the best previous-token score had come {FORMED_SHARE:g} of the way from iteration 0's "
        "to its final value",
        lambda d, e: formed_tokens(d, "previous_token"),
    ),
    "induction_formed_tokens": (
        f"tokens seen when the best induction score had come {FORMED_SHARE:g} of the way from iteration 0's "
        "to its final value",
        lambda d, e: formed_tokens(d, "induction"),
    ),
}


def _stage_event(dynamics, stage, event, field):
    found = ((dynamics or {}).get("stage_events") or {}).get(stage, {}).get(event)
    return None if found is None else found[field]


def _final_stage_kl(dynamics, stage):
    return ((_snapshot(dynamics, "last") or {}).get("stage_kl") or {}).get(stage)


# FAMILY (of FAMILY.STAGE) -> (what it is, reader(dynamics record, stage) -> float or None)
STAGE_FAMILIES = {
    "stage_entered_tokens": (
        "tokens seen when the model first came near the stage predictor (dynamics' stage events)",
        lambda d, stage: _stage_event(d, stage, "entered", "tokens"),
    ),
    "stage_left_tokens": (
        "tokens seen when the model left the stage predictor for good (None while it is still near it)",
        lambda d, stage: _stage_event(d, stage, "left", "tokens"),
    ),
    "stage_closest_kl": (
        "the smallest KL(stage predictor || model) over the snapshots, nats",
        lambda d, stage: _stage_event(d, stage, "closest", "kl"),
    ),
    "stage_final_kl": (
        "KL(stage predictor || model) at the last snapshot, nats",
        lambda d, stage: _final_stage_kl(d, stage),
    ),
}


# FAMILY (of FAMILY.LAYER, LAYER a block index) -> (what it is, reader(dynamics record, layer) -> float or None)
LAYER_FAMILIES = {
    "previous_token_score": (
        "the best previous-token score over the heads of block LAYER, last snapshot",
        lambda d, layer: best_head(_snapshot(d, "last"), "previous_token", layer),
    ),
    "induction_score": (
        "the best induction score over the heads of block LAYER, last snapshot",
        lambda d, layer: best_head(_snapshot(d, "last"), "induction", layer),
    ),
}


def check_quantity(name):
    """Refuse a name outside the closed set, listing it."""
    family, dot, arg = name.partition(".") if isinstance(name, str) else ("", "", "")
    staged = dot and family in STAGE_FAMILIES and arg
    layered = dot and family in LAYER_FAMILIES and arg.isdigit()
    if name in QUANTITIES or staged or layered:
        return name
    named = ", ".join([*(f"{f}.STAGE" for f in STAGE_FAMILIES), *(f"{f}.LAYER" for f in LAYER_FAMILIES)])
    raise NanoMarkovError(
        f"unknown quantity {name!r}; choose from {', '.join(QUANTITIES)}, {named} (docs/papers.md#quantities)"
    )


def measure(name, dynamics, evaluation):
    """The value of quantity `name` for one run (None where the run cannot give it)."""
    family, dot, arg = name.partition(".")
    if not dot:
        value = QUANTITIES[name][1](dynamics, evaluation)
    elif family in LAYER_FAMILIES:
        value = LAYER_FAMILIES[family][1](dynamics, int(arg))
    else:
        value = STAGE_FAMILIES[family][1](dynamics, arg)
    return None if value is None else float(value)
