"""A sparse autoencoder (SAELens) on a trained model's residual stream, scored against the true states.

    python examples/sae_features.py [OUT_DIR] [--max_iters N] [--sae_samples N]

On a first-order chain the ground truth of every position is known: the current state s,
which is all the next prediction depends on. Generates MM-10, trains nanoMarkov's default
recipe on it, collects the residual stream after the last block at every position of the val
sequences, trains a TopK SAE on it with SAELens 6 (SAETrainer on our own activations: no
TransformerLens model needed), then, for each state, finds the SAE feature that best matches
"the current state is s": its correlation with that indicator, and its AUROC (the chance that
the feature is larger at a random position in state s than at a random one elsewhere). The
same score with the states shuffled is what chance gives. Minutes at most on a laptop CPU.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig

import nanomarkov
from nanomarkov.config import TrainConfig, preset
from nanomarkov.data import generate_dataset, load_dataset
from nanomarkov.interp.linear_probes import residual_streams
from nanomarkov.train import train

N_STATES = 10
SEQ_LEN = 64


def train_model(out, max_iters=None, seed=42):
    """MM-10 in OUT/data, the default recipe (max_iters: shorter) in OUT/run; returns (model, dataset)."""
    generate_dataset(out / "data", N_STATES, 4000, 400, seq_len=SEQ_LEN, seed=seed)
    cfg = preset("default", N_STATES, seed=seed) | {"data_dir": str(out / "data"), "out_dir": str(out / "run")}
    if max_iters:  # keep the schedule consistent with the shorter run
        cfg |= {"max_iters": max_iters, "lr_decay_iters": max_iters, "eval_interval": max_iters}
        cfg["warmup_iters"] = min(cfg["warmup_iters"], max_iters)
    train(TrainConfig.from_dict(cfg | {"device": "cpu", "compile": False}, "example"), overwrite=True)
    return nanomarkov.load(out / "run" / "ckpt.pt"), load_dataset(out / "data")


def activations_and_states(model, tokens):
    """The last residual stream at every state position (BOS's left out): (n, d) float32 and (n,) states."""
    tokens = np.asarray(tokens)
    _, streams = residual_streams(model, tokens)
    acts = streams[-1][:, 1:]  # position t reads tokens[:, t]; t = 0 is BOS
    return torch.from_numpy(acts.reshape(-1, acts.shape[-1])), tokens[:, 1:-1].reshape(-1)


def random_batches(acts, batch_size, seed):
    """SAELens's data provider: an endless iterator of (batch_size, d) rows drawn from acts."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield acts[torch.randint(len(acts), (batch_size,), generator=generator)]


def train_sae(acts, n_samples=200_000, d_sae=4 * N_STATES, k=2, seed=0):
    """A TopK SAE (k features active per position) fit to acts with SAELens's SAETrainer."""
    torch.manual_seed(seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=acts.shape[1], d_sae=d_sae, k=k))
    cfg = SAETrainerConfig(
        total_training_samples=n_samples,
        train_batch_size_samples=256,
        lr=3e-3,
        lr_end=3e-4,  # the end of the cosine decay
        lr_scheduler_name="cosineannealing",
    )
    return SAETrainer(cfg, sae, random_batches(acts, 256, seed)).fit()


def auroc(scores, positive):
    """P(score at a positive > score at a negative), ties counted half (Mann-Whitney U / n_pos n_neg)."""
    values, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based rank of each distinct value, ties averaged
    ranks = average_rank[inverse]
    n_pos = positive.sum()
    n_neg = len(positive) - n_pos
    return (ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def best_features(features, states, n_states=N_STATES):
    """Per state: the feature best correlated with "the state is s", that correlation and its AUROC."""
    indicators = np.eye(n_states)[states]  # (n, K)
    centred_f = features - features.mean(0)
    centred_i = indicators - indicators.mean(0)
    norms = np.outer(np.linalg.norm(centred_f, axis=0), np.linalg.norm(centred_i, axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = np.nan_to_num((centred_f.T @ centred_i) / norms)  # (d_sae, K); a dead feature scores 0
    best = correlation.argmax(0)
    scores = np.array([auroc(features[:, best[s]], states == s) for s in range(n_states)])
    return {"feature": best, "correlation": correlation[best, np.arange(n_states)], "auroc": scores}


def score_sae(sae, acts, states, seed=0):
    """best_features of the SAE's features on acts, against the true states and against shuffled ones."""
    with torch.no_grad():
        features = sae.encode(acts).double().numpy()
    shuffled = np.random.default_rng(seed).permutation(states)
    return best_features(features, states), best_features(features, shuffled)


def main(argv=None):
    """Run it all and print the scores; returns what was scored: {"sae", "acts", "states", "true", "chance"}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="examples_out/sae", help="folder for data and run")
    parser.add_argument("--max_iters", type=int, default=None, help="shorter model training (default: the recipe's)")
    parser.add_argument("--sae_samples", type=int, default=200_000, help="activations the SAE trains on")
    args = parser.parse_args(argv)
    model, dataset = train_model(Path(args.out), args.max_iters)
    acts, states = activations_and_states(model, dataset.val)
    sae = train_sae(acts, args.sae_samples)
    true, chance = score_sae(sae, acts, states)
    for s in range(N_STATES):
        print(
            f"state {s}: best feature {true['feature'][s]:>3}, correlation {true['correlation'][s]:.3f}, "
            f"AUROC {true['auroc'][s]:.3f}"
        )
    print(f"distinct best features = {len(set(true['feature'].tolist()))} of {N_STATES} states")
    print(
        f"mean best correlation = {true['correlation'].mean():.4f} (shuffled states: {chance['correlation'].mean():.4f})"
    )
    print(f"mean best AUROC = {true['auroc'].mean():.4f} (shuffled states: {chance['auroc'].mean():.4f})")
    return {"sae": sae, "acts": acts, "states": states, "true": true, "chance": chance}


if __name__ == "__main__":
    main()
