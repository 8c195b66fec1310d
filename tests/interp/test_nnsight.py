"""nnsight on a nanoMarkov model: activation patching with a known causal answer.

A first-order chain's next state depends on the current state alone, so a model that learned
the chain, given a context ending in s whose last-position residual stream is replaced by the
one of a context ending in s', must predict row s' of P. The example examples/nnsight_patching.py
trains the model once (module fixture); the test patches with its own nnsight traces and checks
against P, then checks the numbers the example printed.
"""

import itertools
import re

import numpy as np
import pytest
import torch
from example_scripts import load_example, run_main

import nanomarkov
from nanomarkov.data import load_dataset

nnsight = pytest.importorskip("nnsight", reason='nnsight is in the interp extra: pip install -e ".[interp]"')

TRAIN_ITERS = 150


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The example run end to end with a short training: (example module, model, dataset, its stdout)."""
    example, out = load_example("nnsight_patching"), tmp_path_factory.mktemp("nnsight")
    _, printed = run_main(example, [str(out), "--max_iters", str(TRAIN_ITERS)])
    return example, nanomarkov.load(out / "run" / "ckpt.pt"), load_dataset(out / "data"), printed


def kl(p, q):
    """KL(p || q) in nats, numpy, rows of q against one row p."""
    return (p * (np.log(p) - np.log(q))).sum(-1)


def state_probs(logits, k):
    """Softmax over the K states (BOS dropped), float64 numpy."""
    return torch.softmax(logits[..., :k].double(), -1).numpy()


def patch(model, module_path, base, source, position=-1):
    """The model's next-state law after `base` with the stream at (module, position) copied from `source`."""
    traced = nnsight.NNsight(model)
    module = traced
    for part in module_path:
        module = module[part] if isinstance(part, int) else getattr(module, part)
    with torch.no_grad():
        with traced.trace(source):
            donor = module.output[:, position, :].save()
        with traced.trace(base):
            module.output[:, position, :] = donor
            logits = traced.output[0].save()
    return state_probs(logits[:, -1], model.config.vocab_size - 1)


def contexts(example, dataset):
    return [example.contexts_ending_in(dataset.val, s) for s in range(dataset.chain.n_states)]


def pairs(example, dataset):
    """(s, s', base contexts ending in s, source contexts ending in s'), equal counts, every ordered pair."""
    by_state = contexts(example, dataset)
    for s, s_prime in itertools.permutations(range(dataset.chain.n_states), 2):
        n = min(len(by_state[s]), len(by_state[s_prime]))
        assert n >= 20, "too few val contexts end in one state for a mean"
        yield s, s_prime, by_state[s][:n], by_state[s_prime][:n]


def model_error(model, example, dataset):
    """The trained model's own mean KL(P_s || q) after real contexts ending in s: the yardstick."""
    p, k = dataset.chain.transmat, dataset.chain.n_states
    with torch.no_grad():
        return np.mean(
            [kl(p[s], state_probs(model(x)[0][:, -1], k)).mean() for s, x in enumerate(contexts(example, dataset))]
        )


LAYERS = {"embed": ("drop",), "block 0": ("blocks", 0), "block 1": ("blocks", 1)}


@pytest.fixture(scope="module")
def patched(run):
    """{layer: [(s, s', the model's next-state law after contexts ending in s patched from ones ending in s')]}."""
    example, model, dataset, _ = run
    return {
        name: [(s, s_prime, patch(model, path, base, source)) for s, s_prime, base, source in pairs(example, dataset)]
        for name, path in LAYERS.items()
    }


def test_patching_the_last_position_makes_the_model_predict_row_s_prime(run, patched):
    example, model, dataset, _ = run
    p = dataset.chain.transmat
    error = model_error(model, example, dataset)
    # The model learned the chain: its own error is far below the rows' separation, so "follows
    # row s'" and "follows row s" cannot be confused.
    separation = min(kl(p[a], p[b]) for a, b in itertools.permutations(range(len(p)), 2))
    assert error < 0.05 < separation / 4, (error, separation)
    for name, results in patched.items():
        for s, s_prime, q in results:
            to_source, to_base = kl(p[s_prime], q).mean(), kl(p[s], q).mean()
            # A perfect patch moves the prediction exactly to the model's own one after s', whose
            # error is `error` on average; 3x it plus 0.01 nats leaves room for one pair being
            # harder than the mean, and stays far below the separation of any two rows.
            assert to_source < 3 * error + 0.01, (name, s, s_prime, to_source, error)
            # The prediction left row s: at least half of KL(P_s || P_s') remains.
            assert to_base > 0.5 * kl(p[s], p[s_prime]), (name, s, s_prime, to_base)


def test_patching_another_position_leaves_the_prediction_on_row_s(run):
    """The control: the same patch one position earlier, at the embeddings, leaves the prediction alone.

    Attention reads that position, so this fails for a model that uses more than the current state.
    """
    example, model, dataset, _ = run
    p = dataset.chain.transmat
    error = model_error(model, example, dataset)
    for s, s_prime, base, source in pairs(example, dataset):
        q = patch(model, LAYERS["embed"], base, source, position=-2)
        assert kl(p[s], q).mean() < 3 * error + 0.01
        assert kl(p[s_prime], q).mean() > 0.5 * kl(p[s_prime], p[s])


def printed(stdout, label):
    match = re.search(rf"^{re.escape(label)}.*?= ([0-9.]+) nats(, to row s = ([0-9.]+))?", stdout, re.MULTILINE)
    assert match, f"{label!r} not in:\n{stdout}"
    return [float(x) for x in match.group(1, 3) if x is not None]


def test_the_example_prints_the_patching_table_it_computed(run, patched):
    example, model, dataset, stdout = run
    p = dataset.chain.transmat
    assert printed(stdout, "unpatched")[0] == pytest.approx(model_error(model, example, dataset), abs=1e-6)
    for name, results in patched.items():
        expected = np.mean([(kl(p[s_prime], q).mean(), kl(p[s], q).mean()) for s, s_prime, q in results], axis=0)
        assert printed(stdout, f"patched at {name} ") == pytest.approx(expected, abs=1e-6)
