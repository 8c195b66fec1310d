"""Activation patching with nnsight, on a chain whose causal answer is known.

    python examples/nnsight_patching.py [OUT_DIR] [--max_iters N]

A first-order chain forgets everything but its current state: after a context ending in
state s the next state follows row s of the transition matrix P, whatever came before. So
patch the residual stream at the last position of a context ending in s with the one from a
context ending in s' (same length, so the same position): a model that learned the chain must
now predict row s' of P. Patched after a block, that only says the later layers read the last
position; patched at the embeddings, the attention layers could still read the earlier context
of the run being patched, and the answer is row s' only if the model ignores it, as the chain
does.

nnsight wraps nanoMarkov's own torch module (NNsight(model)): no conversion, no transformers
model. Generates a 4-state chain, trains a small two-layer GPT with attention (about a minute
on a laptop CPU; --max_iters shortens it), then for every layer and every ordered pair of
distinct states prints the mean KL of the patched prediction to row s' and to row s.
"""

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch
from nnsight import NNsight

import nanomarkov
from nanomarkov.config import TrainConfig
from nanomarkov.data import generate_dataset, load_dataset
from nanomarkov.evaluate import kl_terms, state_log_probs
from nanomarkov.train import train

N_STATES = 4
SEQ_LEN = 16  # BOS + 15 states: the model reads at most 15 positions
CONTEXT = 12  # contexts are the first CONTEXT tokens of val sequences, BOS included
RECIPE = dict(n_layer=2, n_head=2, n_embd=32, batch_size=32, learning_rate=1e-2, min_lr=1e-3, warmup_iters=20)


def train_model(out, max_iters=600, seed=3):
    """Generate the chain's dataset in OUT/data, train the small GPT in OUT/run; returns (model, dataset)."""
    generate_dataset(out / "data", N_STATES, 2000, 400, seq_len=SEQ_LEN, seed=seed)
    cfg = TrainConfig(
        data_dir=str(out / "data"),
        out_dir=str(out / "run"),
        max_iters=max_iters,
        lr_decay_iters=max_iters,
        eval_interval=max_iters,
        device="cpu",
        compile=False,
        seed=seed,
        **RECIPE,
    )
    train(cfg, overwrite=True, show_progress=False)
    return nanomarkov.load(out / "run" / "ckpt.pt"), load_dataset(out / "data")


def stream_modules(traced):
    """{layer name: the module whose output is that residual stream}, named as linear_probes names them."""
    modules = {"embed": traced.drop}  # drop's output is token + position embedding
    modules.update({f"block {i}": block for i, block in enumerate(traced.blocks)})
    return modules


def contexts_ending_in(tokens, state, length=CONTEXT):
    """The first `length` tokens of each sequence whose token at position length - 1 is `state`."""
    tokens = np.asarray(tokens)
    return torch.from_numpy(tokens[tokens[:, length - 1] == state, :length].astype(np.int64))


@torch.no_grad()
def patched_log_probs(traced, module, base, source):
    """log q over the states after `base`, its last-position stream at `module` taken from `source`.

    Two traces: the first saves the source's stream, the second writes it into the base run.
    """
    with traced.trace(source):
        donor = module.output[:, -1, :].save()
    with traced.trace(base):
        module.output[:, -1, :] = donor
        logits = traced.output[0].save()
    return state_log_probs(logits[:, -1], N_STATES)


def patching_table(model, dataset):
    """{layer: {"to_source", "to_base"}}: mean KL(P_s' || q) and KL(P_s || q) over pairs s != s'.

    Also "unpatched": the model's own mean KL(P_s || q) after contexts ending in s, the error the
    patched runs are to be compared with.
    """
    traced = NNsight(model)
    log_rows = torch.from_numpy(np.log(dataset.chain.transmat))
    contexts = [contexts_ending_in(dataset.val, s) for s in range(N_STATES)]
    table = {}
    for name, module in stream_modules(traced).items():
        to_source, to_base = [], []
        for s, s_prime in itertools.permutations(range(N_STATES), 2):
            n = min(len(contexts[s]), len(contexts[s_prime]))
            log_q = patched_log_probs(traced, module, contexts[s][:n], contexts[s_prime][:n])
            to_source.append(kl_terms(log_rows[s_prime].expand_as(log_q), log_q).mean().item())
            to_base.append(kl_terms(log_rows[s].expand_as(log_q), log_q).mean().item())
        table[name] = {"to_source": float(np.mean(to_source)), "to_base": float(np.mean(to_base))}
    with torch.no_grad():
        unpatched = [
            kl_terms(log_rows[s], state_log_probs(model(x)[0][:, -1], N_STATES)).mean().item()
            for s, x in enumerate(contexts)
        ]
    table["unpatched"] = float(np.mean(unpatched))
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="examples_out/nnsight", help="folder for data and run")
    parser.add_argument("--max_iters", type=int, default=600, help="training steps (default 600)")
    args = parser.parse_args(argv)
    model, dataset = train_model(Path(args.out), args.max_iters)
    table = patching_table(model, dataset)
    p = dataset.chain.transmat
    separation = np.mean([(p[a] * np.log(p[a] / p[b])).sum() for a, b in itertools.permutations(range(N_STATES), 2)])
    print(f"mean KL(P_s || P_s') over pairs       = {separation:.6f} nats (what a perfect patch shows to row s)")
    print(f"unpatched mean KL(P_s || q)            = {table['unpatched']:.6f} nats (the model's own error)")
    for name, row in table.items():
        if name != "unpatched":
            print(f"patched at {name:<8} KL to row s' = {row['to_source']:.6f} nats, to row s = {row['to_base']:.6f}")


if __name__ == "__main__":
    main()
