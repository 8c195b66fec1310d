"""Processes made of other processes: factored (several side by side) and mixture (one per sequence).

factored  independent processes each emit a token per step; the joint token is their tuple, its
          index in row-major order (the first factor most significant), so K = K_1 * ... * K_m. The
          optimal predictor is the product of the factors' (log-probs add), and so is the law of
          every sequence: each theory number that is a sum over positions of expected log-losses
          is the sum of the factors'. The optimal accuracy is not: at each position it is
          E[prod_i max_x p_i(x | past_i)], which by independence is the product of the factors'
          accuracies at that position (exact where each factor's is, from its
          optimal_accuracy at every length), averaged over positions; a factor whose accuracy
          is estimated is sampled, and the number carries its standard error.
mixture   each sequence is drawn whole from one component, chosen by `weights`; the components
          share one vocabulary. The optimal predictor is the Bayes mixture: the posterior over
          components given the prefix times each component's own predictive law. Its expected
          loss and accuracy by position are Monte-Carlo estimates with their standard errors
          (each position's loss as the mean entropy of the mixture's predictive law over
          THEORY_SEQUENCES sampled prefixes); the entropy rate is the weighted mean of the
          components' (the posterior concentrates on the true component), and the stage
          "knows_component" (an oracle told the component) costs the weighted mean of the
          components' own optimal losses.

Both save their parts in chain.npz: "layout" (a JSON list of the parts' process names, and the
mixture's weights) and each part's arrays under "c{i}__{name}", so a composite of composites nests.
"""

import json
import math

import numpy as np

from nanomarkov.errors import NanoMarkovError
from nanomarkov.processes.base import LOOKBACK_RECIPE, WHOLE_HISTORY_RECIPE, Process
from nanomarkov.processes.markov import MarkovChain
from nanomarkov.processes.numerics import check_distribution, entropy, standard_error, token_dtype
from nanomarkov.processes.registry import process_class

# Prefixes sampled for a composite's estimated theory, and the seed they are drawn from.
THEORY_SEQUENCES = 2000
THEORY_SEED = 20250
# Entries of the float64 tables one batch of the mixture's theory holds (the rest are sampled in turn).
THEORY_BATCH_ENTRIES = 2**22
# The largest joint vocabulary: token ids and BOS must fit in uint32.
MAX_JOINT_STATES = 2**31
# The length at which a component with no stationary law gives its long-run token law (unigram_law).
LONG_RUN_LEN = 256


def packed(parts, **extra):
    """chain.npz's arrays of a composite: its layout (the parts' names and `extra`) and each part's arrays."""
    arrays = {"layout": np.array(json.dumps({"parts": [part.process for part in parts], **extra}))}
    for index, part in enumerate(parts):
        arrays.update({f"c{index}__{name}": np.asarray(value) for name, value in part.arrays().items()})
    return arrays


def unpacked(arrays):
    """(the parts, the layout dict) of what `packed` saved (a mapping such as an open .npz)."""
    layout = json.loads(str(np.asarray(arrays["layout"]).item()))
    parts = []
    for index, process in enumerate(layout["parts"]):
        prefix = f"c{index}__"
        own = {name[len(prefix) :]: arrays[name] for name in arrays if name.startswith(prefix)}
        parts.append(process_class(process).from_arrays(own))
    return parts, layout


def child_generators(rng, count):
    """`count` independent generators seeded from `rng`: one stream per part of a composite."""
    return [np.random.default_rng(int(seed)) for seed in rng.integers(0, 2**63, size=count)]


def log_sum_exp(values, axis):
    """log(sum(exp(values))) along `axis`, -inf where every term is -inf."""
    top = np.max(values, axis=axis, keepdims=True)
    shift = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(shift, axis=axis) + np.log(np.exp(values - shift).sum(axis=axis))


def outer(tables):
    """The row-major outer product of the last axes of `tables` (equal leading shapes): (..., prod of sizes)."""
    joint = tables[0]
    for table in tables[1:]:
        joint = (joint[..., :, None] * table[..., None, :]).reshape(*joint.shape[:-1], -1)
    return joint


def exact_accuracy_by_position(process, seq_len):
    """The optimal accuracy at each predicted position 1..L-1, from the mean accuracies A(n) at every length n:
    (n - 1) A(n) is the sum of the first n - 1 positions', so position t's is t A(t+1) - (t-1) A(t)."""
    means = np.array([process.optimal_accuracy(n) for n in range(2, seq_len + 1)])
    t = np.arange(1, seq_len)
    return np.clip(t * means - (t - 1) * np.concatenate([[0.0], means[:-1]]), 0.0, 1.0)


def long_run_law(process):
    """The long-run token law of a process: its stationary law where it has one (a k-th order chain's, of
    the last state), else its unigram law at LONG_RUN_LEN tokens."""
    try:
        law = process.stationary()
    except NotImplementedError:
        law = None
    if law is None:
        law = process.unigram_law(LONG_RUN_LEN)
    if law is None:
        raise NanoMarkovError(f"process {process.process} gives no long-run token law, which a mixture's unigram needs")
    return np.asarray(law, dtype=np.float64).reshape(-1, process.n_states).sum(axis=0)


class FactoredProcess(Process):
    """Independent processes side by side, the token their tuple (module docstring)."""

    process = "factored"
    SUMMARY = "independent processes side by side, the token their tuple (a spec's factors; from K: two random chains)"
    ARRAYS = ("layout",)  # and each factor's arrays, "c{i}__{name}"
    RECIPE = WHOLE_HISTORY_RECIPE
    BELIEF_STATES = True  # an instance's says whether every factor has beliefs
    HISTORY_REASON = "each factor's next token depends on that factor's own history"

    def __init__(self, factors):
        factors = tuple(factors)
        if not factors or not all(isinstance(factor, Process) for factor in factors):
            raise NanoMarkovError("a factored process needs at least one factor, each a process")
        self.factors = factors
        self.sizes = tuple(factor.n_states for factor in factors)
        if math.prod(self.sizes) > MAX_JOINT_STATES:
            raise NanoMarkovError(
                f"factors of K = {' x '.join(map(str, self.sizes))} make {math.prod(self.sizes):,} joint tokens, "
                f"more than {MAX_JOINT_STATES:,}; use fewer or smaller factors"
            )
        self.strides = tuple(math.prod(self.sizes[i + 1 :]) for i in range(len(self.sizes)))
        self.BELIEF_STATES = all(factor.BELIEF_STATES for factor in factors)
        self.accuracies = {}

    @classmethod
    def random(cls, n_states, seed=42, alpha=1.0, sparsity=None):
        """Two random first-order chains of K = a * b states (a the smallest divisor of K above 1), or one
        chain where K is prime; the factor i's chain drawn from seed + i."""
        divisor = next((a for a in range(2, math.isqrt(n_states) + 1) if n_states % a == 0), None)
        sizes = (n_states,) if divisor is None else (divisor, n_states // divisor)
        return cls(
            MarkovChain.random(size, (seed + i) % 2**32, alpha, sparsity) for i, size in enumerate(sizes)
        )  # fmt: skip

    def arrays(self):
        return packed(self.factors)

    @classmethod
    def from_arrays(cls, arrays):
        return cls(unpacked(arrays)[0])

    @property
    def n_states(self):
        return math.prod(self.sizes)

    @property
    def n_hidden(self):
        return math.prod(factor.n_hidden for factor in self.factors)

    def table_entries(self, seq_len):
        return max(super().table_entries(seq_len), *(factor.table_entries(seq_len) for factor in self.factors))

    def split(self, tokens):
        """Each factor's own BOS-led sequences of the joint ones."""
        tokens = np.asarray(self.check_tokens(tokens), dtype=np.int64)
        parts = []
        for factor, size, stride in zip(self.factors, self.sizes, self.strides):
            part = np.empty_like(tokens)
            part[:, 0] = factor.bos_token
            part[:, 1:] = tokens[:, 1:] // stride % size
            parts.append(part)
        return parts

    def sample(self, n_sequences, seq_len, rng):
        """Each factor samples its own sequences from its own stream (child_generators of `rng`)."""
        self.check_seq_len(seq_len)
        out = np.empty((n_sequences, seq_len), dtype=token_dtype(self.vocab_size))
        out[:, 0] = self.bos_token
        joint = np.zeros((n_sequences, seq_len - 1), dtype=np.int64)
        for factor, stride, stream in zip(self.factors, self.strides, child_generators(rng, len(self.factors))):
            joint += factor.sample(n_sequences, seq_len, stream)[:, 1:].astype(np.int64) * stride
        out[:, 1:] = joint
        return out

    def optimal_log_probs(self, tokens):
        joint = None
        for factor, part in zip(self.factors, self.split(tokens)):
            own = factor.optimal_log_probs(part)
            joint = own if joint is None else (joint[..., :, None] + own[..., None, :]).reshape(*own.shape[:2], -1)
        return joint

    def belief_states(self, tokens):
        """The outer product of the factors' beliefs, (n, L, prod of their n_hidden)."""
        if not self.BELIEF_STATES:
            raise NanoMarkovError("this factored process has a factor without belief states")
        return outer([factor.belief_states(part) for factor, part in zip(self.factors, self.split(tokens))])

    def optimal_loss_by_position(self, seq_len):
        by_factor = [factor.optimal_loss_by_position(seq_len) for factor in self.factors]
        losses = np.sum([losses for losses, _ in by_factor], axis=0)
        return losses, np.sqrt(np.sum([np.square(errors) for _, errors in by_factor], axis=0))

    def accuracy(self, seq_len):
        """(the optimal accuracy, its standard error): each position's the product of the factors' there, the
        exact ones from exact_accuracy_by_position, the others sampled together (module docstring)."""
        if seq_len not in self.accuracies:
            product, sampled = np.ones((1, seq_len - 1)), False
            for index, factor in enumerate(self.factors):
                if factor.standard_errors(seq_len).get("optimal_accuracy", 0.0) == 0.0:
                    product = product * exact_accuracy_by_position(factor, seq_len)
                    continue
                tokens = factor.sample(THEORY_SEQUENCES, seq_len, np.random.default_rng([THEORY_SEED, index]))
                product = product * np.exp(factor.optimal_log_probs(tokens).max(axis=2))
                sampled = True
            per_sequence = product.mean(axis=1)
            self.accuracies[seq_len] = (
                float(per_sequence.mean()),
                float(standard_error(per_sequence)) if sampled else 0.0,
            )
        return self.accuracies[seq_len]

    def optimal_accuracy(self, seq_len):
        return self.accuracy(seq_len)[0]

    def entropy_rate(self):
        return float(sum(factor.entropy_rate() for factor in self.factors))

    def unigram_loss(self):
        """The long-run joint token law is the product of the factors', so its entropy is the sum."""
        return float(sum(factor.unigram_loss() for factor in self.factors))

    def standard_errors(self, seq_len):
        """The factors' errors added in quadrature (their estimates are independent), and the accuracy's own."""
        errors = [factor.standard_errors(seq_len) for factor in self.factors]
        if not any(errors):
            return {}
        names = ("entropy_rate", "optimal_loss", "unigram_loss")
        combined = {
            name: float(np.sqrt(sum(error.get(name, 0.0) ** 2 for error in errors)))
            for name in names
            if any(name in error for error in errors)
        }
        return {**combined, "optimal_accuracy": self.accuracy(seq_len)[1]}

    def token_marginals(self, seq_len):
        marginals = [factor.token_marginals(seq_len) for factor in self.factors]
        return None if any(m is None for m in marginals) else outer([np.asarray(m) for m in marginals])

    def unigram_law(self, seq_len):
        """The mean joint law over positions where the marginals are known, else the product of the factors'."""
        marginals = self.token_marginals(seq_len)
        if marginals is not None:
            return marginals.mean(axis=0)
        laws = [factor.unigram_law(seq_len) for factor in self.factors]
        return None if any(law is None for law in laws) else outer([np.asarray(law) for law in laws])


class MixtureProcess(Process):
    """Each sequence drawn whole from one component, chosen by the weights (module docstring)."""

    process = "mixture"
    SUMMARY = "each sequence from one of several processes (a spec's components and weights; from K: two random chains)"
    ARRAYS = ("layout",)  # and each component's arrays, "c{i}__{name}"
    # Which component drew the sequence is in its counts so far, read best by the look-back recipe (0.0089 nats;
    # the whole-history recipe 0.016).
    RECIPE = LOOKBACK_RECIPE
    BELIEF_STATES = True
    HISTORY_REASON = "the next token depends on which component the sequence so far points to"

    def __init__(self, components, weights):
        components = tuple(components)
        if not components or not all(isinstance(component, Process) for component in components):
            raise NanoMarkovError("a mixture needs at least one component, each a process")
        sizes = [component.n_states for component in components]
        if len(set(sizes)) != 1:
            raise NanoMarkovError(
                f"the components of a mixture must share one vocabulary, got K = {', '.join(map(str, sizes))}; "
                "give components of the same K"
            )
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (len(components),):
            raise NanoMarkovError(
                f"a mixture of {len(components)} components needs as many weights, got {weights.shape}"
            )
        check_distribution("mixture weights", weights)
        self.components, self.weights = components, weights
        self.BELIEF_STATES = True
        self.estimates = {}

    @classmethod
    def random(cls, n_states, seed=42, alpha=1.0, sparsity=None):
        """Two random first-order chains of K states, drawn from seed and seed + 1, weighted alike."""
        chains = [MarkovChain.random(n_states, (seed + i) % 2**32, alpha, sparsity) for i in range(2)]
        return cls(chains, [0.5, 0.5])

    def arrays(self):
        return packed(self.components, weights=self.weights.tolist())

    @classmethod
    def from_arrays(cls, arrays):
        components, layout = unpacked(arrays)
        return cls(components, layout["weights"])

    @property
    def n_states(self):
        return self.components[0].n_states

    @property
    def n_hidden(self):
        """Every component's hidden states side by side where each has them, else the components themselves."""
        if all(component.BELIEF_STATES for component in self.components):
            return sum(component.n_hidden for component in self.components)
        return len(self.components)

    def table_entries(self, seq_len):
        own = (len(self.components) + 2) * seq_len * self.n_states
        return max(own, *(component.table_entries(seq_len) for component in self.components))

    def sample(self, n_sequences, seq_len, rng):
        """A component per sequence from `rng`, then each component's sequences from its own stream."""
        self.check_seq_len(seq_len)
        chosen = np.minimum(
            np.searchsorted(np.cumsum(self.weights), rng.random(n_sequences), side="right"), len(self.weights) - 1
        )
        out = np.empty((n_sequences, seq_len), dtype=token_dtype(self.vocab_size))
        for index, (component, stream) in enumerate(zip(self.components, child_generators(rng, len(self.weights)))):
            rows = np.flatnonzero(chosen == index)
            if len(rows):
                out[rows] = component.sample(len(rows), seq_len, stream)
        return out

    def log_posterior(self, tokens, log_probs):
        """log P(component | x_1..x_t) at every t = 0..L-1, (C, n, L), from each component's log_probs."""
        picked = np.stack([np.take_along_axis(lp, tokens[:, 1:, None], axis=2)[..., 0] for lp in log_probs])
        prefix = np.concatenate([np.zeros((*picked.shape[:2], 1)), np.cumsum(picked, axis=2)], axis=2)
        with np.errstate(divide="ignore"):
            joint = np.log(self.weights)[:, None, None] + prefix
        return joint - log_sum_exp(joint, axis=0)[None]

    def optimal_log_probs(self, tokens):
        """The Bayes mixture: log sum_c P(c | prefix) P_c(next | prefix)."""
        tokens = np.asarray(self.check_tokens(tokens), dtype=np.int64)
        log_probs = [component.optimal_log_probs(tokens) for component in self.components]
        posterior = self.log_posterior(tokens, log_probs)
        return log_sum_exp(posterior[:, :, :-1, None] + np.stack(log_probs), axis=0)

    def belief_states(self, tokens):
        """Each component's belief weighted by its posterior, side by side, where every component has beliefs;
        else the posterior over components. (n, L, n_hidden)."""
        tokens = np.asarray(self.check_tokens(tokens), dtype=np.int64)
        log_probs = [component.optimal_log_probs(tokens) for component in self.components]
        posterior = np.exp(self.log_posterior(tokens, log_probs))
        if not all(component.BELIEF_STATES for component in self.components):
            return np.moveaxis(posterior, 0, -1)
        beliefs = [p[..., None] * c.belief_states(tokens) for p, c in zip(posterior, self.components)]
        return np.concatenate(beliefs, axis=-1)

    def monte_carlo(self, seq_len):
        """(entropies, max probabilities) of the mixture's predictive law on THEORY_SEQUENCES sampled
        prefixes, each (n, L-1): their means are the optimal loss and accuracy by position."""
        if seq_len not in self.estimates:
            tokens = self.sample(THEORY_SEQUENCES, seq_len, np.random.default_rng(THEORY_SEED))
            batch = max(1, THEORY_BATCH_ENTRIES // ((len(self.components) + 2) * seq_len * self.n_states))
            entropies, maxima = [], []
            for start in range(0, len(tokens), batch):
                log_probs = self.optimal_log_probs(tokens[start : start + batch])
                probs = np.exp(log_probs)
                entropies.append(-(probs * np.where(probs > 0, log_probs, 0.0)).sum(axis=2))
                maxima.append(probs.max(axis=2))
            self.estimates[seq_len] = (np.concatenate(entropies), np.concatenate(maxima))
        return self.estimates[seq_len]

    def optimal_loss_by_position(self, seq_len):
        entropies = self.monte_carlo(seq_len)[0]
        return entropies.mean(axis=0), standard_error(entropies, axis=0)

    def optimal_accuracy(self, seq_len):
        return float(self.monte_carlo(seq_len)[1].mean())

    def entropy_rate(self):
        """The weighted mean of the components' entropy rates: the posterior concentrates on the true one."""
        return float(self.weights @ [component.entropy_rate() for component in self.components])

    def unigram_loss(self):
        """H of the long-run token law over sequences, the weighted mean of the components' long-run laws."""
        return float(entropy(self.weights @ np.stack([long_run_law(c) for c in self.components])))

    def standard_errors(self, seq_len):
        entropies, maxima = self.monte_carlo(seq_len)
        errors = [component.standard_errors(seq_len) for component in self.components]
        rate_se = np.sqrt(sum((w * e.get("entropy_rate", 0.0)) ** 2 for w, e in zip(self.weights, errors)))
        return {
            "entropy_rate": float(rate_se),
            "optimal_loss": float(standard_error(entropies.mean(axis=1))),
            "optimal_accuracy": float(standard_error(maxima.mean(axis=1))),
        }

    def token_marginals(self, seq_len):
        marginals = [component.token_marginals(seq_len) for component in self.components]
        if any(m is None for m in marginals):
            return None
        return np.tensordot(self.weights, np.stack(marginals), axes=1)

    def unigram_law(self, seq_len):
        laws = [component.unigram_law(seq_len) for component in self.components]
        return None if any(law is None for law in laws) else self.weights @ np.stack(laws)

    def stage_losses(self, seq_len):
        """The common stages, then knows_component: the oracle told the sequence's component, which pays only
        that component's own optimal loss (below the optimum, which must infer the component)."""
        stages = super().stage_losses(seq_len)
        own = [component.optimal_loss(seq_len) for component in self.components]
        return {**stages, "knows_component": float(self.weights @ own)}

    def stage_loss_errors(self, seq_len):
        errors = super().stage_loss_errors(seq_len)
        own = [c.standard_errors(seq_len).get("optimal_loss", 0.0) for c in self.components]
        return {**errors, "knows_component": float(np.sqrt(np.sum(np.square(self.weights * own))))}
