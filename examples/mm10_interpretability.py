"""Where does a trained GPT keep the transition matrix of the chain it learned?

    python examples/mm10_interpretability.py [OUT_DIR] [--max_iters N]

Generates MM-10, trains nanoMarkov's default recipe on it (under a minute on a
laptop CPU), exports the model to safetensors, reloads it with nanomarkov.load
(no pickle, no training code), looks inside it with TransformerLens (when the
interp extra is installed) and runs the ground-truth probes. Because the
chain is known exactly, every probe has a right answer: P itself.
"""

import argparse
import importlib.util
from pathlib import Path

import torch

import nanomarkov
from nanomarkov.checkpoint import export_safetensors
from nanomarkov.config import TrainConfig, preset
from nanomarkov.data import generate_dataset, load_dataset
from nanomarkov.interp import readouts as probes
from nanomarkov.interp.lens import to_hooked_transformer
from nanomarkov.train import train

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("out", nargs="?", default="examples_out", help="folder for everything (default examples_out/)")
parser.add_argument(
    "--max_iters", type=int, default=None, help="shorter training, e.g. for a test (default: the recipe's)"
)
args = parser.parse_args()
out = Path(args.out)

# 1. Data: a random 10-state chain; the dataset folder stores the chain itself (chain.npz).
generate_dataset(out / "data", 10, 10000, 1000)
data = load_dataset(out / "data")

# 2. Train the default recipe (one MLP-only block), all outputs inside OUT_DIR.
cfg = preset("default", 10) | {"data_dir": str(out / "data"), "out_dir": str(out / "run")}
if args.max_iters:  # keep the schedule consistent with the shorter run
    n = args.max_iters
    cfg |= {
        "max_iters": n,
        "lr_decay_iters": n,
        "warmup_iters": min(cfg["warmup_iters"], n),
        "eval_interval": min(cfg["eval_interval"], n),
    }
done = train(TrainConfig.from_dict(cfg, "example"), overwrite=True)
print(f"val loss {done['val_loss']:.6f}, optimum {done['optimal_loss']:.6f} nats/token")

# 3. Export and reload: this is the model a user of another tool would receive.
export_safetensors(out / "run" / "ckpt.pt", out / "export")
model = nanomarkov.load(out / "export")

# 3b. The same model as a TransformerLens HookedTransformer (the interp extra), where every
# activation is one run_with_cache away. The prompts [BOS, s] ask for row s of P.
if importlib.util.find_spec("transformer_lens") is None:
    print('TransformerLens part skipped: install it with pip install -e ".[interp]"')
else:
    hooked = to_hooked_transformer(model)
    k = data.chain.n_states
    prompts = torch.stack([torch.full((k,), k), torch.arange(k)], dim=1)
    logits, cache = hooked.run_with_cache(prompts)
    with torch.no_grad():
        gap = (logits - model(prompts)[0]).abs().max().item()
    print(f"TransformerLens max |logit - ours| = {gap:.2e}")
    # What each component wrote into the state token's residual stream, read out through the
    # final LayerNorm (its scale from the cache) and W_U: the pieces add up to the K x K logit
    # table (centred per row, as softmax ignores a shift). The share of that table along each
    # piece (they sum to 1) says which component stores the chain.
    stack, labels = cache.decompose_resid(pos_slice=-1, return_labels=True)
    parts = (cache.apply_ln_to_stack(stack, pos_slice=-1) * hooked.ln_final.w) @ hooked.W_U[:, :k]
    parts = parts - parts.mean(-1, keepdim=True)
    table = parts.sum(0)
    for label, part in zip(labels, parts):
        share = (part * table).sum() / table.square().sum()
        print(f"TransformerLens {label:<10} share of the logit table = {share:.6f}")

# 4. The probes, each against the true chain; every one returns arrays and has a plot.
tokens = data.val[:200]
readout = probes.transition_readout(model, data.chain)  # the whole model after [BOS, s]
direct = probes.direct_path(model, data.chain)  # embedding -> head, skipping the block
lens = probes.logit_lens(model, data.chain, tokens)  # each residual stream, read out
attention = probes.attention_summary(model, tokens)  # empty here: the default recipe is MLP-only
figures = {
    "transition_readout.png": probes.plot_transition_readout(readout),
    "direct_path.png": probes.plot_direct_path(direct),
    "logit_lens.png": probes.plot_logit_lens(lens),
    "attention_summary.png": probes.plot_attention_summary(attention),
}
for name, figure in figures.items():
    figure.savefig(out / name)

# 5. Where the matrix lives: if the direct path is already close to P, the embedding and
# unembedding hold the chain (a bigram table); what the block adds is the gap to the whole model.
print(f"whole model  mean KL(P_s || q_s) = {readout['kl'].mean():.6f} nats")
print(f"direct path  mean KL(P_s || q_s) = {direct['kl'].mean():.6f} nats")
for layer, kl in zip(lens["layers"], lens["kl_to_truth"]):
    print(f"logit lens   after {layer:<10} KL to truth = {kl:.6f} nats")
print(f"plots: {', '.join(str(out / name) for name in figures)}")
