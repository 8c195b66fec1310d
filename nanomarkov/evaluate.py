"""The six metrics, each next to its exact optimum and its baselines.

One streaming pass over the val split forwards every model being compared on the
same batch and accumulates everything, so memory stays bounded however large the
split, and agreement between runs costs no second pass:

1. cross-entropy on the whole val split vs optimal_loss, true_loss(val) and the
   bigram / unigram / uniform baselines;
2. perplexity;
3. top-1 accuracy vs the true model's;
4. agreement between runs (top-1 agreement, Jensen-Shannon divergence);
5. transition fidelity: KL(P_s || model(. | [BOS, s])) and the same over real val
   contexts ending in s;
6. Markov property: how much the model's prediction after state s varies with the
   history before s (0 for a memoryless model).

For metrics 4-6 the model's distribution is over the K states: the BOS logit is
dropped and the rest renormalised (BOS never follows a state).

Metrics 1-4 hold for any process (the true model's accuracy comes from the
process's own optimal predictor, `optimal_log_probs`). Metrics 5 and 6 are about
first-order chains; the process's METRICS says which families run, for the
others the result holds null and `skipped` says why (the process's skipped_metrics()),
and `optimal_fidelity` takes their place: the mean over every val
position of KL(optimal predictor || model). A k-th order chain (process
"korder") also gets `korder_fidelity`: the same KL over positions t > k, where
the context is complete, next to that of the best first-order predictor (what a
model that reads only the last state can reach at best).

A model whose outputs are not finite (NaN or inf logits on any val position or
prompt: broken weights) gets `outputs_finite: false`, and every number measured
from it (MODEL_NUMBERS) is null rather than a NaN, or a finite number that an
argmax or a NaN-skipping mean computed from NaN.
"""

import contextlib
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nanomarkov.checkpoint import checkpoint_path, load_model, nonfinite_weights
from nanomarkov.config import is_run_folder
from nanomarkov.data import learnable_fraction, load_dataset, optimal_loss_by_position, stage_losses
from nanomarkov.errors import NanoMarkovError
from nanomarkov.files import (
    check_output_folder,
    check_own_files,
    holds_record,
    json_text,
    write_atomic_together,
    writer_lock,
)
from nanomarkov.processes.numerics import entropy
from nanomarkov.progress import Heartbeat

# Positions x vocabulary per evaluated batch: bounds memory for any K (~64 MB of float64 logits per model).
EVAL_BATCH_ELEMENTS = 1 << 23
WORST_STATES = 5
# Positions eval.json lists where the model's loss is furthest above the optimal predictor on the same val sequences.
FURTHEST_POSITIONS = 3


def bigram_baseline(dataset):
    """Val loss of Dirichlet(1)-smoothed bigram counts from train (BOS row = start counts).

    About the best any learner can do with exactly this much data.
    """
    k = dataset.chain.n_states
    counts = np.zeros((k + 1) * k)
    for lo in range(0, dataset.train.shape[0], 8192):
        chunk = np.asarray(dataset.train[lo : lo + 8192], dtype=np.int64)
        counts += np.bincount((chunk[:, :-1] * k + chunk[:, 1:]).ravel(), minlength=(k + 1) * k)
    log_q = np.log((counts.reshape(k + 1, k) + 1) / (counts.reshape(k + 1, k).sum(axis=1, keepdims=True) + k))
    total = 0.0
    for lo in range(0, dataset.val.shape[0], 8192):
        chunk = np.asarray(dataset.val[lo : lo + 8192], dtype=np.int64)
        total -= log_q[chunk[:, :-1], chunk[:, 1:]].sum()
    return total / (dataset.val.shape[0] * (dataset.seq_len - 1))


def state_log_probs(logits, n_states):
    """log q over the K states: BOS dropped, renormalised (float64)."""
    return F.log_softmax(logits[..., :n_states].double(), dim=-1)


def kl_terms(log_p, log_q):
    """KL(p || q) along the last axis from log-probabilities, with 0 log 0 = 0 (float64 tensors)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def kl_rows(p, q):
    """KL(p_i || q_i) for each row, with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return terms.sum(axis=1)


@dataclass
class Batch:
    """One batch of val sequences with what every family reads: the optimal predictor and each model's q."""

    tokens: torch.Tensor  # (B, L) int64
    optimal_log: torch.Tensor  # (B, L-1, K) the process's optimal next-state log-probs
    logits: dict  # name -> (B, L-1, K+1) float64
    log_q: dict  # name -> (B, L-1, K) float64, over the states

    @property
    def x(self):
        return self.tokens[:, :-1]

    @property
    def y(self):
        return self.tokens[:, 1:]


class CommonMetrics:
    """Metrics 1-3 for every process: cross-entropy, perplexity, accuracy (and agreement's slot)."""

    def __init__(self, dataset, names):
        self.k, self.theory = dataset.chain.n_states, dataset.meta["theory"]
        self.loss_sum = dict.fromkeys(names, 0.0)
        self.correct = dict.fromkeys(names, 0)
        self.nonfinite = dict.fromkeys(names, 0)  # positions whose logits hold a NaN or an inf
        self.true_correct, self.positions = 0, 0

    def update(self, batch):
        y = batch.y
        self.positions += y.numel()
        self.true_correct += (batch.optimal_log.argmax(-1) == y).sum().item()
        for name, logits in batch.logits.items():
            self.loss_sum[name] += F.cross_entropy(
                logits.reshape(-1, self.k + 1), y.reshape(-1), reduction="sum"
            ).item()
            self.correct[name] += (logits.argmax(-1) == y).sum().item()
            self.nonfinite[name] += (~torch.isfinite(logits).all(-1)).sum().item()

    def results(self, name, bigram):
        n = self.positions
        return common_metrics(
            self.loss_sum[name] / n, self.correct[name] / n, self.true_correct / n, self.theory, bigram, self.k
        )


class LossByPosition:
    """The loss at each predicted position t = 1..L-1 over val, for every model and for the optimal
    predictor on this very val split, beside the expected optimum there (meta.json's, or the process's).

    The excess at a position is the model's loss minus the optimal predictor's on the same val sequences:
    measured against the expected optimum, the val split's sampling noise would swamp it."""

    def __init__(self, dataset, names):
        self.k, self.theory = dataset.chain.n_states, dataset.meta["theory"]
        self.optimal, self.optimal_se = optimal_loss_by_position(dataset)
        self.stages = stage_losses(dataset)
        self.loss_sum = {name: np.zeros(dataset.seq_len - 1) for name in names}
        self.true_sum, self.sequences = np.zeros(dataset.seq_len - 1), 0

    def update(self, batch):
        y = batch.y
        self.sequences += y.shape[0]
        self.true_sum -= batch.optimal_log.gather(-1, y[..., None])[..., 0].sum(0).numpy()
        for name, logits in batch.logits.items():
            nll = F.cross_entropy(logits.reshape(-1, self.k + 1), y.reshape(-1), reduction="none")
            self.loss_sum[name] += nll.reshape(y.shape).sum(0).numpy()

    def results(self, name):
        """({"loss_by_position": summary}, {"val_loss": (L-1,), ...}): the arrays go to loss_by_position.npz."""
        arrays = {
            "val_loss": self.loss_sum[name] / self.sequences,
            "optimal_loss": self.optimal,
            "optimal_loss_se": self.optimal_se,
            "true_loss_val": self.true_sum / self.sequences,
        }
        excess = arrays["val_loss"] - arrays["true_loss_val"]
        positions = [t for t in (1, 10, 100) if t <= len(excess)] + [len(excess)]
        summary = {
            "positions": len(excess),
            "estimated": bool(self.optimal_se.any()),
            "at": [_at_position(t, arrays) for t in dict.fromkeys(positions)],
            "furthest_above_optimum": [
                _at_position(int(t) + 1, arrays) for t in np.argsort(-excess)[:FURTHEST_POSITIONS]
            ],
            "entropy_rate": self.theory["entropy_rate"],
            "unigram_loss": self.theory["unigram_loss"],
            "uniform_loss": self.theory["uniform_loss"],
            "stage_losses": self.stages,
            "file": "loss_by_position.npz",
        }
        return {"loss_by_position": summary}, arrays


def _at_position(t, arrays):
    """eval.json's entry for predicted position t (1-based): excess is val_loss - optimal_loss_val, the
    optimal predictor on the same val sequences; optimal_loss is the expected optimum (the theory)."""
    at = {key: float(values[t - 1]) for key, values in arrays.items()}
    entry = {"position": t, "val_loss": at["val_loss"], "optimal_loss": at["optimal_loss"]}
    entry |= {"optimal_loss_val": at["true_loss_val"], "excess": at["val_loss"] - at["true_loss_val"]}
    return entry | ({"optimal_loss_se": at["optimal_loss_se"]} if arrays["optimal_loss_se"].any() else {})


class Agreement:
    """Metric 4: top-1 agreement and Jensen-Shannon divergence between every pair of runs."""

    def __init__(self, names):
        self.names = names
        self.pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
        self.sums = {pair: [0, 0.0] for pair in self.pairs}  # (top-1 agreements, summed JSD)

    def update(self, batch):
        for a_name, b_name in self.pairs:
            log_qa, log_qb = batch.log_q[a_name], batch.log_q[b_name]
            log_m = torch.logaddexp(log_qa, log_qb) - np.log(2)
            jsd = 0.5 * ((log_qa.exp() * (log_qa - log_m)).sum(-1) + (log_qb.exp() * (log_qb - log_m)).sum(-1))
            top_a, top_b = batch.logits[a_name].argmax(-1), batch.logits[b_name].argmax(-1)
            self.sums[(a_name, b_name)][0] += (top_a == top_b).sum().item()
            self.sums[(a_name, b_name)][1] += jsd.sum().item()

    def result(self, n_positions, finite):
        """The agreement dict every run shares, or None with one run.

        A pair with a model whose outputs are not finite (`finite[name]` False) has no agreement: null,
        and so are the means over pairs, which would otherwise describe fewer runs than they name.
        """
        if not self.pairs:
            return None
        pairs = [
            {"a": a, "b": b, "top1_agreement": agree / n_positions, "mean_jsd": jsd / n_positions}
            if finite[a] and finite[b]
            else {"a": a, "b": b, "top1_agreement": None, "mean_jsd": None}
            for (a, b), (agree, jsd) in self.sums.items()
        ]
        every_pair = all(finite.values())
        return {
            "runs": self.names,
            "top1_agreement": float(np.mean([q["top1_agreement"] for q in pairs])) if every_pair else None,
            "mean_jsd": float(np.mean([q["mean_jsd"] for q in pairs])) if every_pair else None,
            "pairs": pairs,
        }


class OptimalFidelity:
    """KL(optimal predictor || model), averaged over every val position."""

    KEYS = ("optimal_fidelity",)

    def __init__(self, dataset, names):
        self.kl_sum, self.positions = dict.fromkeys(names, 0.0), 0

    def update(self, batch):
        self.positions += batch.y.numel()
        for name, log_q in batch.log_q.items():
            self.kl_sum[name] += kl_terms(batch.optimal_log, log_q).sum().item()

    def results(self, name, models, device, timings):
        return {"optimal_fidelity": {"positions": self.positions, "mean_kl": self.kl_sum[name] / self.positions}}, {}


class KOrderFidelity:
    """A k-th order chain: KL(row of the last k states || model) over positions t > k, where the context is
    complete, next to that of the best first-order predictor (the best a model reading one state can do)."""

    KEYS = ("korder_fidelity",)

    def __init__(self, dataset, names):
        self.order = dataset.chain.context_order
        with np.errstate(divide="ignore"):
            self.first_order_log = torch.from_numpy(np.log(dataset.chain.first_order_rows()))
        self.kl_sum, self.first_order_kl_sum, self.positions = dict.fromkeys(names, 0.0), 0.0, 0

    def update(self, batch):
        full_log = batch.optimal_log[:, self.order :]  # positions predicted from a full context of k states
        self.positions += full_log.shape[0] * full_log.shape[1]
        first_order = self.first_order_log[batch.x[:, self.order :]]
        self.first_order_kl_sum += kl_terms(full_log, first_order).sum().item()
        for name, log_q in batch.log_q.items():
            self.kl_sum[name] += kl_terms(batch.optimal_log, log_q)[:, self.order :].sum().item()

    def results(self, name, models, device, timings):
        n = self.positions
        return {
            "korder_fidelity": {
                "order": self.order,
                "positions": n,
                "mean_kl": self.kl_sum[name] / n if n else None,
                "first_order_kl": self.first_order_kl_sum / n if n else None,
            }
        }, {}


class FirstOrderFidelity:
    """Metrics 5 and 6 of a first-order chain: transition fidelity (KL(P_s || model) on the prompts [BOS, s]
    and on real val contexts ending in s) and the Markov property (the spread of the model's prediction
    after s across histories: H(mean q) - mean H(q), 0 for a memoryless model)."""

    KEYS = ("transition_fidelity", "markov_property")

    def __init__(self, dataset, names):
        self.chain, k = dataset.chain, dataset.chain.n_states
        rows = self.chain.transition_rows()  # row K: after BOS
        self.p, self.row_entropy = torch.from_numpy(rows[:k]), torch.from_numpy(entropy(rows[:k], axis=1))
        self.kl_sum = {name: np.zeros(k) for name in names}  # sum over contexts ending in s of KL(P_s || q_t)
        self.prob_sum = {name: np.zeros((k, k)) for name in names}  # sum of q_t over contexts ending in s
        self.entropy_sum = {name: np.zeros(k) for name in names}  # sum of H(q_t) over contexts ending in s
        self.count = np.zeros(k)  # contexts ending in s

    def update(self, batch):
        k = self.chain.n_states
        states = batch.x[:, 1:]  # contexts ending in a state: every position after the BOS one
        flat_states = states.reshape(-1).numpy()
        self.count += np.bincount(flat_states, minlength=k)
        for name, log_q in batch.log_q.items():
            # KL(P_s || q_t) = -H(P_s) - sum_j P_sj log q_tj, s = current state.
            ctx_log_q = log_q[:, 1:]
            ctx_q = ctx_log_q.exp()
            kl = (-(self.p[states] * ctx_log_q).sum(-1) - self.row_entropy[states]).reshape(-1).numpy()
            # spread = mean_t KL(q_t || mean q) = H(mean q) - mean_t H(q_t), in one pass.
            h = -(ctx_q * ctx_log_q).sum(-1).reshape(-1).numpy()
            self.kl_sum[name] += np.bincount(flat_states, weights=kl, minlength=k)
            self.entropy_sum[name] += np.bincount(flat_states, weights=h, minlength=k)
            np.add.at(self.prob_sum[name], flat_states, ctx_q.reshape(-1, k).numpy())

    def _prompts(self, model, device):
        """The model's next-state distributions on the K prompts [BOS, s] (K, K), and after BOS alone (K,)."""
        k = self.chain.n_states
        prompts = torch.stack([torch.full((k,), k), torch.arange(k)], dim=1)
        log_q = state_log_probs(model(prompts.to(device))[0].cpu(), k)
        return log_q[:, 1].exp().numpy(), log_q[0, 0].exp().numpy()

    def results(self, name, models, device, timings):
        started = time.perf_counter()
        pi, count, rows = self.chain.stationary(), self.count, self.chain.transition_rows()
        learned, learned_start = self._prompts(models[name], device)
        prompt_kl = kl_rows(rows[:-1], learned)
        # NaN marks a state without contexts in the arrays; the means below select the states with
        # contexts by `seen` rather than skip NaN (nanmean, nansum), so a NaN the model produced shows.
        seen = count > 0
        context_kl = np.where(seen, self.kl_sum[name] / np.maximum(count, 1), np.nan)
        mean_q = self.prob_sum[name] / np.maximum(count, 1)[:, None]
        spread = np.where(count > 1, entropy(mean_q, axis=1) - self.entropy_sum[name] / np.maximum(count, 1), np.nan)
        spread = np.where(count > 1, np.maximum(spread, 0.0), np.nan)  # rounding can dip below 0
        worst = np.argsort(-prompt_kl)[:WORST_STATES]
        fidelity = {
            "mean_kl": float(prompt_kl.mean()),
            "weighted_kl": float(pi @ prompt_kl),
            "context_mean_kl": float(context_kl[seen].mean()),
            "context_weighted_kl": float(pi[seen] @ context_kl[seen] / pi[seen].sum()),
            "start_kl": float(kl_rows(rows[-1:], learned_start[None])[0]),  # the last row is the one after BOS
            "worst_states": [
                {"state": int(s), "kl": float(prompt_kl[s]), "stationary_prob": float(pi[s])} for s in worst
            ],
            "states_without_val_context": int((~seen).sum()),
        }
        arrays = {
            "learned_matrix": learned,
            "learned_start": learned_start,
            "prompt_kl": prompt_kl,
            "context_kl": context_kl,
            "spread": spread,
            "stationary": pi,
        }
        timings[f"prompts_and_summary_s[{name}]"] = time.perf_counter() - started
        return {"transition_fidelity": fidelity, "markov_property": _markov_property(spread, pi, count)}, arrays


def _markov_property(spread, pi, count):
    has_spread = count > 1  # as for the context KL: selected by count, so a NaN from the model is not skipped
    states, values = np.flatnonzero(has_spread), spread[has_spread]
    return {
        "mean_spread": float(values.mean()) if values.size else None,
        "weighted_spread": float(pi[states] @ values / pi[states].sum()) if values.size else None,
        "max_spread": float(values.max()) if values.size else None,
        "max_spread_state": int(states[np.argmax(values)]) if values.size else None,
        "contexts": int(count.sum()),
        "min_contexts_per_state": int(count.min()),
    }


# Every number measured from the model, per section: null when its outputs are not finite. The rest
# (the theory, the baselines, counts of positions and contexts) does not depend on the model.
MODEL_NUMBERS = {
    "cross_entropy": ("val_loss", "excess", "pct_of_optimum", "learnable_fraction"),
    "perplexity": ("perplexity",),
    "accuracy": ("accuracy",),
    "transition_fidelity": ("mean_kl", "weighted_kl", "context_mean_kl", "context_weighted_kl", "start_kl"),
    "markov_property": ("mean_spread", "weighted_spread", "max_spread", "max_spread_state"),
    "optimal_fidelity": ("mean_kl",),
    "korder_fidelity": ("mean_kl",),
}
# Arrays of the model's own outputs (the prompts' distributions), which the val pass does not cover.
MODEL_OUTPUT_ARRAYS = ("learned_matrix", "learned_start")


def without_model_numbers(result):
    """`result` with every MODEL_NUMBERS entry null and the worst states (ranked by the model) emptied."""
    result = dict(result)
    for section, keys in MODEL_NUMBERS.items():
        if result.get(section) is not None:
            result[section] = result[section] | dict.fromkeys(keys)
    if result.get("transition_fidelity") is not None:
        result["transition_fidelity"]["worst_states"] = []
    if result.get("loss_by_position") is not None:
        at = [entry | {"val_loss": None, "excess": None} for entry in result["loss_by_position"]["at"]]
        result["loss_by_position"] = result["loss_by_position"] | {"at": at, "furthest_above_optimum": []}
    return result


# The family that computes each metric key a process may list in METRICS.
FAMILIES = {
    "transition_fidelity": FirstOrderFidelity,
    "markov_property": FirstOrderFidelity,
    "optimal_fidelity": OptimalFidelity,
    "korder_fidelity": KOrderFidelity,
}


@torch.no_grad()
def evaluate_models(models, dataset, device="cpu", extra_families=()):
    """Every metric that applies to the dataset's process, for each model in `models` (a dict name -> module).

    Each module maps idx (B, T) to (logits (B, T, K+1), _), as GPT does. One pass over
    the val split feeds every family; the process's METRICS says which families run,
    and its skipped_metrics() why the others do not. Returns {name: result dict}; with
    two or more models each result carries the agreement. Each result says whether the
    model's outputs were finite (`outputs_finite`, `nonfinite_positions`); when not, its
    MODEL_NUMBERS are null. `extra_families`: more family classes (as FAMILIES' are: built from the dataset
    and the names, fed each Batch) whose numbers join each result, read from this same pass
    (dynamics.StageDistances: a pass of their own would double the model's forward passes).
    """
    chain, names, timings = dataset.chain, list(models), {}
    common, agreement = CommonMetrics(dataset, names), Agreement(names)
    by_position = LossByPosition(dataset, names)
    classes = [*dict.fromkeys(FAMILIES[key] for key in chain.METRICS), *extra_families]
    families = [cls(dataset, names) for cls in classes]
    started = time.perf_counter()
    with Heartbeat(f"eval of {', '.join(names)}", val_batch_count(dataset), "val batches") as heartbeat:
        for batch in _val_batches(models, dataset, device):
            for family in (common, agreement, by_position, *families):
                family.update(batch)
            heartbeat.advance()
    timings["val_pass_s"] = time.perf_counter() - started
    started = time.perf_counter()
    bigram = bigram_baseline(dataset)
    timings["bigram_baseline_s"] = time.perf_counter() - started

    results = {}
    for name in names:
        result = common.results(name, bigram) | dict.fromkeys(FAMILIES)
        result_by_position, position_arrays = by_position.results(name)
        result.update(result_by_position)
        arrays = {"loss_by_position": position_arrays}
        for family in families:
            values, family_arrays = family.results(name, models, device, timings)
            result.update(values)
            arrays.update(family_arrays)
        finite = common.nonfinite[name] == 0 and all(
            np.isfinite(arrays[key]).all() for key in MODEL_OUTPUT_ARRAYS if key in arrays
        )
        if not finite:
            result = without_model_numbers(result)
        results[name] = result | {
            "outputs_finite": bool(finite),
            "nonfinite_positions": common.nonfinite[name],
            "positions": common.positions,
            "skipped": chain.skipped_metrics(),
            "arrays": arrays,
        }
    shared = agreement.result(common.positions, {name: results[name]["outputs_finite"] for name in names})
    for name in names:
        results[name]["agreement"] = shared
        results[name]["timing"] = {key: round(value, 3) for key, value in timings.items()}
    return results


def val_batch_sequences(dataset):
    """The sequences in one batch of the val pass: EVAL_BATCH_ELEMENTS positions x vocabulary, at least one."""
    return max(1, EVAL_BATCH_ELEMENTS // ((dataset.seq_len - 1) * (dataset.chain.n_states + 1)))


def val_batch_count(dataset):
    return -(-dataset.val.shape[0] // val_batch_sequences(dataset))


def _val_batches(models, dataset, device):
    """The val split in batches of whole sequences, each with the optimal predictor and every model's output."""
    k = dataset.chain.n_states
    batch = val_batch_sequences(dataset)
    for lo in range(0, dataset.val.shape[0], batch):
        tokens = torch.from_numpy(np.asarray(dataset.val[lo : lo + batch], dtype=np.int64))
        optimal_log = torch.from_numpy(dataset.chain.optimal_log_probs(tokens.numpy()))
        # float64 from here on: the sums over a million positions keep every digit.
        logits = {name: model(tokens[:, :-1].to(device))[0].cpu().double() for name, model in models.items()}
        log_q = {name: state_log_probs(value, k) for name, value in logits.items()}
        yield Batch(tokens, optimal_log, logits, log_q)


# Theory keys of loss levels every process has; any other *_loss key is a process's own
# baseline (icl: oracle_loss, unigram_in_context_loss) and is shown beside them.
COMMON_LOSSES = ("optimal_loss", "true_loss_val", "unigram_loss", "uniform_loss")


def common_metrics(val_loss, accuracy, true_accuracy, theory, bigram, k):
    """Metrics 1-3 (and agreement's slot), defined for every process."""
    return {
        "cross_entropy": {
            "val_loss": val_loss,
            "optimal_loss": theory["optimal_loss"],
            "true_loss_val": theory["true_loss_val"],
            "excess": val_loss - theory["true_loss_val"],
            "pct_of_optimum": 100 * theory["true_loss_val"] / val_loss,
            "learnable_fraction": learnable_fraction(val_loss, theory),
            "bigram_baseline": bigram,
            "unigram_loss": theory["unigram_loss"],
            "uniform_loss": theory["uniform_loss"],
            "process_baselines": {
                key: value for key, value in theory.items() if key.endswith("_loss") and key not in COMMON_LOSSES
            },
        },
        "perplexity": {
            "perplexity": float(np.exp(val_loss)),
            "optimal_perplexity": float(np.exp(theory["optimal_loss"])),
            "true_perplexity_val": float(np.exp(theory["true_loss_val"])),
            "bigram_perplexity": float(np.exp(bigram)),
            "uniform_perplexity": float(k),
        },
        "accuracy": {
            "accuracy": accuracy,
            "optimal_accuracy": theory["optimal_accuracy"],
            "true_accuracy_val": true_accuracy,
            "chance": 1 / k,
        },
        "agreement": None,
    }


# ------------------------------------------------------------ checkpoints and files


def evaluate_checkpoints(ckpt_paths, data_dir=None, out=None, device="cpu", force=False):
    """Evaluate checkpoints trained on one dataset; write eval.json, eval.md and arrays for each.

    Results go next to each checkpoint, or into `out` (one sub-folder per run when
    there are several), which must be new, empty, an earlier evaluation or a run folder,
    unless `force` (files.check_output_folder). Returns [(output folder, result)]; a result's `outputs_finite` says
    whether the model could be measured at all (see nonfinite_message).
    """
    loaded = [(checkpoint_path(path), *load_model(path)) for path in ckpt_paths]
    data_dirs = {str(data_dir or ckpt["data_dir"]) for _, _, ckpt in loaded}
    if len(data_dirs) > 1:
        raise NanoMarkovError(
            f"these checkpoints were trained on different datasets ({', '.join(sorted(data_dirs))}); "
            "evaluate them separately (agreement compares runs on the same data)"
        )
    (data_path,) = data_dirs
    if not Path(data_path).exists():
        raise NanoMarkovError(
            f"dataset {data_path} of {loaded[0][0]} not found; run from the folder you trained in, or pass --data DIR"
        )
    dataset = load_dataset(data_path)
    models = {}
    for path, model, ckpt in loaded:
        check_trained_on(path, ckpt, dataset)
        if model.config.vocab_size != dataset.vocab_size:
            raise NanoMarkovError(
                f"{path} has vocabulary {model.config.vocab_size}, {data_path} has {dataset.vocab_size}"
            )
        models[str(path)] = model.to(device)
    # Every folder checked before any is made, and all before the pass: fail fast, and leave nothing behind.
    folders = [output_folder(path, out, len(loaded), force) for path, _, _ in loaded]
    with contextlib.ExitStack() as held:  # one writer: a train still writing a run folder refuses its evaluation
        for folder in dict.fromkeys(folders):  # (made here, and removed again if the evaluation fails)
            held.enter_context(writer_lock(folder, "evaluation"))
        return write_evaluations(loaded, folders, evaluate_models(models, dataset, device), dataset, data_path)


def write_evaluations(loaded, folders, results, dataset, data_path):
    """Each checkpoint's evaluation into its folder (write_eval); returns [(folder, result)]."""
    written = []
    for (path, model, ckpt), folder in zip(loaded, folders):
        result = results[str(path)]
        result["nonfinite_weights"] = nonfinite_weights(model)  # why its outputs are not finite, if they are not
        result["run"] = {
            "checkpoint": str(path),
            "dataset": data_path,
            "iter": ckpt.get("iter"),
            "n_states": dataset.chain.n_states,
            "process": dataset.chain.process,
            "order": dataset.chain.options().get("order", 1),
            "seq_len": dataset.seq_len,
            "val_sequences": dataset.val.shape[0],
            "seed": ckpt.get("config", {}).get("seed"),
        }
        write_eval(result, folder)
        written.append((folder, result))
    return written


def check_trained_on(trained, ckpt, dataset):
    """Refuse a dataset other than the one `trained` (a checkpoint or run) was trained on: the sha256 of
    its files, which `ckpt` (its checkpoint or config.json) records (one that records none passes any)."""
    expected, found = ckpt.get("dataset_sha256"), dataset.meta["sha256"]
    if expected is None or expected == found:
        return
    expected = expected if isinstance(expected, dict) else {}
    differ = sorted(name for name in {*expected, *found} if expected.get(name) != found.get(name))
    recorded = ", ".join(f"{name} {str(expected[name])[:12]}" for name in differ if name in expected)
    raise NanoMarkovError(
        f"{trained} was trained on other data than {dataset.path} (sha256 of {', '.join(differ)} differs): "
        f"it expects the dataset {ckpt.get('data_dir')} whose sha256 starts {recorded or '(unreadable)'}; "
        "pass that dataset with --data DIR (or an identical copy of it)"
    )


# Keys every eval.json nanoMarkov writes holds: an evaluation folder is told by its content, not its name.
# What eval writes into a folder (--force writes beside a user's files, never over these names).
EVAL_FILES = ("eval.json", "eval.md", "learned_matrix.npy", "per_state.npz", "loss_by_position.npz", "*.partial")
# What each metric family measures, for the table's notes (eval.json keeps the family's own name).
FAMILY_TITLES = {
    "transition_fidelity": "the transition KL against the true matrix",
    "markov_property": "the Markov spread",
    "optimal_fidelity": "the KL to the optimal predictor",
    "korder_fidelity": "the KL against the true k-th order rows",
}
EVAL_MARKS = ("run", "outputs_finite", "files")


def is_evaluation_folder(folder) -> bool:
    """Whether eval may write into `folder` unasked: an earlier evaluation (its eval.json) or a run folder."""
    return is_run_folder(folder) or holds_record(folder, "eval.json", EVAL_MARKS)


def holds_evaluations(folder) -> bool:
    """Whether `folder` holds only evaluations (what eval --out wrote for several checkpoints: one sub-folder each)."""
    entries = list(Path(folder).iterdir())
    return bool(entries) and all(entry.is_dir() and is_evaluation_folder(entry) for entry in entries)


def output_folder(ckpt_path, out, n_checkpoints, force=False):
    """Where a checkpoint's evaluation goes (next to it, `out`, or a sub-folder of `out`), checked, not made:
    into `out` only where it is new, empty, an evaluation or a run folder, or `force` (files.check_output_folder);
    never over files of those names that an earlier evaluation did not write (files.check_own_files)."""
    if out is None:
        folder = Path(ckpt_path).parent
    elif n_checkpoints == 1:
        folder = check_output_folder(out, "model evaluation", is_evaluation_folder, force=force, writes=EVAL_FILES)
    else:  # several: `out` gets one sub-folder each, so it too must be new, empty or of evaluations only
        name = Path(ckpt_path).parent.name
        out = check_output_folder(out, "folder of model evaluations", holds_evaluations, force=force, writes=(name,))
        folder = check_output_folder(
            out / name, "model evaluation", is_evaluation_folder, force=force, writes=EVAL_FILES
        )
    check_own_files(folder, EVAL_FILES[:-1], "model evaluation", record="eval.json", marks=EVAL_MARKS)
    return folder


def make_folder(folder, what="the evaluation"):
    """`folder`, created if need be; NanoMarkovError when it cannot be (a file on its path, no permission)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NanoMarkovError(
            f"cannot write {what} to {folder} ({e.strerror or e}); give --out a folder you can write"
        ) from None
    return folder


def array_bytes(save, *args, **arrays):
    """What np.save / np.savez would write, in memory: the file then goes to disk atomically."""
    buffer = io.BytesIO()
    save(buffer, *args, **arrays)
    return buffer.getbuffer()


def write_eval(result, folder):
    """eval.json (every number, strict JSON), eval.md (a table), learned_matrix.npy and per_state.npz
    (first-order chains), loss_by_position.npz (val_loss, optimal_loss, optimal_loss_se, true_loss_val).

    The files replace their predecessors together (files.write_atomic_together): a full disk leaves
    the previous evaluation as it was, never an empty or partial file, nor new arrays beside an old record.
    """
    folder = make_folder(Path(folder))
    arrays = result["arrays"]
    record = {k: v for k, v in result.items() if k != "arrays"}
    record["files"] = {}
    payloads = {}
    if "learned_matrix" in arrays:  # first-order chains only: a k-th order chain has no K x K matrix to learn
        payloads[folder / "learned_matrix.npy"] = array_bytes(np.save, arrays["learned_matrix"])
        per_state = {k: v for k, v in arrays.items() if k not in ("learned_matrix", "loss_by_position")}
        payloads[folder / "per_state.npz"] = array_bytes(np.savez, **per_state)
        record["files"] = {"learned_matrix": "learned_matrix.npy", "per_state": "per_state.npz"}
    if "loss_by_position" in arrays:
        payloads[folder / "loss_by_position.npz"] = array_bytes(np.savez, **arrays["loss_by_position"])
        record["files"]["loss_by_position"] = "loss_by_position.npz"
    payloads[folder / "eval.md"] = format_eval(result) + "\n"
    payloads[folder / "eval.json"] = json_text(record)  # strict: a NaN would be null (outputs_finite says why)
    write_atomic_together(payloads, "evaluation")


def nonfinite_message(written):
    """One line naming the checkpoints whose outputs are not finite, or None when every one is."""
    broken = [result for _, result in written if not result["outputs_finite"]]
    if not broken:
        return None
    which = "; ".join(f"{r['run']['checkpoint']} ({nonfinite_where(r)})" for r in broken)
    return (
        f"the model's outputs are not finite (NaN or inf) for {which}: its metrics are null in eval.json; "
        "its weights are broken, so retrain it (e.g. a lower learning rate) or evaluate an earlier checkpoint"
    )


NOT_FINITE = "not finite"  # a table cell whose number is null because the model's outputs are not finite


def num(value, spec, scale=1, unit=""):
    """A table cell: `value` formatted, or NOT_FINITE for a null (see MODEL_NUMBERS)."""
    return NOT_FINITE if value is None else f"{scale * value:{spec}}{unit}"


def nonfinite_where(result):
    """Where a model's outputs were not finite (and which of its weights are not), in words."""
    if result["nonfinite_positions"]:
        where = f"on {result['nonfinite_positions']} of {result['positions']} val positions"
    else:
        where = "on the prompts [BOS, s]"
    weights = result.get("nonfinite_weights") or []
    if weights:
        where += f"; NaN or inf in its weights {', '.join(weights[:3])}{' and more' if len(weights) > 3 else ''}"
    return where


def nonfinite_warning(result):
    """The line eval.md opens with when the model's outputs are not finite, else None."""
    if result.get("outputs_finite", True):
        return None
    return (
        f"**The model's outputs are not finite** (NaN or inf {nonfinite_where(result)}): its weights are broken, so nothing "
        f"can be measured from it; every number measured from the model reads '{NOT_FINITE}' (null in eval.json)."
    )


def format_eval(result):
    """The metrics as a markdown table, each next to its optimum and baselines."""
    run, ce, pp, ac = result.get("run", {}), result["cross_entropy"], result["perplexity"], result["accuracy"]
    tf, mp, ag = result["transition_fidelity"], result["markov_property"], result["agreement"]
    kf, skipped = result.get("korder_fidelity"), result.get("skipped", {})
    rows = _common_rows(ce, pp, ac, ag)
    if result.get("loss_by_position") is not None:
        rows.append(_by_position_row(result["loss_by_position"]))
    of = result.get("optimal_fidelity")
    if of is not None:
        rows.append(("KL(optimal predictor ‖ model), all positions", num(of["mean_kl"], ".6f"), "0", ""))
    if kf is not None and kf["positions"]:
        rows.append(
            (
                f"order-{kf['order']} KL(row of last {kf['order']} states ‖ model), positions t > {kf['order']}",
                num(kf["mean_kl"], ".6f"),
                "0",
                f"best first-order predictor {kf['first_order_kl']:.6f}",
            )
        )
    if tf is not None:
        worst = ", ".join(f"{w['state']} ({w['kl']:.4f})" for w in tf["worst_states"])
        rows += _first_order_rows_md(tf, mp, worst, result.get("outputs_finite", True))
    title = f"# Evaluation of {run['checkpoint']}" if run else "# Evaluation"
    kind = f", order {run['order']}" if run and kf is not None else ""
    head = (
        (
            f"dataset {run['dataset']}: K={run['n_states']}{kind}, {run['val_sequences']} val sequences of "
            f"{run['seq_len']} tokens; checkpoint at iter {run['iter']}"
        )
        if run
        else ""
    )
    warning = nonfinite_warning(result)
    lines = [title, "", head, *(["", warning] if warning else []), ""]
    lines += [f"{len(rows)} metrics against the exact theory, each beside its optimum and baselines:", ""]
    lines += ["| metric | model | optimum | baselines |", "|---|---:|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    skipped_lines = [
        f"- not measured, {FAMILY_TITLES.get(name, name)}: {why}"
        for name, why in skipped.items()
        if result.get(name) is None
    ]
    lines += [""] + skipped_lines if skipped_lines else []
    timing = result.get("timing", {})
    if timing:
        several = sum("[" in key for key in timing) > 1
        lines += ["", "time: " + ", ".join(f"{timing_label(k, several)} {v:.2f}s" for k, v in timing.items())]
    return "\n".join(lines)


def timing_label(key, with_model=False):
    """A timing key of eval.json as words: 'val_pass_s' -> 'val pass', 'prompts_and_summary_s[NAME]' ->
    'prompts and summary', with '(NAME)' only when several models were timed (else it is this table's)."""
    base, _, model = key.partition("[")
    words = base.removesuffix("_s").replace("_", " ")
    return f"{words} ({model.removesuffix(']')})" if with_model and model else words


def _common_rows(ce, pp, ac, ag):
    """Metrics 1-4 as table rows."""
    return [
        (
            "cross-entropy (nats/token)",
            num(ce["val_loss"], ".6f"),
            f"true on val {ce['true_loss_val']:.6f}, expected {ce['optimal_loss']:.6f}",
            f"bigram (next-token counts on train) {ce['bigram_baseline']:.4f}, unigram {ce['unigram_loss']:.4f}, "
            f"uniform {ce['uniform_loss']:.4f}"
            + "".join(
                f", {key.removesuffix('_loss')} {value:.4f}" for key, value in ce.get("process_baselines", {}).items()
            ),
        ),
        ("excess over true on val (nats)", num(ce["excess"], ".6f"), "0", ""),
        (
            "learnable structure captured: (uniform − val) / (uniform − true on val)",
            num(ce["learnable_fraction"], ".2f", 100, " %"),
            "100 %",
            "uniform 0 %",
        ),
        (
            "% of optimum: true on val / val (the original scripts' score; high even for a uniform guess, so "
            "the row above is the headline)",
            num(ce["pct_of_optimum"], ".3f", unit=" %"),
            "100 %",
            f"uniform {100 * ce['true_loss_val'] / ce['uniform_loss']:.3f} %",
        ),
        (
            "perplexity",
            num(pp["perplexity"], ".4f"),
            f"{pp['true_perplexity_val']:.4f}",
            f"bigram {pp['bigram_perplexity']:.4f}, uniform {pp['uniform_perplexity']:.0f}",
        ),
        (
            "accuracy",
            num(ac["accuracy"], ".3f", 100, " %"),
            f"true model on val {100 * ac['true_accuracy_val']:.3f} %, expected {100 * ac['optimal_accuracy']:.3f} %",
            f"chance {100 * ac['chance']:.3f} %",
        ),
        (
            "agreement across seeds (top-1, JSD)",
            "n/a (one run)"
            if ag is None
            else f"{num(ag['top1_agreement'], '.2f', 100, ' %')}, {num(ag['mean_jsd'], '.6f')}",
            "100 %, 0",
            "",
        ),
    ]


def _by_position_row(by_position):
    """The loss at positions 1, 10, 100 and the last beside the expected optimum there, and where the model is
    furthest above the optimal predictor on the same val sequences."""
    model = ", ".join(f"{e['position']}: {num(e['val_loss'], '.4f')}" for e in by_position["at"])
    optimum = ", ".join(f"{e['position']}: {e['optimal_loss']:.4f}" for e in by_position["at"])
    furthest = ", ".join(f"{e['position']} ({e['excess']:+.4f})" for e in by_position["furthest_above_optimum"])
    return (
        "loss at position t (t: loss)",
        model,
        "expected " + optimum + (" (estimated)" if by_position["estimated"] else ""),
        f"furthest above the optimal predictor on these val sequences at {furthest}" if furthest else "",
    )


def _first_order_rows_md(tf, mp, worst, outputs_finite):
    """Metrics 5 and 6 as table rows."""
    if not outputs_finite:
        spread = NOT_FINITE
    elif mp["mean_spread"] is None:
        spread = "n/a"
    else:
        spread = f"{mp['mean_spread']:.6f}, {mp['max_spread']:.6f} (state {mp['max_spread_state']})"
    return [
        (
            "transition KL, prompts [BOS, s] (mean, π-weighted)",
            f"{num(tf['mean_kl'], '.6f')}, {num(tf['weighted_kl'], '.6f')}",
            "0",
            f"worst states: {worst}" if worst else "",
        ),
        (
            "transition KL, real val contexts (mean, π-weighted)",
            f"{num(tf['context_mean_kl'], '.6f')}, {num(tf['context_weighted_kl'], '.6f')}",
            "0",
            "",
        ),
        ("start distribution KL (after BOS)", num(tf["start_kl"], ".6f"), "0", ""),
        (
            "Markov spread: how much the prediction after a state changes with the states before it (mean, max)",
            spread,
            "0",
            f"{mp['contexts']} contexts, >= {mp['min_contexts_per_state']} per state",
        ),
    ]
