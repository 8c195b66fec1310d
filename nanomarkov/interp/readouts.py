"""Ground-truth probes: where in a trained GPT does the transition matrix live?

A Markov chain's next token depends on the current token alone, so the right
answer for every internal quantity below is known exactly: P[s] after state s,
startprob after BOS. Each probe returns a dict of numpy arrays and has a plot
function that draws it (matplotlib Figure, no pyplot: safe headless).

- transition_readout: the whole model on the prompts [BOS, s], against P.
- logit_lens: every residual stream (after the embeddings, after each block)
  read out through ln_f and the head, against the final output and against P.
- direct_path: embedding -> ln_f -> head alone, skipping every block, against P.
- attention_summary: how much each head attends to the current token, to
  earlier states and to BOS. A Markov chain needs only the current token.
- previous_token_scores, induction_scores: the circuits literature's two head
  scores (attention to the previous token; on repeated random sequences,
  repeated_random_tokens, to the token after the current one's earlier copy).

As in evaluation, a distribution "over the states" drops the BOS logit and
renormalises over the K states (BOS never follows anything), and KL(P_s || q)
treats 0 log 0 as 0. Probes run the model in eval mode without gradients and
leave its mode as they found it. Token arrays are BOS-led sequences as a
dataset stores them (e.g. dataset.val[:200]); the model reads seq[:-1].
"""

import math
from contextlib import contextmanager

import numpy as np
import torch
from matplotlib.figure import Figure

from nanomarkov.errors import NanoMarkovError
from nanomarkov.evaluate import kl_rows, kl_terms, state_log_probs

# Positions x vocabulary per forward batch: bounds memory (float64 logits, one copy per layer).
PROBE_BATCH_ELEMENTS = 1 << 21


@contextmanager
def _inference(model):
    """Eval mode (no dropout) and no gradients for the duration; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def _check_vocab(model, chain):
    if chain.transition_rows() is None:
        raise NanoMarkovError(
            f"this probe compares the model with a first-order transition matrix, which a "
            f"{chain.process} process does not have; see context_probe (korder) and "
            f"belief_state_probe (hmm)"
        )
    if model.config.vocab_size != chain.n_states + 1:
        raise NanoMarkovError(
            f"the model's vocabulary is {model.config.vocab_size} but the chain has "
            f"{chain.n_states} states + BOS; probe the model with the chain it was trained on"
        )


def _batches(model, tokens):
    """(B, T) input slices of BOS-led sequences, each batch small enough for PROBE_BATCH_ELEMENTS."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 3:
        raise NanoMarkovError(f"expected BOS-led sequences of shape (n, seq_len >= 3), got {tokens.shape}")
    bos = model.config.vocab_size - 1
    if np.any(tokens[:, 0] != bos) or np.any(tokens[:, 1:] >= bos) or np.any(tokens < 0):
        raise NanoMarkovError(f"every sequence must be BOS = {bos} followed by states 0..{bos - 1}")
    if tokens.shape[1] - 1 > model.config.block_size:
        raise NanoMarkovError(
            f"sequences of {tokens.shape[1]} tokens need block_size >= {tokens.shape[1] - 1}, "
            f"the model has {model.config.block_size}; pass tokens[:, :{model.config.block_size + 1}]"
        )
    per_batch = max(1, PROBE_BATCH_ELEMENTS // ((tokens.shape[1] - 1) * model.config.vocab_size))
    for lo in range(0, tokens.shape[0], per_batch):
        yield torch.from_numpy(np.asarray(tokens[lo : lo + per_batch, :-1], dtype=np.int64))


def forward_capturing(model, tokens, modules, inputs=False):
    """For each batch: (its input x on the CPU, [what each module returned, or received with inputs=True]).

    Forward hooks record the tensors during one ordinary forward pass, so nothing
    of the model's own computation is rewritten here. The caller's loop body
    runs inside the eval-mode, no-gradient context too.
    """
    captured = []
    if inputs:
        hooks = [m.register_forward_pre_hook(lambda module, args: captured.append(args[0])) for m in modules]
    else:
        hooks = [m.register_forward_hook(lambda module, args, out: captured.append(out)) for m in modules]
    try:
        with _inference(model) as device:
            for x in _batches(model, tokens):
                captured.clear()
                model(x.to(device))
                yield x, list(captured)
    finally:
        for hook in hooks:
            hook.remove()


# ------------------------------------------------------------ the whole model and the direct path


def readout(chain, learned):
    """{"learned", "true", "kl"} of learned rows q_s (K, K) against the chain's rows P_s after each state."""
    true = chain.transition_rows()[:-1]  # the last row is the one after BOS
    return {"learned": learned, "true": true, "kl": kl_rows(true, learned)}


def transition_readout(model, chain):
    """The model's next-state distribution after [BOS, s] for every state s, against P.

    Returns {"learned": (K, K) rows q_s, "true": P, "kl": (K,) KL(P_s || q_s)}.
    The same numbers as evaluation's learned_matrix and prompt KL.
    """
    _check_vocab(model, chain)
    k = chain.n_states
    with _inference(model) as device:
        prompts = torch.stack([torch.full((k,), k), torch.arange(k)], dim=1).to(device)
        learned = state_log_probs(model(prompts)[0][:, 1].cpu(), k).exp().numpy()
    return readout(chain, learned)


def direct_path(model, chain):
    """Embedding -> ln_f -> head alone for each state (no block at all), against P.

    This is the bigram a transformer can store in its embedding and unembedding
    (with a tied one-hot head it is the identity, so it holds nothing). With
    positional embeddings the state's input is wte[s] + wpe[1]: position 1 is
    where a state sits in the prompt [BOS, s]. Returns {"learned", "true", "kl"}
    as transition_readout does; for a model with n_layer=0 the two are the same.
    """
    _check_vocab(model, chain)
    k = chain.n_states
    with _inference(model):
        x = model.wte.weight[:k]
        if model.wpe is not None:
            x = x + model.wpe.weight[1]
        learned = state_log_probs(model.lm_head(model.ln_f(x)).cpu(), k).exp().numpy()
    return readout(chain, learned)


# ------------------------------------------------------------ logit lens


def logit_lens(model, chain, tokens):
    """Every residual stream read out through ln_f and the head, averaged over the given sequences.

    The streams are the embeddings (token + position, the input of block 0) and
    the output of each block, captured with forward hooks during one ordinary
    forward pass. For each, over all predicted positions t:
    kl_to_final = mean KL(model's final q_t || lens q_t), how far that layer is
    from the answer it ends with; kl_to_truth = mean KL(P[x_t] || lens q_t),
    with startprob after BOS, how far it is from the right answer. The last
    entry is the model's own output: its kl_to_final is 0, and its kl_to_truth
    is evaluation's context KL averaged over positions (the BOS one included).
    Returns {"layers": names, "kl_to_final": (n_layer+1,), "kl_to_truth": (n_layer+1,)}.
    """
    _check_vocab(model, chain)
    k = chain.n_states
    # Row x of the table is the true next-state distribution after token x (BOS = row K).
    with np.errstate(divide="ignore"):
        log_table = torch.from_numpy(np.log(chain.transition_rows()))
    modules = [model.drop, *model.blocks]  # drop's output is the embeddings' sum, the input of block 0
    to_final = np.zeros(len(modules))
    to_truth = np.zeros(len(modules))
    positions = 0
    for x, streams in forward_capturing(model, tokens, modules):
        lens = [state_log_probs(model.lm_head(model.ln_f(s)).cpu(), k) for s in streams]
        log_p = log_table[x]
        for i, log_q in enumerate(lens):
            to_final[i] += kl_terms(lens[-1], log_q).sum().item()
            to_truth[i] += kl_terms(log_p, log_q).sum().item()
        positions += x.numel()
    layers = ["embed"] + [f"block {i}" for i in range(len(model.blocks))]
    return {"layers": layers, "kl_to_final": to_final / positions, "kl_to_truth": to_truth / positions}


# ------------------------------------------------------------ attention


def _attention_weights(attn, h):
    """Attention weights (B, n_head, T, T) of a CausalSelfAttention on its input h (B, T, C).

    The forward pass uses a fused kernel that never materialises the weights,
    so they are recomputed here from the same c_attn projection, with the same
    1/sqrt(head_dim) scale and causal mask (or alibi's bias, which holds it;
    dropout is off in eval mode). The tests check that weights @ values
    reproduces the layer's own output.
    """
    B, T, C = h.shape
    q, k, _ = attn.c_attn(h).split(C, dim=2)
    q, k = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(C // attn.n_head)
    if attn.alibi:
        return (scores + attn.score_bias(T, h.device)).softmax(dim=-1)
    causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


def attention_layers(model):
    """The indices of the blocks that have attention (none in an MLP-only model or one of 0 layers)."""
    return np.array([i for i, block in enumerate(model.blocks) if block.attn is not None], dtype=int)


def attention_patterns(model, tokens):
    """For each batch of BOS-led sequences (the model reads seq[:-1]): (its input x, [the attention
    weights (B, n_head, T, T) of each attention layer, in block order]), from _attention_weights."""
    attns = [block.attn for block in model.blocks if block.attn is not None]
    for x, inputs in forward_capturing(model, tokens, attns, inputs=True):
        yield x, [_attention_weights(attn, h) for attn, h in zip(attns, inputs)]


def previous_token_scores(model, tokens):
    """Per attention layer and head, (n_attn_layers, n_head): the previous-token score, the attention
    weight from each query position t >= 1 to key t - 1 (BOS for t = 1), averaged over every such
    query of the given BOS-led sequences. 1 for a head that attends to the previous token alone."""
    sums, queries = np.zeros((attention_layers(model).size, model.config.n_head)), 0
    for x, weights in attention_patterns(model, tokens):
        for i, w in enumerate(weights):
            sums[i] += w.diagonal(offset=-1, dim1=-2, dim2=-1).sum((0, 2)).cpu().numpy()
        queries += x.size(0) * (x.size(1) - 1)
    return sums / max(queries, 1)


def repeated_random_tokens(n_states, n_sequences, half, rng):
    """(n_sequences, 2 half + 2) sequences [BOS, r_1..r_n, r_1..r_n, r_1], r_i i.i.d. uniform over the
    K states (n = half): a model reads [BOS, r, r]; the last r_1 is only the next token."""
    repeated = rng.integers(n_states, size=(n_sequences, half))
    bos = np.full((n_sequences, 1), n_states)
    return np.hstack([bos, repeated, repeated, repeated[:, :1]])


def induction_scores(model, tokens):
    """Per attention layer and head, (n_attn_layers, n_head): the induction score (Olsson et al. 2022)
    on repeated sequences from repeated_random_tokens, the attention weight from the second copy of
    r_i (position n + i) to the token after its first copy (position i + 1), averaged over i = 1..n
    and the sequences. 1 for a head that attends there alone."""
    half = (np.asarray(tokens).shape[1] - 2) // 2
    sums = np.zeros((attention_layers(model).size, model.config.n_head))
    for _, weights in attention_patterns(model, tokens):
        for i, w in enumerate(weights):
            # Row q = n + 1 + r of the second copy, column q - n + 1 = r + 2: the slice's diagonal at offset 2.
            sums[i] += w[:, :, half + 1 :].diagonal(offset=2, dim1=-2, dim2=-1).sum((0, 2)).cpu().numpy()
    return sums / max(np.asarray(tokens).shape[0] * half, 1)


def attention_summary(model, tokens):
    """Per layer and head, the mean attention weight on the current token, on earlier states, and on BOS.

    Averaged over the given sequences and every query position t >= 1 (at t = 0
    the only choice is BOS itself); for each query the three add up to 1. A
    head that has learned what a Markov chain needs puts its weight on the
    current token (or parks it on BOS, a no-op). The input of each attention
    layer is captured with a forward pre-hook; see _attention_weights for how
    the weights are recomputed from it. Returns {"current", "earlier", "bos"},
    each (n_layer, n_head), "previous" (the part of "earlier" on the state just
    before the query: a previous-token head, what an in-context or k-th order
    chain needs) and "layers" (block indices); all empty (shape (0, 0)) for an
    MLP-only model, which has no attention.
    """
    layers = attention_layers(model)
    if not layers.size:
        return {
            "current": np.zeros((0, 0)),
            "earlier": np.zeros((0, 0)),
            "bos": np.zeros((0, 0)),
            "previous": np.zeros((0, 0)),
            "layers": np.zeros(0, dtype=int),
        }
    sums = np.zeros((4, layers.size, model.config.n_head))  # current, earlier, bos, previous (a part of earlier)
    queries = 0
    for x, weights in attention_patterns(model, tokens):
        T = x.size(1)
        # Keys strictly between BOS and the query: the history a Markov chain does not need.
        history = torch.ones(T, T, dtype=torch.bool, device=weights[0].device).tril(-1)
        history[:, 0] = False
        for i, w in enumerate(weights):
            w = w[:, :, 1:]  # queries t >= 1
            sums[0, i] += w.diagonal(offset=1, dim1=-2, dim2=-1).sum((0, 2)).cpu().numpy()
            sums[1, i] += (w * history[1:]).sum((0, 2, 3)).cpu().numpy()
            sums[2, i] += w[..., 0].sum((0, 2)).cpu().numpy()
            # The state just before the query (key t-1 for queries t >= 2; at t = 1 that key is BOS).
            sums[3, i] += w.diagonal(dim1=-2, dim2=-1)[..., 1:].sum((0, 2)).cpu().numpy()
        queries += x.size(0) * (T - 1)
    current, earlier, bos, previous = sums / queries
    return {"current": current, "earlier": earlier, "bos": bos, "previous": previous, "layers": layers}


# ------------------------------------------------------------ plots


def _plot_against_truth(result, what):
    true, learned, kl = result["true"], result["learned"], result["kl"]
    fig = Figure(figsize=(15, 4.6), layout="constrained")
    axes = fig.subplots(1, 3)
    vmax = max(true.max(), learned.max())
    for ax, matrix, title in ((axes[0], true, f"true P (K={true.shape[0]})"), (axes[1], learned, what)):
        image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        fig.colorbar(image, ax=ax, shrink=0.85, label="probability")
        ax.set_title(title)
        ax.set_xlabel("next state j")
        ax.set_ylabel("current state i")
    axes[2].bar(np.arange(kl.size), kl, color="C1")
    axes[2].set_title(f"KL(P_s ‖ {what.split(':')[0]}), mean {kl.mean():.4g} nats")
    axes[2].set_xlabel("state s")
    axes[2].set_ylabel("nats")
    return fig


def plot_transition_readout(result):
    """True P, the model's readout after [BOS, s], and the KL per state."""
    return _plot_against_truth(result, "readout: model after [BOS, s]")


def plot_direct_path(result):
    """True P, embedding -> unembedding alone, and the KL per state."""
    return _plot_against_truth(result, "direct path: embed -> head, no blocks")


def plot_logit_lens(result):
    """KL to the final output and to the truth, layer by layer: where the answer forms."""
    fig = Figure(figsize=(7, 4.6), layout="constrained")
    ax = fig.subplots()
    steps = np.arange(len(result["layers"]))
    ax.plot(steps, result["kl_to_truth"], "o-", label="KL(true next-state dist ‖ lens)")
    ax.plot(steps, result["kl_to_final"], "s--", label="KL(final output ‖ lens)")
    ax.set_xticks(steps, result["layers"])
    ax.set_xlabel("residual stream after")
    ax.set_ylabel("mean KL (nats)")
    ax.set_title("logit lens")
    values = np.concatenate([result["kl_to_truth"], result["kl_to_final"]])
    if values.min() > 0 and values.max() / values.min() >= 10:  # log only where it shows the spread
        ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def plot_attention_summary(result):
    """One stacked bar per head: weight on the current token, earlier states, BOS."""
    fig = Figure(figsize=(max(6, 0.5 * result["current"].size + 2), 4.6), layout="constrained")
    ax = fig.subplots()
    if result["current"].size == 0:
        ax.text(0.5, 0.5, "no attention: an MLP-only model", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    labels = [f"L{layer}H{h}" for layer in result["layers"] for h in range(result["current"].shape[1])]
    bottom = np.zeros(len(labels))
    for key, colour in (("current", "C2"), ("earlier", "C3"), ("bos", "C7")):
        values = result[key].ravel()
        ax.bar(labels, values, bottom=bottom, color=colour, label=key)
        bottom += values
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean attention weight (queries t >= 1)")
    ax.set_title("where each head looks: a Markov chain needs only the current token")
    ax.legend()
    return fig
