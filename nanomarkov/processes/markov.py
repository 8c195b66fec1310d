"""Markov chains: construction, exact theory, vectorised sampling.

Everything here speaks the sequence format of the datasets: a sequence of
`seq_len` tokens is `[BOS, x1, ..., x_{L-1}]` with BOS = K (one past the last
state), x1 ~ startprob and x_t ~ transmat[x_{t-1}]. A model sees `seq[:-1]`
and predicts `seq[1:]`, so L - 1 positions are predicted per sequence; every
loss below is in nats per predicted token.

Shared behaviour (BOS, vocabulary, checks, the theory dict) comes from
processes.base.Process, the contract every process follows.
"""

import pickle
import warnings
from functools import cached_property
from pathlib import Path

import numpy as np

from nanomarkov.errors import NanoMarkovError
from nanomarkov.memory import check_fits
from nanomarkov.processes.base import Process
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

# Sequences per chunk of true_loss: bounds its memory for any number of sequences.
TRUE_LOSS_CHUNK = 16384
# A K x K float64 matrix above this many bytes is refused before it is drawn.
MAX_MATRIX_BYTES = 8 << 30
# K x K float64 matrices a chain holds at once at its peak: the chain, then its theory's temporaries
# (entropies, reachability) or its alias tables beside it. tracemalloc measured 4.4 for
# `nanomarkov generate 1500` (drawing, theory, sampling) and 3.8 for loading that dataset.
PEAK_MATRICES = 5


class MarkovChain(Process):
    """A first-order Markov chain on states 0..K-1 with a start distribution.

    The transition matrix and start distribution are float64 and read-only;
    all theory is exact (linear algebra, no sampling).
    """

    process = "markov"
    SUMMARY = "first-order chain (default)"
    ARRAYS = ("transmat", "startprob")
    METRICS = ("transition_fidelity", "markov_property")
    FOLDER_PREFIX = "mm"  # the seed's data/mm{K}
    chunk_sequences = TRUE_LOSS_CHUNK  # true_loss's sequences per chunk

    def __init__(self, transmat, startprob):
        self.check_memory(np.shape(transmat)[0] if np.ndim(transmat) == 2 else 0)
        transmat = np.array(transmat, dtype=np.float64)
        startprob = np.array(startprob, dtype=np.float64)
        if transmat.ndim != 2 or transmat.shape[0] != transmat.shape[1]:
            raise NanoMarkovError(f"transmat must be a square matrix, got shape {transmat.shape}")
        if transmat.shape[0] < 2:
            raise NanoMarkovError("a Markov chain needs at least 2 states")
        if startprob.shape != (transmat.shape[0],):
            raise NanoMarkovError(
                f"startprob must have shape ({transmat.shape[0]},) to match transmat, got {startprob.shape}"
            )
        check_distribution("transmat rows", transmat)
        check_distribution("startprob", startprob)
        transmat.flags.writeable = False
        startprob.flags.writeable = False
        self.transmat = transmat
        self.startprob = startprob
        self._marginals = {}  # seq_len -> state_marginals; the chain is immutable, so this never goes stale

    @classmethod
    def random(cls, n_states, seed=42, alpha=1.0, sparsity=None):
        """A random chain: rows ~ Dirichlet(alpha), startprob ~ Dirichlet(1).

        With `sparsity` S (percent), each row keeps max(1, int(K*(100-S)/100))
        targets chosen uniformly without replacement (the seed's rule) and puts
        Dirichlet(alpha) weights on them. Same arguments, same chain.
        """
        check_random_parameters(n_states, alpha, sparsity)
        if n_states * n_states * 8 > MAX_MATRIX_BYTES:
            raise NanoMarkovError(
                f"K = {n_states} needs a {n_states}x{n_states} float64 matrix (over 8 GiB); use a smaller K"
            )
        cls.check_memory(n_states)
        rng = np.random.default_rng(seed)
        startprob = rng.dirichlet(np.ones(n_states))
        return cls(random_rows(rng, n_states, n_states, alpha, sparsity), startprob)

    @staticmethod
    def check_memory(n_states):
        """Refuse, before drawing or copying it, a chain of K = n_states whose PEAK_MATRICES K x K matrices
        will not fit in the memory free."""
        check_fits(
            PEAK_MATRICES * n_states * n_states * 8,
            f"K = {n_states}'s chain and its theory ({PEAK_MATRICES} {n_states}x{n_states} float64 matrices at once)",
            "use a smaller K",
        )

    @property
    def n_states(self):
        return self.transmat.shape[0]

    # ---------------------------------------------------------------- theory

    def stationary(self):
        """The stationary distribution pi (pi P = pi), solved exactly.

        A chain with one closed class (periodic or not) has exactly one. A
        chain with several closed classes has many; then this warns and
        returns the one the process actually settles into from `startprob`:
        each closed class's own stationary distribution, weighted by the
        probability of ending up in that class.
        """
        return self._stationary.copy()

    @cached_property
    def _stationary(self):
        k = self.n_states
        reach = (self.transmat > 0) | np.eye(k, dtype=bool)
        # Transitive closure by repeated squaring: log2(K) boolean products.
        while True:
            closed = (reach.astype(np.float32) @ reach.astype(np.float32)) > 0
            if np.array_equal(closed, reach):
                break
            reach = closed
        # i is recurrent iff everything it reaches reaches it back.
        recurrent = np.all(reach <= reach.T, axis=1)
        classes = np.unique(reach[recurrent], axis=0)
        if len(classes) == 1:
            return self._class_stationary(classes[0])
        warnings.warn(
            f"the chain has {len(classes)} closed classes, so its stationary distribution is not unique; "
            "using the long-run distribution reached from startprob",
            stacklevel=3,
        )
        transient = ~recurrent
        q = self.transmat[np.ix_(transient, transient)]
        pi = np.zeros(k)
        for members in classes:
            into_class = self.transmat[np.ix_(transient, members)].sum(axis=1)
            absorbed = np.linalg.solve(np.eye(q.shape[0]) - q, into_class) if q.size else into_class
            weight = self.startprob[members].sum() + self.startprob[transient] @ absorbed
            pi += weight * self._class_stationary(members)
        return pi

    def _class_stationary(self, members):
        """Stationary distribution of the chain restricted to one closed class."""
        sub = self.transmat[np.ix_(members, members)]
        n = sub.shape[0]
        # pi (P - I) = 0 has rank n-1 on an irreducible class; replacing one
        # equation by sum(pi) = 1 makes the system square and non-singular.
        system = sub.T - np.eye(n)
        system[-1] = 1.0
        rhs = np.zeros(n)
        rhs[-1] = 1.0
        pi = np.zeros(self.n_states)
        pi[members] = np.clip(np.linalg.solve(system, rhs), 0.0, None)
        return pi / pi.sum()

    @cached_property
    def row_entropies(self):
        """H(P_s) for each state s: the loss of predicting the next token from s."""
        return entropy(self.transmat, axis=1)

    def entropy_rate(self):
        """sum_s pi_s H(P_s): the per-token loss of the true model far from the start."""
        return float(self.stationary() @ self.row_entropies)

    def state_marginals(self, seq_len):
        """mu_t for t = 1..L-1: the distribution of x_t (row t-1), mu_1 = startprob."""
        self.check_seq_len(seq_len)
        if seq_len not in self._marginals:
            self._marginals[seq_len] = evolve(self.startprob, lambda mu: mu @ self.transmat, seq_len - 1)
        return self._marginals[seq_len]

    def token_marginals(self, seq_len):
        """The law of x_t at t = 1..L-1, exact (the unigram stage of stage_losses)."""
        return self.state_marginals(seq_len)

    def optimal_loss_by_position(self, seq_len):
        """Expected loss of the true model at each predicted position 1..L-1, exact: (losses, zeros).

        Position 1 predicts x1 from BOS and costs H(startprob); position t > 1
        predicts x_t from x_{t-1} ~ mu_{t-1} and costs sum_s mu_{t-1}(s) H(P_s).
        """
        marginals = self.state_marginals(seq_len)
        losses = np.concatenate([[entropy(self.startprob)], marginals[:-1] @ self.row_entropies])
        return losses, np.zeros_like(losses)

    def optimal_accuracy(self, seq_len):
        """Expected top-1 accuracy of the true model (predicting each row's argmax)."""
        marginals = self.state_marginals(seq_len)
        by_position = np.concatenate([[self.startprob.max()], marginals[:-1] @ self.transmat.max(axis=1)])
        return float(by_position.mean())

    def true_loss(self, tokens):
        """Exact cross-entropy of the true model on given sequences (n, seq_len).

        This is the floor for that very sample: no model can have lower loss on
        it in expectation, and a val loss below it means a bug or a leak.
        """
        tokens = self.check_tokens(tokens)
        with np.errstate(divide="ignore"):
            log_start = np.log(self.startprob)
            log_trans = np.log(self.transmat)
        total, step = 0.0, self.chunk_sequences
        for lo in range(0, tokens.shape[0], step):
            chunk = np.asarray(tokens[lo : lo + step], dtype=np.int64)
            total -= log_start[chunk[:, 1]].sum()
            total -= log_trans[chunk[:, 1:-1], chunk[:, 2:]].sum()
        return float(total / (tokens.shape[0] * (tokens.shape[1] - 1)))

    def optimal_log_probs(self, tokens):
        """The true model's next-state log-probs for BOS-led sequences (n, L): shape (n, L-1, K), float64.

        Entry [:, t] predicts tokens[:, t+1] from tokens[:, :t+1]: log startprob
        after BOS, log transmat[x_t] after a state (-inf where a probability is 0).
        """
        tokens = np.asarray(self.check_tokens(tokens), dtype=np.int64)
        with np.errstate(divide="ignore"):
            log_table = np.log(np.vstack([self.transmat, self.startprob]))  # row K = after BOS
        return log_table[tokens[:, :-1]]

    def unigram_loss(self):
        """H(pi): the loss of a model that knows the state frequencies but not the transitions."""
        return float(entropy(self.stationary()))

    # ------------------------------------------------------- what eval and the probes read

    @property
    def context_order(self):
        return 1

    def transition_rows(self):
        return np.vstack([self.transmat, self.startprob])

    def skipped_metrics(self):
        return {
            "optimal_fidelity": "a first-order chain's optimal predictor is its transition row: "
            "the transition KL rows above report that KL per state",
            "korder_fidelity": "defined for k-th order chains (process korder); this one is first-order",
        }

    # -------------------------------------------------------------- sampling

    @cached_property
    def _samplers(self):
        """Alias tables for startprob (row K) and every transition row, flattened."""
        keep, alias = alias_tables(np.vstack([self.transmat, self.startprob]))
        return keep.ravel(), alias.ravel()

    def sample(self, n_sequences, seq_len, rng):
        """n_sequences BOS-led sequences of seq_len tokens, shape (n, seq_len).

        Vectorised across sequences: a Python loop over the L-1 positions, one
        uniform per token. Each sequence takes a contiguous run of L-1 numbers
        from `rng`, so sampling 10 then 20 sequences gives the same bytes as
        sampling 30 at once: datasets do not depend on the chunk size.
        """
        self.check_seq_len(seq_len)
        k = self.n_states
        keep, alias = self._samplers
        uniforms = rng.random((n_sequences, seq_len - 1))
        out = np.empty((seq_len, n_sequences), dtype=token_dtype(self.vocab_size))
        out[0] = self.bos_token
        # The start distribution is stored as row K, right after the K transition rows.
        state = np.full(n_sequences, k, dtype=np.int64)
        for t in range(seq_len - 1):
            state = alias_draw(keep, alias, state * k, uniforms[:, t], k)
            out[t + 1] = state
        return out.T

    # ------------------------------------------------------------- interop

    def to_hmmlearn(self):
        """The same chain as an hmmlearn CategoricalHMM with identity emissions."""
        from hmmlearn.hmm import CategoricalHMM

        model = CategoricalHMM(n_components=self.n_states, n_features=self.n_states, init_params="", params="")
        model.startprob_ = np.array(self.startprob)
        model.transmat_ = np.array(self.transmat)
        model.emissionprob_ = np.eye(self.n_states)
        return model

    @classmethod
    def from_hmmlearn(cls, model):
        """A MarkovChain from an hmmlearn CategoricalHMM whose emissions are the identity."""
        emissions = np.asarray(getattr(model, "emissionprob_", None), dtype=np.float64)
        n = np.asarray(model.transmat_).shape[0]
        if emissions.shape != (n, n) or not np.allclose(emissions, np.eye(n)):
            raise NanoMarkovError(
                "this hmmlearn model's emissions are not the identity, so it is a hidden Markov model, "
                "not a Markov chain over its observed tokens"
            )
        return cls(model.transmat_, model.startprob_)


UNTRUSTED = (
    "{path}: not loaded: unpickling a file runs arbitrary code that the file names, so a pickle "
    "is only safe if you (or someone you trust) made it; if you did, pass --trust-pickle"
)


def load_hmmlearn_chain(path, trust_pickle=False):
    """The MarkovChain inside a pickled hmmlearn model with identity emissions.

    Without `trust_pickle` the file is not even opened. Anything other than an
    hmmlearn model, or an hmmlearn model that is a real HMM (emissions not the
    identity), raises NanoMarkovError.
    """
    path = Path(path)
    if not trust_pickle:
        raise NanoMarkovError(UNTRUSTED.format(path=path))
    try:
        with open(path, "rb") as f:
            model = pickle.load(f)
    except OSError as e:
        raise NanoMarkovError(f"{path}: cannot be read: {e.strerror or e}") from e
    except ModuleNotFoundError as e:
        raise NanoMarkovError(
            f"{path}: needs the module {e.name!r} to unpickle; install it (pip install hmmlearn)"
        ) from e
    except Exception as e:  # a broken or foreign pickle can raise nearly anything
        raise NanoMarkovError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e
    module = type(model).__module__ or ""
    if not module.startswith("hmmlearn.") or not all(
        hasattr(model, a) for a in ("transmat_", "startprob_", "emissionprob_")
    ):
        raise NanoMarkovError(
            f"{path}: holds a {module}.{type(model).__qualname__}, not an hmmlearn CategoricalHMM "
            "with transmat_, startprob_ and emissionprob_ (what the seed's generator saved as model.pkl)"
        )
    try:
        return MarkovChain.from_hmmlearn(model)
    except NanoMarkovError as e:
        raise NanoMarkovError(f"{path}: {e}") from e
