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
first-order chains; for any other process they are null, the result's `skipped`
says why, and `optimal_fidelity` takes their place: the mean over every val
position of KL(optimal predictor || model). A k-th order chain (process
"korder") also gets `korder_fidelity`: the same KL over positions t > k, where
the context is complete, next to that of the best first-order predictor (what a
model that reads only the last state can reach at best).
"""

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nanomarkov.checkpoint import load_model
from nanomarkov.data import load_dataset
from nanomarkov.errors import NanoMarkovError
from nanomarkov.processes.markov import entropy

# Positions x vocabulary per evaluated batch: bounds memory for any K (~64 MB of float64 logits per model).
BATCH_ELEMENTS = 1 << 23
WORST_STATES = 5


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


def _state_log_probs(logits, n_states):
    """log q over the K states: BOS dropped, renormalised."""
    return F.log_softmax(logits[..., :n_states].double(), dim=-1)


class _Accumulator:
    """Running sums for one model over the val split."""

    def __init__(self, k):
        self.loss_sum = 0.0
        self.correct = 0
        self.kl_sum = np.zeros(k)  # sum over contexts ending in s of KL(P_s || q_t)
        self.count = np.zeros(k)  # contexts ending in s
        self.prob_sum = np.zeros((k, k))  # sum of q_t over contexts ending in s
        self.entropy_sum = np.zeros(k)  # sum of H(q_t) over contexts ending in s
        self.korder_kl_sum = 0.0  # korder: sum over full-context positions of KL(row || q_t)
        self.optimal_kl_sum = 0.0  # not first-order: sum over all positions of KL(optimal || q_t)


@torch.no_grad()
def evaluate_models(models, dataset, device="cpu"):
    """All six metrics for each model in `models` (a dict name -> module) on `dataset`.

    Each module maps idx (B, T) to (logits (B, T, K+1), _), as GPT does. Returns
    {name: result dict}; with two or more models each result carries the agreement.
    """
    chain, k = dataset.chain, dataset.chain.n_states
    markov, korder = chain.process == "markov", chain.process == "korder"
    order = getattr(chain, "order", 1)
    theory = dataset.meta["theory"]
    names = list(models)
    timings = {}
    started = time.perf_counter()

    if markov:
        p = torch.from_numpy(np.array(chain.transmat))
        row_entropy = torch.from_numpy(chain.row_entropies)
        # The true model's top-1 prediction is a lookup by the current token (BOS = row K).
        true_argmax = torch.from_numpy(np.argmax(np.vstack([chain.transmat, chain.startprob]), axis=1))
    elif korder:
        with np.errstate(divide="ignore"):
            first_order_log = torch.from_numpy(np.log(_first_order_rows(chain)))
    first_order_kl_sum, korder_positions = 0.0, 0
    acc = {name: _Accumulator(k) for name in names}
    pair_names = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    agree = {pair: [0, 0.0] for pair in pair_names}  # (top-1 agreements, summed JSD)
    true_correct = 0
    n_positions = 0
    batch = max(1, BATCH_ELEMENTS // ((dataset.seq_len - 1) * (k + 1)))

    for lo in range(0, dataset.val.shape[0], batch):
        tokens = torch.from_numpy(np.asarray(dataset.val[lo : lo + batch], dtype=np.int64))
        x, y = tokens[:, :-1], tokens[:, 1:]
        states = x[:, 1:]  # contexts ending in a state: every position after the BOS one
        n_positions += y.numel()
        if markov:
            true_correct += (true_argmax[x] == y).sum().item()
        else:
            optimal_log = torch.from_numpy(chain.optimal_log_probs(tokens.numpy()))  # (B, L-1, K)
            true_correct += (optimal_log.argmax(-1) == y).sum().item()
            if korder:
                full_log = optimal_log[:, order:]  # positions predicted from a full context of k states
                korder_positions += full_log.shape[0] * full_log.shape[1]
                first_order_kl_sum += _kl_terms(full_log, first_order_log[x[:, order:]]).sum().item()
        flat_states = states.reshape(-1).numpy()
        dists = {}
        for name in names:
            a = acc[name]
            # float64 from here on: the sums over a million positions keep every digit.
            logits = models[name](x.to(device))[0].cpu().double()
            a.loss_sum += F.cross_entropy(logits.reshape(-1, k + 1), y.reshape(-1), reduction="sum").item()
            a.correct += (logits.argmax(-1) == y).sum().item()
            log_q = _state_log_probs(logits, k)
            q = log_q.exp()
            dists[name] = (log_q, logits.argmax(-1))
            if not markov:
                kl = _kl_terms(optimal_log, log_q)
                a.optimal_kl_sum += kl.sum().item()
                if korder:
                    a.korder_kl_sum += kl[:, order:].sum().item()
                continue
            # Metric 5 on real contexts: KL(P_s || q_t) = -H(P_s) - sum_j P_sj log q_tj, s = current state.
            ctx_log_q, ctx_q = log_q[:, 1:], q[:, 1:]
            cross = -(p[states] * ctx_log_q).sum(-1)
            kl = (cross - row_entropy[states]).reshape(-1).numpy()
            # Metric 6: spread = mean_t KL(q_t || mean q) = H(mean q) - mean_t H(q_t), in one pass.
            h = -(ctx_q * ctx_log_q).sum(-1).reshape(-1).numpy()
            a.kl_sum += np.bincount(flat_states, weights=kl, minlength=k)
            a.count += np.bincount(flat_states, minlength=k)
            a.entropy_sum += np.bincount(flat_states, weights=h, minlength=k)
            np.add.at(a.prob_sum, flat_states, ctx_q.reshape(-1, k).numpy())
        for a_name, b_name in pair_names:
            (log_qa, top_a), (log_qb, top_b) = dists[a_name], dists[b_name]
            log_m = torch.logaddexp(log_qa, log_qb) - np.log(2)
            jsd = 0.5 * ((log_qa.exp() * (log_qa - log_m)).sum(-1) + (log_qb.exp() * (log_qb - log_m)).sum(-1))
            agree[(a_name, b_name)][0] += (top_a == top_b).sum().item()
            agree[(a_name, b_name)][1] += jsd.sum().item()
    timings["val_pass_s"] = time.perf_counter() - started

    started = time.perf_counter()
    bigram = bigram_baseline(dataset)
    timings["bigram_baseline_s"] = time.perf_counter() - started

    results = {}
    if not markov:
        for name in names:
            a = acc[name]
            val_loss = a.loss_sum / n_positions
            results[name] = {
                **_common_metrics(val_loss, a.correct / n_positions, true_correct / n_positions, theory, bigram, k),
                "transition_fidelity": None,
                "markov_property": None,
                "optimal_fidelity": {"positions": n_positions, "mean_kl": a.optimal_kl_sum / n_positions},
                "korder_fidelity": {
                    "order": order,
                    "positions": korder_positions,
                    "mean_kl": a.korder_kl_sum / korder_positions if korder_positions else None,
                    "first_order_kl": first_order_kl_sum / korder_positions if korder_positions else None,
                }
                if korder
                else None,
                "skipped": _skipped(chain),
                "arrays": {},
            }
        return _finish(results, names, pair_names, agree, n_positions, timings)
    pi = chain.stationary()
    for name in names:
        started = time.perf_counter()
        # Metric 5 on the clean prompts [BOS, s]: one batch of K two-token prompts.
        prompts = torch.stack([torch.full((k,), k), torch.arange(k)], dim=1)
        log_q = _state_log_probs(models[name](prompts.to(device))[0].cpu(), k)
        learned = log_q[:, 1].exp().numpy()
        learned_start = log_q[0, 0].exp().numpy()
        prompt_kl = _kl_rows(chain.transmat, learned)
        a = acc[name]
        seen = a.count > 0
        context_kl = np.where(seen, a.kl_sum / np.maximum(a.count, 1), np.nan)
        mean_q = a.prob_sum / np.maximum(a.count, 1)[:, None]
        spread = np.where(a.count > 1, entropy(mean_q, axis=1) - a.entropy_sum / np.maximum(a.count, 1), np.nan)
        spread = np.where(np.isnan(spread), np.nan, np.maximum(spread, 0.0))  # rounding can dip below 0
        val_loss = a.loss_sum / n_positions
        worst = np.argsort(-prompt_kl)[:WORST_STATES]
        has_spread = ~np.isnan(spread)
        results[name] = {
            **_common_metrics(val_loss, a.correct / n_positions, true_correct / n_positions, theory, bigram, k),
            "transition_fidelity": {
                "mean_kl": float(prompt_kl.mean()),
                "weighted_kl": float(pi @ prompt_kl),
                "context_mean_kl": float(np.nanmean(context_kl)),
                "context_weighted_kl": float(np.nansum(pi * context_kl) / pi[seen].sum()),
                "start_kl": float(_kl_rows(chain.startprob[None], learned_start[None])[0]),
                "worst_states": [
                    {"state": int(s), "kl": float(prompt_kl[s]), "stationary_prob": float(pi[s])} for s in worst
                ],
                "states_without_val_context": int((~seen).sum()),
            },
            "markov_property": {
                "mean_spread": float(np.nanmean(spread)) if has_spread.any() else None,
                "weighted_spread": float(np.nansum(pi * spread) / pi[has_spread].sum()) if has_spread.any() else None,
                "max_spread": float(np.nanmax(spread)) if has_spread.any() else None,
                "max_spread_state": int(np.nanargmax(spread)) if has_spread.any() else None,
                "contexts": int(a.count.sum()),
                "min_contexts_per_state": int(a.count.min()),
            },
            "optimal_fidelity": None,
            "korder_fidelity": None,
            "skipped": _skipped(chain),
            "arrays": {
                "learned_matrix": learned,
                "learned_start": learned_start,
                "prompt_kl": prompt_kl,
                "context_kl": context_kl,
                "spread": spread,
                "stationary": pi,
            },
        }
        timings[f"prompts_and_summary_s[{name}]"] = time.perf_counter() - started
    return _finish(results, names, pair_names, agree, n_positions, timings)


def _skipped(chain):
    """The metrics that do not apply to this process, each with the reason."""
    if chain.process == "markov":
        return {
            "optimal_fidelity": "a first-order chain's optimal predictor is its transition row: "
            "transition_fidelity reports that KL per state",
            "korder_fidelity": "defined for k-th order chains (process korder); this one is first-order",
        }
    if chain.process == "korder":
        return {
            "transition_fidelity": f"defined for first-order chains; this is a k-th order chain (order {chain.order}), "
            "whose next state depends on the last k states: see korder_fidelity",
            "markov_property": "a first-order model's prediction should not depend on history before the "
            f"last state; an order-{chain.order} chain's does, so the check does not apply",
        }
    why = {
        "icl": "each sequence has its own transition matrix, drawn from a prior",
        "hmm": "tokens are emissions of hidden states, and the next one depends on the belief over them",
    }
    reason = why.get(chain.process, f"process {chain.process} is not a first-order chain")
    return {
        "transition_fidelity": f"no fixed token-to-token matrix to compare with ({reason}): see optimal_fidelity",
        "markov_property": f"the optimal prediction depends on the whole history ({reason})",
        "korder_fidelity": "defined for k-th order chains (process korder)",
    }


# Theory keys of loss levels every process has; any other *_loss key is a process's own
# baseline (icl: oracle_loss, unigram_in_context_loss) and is shown beside them.
COMMON_LOSSES = ("optimal_loss", "true_loss_val", "unigram_loss", "uniform_loss")


def _common_metrics(val_loss, accuracy, true_accuracy, theory, bigram, k):
    """Metrics 1-3 (and agreement's slot), defined for every process."""
    return {
        "cross_entropy": {
            "val_loss": val_loss,
            "optimal_loss": theory["optimal_loss"],
            "true_loss_val": theory["true_loss_val"],
            "excess": val_loss - theory["true_loss_val"],
            "pct_of_optimum": 100 * theory["true_loss_val"] / val_loss,
            "learnable_fraction": (theory["uniform_loss"] - val_loss)
            / (theory["uniform_loss"] - theory["true_loss_val"]),
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


def _kl_terms(log_p, log_q):
    """KL(p || q) along the last axis from log-probabilities, with 0 log 0 = 0 (float64 tensors)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _first_order_rows(chain):
    """The best predictor from the last state alone, in the stationary regime: P(x_t | x_{t-1}), (K, K).

    From the stationary tuple distribution times the rows, summed over the
    older states; a state of stationary probability 0 gets the uniform row.
    """
    k = chain.n_states
    joint = (chain.stationary().reshape(-1, 1) * chain.rows).reshape(-1, k, k).sum(axis=0)  # (last, next)
    mass = joint.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mass > 0, joint / mass, 1.0 / k)


def _finish(results, names, pair_names, agree, n_positions, timings):
    """Agreement between runs and the timings, added to every result."""
    if pair_names:
        pairs = [
            {
                "a": a_name,
                "b": b_name,
                "top1_agreement": agree[(a_name, b_name)][0] / n_positions,
                "mean_jsd": agree[(a_name, b_name)][1] / n_positions,
            }
            for a_name, b_name in pair_names
        ]
        agreement = {
            "runs": names,
            "top1_agreement": float(np.mean([q["top1_agreement"] for q in pairs])),
            "mean_jsd": float(np.mean([q["mean_jsd"] for q in pairs])),
            "pairs": pairs,
        }
        for name in names:
            results[name]["agreement"] = agreement
    for name in names:
        results[name]["timing"] = {key: round(value, 3) for key, value in timings.items()}
    return results


def _kl_rows(p, q):
    """KL(p_i || q_i) for each row, with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return terms.sum(axis=1)


# ------------------------------------------------------------ checkpoints and files


def evaluate_checkpoints(ckpt_paths, data_dir=None, out=None, device="cpu"):
    """Evaluate checkpoints trained on one dataset; write eval.json, eval.md and arrays for each.

    Results go next to each checkpoint, or into `out` (one sub-folder per run when
    there are several). Returns [(output folder, result)].
    """
    loaded = [(Path(path), *load_model(path)) for path in ckpt_paths]
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
        if ckpt.get("dataset_sha256") not in (None, dataset.meta["sha256"]):
            raise NanoMarkovError(f"{path} was trained on other data than {data_path} (sha256 differs)")
        if model.config.vocab_size != dataset.vocab_size:
            raise NanoMarkovError(
                f"{path} has vocabulary {model.config.vocab_size}, {data_path} has {dataset.vocab_size}"
            )
        models[str(path)] = model.to(device)
    results = evaluate_models(models, dataset, device)
    written = []
    for path, _, ckpt in loaded:
        if out is None:
            folder = path.parent
        else:
            folder = Path(out) if len(loaded) == 1 else Path(out) / path.parent.name
        result = results[str(path)]
        result["run"] = {
            "checkpoint": str(path),
            "dataset": data_path,
            "iter": ckpt.get("iter"),
            "n_states": dataset.chain.n_states,
            "process": dataset.chain.process,
            "order": getattr(dataset.chain, "order", 1),
            "seq_len": dataset.seq_len,
            "val_sequences": dataset.val.shape[0],
            "seed": ckpt.get("config", {}).get("seed"),
        }
        write_eval(result, folder)
        written.append((folder, result))
    return written


def write_eval(result, folder):
    """eval.json (every number), eval.md (a table), learned_matrix.npy and per_state.npz."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = result["arrays"]
    record = {k: v for k, v in result.items() if k != "arrays"}
    record["files"] = {}
    if "learned_matrix" in arrays:  # first-order chains only: a k-th order chain has no K x K matrix to learn
        np.save(folder / "learned_matrix.npy", arrays["learned_matrix"])
        np.savez(folder / "per_state.npz", **{k: v for k, v in arrays.items() if k != "learned_matrix"})
        record["files"] = {"learned_matrix": "learned_matrix.npy", "per_state": "per_state.npz"}
    (folder / "eval.json").write_text(json.dumps(record, indent=2) + "\n")
    (folder / "eval.md").write_text(format_eval(result) + "\n")


def format_eval(result):
    """The metrics as a markdown table, each next to its optimum and baselines."""
    run, ce, pp, ac = result.get("run", {}), result["cross_entropy"], result["perplexity"], result["accuracy"]
    tf, mp, ag = result["transition_fidelity"], result["markov_property"], result["agreement"]
    kf, skipped = result.get("korder_fidelity"), result.get("skipped", {})
    rows = [
        (
            "cross-entropy (nats/token)",
            f"{ce['val_loss']:.6f}",
            f"true on val {ce['true_loss_val']:.6f}, expected {ce['optimal_loss']:.6f}",
            f"bigram {ce['bigram_baseline']:.4f}, unigram {ce['unigram_loss']:.4f}, uniform {ce['uniform_loss']:.4f}"
            + "".join(
                f", {key.removesuffix('_loss')} {value:.4f}" for key, value in ce.get("process_baselines", {}).items()
            ),
        ),
        ("excess over true (nats)", f"{ce['excess']:.6f}", "0", ""),
        ("% of optimum (true/val)", f"{ce['pct_of_optimum']:.3f} %", "100 %", ""),
        ("learnable structure captured", f"{100 * ce['learnable_fraction']:.2f} %", "100 %", "uniform 0 %"),
        (
            "perplexity",
            f"{pp['perplexity']:.4f}",
            f"{pp['true_perplexity_val']:.4f}",
            f"bigram {pp['bigram_perplexity']:.4f}, uniform {pp['uniform_perplexity']:.0f}",
        ),
        (
            "accuracy",
            f"{100 * ac['accuracy']:.3f} %",
            f"true model on val {100 * ac['true_accuracy_val']:.3f} %, expected {100 * ac['optimal_accuracy']:.3f} %",
            f"chance {100 * ac['chance']:.3f} %",
        ),
        (
            "agreement across seeds (top-1, JSD)",
            "n/a (one run)" if ag is None else f"{100 * ag['top1_agreement']:.2f} %, {ag['mean_jsd']:.6f}",
            "100 %, 0",
            "",
        ),
    ]
    of = result.get("optimal_fidelity")
    if of is not None:
        rows.append(("KL(optimal predictor ‖ model), all positions", f"{of['mean_kl']:.6f}", "0", ""))
    if kf is not None and kf["mean_kl"] is not None:
        rows.append(
            (
                f"order-{kf['order']} KL(row of last {kf['order']} states ‖ model), positions t > {kf['order']}",
                f"{kf['mean_kl']:.6f}",
                "0",
                f"best first-order predictor {kf['first_order_kl']:.6f}",
            )
        )
    if tf is not None:
        worst = ", ".join(f"{w['state']} ({w['kl']:.4f})" for w in tf["worst_states"])
        rows += _first_order_rows_md(tf, mp, worst)
    title = f"# Evaluation of {run['checkpoint']}" if run else "# Evaluation"
    kind = f", order {run['order']}" if run.get("process") == "korder" else ""
    head = (
        (
            f"dataset {run['dataset']}: K={run['n_states']}{kind}, {run['val_sequences']} val sequences of "
            f"{run['seq_len']} tokens; checkpoint at iter {run['iter']}"
        )
        if run
        else ""
    )
    lines = [title, "", head, "", "| metric | model | optimum | baselines |", "|---|---:|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    skipped_lines = [f"- skipped {name}: {why}" for name, why in skipped.items() if result.get(name) is None]
    lines += [""] + skipped_lines if skipped_lines else []
    timing = result.get("timing", {})
    if timing:
        lines += ["", "time: " + ", ".join(f"{k} {v:.2f}s" for k, v in timing.items())]
    return "\n".join(lines)


def _first_order_rows_md(tf, mp, worst):
    """Metrics 5 and 6 as table rows."""
    return [
        (
            "transition KL, prompts [BOS, s] (mean, π-weighted)",
            f"{tf['mean_kl']:.6f}, {tf['weighted_kl']:.6f}",
            "0",
            f"worst states: {worst}",
        ),
        (
            "transition KL, real val contexts (mean, π-weighted)",
            f"{tf['context_mean_kl']:.6f}, {tf['context_weighted_kl']:.6f}",
            "0",
            "",
        ),
        ("start distribution KL (after BOS)", f"{tf['start_kl']:.6f}", "0", ""),
        (
            "Markov spread across histories (mean, max)",
            "n/a"
            if mp["mean_spread"] is None
            else f"{mp['mean_spread']:.6f}, {mp['max_spread']:.6f} (state {mp['max_spread_state']})",
            "0",
            f"{mp['contexts']} contexts, >= {mp['min_contexts_per_state']} per state",
        ),
    ]
