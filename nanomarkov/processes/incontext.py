"""In-context Markov chains: a fresh transition matrix per sequence, and the Bayes predictor.

Same sequence format as `chains.MarkovChain`: `[BOS, x1, ..., x_{L-1}]` with
BOS = K. Every sequence draws its own K x K matrix P, each row independently:
dense rows ~ Dirichlet(concentration); sparse rows (support_size m < K) put
Dirichlet(alpha, ..., alpha) weights on m states chosen uniformly without
replacement (MarkovChain.random's rule; sparse needs one alpha for all states).
Then x1 ~ startprob (uniform from `random`: the first state says nothing about
P, and every state is alike) and x_{t+1} ~ P[x_t].

The optimal predictor knows the prior but not P. Rows are independent a priori
and the likelihood factorises by rows, so the posterior of row s depends only on
n_j, the number of transitions s -> j seen so far (n = sum_j n_j, d = #{j: n_j > 0}):

    p(next = j | past, current state s) = (n_j + alpha_j c_j) / sum_i (n_i + alpha_i c_i),
    c_j = 1 if n_j > 0, else (m - d) / (K - d).

Dense (m = K): every c_j = 1, the add-alpha rule. Sparse: given a support T the
Dirichlet-multinomial likelihood is G(m alpha)/G(m alpha + n) prod_{j seen} G(alpha + n_j)/G(alpha),
the same for every T containing the seen states, so the posterior over T is
uniform on those supersets; an unseen j is in T with probability (m-d)/(K-d), and
given T the prediction is (n_j + alpha)/(m alpha + n) on T. The first state is
predicted by startprob. By the chain rule the predictions multiply to the
sequence's probability, startprob[x1] times, per row s, the Dirichlet-multinomial
probability of its targets in order (times C(K-d, m-d)/C(K, m), the chance that
the support holds the d seen states) -- which is how `true_loss` computes it.

`order` k > 1 (dense rows, uniform start) gives each sequence a k-th order tensor instead: a row
~ Dirichlet(concentration) per context (x_{t-k+1}, ..., x_t), K^k of them, indexed oldest digit
first as korder's tuples. x1..xk come from startprob; the rule above holds with the context for
the state (n_j the transitions from the current context to j), and so does the marginal.

Expected losses have no closed form (they average over the count statistics of
a random walk on a random matrix), so `theory` is a seeded Monte-Carlo estimate
with a standard error for every key it estimates.

The start rule `start="stationary"` (dense rows only) draws x1 from the
stationary law pi_P of the sequence's own matrix instead of startprob, as the
statistical-induction-head papers sample (Edelman et al. 2024). Then the
posterior of P given x1..xt is the conjugate one above times pi_P(x1), which
couples the rows and is no Dirichlet term, so there is no closed form:

    p(x1 = j)                      = E[pi_P(j)]           (the prior mean of the stationary law)
    p(next = j | x1..xt, x_t = s)  = E_D[P_sj pi_P(x1)] / E_D[pi_P(x1)],

E_D over D, the conjugate (uniform-start) posterior given the counts. The first
is 1/K exactly when every state is alike (one concentration), else a Monte-Carlo
mean; the second is estimated by importance sampling: particles drawn from D,
weighted by pi_P(x1), with E_D[P_s] as a control variate (`_particle_predictions`).
`theory` scores the conjugate predictor exactly per sequence and adds the Bayes
predictor's small gain over it, estimated on fewer sequences (`_add_particle_gain`);
`true_loss` averages the estimated predictor's log-losses. All carry errors.
"""

import math
import warnings
from functools import cached_property

import numpy as np

from nanomarkov.errors import NanoMarkovError
from nanomarkov.processes.base import WHOLE_HISTORY_RECIPE, Option, Process
from nanomarkov.processes.markov import MarkovChain
from nanomarkov.processes.numerics import (
    CONCENTRATION_RANGE,
    check_distribution,
    check_random_parameters,
    entropy,
    standard_error,
    token_dtype,
    valid_concentration,
)

# Per-sequence count arrays (n, K, K) are built this many entries at a time (32 MiB of float64).
BLOCK_ENTRIES = 1 << 22
# theory's Monte-Carlo sample: THEORY_SEQUENCES sequences from a fixed seed, fewer for large K
# so that the sampled matrices total at most THEORY_ENTRIES entries (never fewer than MIN_THEORY_SEQUENCES):
# K <= 28 gets all 20k, K = 100 about 1700 (its per-sequence losses vary little, so the errors stay ~1e-5).
THEORY_SEED = 0
THEORY_SEQUENCES = 20_000
THEORY_ENTRIES = 1 << 24
MIN_THEORY_SEQUENCES = 1000

# The start rules: x1 from startprob, or from the stationary law of the sequence's own matrix.
START_RULES = ("uniform", "stationary")
# The stationary start's Bayes predictor: particles per sequence (importance sampling), and the
# seed of their draws, so that the predictor is a fixed function of the sequences it is given.
PREDICTOR_PARTICLES = 32
PREDICTOR_SEED = 1
# The stationary start's theory: sequences (beyond theory's sample) scored with particles for the
# Bayes predictor's gain over the conjugate one, and Monte-Carlo draws of matrices for the prior
# mean of the stationary law when states differ.
GAIN_SEQUENCES = 1000
# The stationary start's largest K: at K = 20 its predictor takes ~0.15 s per sequence of 128 tokens
# on one CPU core (eval's val split, theory's GAIN_SEQUENCES), growing as K^3.
MAX_STATIONARY_STATES = 20
# The stationary start's smallest concentration. Below it rows are nearly one-hot, a sequence's stationary law
# under the particles (its importance weights) degenerates, and the particles' estimate of a small probability
# can fall to 0, where the delta method's correction divides by it: measured at 0.3 (K = 2) and 0.4 (K = 3),
# the theory's optimal loss came out inf; at 0.5 it is finite for K = 2 to 15 (tests/processes/test_incontext_alpha.py).
MIN_STATIONARY_CONCENTRATION = 0.5
START_LAW_MATRICES = 200_000

# The order option (order k > 1): its largest number of contexts K^k. theory solves a K^k x K^k
# lifted chain per sampled sequence for the entropy rate (256: about 2 s for 1000 sequences).
MAX_CONTEXTS = 256
# Below this concentration numpy's Dirichlet draws rows with entries exactly 0 (its small-alpha method), so an
# order-k tensor's lifted chain needs the class analysis of _stationaries (a K^k x K^k closure, settled_laws
# where it splits): about a minute at 81 contexts (K = 3, order 4, alpha 0.01), past an hour at alpha 1e-8.
# Orders above 1 with more contexts than MAX_SMALL_CONCENTRATION_CONTEXTS are refused there (about 6 s at 27:
# K = 3, order 3, alpha 1e-8).
LIFTED_MIN_CONCENTRATION = 0.1
MAX_SMALL_CONCENTRATION_CONTEXTS = 27

# State reduction's floor on the chance of leaving a state downwards (a chain that nearly splits, as rows drawn
# with a tiny concentration do), and the total past which it rescales the partial solution: together they keep
# every partial value below 1e300, so no tiny concentration overflows it into inf or NaN.
LEAVING_FLOOR = 1e-200
RESCALE_ABOVE = 1e100
# solve_stationary's answer is kept where pi P = pi holds to this relative error in every entry; else state
# reduction answers.
STATIONARY_RESIDUAL = 1e-9
# settled_law's fallback: 2^80 steps of the lazy chain leave a state that escapes with chance 1e-24 per step.
SETTLING_SQUARINGS = 80
# settled_laws stops squaring a chain whose every entry moved less than this (relative) in one squaring.
SETTLED_CHANGE = 1e-12

# random()'s largest K: theory at K=100, L=256 takes 4 s, and beyond K^2 * MIN_THEORY_SEQUENCES
# / THEORY_ENTRIES its sample of matrices grows as K^2 (8 GB at K=1000).
MAX_RANDOM_STATES = 100


def _inverse_cdf(weights, uniforms):
    """One draw per row of non-negative weights (n, K), by inverting the cumulative sums with a uniform each.

    Only the first K-1 boundaries are compared, so the draw is at most K-1 and
    a zero-weight state (equal boundaries on both sides) is never drawn.
    """
    cumulative = np.cumsum(weights, axis=1)
    return (cumulative[:, :-1] <= (uniforms * cumulative[:, -1])[:, None]).sum(axis=1)


def _entropy_of_mean(distributions):
    """H(mean of the rows) and its standard error by the delta method (gradient -(log p + 1))."""
    mean = distributions.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        gradient = np.where(mean > 0, -(np.log(mean) + 1), 0.0)
    return float(entropy(mean)), float((distributions @ gradient).std(ddof=1) / np.sqrt(len(distributions)))


def cross_entropy(p, q):
    """-sum_j p_j log q_j along the last axis, with 0 log q = 0 (also where q_j = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(q), 0.0).sum(axis=-1)


def _log_binomial(n, k):
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _log_rising(base, n_max):
    """log(base (base+1) ... (base+n-1)) = log G(base+n)/G(base) for n = 0..n_max, along a new last axis."""
    terms = np.log(np.asarray(base, dtype=np.float64)[..., None] + np.arange(n_max))
    return np.concatenate([np.zeros(terms.shape[:-1] + (1,)), np.cumsum(terms, axis=-1)], axis=-1)


def solve_stationary(matrices):
    """The stationary distribution (n, K) of each matrix (n, K, K) that has one closed class, by one batched solve."""
    k = matrices.shape[-1]
    system = np.swapaxes(matrices, 1, 2) - np.eye(k)
    system[:, -1] = 1.0  # pi (P - I) = 0 has rank K-1 here; sum(pi) = 1 makes it square and regular
    rhs = np.zeros((system.shape[0], k, 1))
    rhs[:, -1] = 1.0
    return np.linalg.solve(system, rhs)[..., 0]


def positive_stationary(matrices):
    """The stationary distribution (n, K) of each matrix (n, K, K) with positive entries, by state
    reduction (Grassmann-Taksar-Heyman): no subtraction, so accurate, and vector steps over the
    batch (laid out last) instead of one LAPACK call per matrix: faster for small K."""
    reduced = np.moveaxis(np.array(matrices, dtype=np.float64), 0, -1).copy()  # (K, K, n)
    k = reduced.shape[0]
    leaving = np.ones(reduced.shape[1:])
    for last in range(k - 1, 0, -1):
        # P(leave `last` for a lower state): never 0 for positive rows (kept off 0 should a tiny alpha underflow).
        leaving[last] = np.maximum(reduced[last, :last].sum(axis=0), LEAVING_FLOOR)
        reduced[:last, :last] += reduced[:last, last][:, None] * (reduced[last, :last] / leaving[last])[None]
    pi = np.zeros(leaving.shape)
    pi[0] = 1.0
    for state in range(1, k):
        large = pi[:state].sum(axis=0) > RESCALE_ABOVE  # only where a chain nearly splits: others keep their bits
        if large.any():
            pi[:state, large] /= pi[:state, large].sum(axis=0)
        pi[state] = (pi[:state] * reduced[:state, state]).sum(axis=0) / leaving[state]
    return (pi / pi.sum(axis=0)).T


def settled_law(matrix, start):
    """The law a chain (K, K) with several closed classes settles into from `start` (K,): MarkovChain.stationary's,
    or, where its linear solves fail (a transient state whose chance of leaving rounds to 0, from a tiny
    concentration), the long-run law of the lazy chain (I + P)/2 (the same limit, and aperiodic) by repeated
    squaring, which subtracts nothing: 2^SETTLING_SQUARINGS steps."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MarkovChain warns that the answer depends on startprob: we want that one
        try:
            law = MarkovChain(matrix, start).stationary()
        except np.linalg.LinAlgError:
            law = np.full(len(start), np.nan)
    return law if np.all(np.isfinite(law)) else settled_laws(matrix[None], start)[0]


def settled_laws(matrices, start):
    """The law each chain (n, K, K) settles into from `start` (K,): that of the lazy chain (I + P)/2 (the same
    limit, and aperiodic) after 2^SETTLING_SQUARINGS steps, by repeated squaring, all chains at once. It
    subtracts nothing, so a chain whose exits round to 0 (rows drawn with a tiny concentration) is no harder."""
    return np.einsum("i,nij->nj", start, settled_powers(matrices)[0])


def settled_powers(matrices):
    """(the lazy chain's (I + P)/2 power (n, K, K) for each chain, the squarings done): each chain's squaring stops
    once a squaring leaves every entry within SETTLED_CHANGE of itself (relative), or after SETTLING_SQUARINGS.
    A state that leaks out slowly keeps changing the entries it leaks into (they double each squaring), so no
    chain stops before its transients have drained; most (one-hot rows) settle in a few dozen squarings."""
    power = (matrices + np.eye(matrices.shape[-1])) / 2
    active, squarings = np.arange(len(power)), 0
    while len(active) and squarings < SETTLING_SQUARINGS:
        squared = power[active] @ power[active]
        squared /= squared.sum(axis=-1, keepdims=True)  # the rows stay distributions whatever the rounding
        moved = ~np.all(np.abs(squared - power[active]) <= SETTLED_CHANGE * np.abs(squared), axis=(1, 2))
        power[active], active, squarings = squared, active[moved], squarings + 1
    return power, squarings


def stationary_laws(matrices, recurrent=None):
    """The stationary distribution (n, K) of each matrix (n, K, K) with one closed class, `recurrent` (n, K) its
    states (None: every state): solve_stationary's answer where it is regular and pi P = pi holds, else state
    reduction with the recurrent states first, which subtracts nothing and so stays accurate however nearly
    the chain splits (rows drawn with a tiny concentration: the solve is singular there, or wrong)."""
    n, k = matrices.shape[:2]
    try:
        with np.errstate(all="ignore"):
            pi = solve_stationary(matrices)
            # Entry by entry and relative: a state the solve gave ~0 that the chain does enter is caught.
            residual = np.abs(np.einsum("ni,nij->nj", pi, matrices) - pi)
            wrong = ~np.all((residual <= STATIONARY_RESIDUAL * np.abs(pi)) & (pi >= 0), axis=1)
    except np.linalg.LinAlgError:
        pi, wrong = np.empty((n, k)), np.ones(n, dtype=bool)
    if wrong.any():
        recurrent = np.ones((n, k), dtype=bool) if recurrent is None else recurrent
        # Recurrent states first: a transient one eliminated after them always leaves downwards, and gets 0.
        order = np.argsort(~recurrent[wrong], axis=1, kind="stable")
        permuted = np.take_along_axis(matrices[wrong], order[:, :, None], axis=1)
        permuted = np.take_along_axis(permuted, order[:, None, :], axis=2)
        reduced = np.empty((len(order), k))
        np.put_along_axis(reduced, order, positive_stationary(permuted), axis=1)
        pi[wrong] = reduced
    return np.clip(pi, 0.0, None) / np.clip(pi, 0.0, None).sum(axis=1, keepdims=True)


def check_order(order, n_states, support_size, start, concentration):
    """The order as an int, once it is an integer >= 1 and, above 1, the chain is dense, starts uniformly,
    has at most MAX_CONTEXTS contexts, and at most MAX_SMALL_CONCENTRATION_CONTEXTS below
    LIFTED_MIN_CONCENTRATION; raises NanoMarkovError otherwise."""
    order_value = np.asarray(order)
    if order_value.ndim != 0 or not np.issubdtype(order_value.dtype, np.integer) or order_value < 1:
        raise NanoMarkovError(f"order must be an integer >= 1 (the context length k), got {order!r}")
    order = int(order_value)
    if order > 1 and (support_size < n_states or start != "uniform"):
        raise NanoMarkovError(
            f"order {order} takes dense rows and the uniform start (no --sparsity or support_size < K, no start "
            "stationary), or use order 1: the exact predictor over sparse supports and stationary starts is first-order"
        )
    if order > 1 and n_states**order > MAX_CONTEXTS:
        raise NanoMarkovError(
            f"order {order} with K = {n_states} has K^k = {n_states**order} contexts, more than {MAX_CONTEXTS}: "
            "theory solves a K^k x K^k lifted chain per sampled sequence; use fewer states or a lower order"
        )
    contexts = n_states**order
    if order > 1 and min(concentration) < LIFTED_MIN_CONCENTRATION and contexts > MAX_SMALL_CONCENTRATION_CONTEXTS:
        raise NanoMarkovError(
            f"order {order} with K = {n_states} ({contexts} contexts) takes concentrations >= "
            f"{LIFTED_MIN_CONCENTRATION}, got {min(concentration):g}: below it rows have entries that are exactly 0 "
            f"and theory analyses each sampled sequence's {contexts}x{contexts} lifted chain, minutes to hours; use "
            f"--alpha >= {LIFTED_MIN_CONCENTRATION}, or K^k <= {MAX_SMALL_CONCENTRATION_CONTEXTS} contexts (K = 3 with "
            "order 3), or order 1"
        )
    return order


class InContextChain(Process):
    """An in-context chain on states 0..K-1: a new random transition matrix for every sequence.

    `concentration` (K,) is the Dirichlet parameter of every row, `startprob`
    (K,) the distribution of x1, `support_size` (0-d) the number m of states a
    row can reach (K: dense). All float64 and read-only; these three arrays are
    the whole process (chain.npz).
    """

    process = "icl"
    SUMMARY = "in-context chain, a fresh Dirichlet matrix per sequence (needs attention to learn)"
    ARRAYS = ("concentration", "startprob", "support_size")
    OPTIONS = (
        Option(
            "start",
            str,
            "uniform",
            "x1 from startprob (uniform, the default) or from each sequence's own matrix's stationary law",
            choices=START_RULES,
        ),
        Option(
            "order",
            int,
            1,
            "the context length k: each sequence draws a fresh k-th order transition tensor (K^k rows)",
        ),
    )
    RECIPE = WHOLE_HISTORY_RECIPE
    HISTORY_REASON = "each sequence has its own transition matrix, drawn from a prior"

    def __init__(self, concentration, startprob, support_size, start="uniform", order=1):
        concentration = np.array(concentration, dtype=np.float64)
        startprob = np.array(startprob, dtype=np.float64)
        support_size = np.array(support_size, dtype=np.float64)
        if concentration.ndim != 1 or concentration.shape[0] < 2:
            raise NanoMarkovError(
                f"concentration must be a vector of K >= 2 Dirichlet parameters, got shape {concentration.shape}"
            )
        if not valid_concentration(concentration):
            raise NanoMarkovError(
                f"concentration, a Dirichlet parameter per state, must be finite and {CONCENTRATION_RANGE}"
            )
        k = concentration.shape[0]
        if startprob.shape != (k,):
            raise NanoMarkovError(f"startprob must have shape ({k},) to match concentration, got {startprob.shape}")
        check_distribution("startprob", startprob)
        if support_size.ndim != 0 or support_size != np.round(support_size) or not 1 <= support_size <= k:
            raise NanoMarkovError(
                f"support_size must be a single integer in 1..{k} (K: dense rows), got {support_size}"
            )
        if support_size < k and np.ptp(concentration) != 0:
            raise NanoMarkovError(
                "a sparse in-context chain needs the same concentration for every state "
                "(the exact predictor over random supports relies on that symmetry)"
            )
        start = str(np.asarray(start))  # a str, or the 0-d str array chain.npz gives back
        if start not in START_RULES:
            raise NanoMarkovError(f"start must be one of {', '.join(START_RULES)}, got {start!r}")
        if start == "stationary" and support_size < k:
            raise NanoMarkovError(
                "start 'stationary' needs dense rows (no --sparsity): a sparse row's matrix can have "
                "several stationary laws"
            )
        if start == "stationary" and concentration.min() < MIN_STATIONARY_CONCENTRATION:
            raise NanoMarkovError(
                f"start 'stationary' takes concentrations >= {MIN_STATIONARY_CONCENTRATION}, got {concentration.min():g}: "
                "below it the particles' estimate of the Bayes predictor breaks down (near one-hot rows); use a "
                "larger --alpha, or --start uniform, whose theory holds for every concentration"
            )
        if start == "stationary" and k > MAX_STATIONARY_STATES:
            raise NanoMarkovError(
                f"start 'stationary' goes up to K = {MAX_STATIONARY_STATES}, got {k}: its Bayes predictor weighs "
                f"{PREDICTOR_PARTICLES} sampled K x K matrices at every position of every sequence; use fewer states or --start uniform"
            )
        order = check_order(order, k, support_size, start, concentration)
        for array in (concentration, startprob, support_size):
            array.flags.writeable = False
        self.concentration = concentration
        self.startprob = startprob
        self.support_size = support_size
        self.start = start
        self.order = order
        self.n_contexts = k**order
        self._theory = {}  # (seq_len, n_sequences) -> theory dict; the process is immutable
        self._unigram_laws = {}  # (seq_len, n_sequences) -> the mean law of x_t in theory's sample

    @classmethod
    def random(cls, n_states, seed=42, alpha=1.0, sparsity=None, start=None, order=None):
        """The in-context chain with rows ~ Dirichlet(alpha), sparse by MarkovChain.random's rule, uniform
        startprob; `start` the start rule (None: "uniform"), `order` the context length (None: 1).

        Nothing here is random -- the randomness is in every sequence's own
        matrix -- so `seed` only keeps the signature of the other processes.
        """
        check_random_parameters(n_states, alpha, sparsity)
        if n_states > MAX_RANDOM_STATES:
            raise NanoMarkovError(
                f"in-context chains go up to K = {MAX_RANDOM_STATES} here, got {n_states}: their "
                "Monte-Carlo theory draws a K x K matrix for every sequence it simulates"
            )
        support = max(1, int(n_states * (100 - sparsity) / 100)) if sparsity else n_states
        start, order = start or "uniform", 1 if order is None else order
        return cls(np.full(n_states, float(alpha)), np.full(n_states, 1.0 / n_states), support, start, order)

    def options(self):
        """The options that differ from their defaults ({"start": "stationary"}, {"order": 2}); {} for the
        defaults, as before the options existed (so an order-1 dataset's meta.json and folder are unchanged)."""
        options = {} if self.start == "uniform" else {"start": self.start}
        return options | ({} if self.order == 1 else {"order": self.order})

    @classmethod
    def from_arrays(cls, arrays):
        """The process arrays() saved: chain.npz holds the start rule ("start") and the order ("order") only
        when they are not the defaults, so a dataset written before them loads as the uniform-start first-order chain."""
        start = arrays["start"] if "start" in arrays else "uniform"
        order = int(arrays["order"]) if "order" in arrays else 1
        return cls(**{name: arrays[name] for name in cls.ARRAYS}, start=start, order=order)

    def arrays(self):
        """The arrays of chain.npz; the start rule (a 0-d str array) and the order (a 0-d int) join them when
        they are not the defaults."""
        extra = {name: np.array(value) for name, value in self.options().items()}
        return super().arrays() | extra

    @property
    def n_states(self):
        return self.concentration.shape[0]

    @property
    def n_support(self):
        return int(self.support_size)

    def _block(self, particles=1):
        """Sequences per block whose count arrays (and `particles` matrices each) fit in BLOCK_ENTRIES."""
        return max(1, BLOCK_ENTRIES // (particles * self.n_contexts * self.n_states))

    # --------------------------------------------------------- the predictor

    def _weights(self, row_counts):
        """Unnormalised posterior predictive n_j + alpha_j c_j from the current row's counts (n, K)."""
        k, m = self.n_states, self.n_support
        seen = row_counts > 0
        distinct = seen.sum(axis=1, keepdims=True)
        # Clipped at 0: more distinct targets than m never happens in sampled data, and then
        # the unseen states simply get no weight instead of a negative one.
        unseen_in_support = np.maximum(m - distinct, 0) / np.maximum(k - distinct, 1)
        return row_counts + self.concentration * np.where(seen, 1.0, unseen_in_support)

    def _predictive(self, row_counts):
        weights = self._weights(row_counts)
        return weights / weights.sum(axis=1, keepdims=True)

    def optimal_log_probs(self, tokens):
        """The Bayes predictor's next-state log-probs for BOS-led sequences (n, L): shape (n, L-1, K), float64.

        Entry [:, t] predicts tokens[:, t+1] from tokens[:, :t+1]: log startprob
        for x1..xk, then the posterior predictive of the current context's row
        given the transitions seen so far (-inf where a probability is 0).
        """
        tokens = np.asarray(self.check_tokens(tokens), dtype=np.int64)
        if self.start == "stationary":
            return self._stationary_log_probs(tokens)
        n, positions, order = tokens.shape[0], tokens.shape[1] - 1, self.order
        out = np.empty((n, positions, self.n_states))
        with np.errstate(divide="ignore"):
            out[:, :order] = np.log(self.startprob)
            for lo in range(0, n, self._block()):
                states = tokens[lo : lo + self._block(), 1:]
                rows, context = np.arange(states.shape[0]), self.contexts(states)
                counts = np.zeros((states.shape[0], self.n_contexts, self.n_states))
                for t in range(order, positions):
                    if t > order:  # the transition (context ending at x_{t-1}) -> x_t joins the counts
                        counts[rows, context[:, t - 2], states[:, t - 1]] += 1
                    out[lo : lo + len(rows), t] = np.log(self._predictive(counts[rows, context[:, t - 1]]))
        return out

    def contexts(self, states):
        """The index of the context (x_{j-k+1}, ..., x_j) ending at each position j of states (n, T), int64,
        oldest digit most significant (korder's indexing); order 1: the states. Entries j < k-1 are partial."""
        states = np.asarray(states, dtype=np.int64)
        out = states.copy()
        for lag in range(1, self.order):
            out[:, lag:] += states[:, :-lag] * self.n_states**lag
        return out

    def _stationary_log_probs(self, tokens):
        """optimal_log_probs under the stationary start: the start law, then the particles' estimates."""
        n, positions = tokens.shape[0], tokens.shape[1] - 1
        out = np.empty((n, positions, self.n_states))
        out[:, 0] = np.log(self.start_law()[0])
        rng, step = np.random.default_rng(PREDICTOR_SEED), self._block(PREDICTOR_PARTICLES)
        for lo in range(0, n, step):
            states = tokens[lo : lo + step, 1:]
            for t, predictive, _, _ in self._particle_predictions(states, rng):
                with np.errstate(divide="ignore"):
                    out[lo : lo + states.shape[0], t] = np.log(predictive)
        return out

    def _particle_predictions(self, states, rng):
        """Under the stationary start, for t = 1..T-1: (t, p, variance, q), p (n, K) the estimated Bayes
        predictive of x_{t+1} given states[:, :t], variance (n, K) its variance, q the conjugate one.

        PREDICTOR_PARTICLES matrices per sequence, each a draw from D (the conjugate posterior
        given the transitions so far), weighted by w = pi_P(x1): p = E_D[P_s w] / E_D[w] =
        q + Cov_D(P_s, w) / E_D[w], s = x_t, with q = E_D[P_s] the conjugate predictive, exact.
        Only the covariance is estimated (a control variate), so the error shrinks with the spread
        of pi_P(x1) under D, which vanishes as the counts grow.
        A transition s -> j changes only row s's posterior, so only that row of every particle is
        drawn again; the others stay draws from their (unchanged) posteriors.
        """
        n, steps = states.shape
        k, rows = self.n_states, np.arange(n)
        counts = np.zeros((n, k, k))
        particles = self._posterior_rows(np.zeros((n, PREDICTOR_PARTICLES, k, k)), rng)
        for t in range(1, steps):
            if t >= 2:
                came, now = states[:, t - 2], states[:, t - 1]
                counts[rows, came, now] += 1
                particles[rows, :, came] = self._posterior_rows(
                    np.broadcast_to(counts[rows, came][:, None, :], (n, PREDICTOR_PARTICLES, k)), rng
                )
            weights = positive_stationary(particles.reshape(-1, k, k)).reshape(n, PREDICTOR_PARTICLES, k)
            weights = weights[rows, :, states[:, 0]]
            weights /= weights.mean(axis=1, keepdims=True)
            current = particles[rows, :, states[:, t - 1]]  # (n, particles, K)
            # Control variate: E_D[P_s] = q is known, so only Cov_D(P_s, w) / E_D[w] is estimated.
            terms = (weights - 1)[:, :, None] * (current - current.mean(axis=1, keepdims=True))
            conjugate = self._predictive(counts[rows, states[:, t - 1]])
            predictive = np.maximum(conjugate + terms.sum(axis=1) / (PREDICTOR_PARTICLES - 1), np.finfo(float).tiny)
            predictive /= predictive.sum(axis=1, keepdims=True)  # an estimate below 0 is possible, if rare
            yield t, predictive, terms.var(axis=1, ddof=1) / PREDICTOR_PARTICLES, conjugate

    def _posterior_rows(self, counts, rng):
        """One draw of a row from its conjugate posterior Dirichlet(concentration + counts) per row of counts (..., K)."""
        gammas = rng.standard_gamma(self.concentration + counts)
        return gammas / gammas.sum(axis=-1, keepdims=True)

    def start_law(self):
        """(p(x1), its standard error), two (K,) arrays: startprob under the uniform start; under the
        stationary start the prior mean of the stationary law, 1/K exactly when every state is alike
        (one concentration), else a Monte-Carlo mean of START_LAW_MATRICES matrices (THEORY_SEED)."""
        return self._start_law

    @cached_property
    def _start_law(self):
        k = self.n_states
        if self.start == "uniform":
            return self.startprob, np.zeros(k)
        if np.ptp(self.concentration) == 0:
            return np.full(k, 1.0 / k), np.zeros(k)
        rng = np.random.default_rng(THEORY_SEED)
        step = max(1, BLOCK_ENTRIES // k**2)
        laws = np.concatenate(
            [
                self._stationaries(self.sample_matrices(min(step, START_LAW_MATRICES - lo), rng))
                for lo in range(0, START_LAW_MATRICES, step)
            ]
        )
        return laws.mean(axis=0), standard_error(laws, axis=0)

    def true_loss(self, tokens):
        """Exact cross-entropy of the Bayes predictor on given BOS-led sequences (n, seq_len).

        Computed as -log P(sequence) / (L-1) from the closed form in the module
        docstring (transition counts only, no per-position pass); by the chain
        rule this equals the mean NLL of optimal_log_probs.
        """
        if self.start == "stationary":  # no closed form: the mean of the estimated predictor's log-probs
            return super().true_loss(tokens)
        tokens = self.check_tokens(tokens)
        n, length, k, m = tokens.shape[0], tokens.shape[1], self.n_states, self.n_support
        n_contexts, order = self.n_contexts, self.order
        n_max = max(length - 1 - order, 0)  # transitions per sequence
        log_rising = _log_rising(self.concentration, n_max)  # (K, n_max+1)
        # A row's total prior weight: sum(alpha) dense, m alpha sparse (one alpha then).
        log_rising_total = _log_rising(self.concentration.sum() * m / k, n_max)
        # log P(the support holds the d seen states) = log C(K-d, m-d) - log C(K, m); impossible if d > m.
        log_support = np.array(
            [_log_binomial(k - d, m - d) - _log_binomial(k, m) if d <= m else -np.inf for d in range(k + 1)]
        )
        with np.errstate(divide="ignore"):
            total = -np.log(self.startprob)[np.asarray(tokens[:, 1 : 1 + order], dtype=np.int64)].sum()
        for lo in range(0, n, self._block()):
            states = np.asarray(tokens[lo : lo + self._block(), 1:], dtype=np.int64)
            b = states.shape[0]
            context = np.arange(b)[:, None] * n_contexts + self.contexts(states)[:, order - 1 : -1]
            pairs = context * k + states[:, order:]
            counts = np.bincount(pairs.ravel(), minlength=b * n_contexts * k).reshape(b, n_contexts, k)
            total -= log_rising[np.arange(k), counts].sum()
            total += log_rising_total[counts.sum(axis=2)].sum()
            total -= log_support[(counts > 0).sum(axis=2)].sum()
        return float(total / (n * (length - 1)))

    # -------------------------------------------------------------- sampling

    def sample(self, n_sequences, seq_len, rng):
        """n_sequences BOS-led sequences of seq_len tokens, shape (n, seq_len).

        A Polya urn: each next state is drawn from the posterior predictive given
        the sequence so far, which by the chain rule is exactly the law of
        "draw a matrix, then walk it". It takes one uniform per token (a
        contiguous run of L-1 per sequence, so the bytes do not depend on how
        the sequences are chunked), where drawing matrices would need K^2 gamma
        variates per sequence whose rejection sampler takes a variable amount
        of the stream. `theory` draws the matrices, and the tests check that
        both give the same process.
        """
        self.check_seq_len(seq_len)
        if self.start == "stationary":
            return self._sample_stationary(n_sequences, seq_len, rng)
        k = self.n_states
        out = np.empty((n_sequences, seq_len), dtype=token_dtype(self.vocab_size))
        out[:, 0] = self.bos_token
        for lo in range(0, n_sequences, self._block()):
            uniforms = rng.random((min(self._block(), n_sequences - lo), seq_len - 1))
            rows = np.arange(uniforms.shape[0])
            counts = np.zeros((len(rows), self.n_contexts, k))
            context = np.zeros(len(rows), dtype=np.int64)  # the index of the last k states
            for t in range(seq_len - 1):
                weights = np.broadcast_to(self.startprob, (len(rows), k)) if t < self.order else None
                if weights is None:
                    weights = self._weights(counts[rows, context])
                state = _inverse_cdf(weights, uniforms[:, t])
                if t >= self.order:
                    counts[rows, context, state] += 1
                context = (context * k + state) % self.n_contexts
                out[lo : lo + len(rows), t + 1] = state
        return out

    def _sample_stationary(self, n_sequences, seq_len, rng):
        """The stationary start: each sequence draws its matrix, x1 from its stationary law, then walks it.

        x1 needs the whole matrix, so there is no urn here. Each sequence takes one seed from `rng`
        (a fixed amount of the stream, so the bytes do not depend on the chunking) for its own
        generator, which draws its matrix and then its L-1 uniforms.
        """
        out = np.empty((n_sequences, seq_len), dtype=token_dtype(self.vocab_size))
        out[:, 0] = self.bos_token
        seeds = rng.integers(2**63, size=n_sequences)
        for lo in range(0, n_sequences, self._block()):
            block = seeds[lo : lo + self._block()]
            matrices = np.empty((len(block), self.n_states, self.n_states))
            uniforms = np.empty((len(block), seq_len - 1))
            for i, seed in enumerate(block):
                own = np.random.default_rng(seed)
                matrices[i] = self.sample_matrices(1, own)[0]
                uniforms[i] = own.random(seq_len - 1)
            out[lo : lo + len(block), 1:] = self.walk(matrices, uniforms, self._stationaries(matrices))
        return out

    def sample_matrices(self, n_sequences, rng):
        """n_sequences random transition matrices from the prior, shape (n, K, K); order k: tensors (n, K^k, K),
        a row per context."""
        k, m = self.n_states, self.n_support
        if m == k:
            return rng.dirichlet(self.concentration, size=(n_sequences, self.n_contexts))
        support = np.argsort(rng.random((n_sequences, k, k)), axis=2)[:, :, :m]
        matrices = np.zeros((n_sequences, k, k))
        weights = rng.dirichlet(self.concentration[:m], size=(n_sequences, k))
        np.put_along_axis(matrices, support, weights, axis=2)
        return matrices

    def walk(self, matrices, uniforms, starts=None):
        """The states x1..x_{L-1} (n, L-1) of each matrix's chain, one uniform (n, L-1) per step.

        x1 from `starts` (n, K), one distribution per matrix (None: startprob for all); order k: x1..xk
        from startprob, then each state from its context's row of the tensor.
        """
        n, steps = uniforms.shape
        rows, context = np.arange(n), np.zeros(n, dtype=np.int64)
        states = np.empty((n, steps), dtype=np.int64)
        starts = np.broadcast_to(self.startprob, (n, self.n_states)) if starts is None else starts
        for t in range(steps):
            states[:, t] = _inverse_cdf(starts if t < self.order else matrices[rows, context], uniforms[:, t])
            context = (context * self.n_states + states[:, t]) % self.n_contexts
        return states

    # ---------------------------------------------------------------- theory

    def theory(self, seq_len):
        """Monte-Carlo theory for sequences of seq_len tokens, each estimate with its standard error (*_se).

        Per-position expectations are averaged given the past (entropies of the
        predictive distributions rather than sampled log-losses): unbiased, and
        with a far smaller variance. Keys:
          optimal_loss, optimal_accuracy  the Bayes predictor (argmax for accuracy)
          oracle_loss                     the predictor that knows the sequence's matrix
          unigram_in_context_loss         add-concentration counts of the states seen so far,
                                          ignoring the current state (startprob for x1)
          unigram_loss                    H(average state distribution over the predicted positions)
          entropy_rate                    E over matrices of the chain's entropy rate: the oracle's
                                          per-token loss far from the start, which the Bayes
                                          predictor also approaches as sequences grow
          uniform_loss                    log K (exact)
          monte_carlo_sequences           the size of the sample
        The sample is theory_sequences() sequences from THEORY_SEED (monte_carlo with fewer is faster).
        """
        return self.monte_carlo(seq_len)

    def table_entries(self, seq_len):
        """theory's Monte-Carlo sample: theory_sequences() sequences of seq_len, drawn at once."""
        return seq_len * self.theory_sequences()

    def theory_sequences(self):
        """THEORY_SEQUENCES, fewer for large K so the sampled matrices stay within THEORY_ENTRIES."""
        budget = THEORY_ENTRIES // (self.n_contexts * self.n_states)
        return max(MIN_THEORY_SEQUENCES, min(THEORY_SEQUENCES, budget))

    def monte_carlo(self, seq_len, n_sequences=None):
        """theory(seq_len) from a sample of n_sequences sequences (default theory_sequences())."""
        self.check_seq_len(seq_len)
        key = (seq_len, n_sequences or self.theory_sequences())
        if key not in self._theory:
            self._theory[key] = self._monte_carlo(*key)
        return dict(self._theory[key][0])

    def optimal_loss(self, seq_len):
        """The Bayes predictor's expected loss: an estimate, its error theory's optimal_loss_se."""
        return self.monte_carlo(seq_len)["optimal_loss"]

    def optimal_accuracy(self, seq_len):
        """The Bayes predictor's expected top-1 accuracy: an estimate, its error theory's optimal_accuracy_se."""
        return self.monte_carlo(seq_len)["optimal_accuracy"]

    def optimal_loss_by_position(self, seq_len):
        """(losses, standard errors) of the Bayes predictor at positions 1..L-1, from theory's sample.

        Position 1 is exact, error 0.0, where start_law() is (startprob, or 1/K under the
        stationary start with one concentration); the mean of the losses is theory's
        optimal_loss up to rounding.
        """
        self.monte_carlo(seq_len)
        losses, errors = (array.copy() for array in self._theory[(seq_len, self.theory_sequences())][1:])
        if not self.start_law()[1].any():
            errors[: self.order] = 0.0  # the same start-law entropy in every sequence: only rounding would show
        return losses, errors

    def standard_errors(self, seq_len):
        theory = self.monte_carlo(seq_len)
        return {key.removesuffix("_se"): value for key, value in theory.items() if key.endswith("_se")}

    # The stage predictors of stage_losses, worst first, and the theory key of each.
    STAGE_KEYS = {
        "uniform": "uniform_loss",
        "unigram": "unigram_loss",
        "in_context_unigram": "unigram_in_context_loss",
        "optimal": "optimal_loss",
        "oracle": "oracle_loss",
    }

    def stage_losses(self, seq_len):
        """Estimates from theory's sample (errors: stage_loss_errors), worst first:
        uniform, unigram    as for every process (unigram: H of the mean law of x_t over positions)
        in_context_unigram  add-concentration counts of the states seen so far, ignoring the
                            current one: q_t(j) = (#{s <= t: x_s = j} + alpha_j) / (t + sum alpha),
                            startprob for x1 (the stage before the model reads transitions)
        optimal             the Bayes predictor (optimal_loss)
        oracle              the predictor that knows the sequence's own matrix: below the optimum,
                            which must learn the matrix from the sequence
        """
        theory = self.monte_carlo(seq_len)
        return {name: float(theory[key]) for name, key in self.stage_keys().items()}

    def stage_loss_errors(self, seq_len):
        theory = self.monte_carlo(seq_len)
        return {name: float(theory.get(f"{key}_se", 0.0)) for name, key in self.stage_keys().items()}

    def stage_keys(self):
        """STAGE_KEYS, with in_context_lower_order (the add-concentration (k-1)-gram of the sequence so far) before
        the optimum for order k > 1: the stage before the model reads the whole context."""
        items = list(self.STAGE_KEYS.items())
        if self.order > 1:
            items.insert(
                items.index(("optimal", "optimal_loss")), ("in_context_lower_order", "lower_order_in_context_loss")
            )
        return dict(items)

    def unigram_law(self, seq_len):
        """The unigram stage's predictor: 1/K exactly where every state is alike (one concentration and,
        under the uniform start, a uniform startprob); else the mean law of x_t in theory's sample,
        the estimate whose entropy stage_losses reports."""
        alike = np.ptp(self.concentration) == 0 and (self.start == "stationary" or np.ptp(self.startprob) == 0)
        if alike:
            return np.full(self.n_states, 1.0 / self.n_states)
        self.monte_carlo(seq_len)
        return self._unigram_laws[(seq_len, self.theory_sequences())]

    def in_context_unigram_log_probs(self, tokens):
        """The in_context_unigram stage on BOS-led sequences (n, L), (n, L-1, K): startprob for x1, then
        q_t(j) = (#{s <= t: x_s = j} + alpha_j) / (t + sum alpha) for x_{t+1}, the states so far counted
        whatever the current one is."""
        tokens = np.asarray(self.check_tokens(tokens), dtype=np.int64)
        seen = np.cumsum(np.eye(self.n_states)[tokens[:, 1:-1]], axis=1)  # (n, L-2, K): counts of x_1..x_t
        counted = np.arange(1, tokens.shape[1] - 1)[None, :, None]
        out = np.empty((tokens.shape[0], tokens.shape[1] - 1, self.n_states))
        with np.errstate(divide="ignore"):
            out[:, 0] = np.log(self.startprob)
        out[:, 1:] = np.log((seen + self.concentration) / (counted + self.concentration.sum()))
        return out

    def stage_log_probs(self, tokens):
        """The base stages plus in_context_unigram before the optimum; no oracle (it reads the sequence's
        own matrix, which the tokens do not hold)."""
        stages = super().stage_log_probs(tokens)
        optimal = stages.pop("optimal")
        stages["in_context_unigram"] = self.in_context_unigram_log_probs(tokens)
        if self.order > 1:  # the add-concentration (k-1)-gram: the optimum of the chain one order lower
            lower = InContextChain(self.concentration, self.startprob, self.n_states, order=self.order - 1)
            stages["in_context_lower_order"] = lower.optimal_log_probs(tokens)
        return stages | {"optimal": optimal}

    @cached_property
    def _long_run(self):
        """(entropy rate, its error, unigram loss, its error) over a sample of matrices alone, from THEORY_SEED."""
        rng = np.random.default_rng(THEORY_SEED)
        n_sequences, rates, stationaries = self.theory_sequences(), [], []
        for lo in range(0, n_sequences, self._block()):
            matrices = self.sample_matrices(min(self._block(), n_sequences - lo), rng)
            pi = self.context_stationaries(matrices)
            # The law of the state: the context's last digit (the least significant).
            stationaries.append(pi.reshape(len(pi), -1, self.n_states).sum(axis=1))
            rates.append((pi * entropy(matrices, axis=2)).sum(axis=1))  # as _entropy_rates, reusing pi
        rates, stationaries = np.concatenate(rates), np.concatenate(stationaries)
        unigram, unigram_se = _entropy_of_mean(stationaries)
        return float(rates.mean()), float(standard_error(rates)), unigram, unigram_se

    def entropy_rate(self):
        """E over matrices of the chain's entropy rate: an estimate from a sample of matrices (THEORY_SEED).

        theory(seq_len) reports the same quantity from the matrices of its own
        sample: the two agree within their standard errors.
        """
        return self._long_run[0]

    def unigram_loss(self):
        """H(E over matrices of the stationary distribution): an estimate, like entropy_rate().

        theory(seq_len)'s unigram_loss is the finite-length version: H of the
        average state distribution over the predicted positions.
        """
        return self._long_run[2]

    def _monte_carlo(self, seq_len, n_sequences):
        """(theory dict, optimal loss at each position (L-1,), its standard errors) from a sample."""
        rng = np.random.default_rng(THEORY_SEED)
        parts = []
        for lo in range(0, n_sequences, self._block()):
            b = min(self._block(), n_sequences - lo)
            matrices = self.sample_matrices(b, rng)
            if self.start == "stationary":
                starts = self._stationaries(matrices)
                states = self.walk(matrices, rng.random((b, seq_len - 1)), starts)
                part = self._per_sequence_stationary(matrices, starts, states)
            else:
                part = self._per_sequence(matrices, self.walk(matrices, rng.random((b, seq_len - 1))))
            parts.append(part | {"entropy_rate": self._entropy_rates(matrices)})
        per_sequence = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        theory = {}
        names = ("entropy_rate", "optimal_loss", "optimal_accuracy", "oracle_loss", "unigram_in_context_loss")
        for name in names + (("lower_order_in_context_loss",) if self.order > 1 else ()):
            values = per_sequence[name]
            theory[name] = float(values.mean())
            theory[f"{name}_se"] = float(values.std(ddof=1) / np.sqrt(n_sequences))
        theory["unigram_loss"], theory["unigram_loss_se"] = _entropy_of_mean(per_sequence["marginal"])
        self._unigram_laws[(seq_len, n_sequences)] = per_sequence["marginal"].mean(axis=0)
        theory["uniform_loss"] = self.uniform_loss()
        theory["monte_carlo_sequences"] = n_sequences
        by_position = per_sequence["optimal_by_position"]
        losses, errors = by_position.mean(axis=0), standard_error(by_position, axis=0)
        if self.start == "stationary":
            losses, errors = self._add_particle_gain(theory, losses, errors, seq_len, rng)
        return theory, losses, errors

    def _add_particle_gain(self, theory, losses, errors, seq_len, rng):
        """Under the stationary start, theory's sample scored the conjugate predictor q (fast, exact);
        the Bayes predictor's gain over it comes from GAIN_SEQUENCES further sequences. Adds it to
        theory's optimal_loss and optimal_accuracy and to (losses, errors) by position, the errors
        combined as those of independent samples; returns (losses, errors).

        Given the past, the Bayes predictor p gains KL(p || q) nats over q, and the accuracy
        p[argmax p] - p[argmax q]. Both are taken at p_hat (_particle_predictions), the loss
        gain less 1/2 sum_j variance_j / p_j, the delta method's bias of KL(p_hat || q): small
        numbers, so a thousand sequences estimate them well.
        """
        gains, accuracies = [], []
        for lo in range(0, GAIN_SEQUENCES, self._block(PREDICTOR_PARTICLES)):
            b = min(self._block(PREDICTOR_PARTICLES), GAIN_SEQUENCES - lo)
            matrices = self.sample_matrices(b, rng)
            states = self.walk(matrices, rng.random((b, seq_len - 1)), self._stationaries(matrices))
            gain, accuracy, rows = np.zeros((b, seq_len - 1)), np.zeros(b), np.arange(b)
            for t, p_hat, variance, q in self._particle_predictions(states, rng):
                kl = cross_entropy(p_hat, q) - cross_entropy(p_hat, p_hat)
                gain[:, t] = kl - 0.5 * (variance / p_hat).sum(axis=1)
                accuracy += p_hat.max(axis=1) - p_hat[rows, q.argmax(axis=1)]
            gains.append(gain)
            accuracies.append(accuracy / (seq_len - 1))
        gain, accuracy = np.concatenate(gains), np.concatenate(accuracies)
        for name, values in (("optimal_loss", -gain.mean(axis=1)), ("optimal_accuracy", accuracy)):
            theory[name] += float(values.mean())
            theory[f"{name}_se"] = float(np.hypot(theory[f"{name}_se"], standard_error(values)))
        theory["gain_sequences"] = GAIN_SEQUENCES
        return losses - gain.mean(axis=0), np.hypot(errors, standard_error(gain, axis=0))

    def _per_sequence(self, matrices, states):
        """Per sequence, the mean over predicted positions of each predictor's expected loss given the past,
        and the Bayes predictor's expected loss at each position ("optimal_by_position", (n, L-1)).

        Positions 0..k-1 predict x1..xk from startprob for every predictor but the
        in-context unigram; position t >= k predicts x_{t+1} given x1..x_t (states[:, :t]),
        whose law given the past is the Bayes predictive p, so a predictor q costs
        -sum_j p_j log q_j there (H(p) for q = p), and the oracle costs H(P[context]) given the matrix.
        """
        n, positions = states.shape
        k, rows, order = self.n_states, np.arange(n), self.order
        start_entropy = float(entropy(self.startprob))
        sums = {name: np.full(n, start_entropy) for name in ("optimal_loss", "oracle_loss", "unigram_in_context_loss")}
        sums["optimal_accuracy"] = np.full(n, self.startprob.max())
        lower = self.lower_order_predictions(states) if order > 1 else None
        if lower is not None:
            sums["lower_order_in_context_loss"] = np.full(n, start_entropy)
        marginal = np.tile(self.startprob, (n, 1))
        row_entropies, context = entropy(matrices, axis=2), self.contexts(states)
        counts = np.zeros((n, self.n_contexts, k))
        seen = np.zeros((n, k))  # states seen so far, for the unigram-in-context predictor
        seen[rows, states[:, 0]] = 1
        by_position = np.empty((n, positions))
        by_position[:, 0] = start_entropy
        for t in range(1, positions):
            if t < order:  # x_{t+1} is still one of the first k, drawn from startprob
                p, oracle = np.broadcast_to(self.startprob, (n, k)), start_entropy
            else:
                if t > order:
                    counts[rows, context[:, t - 2], states[:, t - 1]] += 1
                p, oracle = self._predictive(counts[rows, context[:, t - 1]]), row_entropies[rows, context[:, t - 1]]
            unigram = (seen + self.concentration) / (t + self.concentration.sum())
            by_position[:, t] = entropy(p, axis=1)
            sums["optimal_loss"] += by_position[:, t]
            sums["optimal_accuracy"] += p.max(axis=1)
            sums["oracle_loss"] += oracle
            sums["unigram_in_context_loss"] -= (p * np.log(unigram)).sum(axis=1)
            if lower is not None:
                sums["lower_order_in_context_loss"] -= (p * np.log(next(lower))).sum(axis=1)
            marginal += p
            seen[rows, states[:, t]] += 1
        averages = {name: total / positions for name, total in sums.items()}
        return averages | {"marginal": marginal / positions, "optimal_by_position": by_position}

    def lower_order_predictions(self, states):
        """For t = 1..T-1, the in-context (k-1)-gram's prediction of x_{t+1} from states[:, :t], (n, K): startprob
        for x1..x_{k-1}, then the add-concentration counts of the transitions out of the last k-1 states."""
        n, positions = states.shape
        lower, rows, order = self.n_contexts // self.n_states, np.arange(n), self.order - 1
        context = self.contexts(states) % lower  # the last k-1 of the k digits
        counts = np.zeros((n, lower, self.n_states))
        for t in range(1, positions):
            if t < order:
                yield np.broadcast_to(self.startprob, (n, self.n_states))
                continue
            if t > order:
                counts[rows, context[:, t - 2], states[:, t - 1]] += 1
            yield self._predictive(counts[rows, context[:, t - 1]])

    def _per_sequence_stationary(self, matrices, starts, states):
        """_per_sequence under the stationary start (x1 ~ starts, each matrix's stationary law), with
        "optimal" the conjugate predictor q (the uniform start's Bayes predictor) after position 0,
        to which _add_particle_gain adds the true Bayes predictor's gain.

        The Bayes predictive p is not known in closed form, so a predictor q is charged
        -sum_j P[x_t, j] log q_j with the sequence's true row, whose mean given the past is p:
        unbiased. Position 0: the start law q0 = start_law() costs -sum_j pi_P(j) log q0_j, H(q0)
        on average.
        """
        n, positions = states.shape
        rows, law = np.arange(n), self.start_law()[0]
        by_position = np.empty((n, positions))
        # H(law) on average; exactly that where the law is exact (1/K), so position 1 shows no rounding.
        by_position[:, 0] = entropy(law) if not self.start_law()[1].any() else cross_entropy(starts, law)
        sums = {
            "optimal_accuracy": starts[:, law.argmax()].copy(),
            "oracle_loss": entropy(starts, axis=1),
            "unigram_in_context_loss": by_position[:, 0].copy(),
        }
        marginal, row_entropies = starts.copy(), entropy(matrices, axis=2)
        seen = np.zeros((n, self.n_states))  # states seen so far, for the unigram-in-context predictor
        seen[rows, states[:, 0]] = 1
        counts = np.zeros(matrices.shape)
        for t in range(1, positions):
            if t >= 2:
                counts[rows, states[:, t - 2], states[:, t - 1]] += 1
            q, truth = self._predictive(counts[rows, states[:, t - 1]]), matrices[rows, states[:, t - 1]]
            by_position[:, t] = cross_entropy(truth, q)
            sums["optimal_accuracy"] += truth[rows, q.argmax(axis=1)]
            sums["oracle_loss"] += row_entropies[rows, states[:, t - 1]]
            unigram = (seen + self.concentration) / (t + self.concentration.sum())
            sums["unigram_in_context_loss"] += cross_entropy(truth, unigram)
            marginal += truth
            seen[rows, states[:, t]] += 1
        sums["optimal_loss"] = by_position.sum(axis=1)
        averages = {name: total / positions for name, total in sums.items()}
        return averages | {"marginal": marginal / positions, "optimal_by_position": by_position}

    def _entropy_rates(self, matrices):
        """Each matrix's entropy rate sum_c pi_c H(P_c), with pi its stationary law over the contexts c."""
        return (self.context_stationaries(matrices) * entropy(matrices, axis=2)).sum(axis=1)

    def lift(self, matrices):
        """The chains on the contexts (n, K^k, K^k) of order-k tensors (n, K^k, K): context c goes to
        (c K + j) mod K^k with probability P[c, j]."""
        n_contexts = self.n_contexts
        lifted = np.zeros((len(matrices), n_contexts, n_contexts))
        following = (np.arange(n_contexts)[:, None] * self.n_states + np.arange(self.n_states)) % n_contexts
        lifted[:, np.arange(n_contexts)[:, None], following] = matrices
        return lifted

    def context_stationaries(self, matrices):
        """The stationary law over the contexts (n, K^k) of each tensor (n, K^k, K); order 1: _stationaries.

        A tensor with positive entries lets every context reach every other in k steps: one closed class,
        solved directly; one with entries that underflowed to 0 goes through _stationaries' class analysis.
        The lifted matrices are built a block of BLOCK_ENTRIES at a time (K^2k entries each).
        """
        if self.order == 1:
            return self._stationaries(matrices)
        pi = np.empty(matrices.shape[:2])
        step = max(1, BLOCK_ENTRIES // self.n_contexts**2)
        start = np.ones(1)
        for _ in range(self.order):  # x1..xk independent from startprob, oldest digit most significant
            start = np.outer(start, self.startprob).ravel()
        for lo in range(0, len(matrices), step):
            block, lifted = pi[lo : lo + step], self.lift(matrices[lo : lo + step])
            positive = (matrices[lo : lo + step] > 0).all(axis=(1, 2))
            block[positive] = stationary_laws(lifted[positive])
            if not positive.all():
                block[~positive] = self._stationaries(lifted[~positive], start)
        return pi

    def _stationaries(self, matrices, start=None):
        """Each matrix's stationary distribution (n, K).

        A matrix with one closed class (dense ones always) has one stationary
        distribution (stationary_laws); the others (several closed classes, from
        sparse rows or entries that underflowed) get the long-run distribution from
        `start` (None: startprob): sparse ones one by one through MarkovChain.stationary
        (settled_law), the others all at once (settled_laws).
        """
        n, k = matrices.shape[:2]
        reach = ((matrices > 0) | np.eye(k, dtype=bool)).astype(np.float32)
        for _ in range(max(1, math.ceil(math.log2(k)))):  # transitive closure by repeated squaring
            reach = np.minimum(reach @ reach, 1.0)
        reach = reach > 0
        back = np.swapaxes(reach, 1, 2)
        recurrent = np.all(~reach | back, axis=2)  # i is recurrent iff everything it reaches reaches it back
        # Count closed classes by their lowest-numbered member.
        has_lower_member = np.any(reach & back & np.tri(k, k, -1, dtype=bool), axis=2)
        single = (recurrent & ~has_lower_member).sum(axis=1) == 1
        pi = np.empty((n, k))
        pi[single] = stationary_laws(matrices[single], recurrent[single])
        start, several = self.startprob if start is None else start, np.flatnonzero(~single)
        if self.n_support < self.n_states:  # sparse rows: MarkovChain's solve per matrix, as always
            for i in several:
                pi[i] = settled_law(matrices[i], start)
        elif len(several):  # dense rows whose entries underflowed to 0 (tiny concentrations), or lifted chains
            pi[several] = settled_laws(matrices[several], start)
        return pi
