"""k-th order Markov chains: construction, exact theory, vectorised sampling.

Same sequence format as `chains.MarkovChain`: `[BOS, x1, ..., x_{L-1}]` with
BOS = K. The first k states (x1..xk) are drawn jointly from `start`, a full
distribution over the K^k tuples; every later state x_t is drawn from
`transitions[x_{t-k}, ..., x_{t-1}]` (oldest first).

Why a joint start rather than a chain of lower-order starts (x1 ~ p1,
x2 ~ p2[x1], ...): the joint is the most general choice (every chain of
lower-order starts is one), it is one array instead of k, its conditionals are
exactly what the optimal predictor uses at positions 1..k, and the lifted
tuple chain (below) starts from it directly. The price is K^k start entries,
which the size limit on `transitions` already covers.

The tuple (x_{t-k+1}, ..., x_t) is itself a first-order Markov chain on K^k
states, the "lifted" chain; tuples are indexed by idx = sum_i x_i K^(k-1-i)
(oldest digit most significant), so one step is idx -> (idx*K + x) mod K^k.
"""

import re
from functools import cached_property

import numpy as np

from nanomarkov.errors import NanoMarkovError
from nanomarkov.memory import check_fits
from nanomarkov.processes.base import Option, Process
from nanomarkov.processes.markov import TRUE_LOSS_CHUNK, MarkovChain
from nanomarkov.processes.numerics import (
    alias_draw,
    alias_tables,
    check_distribution,
    check_random_parameters,
    entropy,
    evolve,
    random_rows,
    token_dtype,
)

# K^(k+1) transition entries at most (512 MiB in float64): beyond this the
# theory's per-position sweep and the alias tables stop being "moderate".
MAX_TRANSITION_ENTRIES = 2**26
# Tables of K^(k+1) float64 entries held at once at the peak of generation (the transitions, their
# alias tables, theory's temporaries): tracemalloc measured 5.7 for K = 40, order 3.
PEAK_TABLES = 6
# Lifted chains up to this many tuples get the exact linear solve of
# MarkovChain.stationary (dense K^k x K^k, about half a second at 1024); larger
# ones iterate the shift from `start` until it stops moving.
MAX_LIFTED_STATES = 1024
STATIONARY_MAX_STEPS = 20_000


def _check_size(n_states, order):
    entries = int(n_states) ** (int(order) + 1)  # Python ints: numpy integers would overflow silently
    if entries > MAX_TRANSITION_ENTRIES:
        raise NanoMarkovError(
            f"a k-th order chain with K={n_states}, order={order} has K^(k+1) = {entries} transition entries, "
            f"more than the limit {MAX_TRANSITION_ENTRIES} (2^26); use fewer states or a lower order"
        )
    check_fits(
        PEAK_TABLES * entries * 8,
        f"a k-th order chain with K={n_states}, order={order} ({PEAK_TABLES} float64 tables of K^(k+1) = "
        f"{entries:,} entries at once)",
        "use fewer states or a lower order",
    )


class KOrderChain(Process):
    """A k-th order Markov chain on states 0..K-1 with a joint start over the first k states.

    `transitions` has shape (K,)*(k+1): transitions[a_1, ..., a_k] is the
    distribution of the next state after the states a_1..a_k (oldest first).
    `start` has shape (K,)*k: the joint distribution of x1..xk. Both are float64
    and read-only; all theory is exact (linear algebra, no sampling).
    """

    process = "korder"
    SUMMARY = "k-th order chain (--order)"
    ARRAYS = ("transitions", "start")
    OPTIONS = (Option("order", int, 2, "states of context k (default 2)"),)
    # Measured in BENCHMARKS.md ("Default recipe per process"): the next state depends on the
    # last k states, which an MLP-only model cannot read, so one attention head gathers them.
    # One block with position embeddings, on the train split, at any K (the first-order rows
    # under it drop all three above K = 10).
    RECIPE = dict(
        mlp_only=False,
        n_layer=1,
        pos_ape=True,
        data_source="fixed",
        n_head=1,
        learning_rate=1e-2,
        min_lr=1e-4,
        max_iters=1500,
        lr_decay_iters=1500,
        eval_interval=500,
    )
    METRICS = ("optimal_fidelity", "korder_fidelity")
    chunk_sequences = TRUE_LOSS_CHUNK  # true_loss's sequences per chunk

    def options(self):
        return {"order": self.order}

    @classmethod
    def folder_name(cls, n_states, order=2):
        return f"mm{n_states}-order{order}"

    @classmethod
    def parse_folder_name(cls, name):
        match = re.fullmatch(r"mm(\d+)-order(\d+)", name)
        return (int(match.group(1)), {"order": int(match.group(2))}) if match else None

    def __init__(self, transitions, start):
        transitions = np.array(transitions, dtype=np.float64)
        start = np.array(start, dtype=np.float64)
        if transitions.ndim < 2 or len(set(transitions.shape)) != 1:
            raise NanoMarkovError(
                f"transitions must have shape (K,)*(order+1) with order >= 1, got shape {transitions.shape}"
            )
        n_states, order = transitions.shape[0], transitions.ndim - 1
        if n_states < 2:
            raise NanoMarkovError("a k-th order chain needs at least 2 states")
        _check_size(n_states, order)
        if start.shape != (n_states,) * order:
            raise NanoMarkovError(
                f"start must be the joint distribution of the first {order} states, shape {(n_states,) * order}, "
                f"got {start.shape}"
            )
        check_distribution("transitions rows", transitions)
        check_distribution("start", start.reshape(1, -1))
        transitions.flags.writeable = False
        start.flags.writeable = False
        self.transitions = transitions
        self.start = start
        self._tuple_marginals = {}  # seq_len -> tuple marginals; immutable chain, never stale

    @classmethod
    def random(cls, n_states, seed=42, alpha=1.0, sparsity=None, order=2):
        """A random chain: rows ~ Dirichlet(alpha), start ~ Dirichlet(1) over the K^k tuples.

        Sparse rows follow MarkovChain.random's rule (max(1, int(K*(100-S)/100))
        targets per row). The draws come in MarkovChain.random's order, so
        order 1 gives exactly MarkovChain.random(n_states, seed, ...).
        """
        check_random_parameters(n_states, alpha, sparsity)
        if not isinstance(order, (int, np.integer)) or order < 1:
            raise NanoMarkovError(f"order must be an integer >= 1, got {order!r}")
        _check_size(n_states, order)
        rng = np.random.default_rng(seed)
        n_rows = n_states**order
        start = rng.dirichlet(np.ones(n_rows))
        rows = random_rows(rng, n_rows, n_states, alpha, sparsity)
        shape = (n_states,) * order
        return cls(rows.reshape(shape + (n_states,)), start.reshape(shape))

    @property
    def n_states(self):
        return self.transitions.shape[0]

    @property
    def order(self):
        return self.transitions.ndim - 1

    def table_entries(self, seq_len):
        """The tuple marginals: one row of K^k per position."""
        return seq_len * self.n_tuples

    @property
    def n_tuples(self):
        return self.n_states**self.order

    @property
    def context_order(self):
        return self.order

    @property
    def rows(self):
        """The transitions as a (K^k, K) matrix, row idx = the flattened tuple index."""
        return self.transitions.reshape(self.n_tuples, self.n_states)

    # ------------------------------------------------------------- interop

    def to_markov_chain(self):
        """The equivalent MarkovChain (order 1 only: higher orders are not first-order over tokens)."""
        if self.order != 1:
            raise NanoMarkovError(
                f"only an order-1 chain is a MarkovChain over its tokens (this one has order {self.order}); "
                "lifted_chain() gives the first-order chain over k-tuples"
            )
        return MarkovChain(self.transitions, self.start)

    def lifted_chain(self):
        """The first-order MarkovChain over k-tuples, started from `start` (dense, K^k x K^k).

        Its state at step j is the tuple (x_j, ..., x_{j+k-1}); it shares the
        rows' entropies and so the entropy rate. Refused above MAX_LIFTED_STATES
        tuples, where the dense matrix and its exact solve get too costly.
        """
        n, k = self.n_tuples, self.n_states
        if n > MAX_LIFTED_STATES:
            raise NanoMarkovError(
                f"the lifted chain would have K^k = {n} states, more than MAX_LIFTED_STATES = {MAX_LIFTED_STATES}"
            )
        idx = np.arange(n)[:, None]
        transmat = np.zeros((n, n))
        transmat[idx, (idx * k + np.arange(k)) % n] = self.rows
        return MarkovChain(transmat, self.start.ravel())

    # ---------------------------------------------------------------- theory

    def _shift(self, mu):
        """One step of the lifted chain on a tuple distribution mu (K^k,), without the dense matrix.

        With idx = (oldest, rest), the next tuple is (rest, x): sum out the
        oldest digit of mu[idx] * rows[idx, x].
        """
        joint = mu[:, None] * self.rows
        return joint.reshape(self.n_states, -1).sum(axis=0)

    def stationary(self):
        """The stationary distribution of the last-k-state tuple, shape (K,)*k.

        Up to MAX_LIFTED_STATES tuples this is MarkovChain.stationary of the
        lifted chain: an exact solve, periodic and reducible chains included
        (the latter warn and use the long-run distribution from `start`).
        Larger lifted chains iterate the shift from `start` until it stops
        moving in float64, and refuse (rather than guess) if it never does.
        """
        return self._stationary.copy()

    @cached_property
    def _stationary(self):
        if self.n_tuples <= MAX_LIFTED_STATES:
            pi = self.lifted_chain().stationary()
        else:
            pi = self._iterated_stationary()
        return pi.reshape(self.start.shape)

    def _iterated_stationary(self):
        max_steps = STATIONARY_MAX_STEPS
        mu = self.start.ravel()
        for _ in range(max_steps):
            nxt = self._shift(mu)
            if np.abs(nxt - mu).sum() < 1e-15:
                return nxt
            mu = nxt
        raise NanoMarkovError(
            f"the tuple distribution of this chain (K^k = {self.n_tuples} tuples) did not settle in {max_steps} steps "
            f"(periodic or very slowly mixing), and it is too large (> {MAX_LIFTED_STATES} tuples) for the exact solve"
        )

    @cached_property
    def row_entropies(self):
        """H(transitions[tuple]) for each flattened tuple index: the loss of predicting from that context."""
        return entropy(self.rows, axis=1)

    def entropy_rate(self):
        """sum_tuple pi(tuple) H(row of tuple): the per-token loss of the true model far from the start."""
        return float(self._stationary.ravel() @ self.row_entropies)

    def _start_marginal(self, t):
        """The joint distribution of x1..xt (t <= k), shape (K,)*t."""
        return self.start.sum(axis=tuple(range(t, self.order))) if t < self.order else self.start

    def tuple_marginals(self, seq_len):
        """Distribution of (x_{t-k+1}, ..., x_t) for t = k..L-2, flattened: one row per position k+1..L-1 it predicts."""
        self.check_seq_len(seq_len)
        n_rows = max(0, seq_len - 1 - self.order)
        if seq_len not in self._tuple_marginals:
            self._tuple_marginals[seq_len] = evolve(self.start.ravel(), self._shift, n_rows)
        return self._tuple_marginals[seq_len]

    def _start_by_position(self, seq_len):
        """Loss and accuracy of the optimal predictor at positions 1..min(k, L-1), from the joint start.

        Position t predicts x_t from x1..x_{t-1} with the conditional of the
        start marginal; by the chain rule its expected loss is
        H(x1..xt) - H(x1..x_{t-1}), and it is right with probability
        sum over prefixes of max_x p(prefix, x).
        """
        losses, accuracies, previous = [], [], 0.0
        for t in range(1, min(self.order, seq_len - 1) + 1):
            marginal = self._start_marginal(t)
            joint_entropy = float(entropy(marginal.ravel()))
            losses.append(joint_entropy - previous)
            previous = joint_entropy
            accuracies.append(float(marginal.reshape(-1, self.n_states).max(axis=1).sum()))
        return np.array(losses), np.array(accuracies)

    def optimal_loss_by_position(self, seq_len):
        """Expected loss of the true model at each predicted position 1..L-1, exact: (losses, zeros).

        Positions 1..k cost the conditional entropies of the joint start;
        position t > k predicts from the last k states, whose tuple has
        distribution mu_{t-1}, and costs sum_tuple mu_{t-1}(tuple) H(row).
        """
        start_losses, _ = self._start_by_position(seq_len)
        losses = np.concatenate([start_losses, self.tuple_marginals(seq_len) @ self.row_entropies])
        return losses, np.zeros_like(losses)

    def optimal_accuracy(self, seq_len):
        """Expected top-1 accuracy of the true model (predicting each predictive distribution's argmax)."""
        _, start_accuracies = self._start_by_position(seq_len)
        later = self.tuple_marginals(seq_len) @ self.rows.max(axis=1)
        return float(np.concatenate([start_accuracies, later]).mean())

    def true_loss(self, tokens):
        """Exact cross-entropy of the true model on given BOS-led sequences (n, seq_len).

        The start conditionals at positions 1..m (m = min(k, L-1)) multiply to
        the start marginal of x1..xm, so their log-losses sum to its log.
        """
        tokens = self.check_tokens(tokens)
        k, m = self.order, min(self.order, tokens.shape[1] - 1)
        with np.errstate(divide="ignore"):
            log_start = np.log(self._start_marginal(m)).ravel()
            log_rows = np.log(self.rows)
        total, step = 0.0, self.chunk_sequences
        for lo in range(0, tokens.shape[0], step):
            states = np.asarray(tokens[lo : lo + step, 1:], dtype=np.int64)
            total -= log_start[self._tuple_index(states[:, :m])].sum()
            if states.shape[1] > k:
                # The context of x_t (t > k) is the window x_{t-k}..x_{t-1}: columns t-k-1 .. t-2 of `states`.
                windows = np.stack([states[:, i : states.shape[1] - k + i] for i in range(k)], axis=-1)
                total -= log_rows[self._tuple_index(windows), states[:, k:]].sum()
        return float(total / (tokens.shape[0] * (tokens.shape[1] - 1)))

    def optimal_log_probs(self, tokens):
        """The true model's next-state log-probs for BOS-led sequences (n, L): shape (n, L-1, K), float64.

        Entry [:, t] predicts tokens[:, t+1] from tokens[:, :t+1]: for t < k the
        conditional of the joint start given the t states so far, from t = k on
        the row of the last k states (-inf where a probability is 0). Its mean
        NLL on the sequences is exactly true_loss.
        """
        tokens = np.asarray(self.check_tokens(tokens), dtype=np.int64)
        states, k = tokens[:, 1:-1], self.order
        n, positions = tokens.shape[0], tokens.shape[1] - 1
        out = np.empty((n, positions, self.n_states))
        with np.errstate(divide="ignore"):
            for t in range(min(k, positions)):
                out[:, t] = np.log(self._start_conditionals[t])[self._tuple_index(states[:, :t])]
            if positions > k:
                windows = np.stack([states[:, i : states.shape[1] - k + 1 + i] for i in range(k)], axis=-1)
                out[:, k:] = np.log(self.rows)[self._tuple_index(windows)]
        return out

    @cached_property
    def _start_conditionals(self):
        """p(x_t | x1..x_{t-1}) for t = 1..k as (K^(t-1), K) tables; a prefix of probability 0 gets uniform."""
        tables = []
        for t in range(1, self.order + 1):
            joint = self._start_marginal(t).reshape(-1, self.n_states)
            mass = joint.sum(axis=1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                tables.append(np.where(mass > 0, joint / mass, 1.0 / self.n_states))
        return tables

    def _tuple_index(self, digits):
        """Flatten tuples along the last axis, oldest digit most significant."""
        index = np.zeros(digits.shape[:-1], dtype=np.int64)
        for i in range(digits.shape[-1]):
            index = index * self.n_states + digits[..., i]
        return index

    def unigram_loss(self):
        """H of the stationary single-state distribution (any coordinate of the stationary tuple)."""
        newest = self._stationary.reshape(-1, self.n_states).sum(axis=0)
        return float(entropy(newest))

    def first_order_rows(self):
        """The best predictor from the last state alone, in the stationary regime: P(x_t | x_{t-1}), (K, K).

        From the stationary tuple distribution times the rows, summed over the
        older states; a state of stationary probability 0 gets the uniform row.
        """
        k = self.n_states
        joint = (self.stationary().reshape(-1, 1) * self.rows).reshape(-1, k, k).sum(axis=0)  # (last, next)
        mass = joint.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(mass > 0, joint / mass, 1.0 / k)

    # ------------------------------------------------------- stage predictors

    def token_marginals(self, seq_len):
        """The law of x_t at t = 1..L-1, exact: the start's marginals up to k, then each tuple law times the rows."""
        self.check_seq_len(seq_len)
        m = min(self.order, seq_len - 1)
        axes = range(self.order)
        start = [self.start.sum(axis=tuple(a for a in axes if a != t)) for t in range(m)]
        return np.vstack([*start, self.tuple_marginals(seq_len) @ self.rows])

    def stage_losses(self, seq_len):
        """The base stages plus first_order: the best predictor of x_t from x_{t-1} alone (BOS before x1).

        At each position t it predicts with the true conditional P(x_t | x_{t-1})
        of that position (the start's joint law up to t = k, the tuple law after),
        costing H(x_{t-1}, x_t) - H(x_{t-1}); position 1 costs H(x1). Exact; for
        order 1 it is the optimum.
        """
        stages = super().stage_losses(seq_len)
        return {"uniform": stages["uniform"], "unigram": stages["unigram"]} | {
            "first_order": float(np.mean(self._first_order_by_position(seq_len))),
            "optimal": stages["optimal"],
        }

    def _first_order_pairs(self, seq_len):
        """The joint law of (x_{t-1}, x_t) at t = 2..L-1, (L-2, K, K): the start's up to t = k, the tuple law's after."""
        k, order = self.n_states, self.order
        pairs = []
        for t in range(2, min(order, seq_len - 1) + 1):  # (x_{t-1}, x_t) inside the start's joint law
            pairs.append(self.start.sum(axis=tuple(a for a in range(order) if a not in (t - 2, t - 1))))
        rows = self.rows.reshape(-1, k, k)  # (older digits, x_{t-1}, x_t)
        previous, joint = None, None
        for mu in self.tuple_marginals(seq_len):
            if previous is None or not np.array_equal(mu, previous):  # once the law settles, so does the pair
                joint = np.einsum("ab,abj->bj", mu.reshape(-1, k), rows)
            pairs.append(joint)
            previous = mu
        return np.array(pairs).reshape(-1, k, k)

    def _first_order_by_position(self, seq_len):
        """H(x_t | x_{t-1}) at t = 1..L-1 (H(x1) at t = 1), from the joint law of each adjacent pair."""
        losses = [float(entropy(self.token_marginals(seq_len)[0]))]
        losses += [
            float(entropy(pair.ravel()) - entropy(pair.sum(axis=1))) for pair in self._first_order_pairs(seq_len)
        ]
        return np.array(losses)

    def stage_log_probs(self, tokens):
        """The base stages plus first_order before the optimum: the law of x1 after BOS, then at each
        position t > 1 the true conditional P(x_t | x_{t-1}) of that position (stage_losses)."""
        stages = super().stage_log_probs(tokens)
        tokens = np.asarray(tokens, dtype=np.int64)
        pairs = self._first_order_pairs(tokens.shape[1])
        mass = pairs.sum(axis=2, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            # A previous state of probability 0 at that position never occurs: any row will do, uniform here.
            conditionals = np.log(np.where(mass > 0, pairs / mass, 1.0 / self.n_states))
            first = np.empty(stages["optimal"].shape)
            first[:, 0] = np.log(self.token_marginals(tokens.shape[1])[0])
        positions = np.arange(pairs.shape[0])
        first[:, 1:] = conditionals[positions, tokens[:, 1:-1]]
        optimal = stages.pop("optimal")
        return stages | {"first_order": first, "optimal": optimal}

    def skipped_metrics(self):
        return {
            "transition_fidelity": "defined for first-order chains; this is a k-th order chain "
            f"(order {self.order}), whose next state depends on the last k states: see korder_fidelity",
            "markov_property": "a first-order model's prediction should not depend on history before the "
            f"last state; an order-{self.order} chain's does, so the check does not apply",
        }

    # -------------------------------------------------------------- sampling

    @cached_property
    def _samplers(self):
        """Alias tables, flattened: the start conditionals for positions 1..k, then the transition rows.

        Position t <= k samples x_t from p(x_t | x1..x_{t-1}), a table of
        K^(t-1) rows; a prefix of probability zero is never reached, so its row
        is filled with the uniform distribution just to be a valid table.
        Returns (keep, alias, offsets): the row for context idx at position
        t (1-based, capped at k+1) starts at offsets[t-1] + idx*K.
        """
        tables, offsets, total = list(self._start_conditionals), [], 0
        tables.append(self.rows)
        for table in tables:
            offsets.append(total)
            total += table.size
        keep, alias = alias_tables(np.vstack(tables))
        return keep.ravel(), alias.ravel(), np.array(offsets, dtype=np.int64)

    def sample(self, n_sequences, seq_len, rng):
        """n_sequences BOS-led sequences of seq_len tokens, shape (n, seq_len).

        One uniform per token, as in MarkovChain.sample: each sequence takes a
        contiguous run of L-1 numbers from `rng`, so the bytes do not depend on
        how the sequences are chunked, and order 1 gives MarkovChain.sample's
        bytes exactly. The first k states come from the start's conditionals
        one at a time (the same joint), the rest from the rows.
        """
        self.check_seq_len(seq_len)
        k, n = self.n_states, self.n_tuples
        keep, alias, offsets = self._samplers
        uniforms = rng.random((n_sequences, seq_len - 1))
        out = np.empty((seq_len, n_sequences), dtype=token_dtype(self.vocab_size))
        out[0] = self.bos_token
        context = np.zeros(n_sequences, dtype=np.int64)  # the flattened tuple of the last min(t, k) states
        for t in range(seq_len - 1):
            state = alias_draw(keep, alias, offsets[min(t, self.order)] + context * k, uniforms[:, t], k)
            # Below k the prefix grows (idx*K + x < K^k); from k on the oldest digit drops off.
            context = (context * k + state) % n
            out[t + 1] = state
        return out.T
