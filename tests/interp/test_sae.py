"""SAELens on a nanoMarkov model: a TopK SAE on the residual stream finds the chain's states.

examples/sae_features.py runs end to end with a short training (module fixture); the test
recomputes its scores independently (correlations with np.corrcoef, AUROC by comparing every
pair) and checks that the features recover the states far above what shuffled states give.
"""

import re

import numpy as np
import pytest
import torch
from example_scripts import load_example, run_main

pytest.importorskip("sae_lens", reason='SAELens is in the interp extra: pip install -e ".[interp]"')


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    example, out = load_example("sae_features"), tmp_path_factory.mktemp("sae")
    result, printed = run_main(example, [str(out), "--max_iters", "60", "--sae_samples", "30000"])
    return example, result, printed


def pairwise_auroc(scores, positive):
    """Every (positive, negative) pair compared: 1 if the positive scores higher, 1/2 on a tie."""
    pos, neg = scores[positive][:, None], scores[~positive][None, :]
    return ((pos > neg) + 0.5 * (pos == neg)).mean()


def test_auroc_matches_the_pairwise_count_with_ties():
    example = load_example("sae_features")
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 4, size=60).astype(float)  # many ties, as ReLU-like features have
        positive = rng.random(60) < 0.3
        assert example.auroc(scores, positive) == pytest.approx(pairwise_auroc(scores, positive), abs=1e-12)


def test_the_sae_features_recover_the_states_far_above_chance(run):
    example, result, stdout = run
    acts, states, best = result["acts"], result["states"], result["true"]["feature"]
    with torch.no_grad():
        features = result["sae"].encode(acts).double().numpy()
    k = example.N_STATES
    correlation = np.array([np.corrcoef(features[:, best[s]], states == s)[0, 1] for s in range(k)])
    rng = np.random.default_rng(1)
    sample = rng.choice(len(states), 2000, replace=False)  # pairwise AUROC on a subsample: n^2 memory
    auroc = np.array([pairwise_auroc(features[sample, best[s]], states[sample] == s) for s in range(k)])
    # Each state's best feature is close to its indicator. The stream is a function of the state and
    # the position, so an SAE may split a state over two features (one per range of positions):
    # the floors below leave room for that (measured over SAE seeds 0-2: worst correlation 0.52,
    # worst AUROC 0.85). With the states shuffled, the best of d_sae features correlates
    # ~sqrt(2 ln d_sae / n) ~ 0.02 by chance and its AUROC is ~0.5.
    assert correlation.min() > 0.4 and correlation.mean() > 0.8, correlation
    assert auroc.min() > 0.75 and auroc.mean() > 0.9, auroc
    assert len(set(best.tolist())) == k  # one feature per state
    assert result["chance"]["correlation"].mean() < 0.1
    assert abs(result["chance"]["auroc"].mean() - 0.5) < 0.1
    assert result["true"]["correlation"] == pytest.approx(correlation, abs=1e-6)
    printed = float(re.search(r"^mean best correlation = ([0-9.]+)", stdout, re.MULTILINE).group(1))
    assert printed == pytest.approx(correlation.mean(), abs=1e-4)
    printed = float(re.search(r"^mean best AUROC = ([0-9.]+)", stdout, re.MULTILINE).group(1))
    assert printed == pytest.approx(result["true"]["auroc"].mean(), abs=1e-4)
