"""Hidden Markov models: construction, the forward algorithm (belief states), theory, sampling.

Same sequence format as `chains.MarkovChain`: `[BOS, x1, ..., x_{L-1}]` with
BOS = K. An HMM is written in one of two forms; the tokens alone are not
Markov in either, and the optimal predictor tracks a belief over the hidden
states, updated one token at a time by the forward algorithm.

State-emitting ("Moore", hmmlearn's convention): `HiddenMarkovModel(transmat,
emissions, startprob)`. A hidden chain h_1, h_2, ... on H states runs
underneath (h_1 ~ startprob, h_{t+1} ~ transmat[h_t]) and each token is an
emission of the current hidden state, x_t ~ emissions[h_t]. The belief b_t =
P(h_t | x_1..x_t), and x_{t+1} is predicted with b_t @ transmat @ emissions.

Token-labelled ("Mealy", the form of computational mechanics, simplexity and
epsilon-transformers): `HiddenMarkovModel.from_token_transitions(T, startprob)`
with T[x][i, j] = P(token x, next hidden j | hidden i) and s_0 ~ startprob
(default: the stationary law of sum_x T[x]), so P(x_1..x_n) = startprob
T[x_1] ... T[x_n] 1. The belief b_t = P(s_t | x_1..x_t) is b_{t-1} T[x_t]
normalised, and x_{t+1} is predicted with b_t @ E, E[i, x] = sum_j T[x][i, j].
The state-emitting form is the special case T[x][i, j] = emissions[i, x]
transmat[i, j] (with s_{t-1} = h_t); it keeps its own arithmetic, so its
numbers, samples and beliefs are those it always had.

The mess3 preset (Marzen & Crutchfield; the belief-state-geometry process of
Shai et al. 2024) is usually written in the edge-emitting ("Mealy") form, one
matrix per token: T(k)[i, j] = P(emit k, go to j | in i) =
(a if j == k else b) * (y if i == j else x), with b = (1-a)/2, y = 1-2x.
Every T(k)[i, j] factorises as transmat[i, j] * emissions[j, k] (the token
depends on the destination state only), so the Moore form with those two
matrices is the same process exactly: h_t is the Mealy state after emitting
x_t, and the Mealy start pi (stationary, uniform) gives startprob = pi T = pi.

The entropy rate has no closed form for an HMM (mess3's has none). Here it is
bracketed exactly: for a stationary process H(x_t | x_<t, h_1) <= rate <=
H(x_t | x_<t), both by enumerating every prefix of the first positions; mess3's
bracket closes to ~1e-7. Numbers the bracket cannot pin down are Monte-Carlo
estimates from a fixed seed. Each theory number has a "_se" key beside it:
0.0 when exact, half the bracket when bracketed, else the standard error.
"""

import re
import warnings
from functools import cached_property

import numpy as np

from nanomarkov.errors import NanoMarkovError
from nanomarkov.processes.base import WHOLE_HISTORY_RECIPE, Option, Process
from nanomarkov.processes.markov import TRUE_LOSS_CHUNK, MarkovChain
from nanomarkov.processes.msp import MSP_TOLERANCE, MixedStatePresentation, msp_state_cap
from nanomarkov.processes.numerics import (
    alias_draw,
    alias_tables,
    check_distribution,
    check_random_parameters,
    entropy,
    random_rows,
    standard_error,
    token_dtype,
)

MESS3_X, MESS3_A = 0.05, 0.85  # Shai et al. 2024's mess3
# H * (H + K) matrix entries at most: the forward step is an (n, H) @ (H, H) product per token.
MAX_MATRIX_ENTRIES = 2**24
# The loss and accuracy at the first positions are exact, by enumerating every prefix
# with its forward vector, as far as (H+1) * K^(t-1) * max(H, K) stays below this (32 MiB).
MAX_ENUMERATED_ENTRIES = 2**22
# Entropy-rate bounds closer than this are used as exact (with half the gap as the error).
BRACKET_WIDTH = 1e-5
# Monte-Carlo theory: a fixed seed (the same HMM always gets the same numbers),
# about MC_TOKENS tokens per estimate (fewer for large H), in chunks of sequences.
MC_SEED = 20240501
MC_TOKENS = 2**21
MC_WORK = 2**28  # tokens * H * (H + K): caps the cost of an estimate for large HMMs
MC_CHUNK_TOKENS = 2**18
MC_CHUNK_ENTRIES = 2**24  # and at most this many predictive probabilities (tokens x K) per chunk
# The entropy rate is estimated as the mean optimal loss over positions
# ENTROPY_RATE_BURN_IN+1 .. 2*ENTROPY_RATE_BURN_IN of stationary runs: by then
# the belief has long forgotten the start in any HMM that mixes reasonably.
ENTROPY_RATE_BURN_IN = 256
# A renewal process's run lengths are summed until a longer run is less likely than this (below float64's
# resolution of 1), in at most RENEWAL_STEPS steps and RENEWAL_WORK multiply-adds (steps * H^2); a token
# matrix is of rank one when each row is a multiple of its largest to within RANK_TOLERANCE (relative).
RENEWAL_TAIL = 1e-17
RENEWAL_STEPS = 10_000
RENEWAL_WORK = 2**28
RANK_TOLERANCE = 1e-12


def mess3_arrays(x=MESS3_X, a=MESS3_A):
    """(transmat, emissions, startprob) of mess3 in the Moore form (see the module docstring)."""
    if not 0 < x < 0.5:
        raise NanoMarkovError(f"mess3 needs 0 < x < 1/2 (the probability of each switch), got x={x!r}")
    if not 0 < a < 1:
        raise NanoMarkovError(f"mess3 needs 0 < a < 1 (the probability of emitting the state's own token), got a={a!r}")
    b, y = (1 - a) / 2, 1 - 2 * x
    eye = np.eye(3, dtype=bool)
    return np.where(eye, y, x), np.where(eye, a, b), np.full(3, 1 / 3)


def checked_state_emitting(transmat, emissions):
    """(transmat, emissions) as read-only float64 arrays, once they are a valid state-emitting HMM."""
    transmat = np.array(transmat, dtype=np.float64)
    emissions = np.array(emissions, dtype=np.float64)
    if transmat.ndim != 2 or transmat.shape[0] != transmat.shape[1] or transmat.shape[0] < 2:
        raise NanoMarkovError(
            f"transmat must be a square (H, H) matrix with H >= 2 hidden states, got shape {transmat.shape}"
        )
    n_hidden = transmat.shape[0]
    if emissions.ndim != 2 or emissions.shape[0] != n_hidden or emissions.shape[1] < 2:
        raise NanoMarkovError(
            f"emissions must have shape (H={n_hidden}, K) with K >= 2 tokens, got shape {emissions.shape}"
        )
    if n_hidden * (n_hidden + emissions.shape[1]) > MAX_MATRIX_ENTRIES:
        raise NanoMarkovError(
            f"an HMM with H={n_hidden}, K={emissions.shape[1]} has more than "
            f"{MAX_MATRIX_ENTRIES} (2^24) matrix entries; use fewer states"
        )
    check_distribution("transmat rows", transmat)
    check_distribution("emissions rows", emissions)
    transmat.flags.writeable = emissions.flags.writeable = False
    return transmat, emissions


def checked_token_transitions(token_transitions):
    """token_transitions as a read-only float64 (K, H, H) array, once it is a valid token-labelled HMM."""
    tokens = np.array(token_transitions, dtype=np.float64)
    if tokens.ndim != 3 or tokens.shape[1] != tokens.shape[2] or tokens.shape[0] < 2 or tokens.shape[1] < 1:
        raise NanoMarkovError(
            "token_transitions must have shape (K, H, H): K >= 2 tokens, one H x H matrix per token, "
            f"got shape {tokens.shape}"
        )
    n_tokens, n_hidden, _ = tokens.shape
    if n_tokens * n_hidden * n_hidden > MAX_MATRIX_ENTRIES:
        raise NanoMarkovError(
            f"token_transitions with K={n_tokens}, H={n_hidden} have more than {MAX_MATRIX_ENTRIES} (2^24) "
            "entries; use fewer states"
        )
    # Row i of the (H, K*H) matrix [T[x][i, j]] over (x, j) is the law of (token, next hidden) from i.
    check_distribution("token_transitions (rows of sum_x T[x])", tokens.transpose(1, 0, 2).reshape(n_hidden, -1))
    tokens.flags.writeable = False
    return tokens


def reset_token(tokens):
    """The first token whose matrix has rank one, T[x] = u v (after it the belief is v / (v . r) whatever came
    before), or None."""
    for token, matrix in enumerate(tokens):
        largest = matrix[np.argmax(np.abs(matrix).sum(axis=1))]
        scale = np.abs(largest).max()
        if scale > 0:
            multiples = matrix @ largest / (largest @ largest)
            if np.abs(matrix - np.outer(multiples, largest)).max() <= RANK_TOLERANCE * scale:
                return token
    return None


def renewal_rate(tokens, normaliser, start):
    """(the reset token, the exact entropy rate) of a two-token process in which one token resets the belief,
    else None.

    After the reset token x the belief is b = v / (v . r) whatever came before, so once x has occurred (almost
    surely from `start`: checked) the sequence is i.i.d. blocks o^N x, o the other token, and by the
    renewal-reward theorem h = H(N) / E[N + 1], with P(N = n) = b T[o]^n T[x] r. Runs are followed until a
    longer one is less likely than RENEWAL_TAIL; None where that takes more than RENEWAL_WORK (the other token
    repeats for long, or forever)."""
    reset = reset_token(tokens) if len(tokens) == 2 else None
    if reset is None:
        return None
    row = tokens[reset][np.argmax(np.abs(tokens[reset]).sum(axis=1))]
    if abs(row @ normaliser) <= RANK_TOLERANCE * np.abs(row).max():
        return None
    runs = [run_lengths(tokens, reset, normaliser, first) for first in (start, row / (row @ normaliser))]
    if runs[0] is None or runs[1] is None:
        return None
    law = np.clip(runs[1], 0.0, None)
    return reset, float(entropy(law) / (law @ np.arange(1, len(law) + 1)))


def run_lengths(tokens, reset, normaliser, start):
    """P(the other token n times, then the reset token) from `start`, n = 0, 1, ..., until a longer run is less
    likely than RENEWAL_TAIL; None where that takes more than RENEWAL_STEPS steps or RENEWAL_WORK multiply-adds."""
    forward, runs = np.asarray(start, dtype=np.float64), []
    for _ in range(min(RENEWAL_STEPS, max(1, RENEWAL_WORK // tokens.shape[1] ** 2))):
        if runs and forward @ normaliser < RENEWAL_TAIL:
            return np.array(runs)
        runs.append(forward @ tokens[reset] @ normaliser)
        forward = forward @ tokens[1 - reset]
    return None


def stationary_law(hidden_chain):
    """The stationary law of a hidden chain (H, H): MarkovChain's exact solve, from a uniform start
    where it has several closed classes (it warns then)."""
    if hidden_chain.shape[0] == 1:
        return np.ones(1)
    return MarkovChain(hidden_chain, np.full(hidden_chain.shape[0], 1.0 / hidden_chain.shape[0])).stationary()


class HiddenMarkovModel(Process):
    """An HMM with H hidden states and K emitted tokens (the states of the sequences), in either form.

    State-emitting: `transmat` (H, H) moves the hidden state, `emissions` (H, K)
    emits a token from the current hidden state, `startprob` (H,) is the
    distribution of h_1; `token_transitions` is None. Token-labelled:
    `token_transitions` (K, H, H) and `startprob` (H,), the distribution of
    s_0; `transmat` and `emissions` are None. All float64 and read-only; the
    arrays an instance has are those of chain.npz.
    """

    process = "hmm"
    SUMMARY = "hidden Markov model (--preset mess3, or --hidden_states)"
    ARRAYS = ("transmat", "emissions", "startprob", "token_transitions")  # an instance has those of its form
    OPTIONS = (
        Option("preset", str, None, "mess3 (K=3, x and a below)", choices=("mess3",)),
        Option("hidden_states", int, None, "hidden states H (default K)"),
        Option("x", float, None, "mess3's switching probability (default 0.05)"),
        Option("a", float, None, "mess3's own-token emission (default 0.85)"),
    )
    RECIPE = WHOLE_HISTORY_RECIPE
    BELIEF_STATES = True
    HISTORY_REASON = "tokens are emissions of hidden states, and the next one depends on the belief over them"
    chunk_sequences = TRUE_LOSS_CHUNK  # true_loss's sequences per chunk
    # Whether conditioning on a hidden state is a process (an HMM's is; a generalized HMM's basis
    # vectors are no quasi-belief), which the entropy-rate bracket's lower bound needs.
    HIDDEN_STATE_BOUND = True

    def __init__(self, transmat=None, emissions=None, startprob=None, token_transitions=None):
        """State-emitting from transmat, emissions and startprob; token-labelled from token_transitions
        (see from_token_transitions). startprob None: the stationary law of the hidden chain."""
        if token_transitions is not None:
            if transmat is not None or emissions is not None:
                raise NanoMarkovError(
                    "give an HMM either as transmat + emissions (state-emitting) or as token_transitions "
                    "(token-labelled), not both"
                )
            self.transmat = self.emissions = None
            self.token_transitions = checked_token_transitions(token_transitions)
            hidden_chain = self.token_transitions.sum(axis=0)
            self._emission_rows = self.token_transitions.sum(axis=2).T  # E[i, x] = P(x | s = i)
        elif transmat is None or emissions is None:
            raise NanoMarkovError(
                "an HMM needs transmat and emissions (state-emitting) or token_transitions (token-labelled)"
            )
        else:
            self.transmat, self.emissions = checked_state_emitting(transmat, emissions)
            self.token_transitions, hidden_chain, self._emission_rows = None, self.transmat, self.emissions
        n_hidden = hidden_chain.shape[0]
        if startprob is None:
            startprob = stationary_law(hidden_chain)
        startprob = np.array(startprob, dtype=np.float64)
        if startprob.shape != (n_hidden,):
            what = "transmat" if self.token_transitions is None else "token_transitions"
            raise NanoMarkovError(f"startprob must have shape ({n_hidden},) to match {what}, got {startprob.shape}")
        check_distribution("startprob", startprob)
        for array in (hidden_chain, self._emission_rows, startprob):
            array.flags.writeable = False
        self.startprob, self._hidden_chain = startprob, hidden_chain
        self._normaliser = np.ones(n_hidden)  # a word's probability is startprob T[x_1] ... T[x_n] 1
        # seq_len -> _loss_and_accuracy, and -> _sampled (Monte-Carlo); the HMM is immutable, so never stale
        self._by_seq_len, self._samples = {}, {}

    @classmethod
    def from_token_transitions(cls, token_transitions, startprob=None):
        """A token-labelled HMM: token_transitions[x][i, j] = P(token x, next hidden j | hidden i).

        Shape (K, H, H), K >= 2 tokens, H >= 1 hidden states; every row of
        sum_x T[x] sums to 1. startprob (H,) is the law of the hidden state
        before the first token; None: the stationary law of sum_x T[x].
        """
        return cls(token_transitions=token_transitions, startprob=startprob)

    def arrays(self):
        """The arrays of this instance's form, {name: array} (chain.npz)."""
        return {name: getattr(self, name) for name in self.ARRAYS if getattr(self, name) is not None}

    @classmethod
    def from_arrays(cls, arrays):
        """The HMM of either form that arrays() saved: the arrays of ARRAYS that `arrays` has."""
        return cls(**{name: arrays[name] for name in cls.ARRAYS if name in arrays})

    def as_token_transitions(self):
        """T (K, H, H) with T[x][i, j] = P(x, next hidden j | hidden i): the token-labelled form of either form.

        For the state-emitting form, T[x][i, j] = emissions[i, x] * transmat[i, j].
        """
        if self.token_transitions is not None:
            return self.token_transitions
        return self.emissions.T[:, :, None] * self.transmat[None]

    @classmethod
    def mess3(cls, x=MESS3_X, a=MESS3_A):
        """The mess3 process: 3 hidden states, 3 tokens, started from its (uniform) stationary distribution."""
        return cls(*mess3_arrays(x, a))

    @classmethod
    def random(cls, n_states, seed=42, alpha=1.0, sparsity=None, hidden_states=None, preset=None, x=None, a=None):
        """mess3 (preset="mess3", K=3) or a random HMM with `hidden_states` H (default K).

        Random: transmat rows ~ Dirichlet(alpha) (sparse rows by MarkovChain's
        rule with `sparsity`), emission rows ~ Dirichlet(alpha), startprob the
        stationary distribution of transmat, so the token process is
        stationary. mess3 is fixed by x and a (defaults 0.05, 0.85); seed only
        seeds the sampling of a dataset, and alpha/sparsity do not apply.
        """
        if preset == "mess3":
            if n_states != 3 or hidden_states not in (None, 3):
                raise NanoMarkovError(
                    f"mess3 has 3 tokens and 3 hidden states, got K={n_states}, hidden_states={hidden_states}"
                )
            if sparsity is not None or alpha != 1.0:
                raise NanoMarkovError("alpha and sparsity shape random HMMs; mess3 is fixed by x and a")
            return cls.mess3(MESS3_X if x is None else x, MESS3_A if a is None else a)
        if preset is not None:
            raise NanoMarkovError(f"unknown HMM preset {preset!r}; known: mess3")
        if x is not None or a is not None:
            raise NanoMarkovError("x and a are mess3's parameters; they need preset mess3 (--preset mess3)")
        check_random_parameters(n_states, alpha, sparsity)
        hidden_states = n_states if hidden_states is None else hidden_states
        if not isinstance(hidden_states, (int, np.integer)) or hidden_states < 2:
            raise NanoMarkovError(f"hidden_states must be an integer >= 2, got {hidden_states!r}")
        if hidden_states * (hidden_states + n_states) > MAX_MATRIX_ENTRIES:  # before drawing them
            raise NanoMarkovError(
                f"an HMM with H={hidden_states}, K={n_states} has more than "
                f"{MAX_MATRIX_ENTRIES} (2^24) matrix entries; use fewer states"
            )
        rng = np.random.default_rng(seed)
        transmat = random_rows(rng, hidden_states, hidden_states, alpha, sparsity)
        emissions = rng.dirichlet(np.full(n_states, float(alpha)), size=hidden_states)
        uniform = np.full(hidden_states, 1.0 / hidden_states)
        with warnings.catch_warnings():
            # A sparse hidden chain may have several closed classes; the long-run distribution
            # reached from a uniform start, which stationary() then returns, is the start we want.
            warnings.simplefilter("ignore")
            startprob = MarkovChain(transmat, uniform).stationary()
        return cls(transmat, emissions, startprob)

    def options(self):
        """The generation options this HMM answers to; mess3 is recognised by its exact arrays."""
        if self.token_transitions is not None:
            return {"preset": None, "hidden_states": self.n_hidden}
        x, a = float(self.transmat[0, 1]), float(self.emissions[0, 0])
        if (
            self.transmat.shape == self.emissions.shape == (3, 3)
            and 0 < x < 0.5
            and 0 < a < 1
            and all(np.array_equal(mine, theirs) for mine, theirs in zip(self.arrays().values(), mess3_arrays(x, a)))
        ):
            return {"preset": "mess3", "hidden_states": 3, "x": x, "a": a}
        return {"preset": None, "hidden_states": self.n_hidden}

    @classmethod
    def folder_name(cls, n_states, preset=None, hidden_states=None, x=None, a=None):
        """ "mess3" (with -x..-a.. when not the default parameters), else "hmm{K}-h{H}"."""
        if preset == "mess3":
            x, a = MESS3_X if x is None else x, MESS3_A if a is None else a
            return "mess3" if (x, a) == (MESS3_X, MESS3_A) else f"mess3-x{x:g}-a{a:g}"
        return f"hmm{n_states}-h{n_states if hidden_states is None else hidden_states}"

    @classmethod
    def parse_folder_name(cls, name):
        if name == "mess3":
            return 3, {"preset": "mess3"}
        match = re.fullmatch(r"hmm(\d+)-h(\d+)", name)
        return (int(match.group(1)), {"hidden_states": int(match.group(2))}) if match else None

    @property
    def n_states(self):
        return self._emission_rows.shape[1]

    @property
    def n_hidden(self):
        return self._hidden_chain.shape[0]

    # ------------------------------------------------------- the forward algorithm

    # A token at most this probable from a belief is impossible there (the MSP's floor): 0 for an HMM,
    # whose impossible tokens have probability 0 exactly.
    MSP_FLOOR = 0.0

    def _filtering(self, tokens):
        """For t = 1..L-1: (prior, P(x_t | x_<t), belief), each row one sequence.

        State-emitting: prior P(h_t | x_<t), belief P(h_t | x_<=t). Token-labelled:
        prior P(s_{t-1} | x_<t), belief P(s_t | x_<=t). Either way prior @ E is
        the predictive distribution of x_t. The belief is renormalised at every
        step, so nothing underflows however long the sequences. A token of
        probability 0 leaves the belief at its prior (there is no posterior to
        take), which keeps later steps finite.
        """
        states = np.asarray(tokens[:, 1:], dtype=np.int64)
        prior = np.tile(self.startprob, (states.shape[0], 1))
        for t in range(states.shape[1]):
            joint = self._joint(prior, states[:, t])
            evidence = joint @ self._normaliser
            belief = np.divide(joint, evidence[:, None], out=prior.copy(), where=evidence[:, None] > 0)
            yield prior, evidence, belief
            prior = belief if self.token_transitions is not None else belief @ self.transmat

    def _joint(self, prior, states):
        """Per row, the prior times the token's likelihood: P(x_t, h_t | x_<t) state-emitting,
        P(x_t, s_t | x_<t) = prior @ T[x_t] token-labelled."""
        if self.token_transitions is None:
            return prior * self.emissions.T[states]
        joint = np.empty_like(prior)
        for token, matrix in enumerate(self.token_transitions):  # one product per token, not per row
            rows = states == token
            joint[rows] = prior[rows] @ matrix
        return joint

    def belief_states(self, tokens):
        """The belief over the hidden states after every prefix of BOS-led sequences: (n, L, H) float64.

        Position 0 (BOS, nothing seen yet) holds startprob. State-emitting: position
        t holds P(h_t | x_1..x_t), the hidden state that emitted x_t; for a
        stationary start (mess3, random HMMs) startprob @ transmat = startprob, so
        the next-token distribution is belief @ transmat @ emissions at every
        position, BOS included. Token-labelled: position t holds P(s_t | x_1..x_t),
        the hidden state after x_t (the mixed state of computational mechanics),
        and the next-token distribution is belief @ E; where the mixed-state presentation
        closes, these are its states (the probes' targets), found by walking it.
        """
        tokens = self.check_tokens(tokens)
        if self.token_transitions is not None and self._msp.closed:  # the MSP's own states
            return self._msp.beliefs[self._msp.state_ids(np.asarray(tokens[:, 1:], dtype=np.int64))]
        out = np.empty((tokens.shape[0], tokens.shape[1], self.n_hidden))
        out[:, 0] = self.startprob
        for t, (_, _, belief) in enumerate(self._filtering(tokens), start=1):
            out[:, t] = belief
        return out

    def optimal_log_probs(self, tokens):
        """The optimal next-token log-probs for BOS-led sequences (n, L): shape (n, L-1, K), float64.

        Entry [:, t] predicts tokens[:, t+1] from tokens[:, :t+1]: the log of
        the predictive distribution prior @ E of _filtering (-inf where a probability is 0).
        """
        tokens = self.check_tokens(tokens)
        out = np.empty((tokens.shape[0], tokens.shape[1] - 1, self.n_states))
        with np.errstate(divide="ignore"):
            for t, (prior, _, _) in enumerate(self._filtering(tokens)):
                out[:, t] = np.log(np.clip(prior @ self._emission_rows, 0.0, None))  # a GHMM rounds below 0
        return out

    def true_loss(self, tokens):
        """Exact mean NLL of the optimal predictor per predicted token: -log P(x_1..x_{L-1}) / (L-1), averaged."""
        tokens = self.check_tokens(tokens)
        total, step = 0.0, self.chunk_sequences
        with np.errstate(divide="ignore"):
            for lo in range(0, tokens.shape[0], step):
                for _, evidence, _ in self._filtering(tokens[lo : lo + step]):
                    total -= np.log(evidence).sum()
        return float(total / (tokens.shape[0] * (tokens.shape[1] - 1)))

    # ---------------------------------------------------------------- theory

    @cached_property
    def _stationary(self):
        """The hidden chain's stationary distribution (MarkovChain's exact solve; warns if not unique)."""
        if self.n_hidden == 1:
            return np.ones(1)
        return MarkovChain(self._hidden_chain, self.startprob).stationary()

    def unigram_loss(self):
        """H of the stationary token distribution pi @ E: a model that knows only token frequencies."""
        return float(entropy(self._stationary @ self._emission_rows))

    def unigram_law(self, seq_len):
        """The unigram stage's predictor: the stationary token distribution pi @ E (unigram_loss's)."""
        return self._stationary @ self._emission_rows

    def _enumerate(self, n_positions, starts):
        """Exact expected loss and accuracy of the optimal predictor at positions 1..n, for each start.

        `starts` (S, H) are distributions of the first hidden state (h_1, or s_0
        token-labelled). Every prefix x_1..x_{t-1} carries its forward vector
        P(prefix, hidden state that emits x_t); its product with E is the
        joint P(prefix, x_t), whose rows give the prefix's
        probability (the row sum) and its predictive distribution. Position t
        costs sum_prefix sum_x -P(prefix, x) log P(x | prefix) and is right
        with probability sum_prefix max_x P(prefix, x). Returns two (S, n) arrays.
        """
        forward = starts[:, None, :]
        losses, accuracies = [], []
        for t in range(1, n_positions + 1):
            joint = forward @ self._emission_rows
            mass = joint.sum(axis=2, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                losses.append(np.where(joint > 0, joint * (np.log(mass) - np.log(joint)), 0.0).sum(axis=(1, 2)))
            accuracies.append(joint.max(axis=2).sum(axis=1))
            if t < n_positions:  # prefix index p*K + x
                forward = self._extend(forward)
        return np.stack(losses, axis=1), np.stack(accuracies, axis=1)

    def _extend(self, forward):
        """The forward vectors (S, P, H) of every prefix extended by every token: (S, P*K, H), index p*K + x."""
        if self.token_transitions is None:  # emit, then one hidden step
            extended = forward[:, :, None, :] * self.emissions.T
            return extended.reshape(len(forward), -1, self.n_hidden) @ self.transmat
        extended = np.einsum("sph,xhj->spxj", forward, self.token_transitions)
        return extended.reshape(len(forward), -1, self.n_hidden)

    @cached_property
    def _exact_head(self):
        """Exact per-position losses and accuracies at positions 1..m, and a lower bound on the entropy rate.

        m is the most positions whose K^(m-1) prefixes (per start) fit in
        MAX_ENUMERATED_ENTRIES. For a stationary process the loss at position
        t, H(x_t | x_<t), falls to the entropy rate h, and knowing the first
        hidden state as well only helps: sum_s pi(s) H(x_t | x_<t, h_1 = s) <= h
        <= H(x_t | x_<t) (Cover & Thomas, Thm 4.5.1; token-labelled, s_0 in place
        of h_1: given it, the tokens after it are independent of those before).
        The lower bound is None otherwise.
        """
        stationary = self.HIDDEN_STATE_BOUND and np.allclose(
            self.startprob @ self._hidden_chain, self.startprob, rtol=0, atol=1e-12
        )
        starts = np.vstack([self.startprob, np.eye(self.n_hidden)]) if stationary else self.startprob[None]
        positions = 1
        while len(starts) * self.n_states**positions * max(self.n_hidden, self.n_states) <= MAX_ENUMERATED_ENTRIES:
            positions += 1
        losses, accuracies = self._enumerate(positions, starts)
        lower = float(self.startprob @ losses[1:, -1]) if stationary else None
        return losses[0], accuracies[0], lower

    @cached_property
    def _msp(self):
        """The mixed-state presentation from startprob, up to msp_state_cap states (msp.py)."""
        cap = msp_state_cap(*self.as_token_transitions().shape[:2])
        return MixedStatePresentation(
            self.as_token_transitions(), self._normaliser, self.startprob, cap, self.MSP_FLOOR
        )

    def _exact_positions(self, n):
        """(losses, accuracies) at the first positions known exactly, n of them where the MSP reaches
        that deep, else _exact_head's (enumerating every prefix)."""
        if self._msp.covers(n):
            return self._msp.loss_and_accuracy(n)
        losses, accuracies, _ = self._exact_head
        return losses, accuracies

    def theory_note(self, seq_len):
        """One line: whether theory is exact from the mixed-state presentation, and if not, why; where the MSP
        merged different beliefs (within MSP_TOLERANCE), from which depth: positions up to it are exact."""
        msp = self._msp
        depth, gap = msp.first_merge()
        if msp.closed and depth is None:
            return f"exact: mixed-state presentation, {msp.n_states} states"
        merged = (
            ""
            if depth is None
            else f"; from depth {depth}, beliefs within {MSP_TOLERANCE:g} of one another are one state (apart by "
            f"{gap:.0e} at most)"
        )
        about = (
            f"mixed-state presentation, {msp.n_states} states"
            if msp.closed
            else f"the mixed-state presentation passed {msp.n_states} states at depth {msp.passed_depth}"
        )
        if not msp.covers(seq_len - 1):
            return f"estimated: {about}{merged}"
        whole = depth is None or depth > seq_len - 2
        exact = f"seq_len {seq_len} (depth {seq_len - 2})" if whole else f"position {depth}"
        return f"exact by position up to {exact}; entropy rate {self.rate_kind()}: {about}{merged}"

    def rate_kind(self):
        """How entropy_rate() is known where the MSP does not give it: "exact (...)" or "estimated"."""
        if self._renewal is not None:
            return f"exact (token {self._renewal[0]} resets the belief)"
        return "exact (unifilar)" if self.unifilar else "estimated"

    def _bracket(self):
        """(lower, upper) bounds on the entropy rate, or None when they are further apart than BRACKET_WIDTH."""
        losses, _, lower = self._exact_head
        if lower is None or losses[-1] - lower > BRACKET_WIDTH:
            return None
        return min(lower, float(losses[-1])), max(lower, float(losses[-1]))  # apart by rounding at most

    @cached_property
    def unifilar(self):
        """True for a token-labelled HMM whose hidden state and token determine the next hidden state."""
        if self.token_transitions is None:
            return False
        return bool(np.all((self.token_transitions > 0).sum(axis=2) <= 1))

    def _monte_carlo(self, seq_len, positions):
        """Per sampled sequence and position of `positions` (a slice of 0..L-2), the optimal predictor's
        expected loss (the entropy of its predictive distribution) and accuracy (its largest probability).

        Averaging the predictive's own entropy rather than -log p of the sampled
        token has the same expectation and less variance. Returns two (n, P) arrays.
        """
        budget = min(MC_TOKENS, MC_WORK // (self.n_hidden * (self.n_hidden + self.n_states)))
        n_sequences = max(64, budget // seq_len)
        per_chunk = max(1, min(MC_CHUNK_TOKENS // seq_len, MC_CHUNK_ENTRIES // (seq_len * self.n_states)))
        rng = np.random.default_rng(MC_SEED)
        losses, accuracies = [], []
        for lo in range(0, n_sequences, per_chunk):
            probs = np.exp(self.optimal_log_probs(self.sample(min(per_chunk, n_sequences - lo), seq_len, rng)))
            losses.append(entropy(probs[:, positions]))
            accuracies.append(probs[:, positions].max(axis=2))
        return np.concatenate(losses), np.concatenate(accuracies)

    def _sampled(self, seq_len):
        """_monte_carlo over every position of sequences of seq_len tokens, computed once per seq_len."""
        if seq_len not in self._samples:
            self._samples[seq_len] = self._monte_carlo(seq_len, slice(None))
        return self._samples[seq_len]

    @cached_property
    def _renewal(self):
        """(the reset token, the exact entropy rate) where the process is a renewal process (renewal_rate)."""
        return renewal_rate(self.as_token_transitions(), self._normaliser, self.startprob)

    @cached_property
    def _entropy_rate(self):
        if self._renewal is not None:  # first: it needs no MSP
            return self._renewal[1], 0.0
        if self._msp.closed and self._msp.first_merge()[0] is None:  # merged beliefs can leak between classes
            return self._msp.entropy_rate(), 0.0
        if self.unifilar:
            return float(self._stationary @ entropy(self._emission_rows)), 0.0
        bracket = self._bracket()
        if bracket is not None:
            return (bracket[0] + bracket[1]) / 2, (bracket[1] - bracket[0]) / 2
        burn_in = ENTROPY_RATE_BURN_IN
        losses, _ = self._monte_carlo(2 * burn_in + 1, slice(burn_in, 2 * burn_in))
        losses = losses.mean(axis=1)
        return float(losses.mean()), float(standard_error(losses))

    def entropy_rate(self):
        """The rate lim_t H(x_t | x_<t) of the token process; its error is theory's entropy_rate_se.

        Exact for a renewal process (renewal_rate: two tokens, one of which resets the belief; sns,
        fanizza, golden_mean). Else exact where the mixed-state presentation closes within its cap
        having merged no different beliefs (msp.MixedStatePresentation.entropy_rate: a finite sum over
        its recurrent states; a belief merged into a different one can leak between its closed classes).
        Else exact for a unifilar token-labelled HMM: sum_i pi_i H(E[i]) (its state,
        once known, stays known, so the rate is H(x | s) under the stationary
        law pi; Crutchfield & Feldman 2003). Else
        the midpoint of the exact bracket of _exact_head with half its width as
        a hard error bound, when that is below BRACKET_WIDTH / 2 (mess3: 1.2e-7).
        Else a Monte-Carlo estimate and its standard error: the mean optimal
        loss over positions B+1..2B (B = ENTROPY_RATE_BURN_IN) of independent
        runs, an upper bound up to its error once beliefs forget the start.
        """
        return self._entropy_rate[0]

    def _loss_and_accuracy(self, seq_len):
        """(optimal loss, its error, optimal accuracy, its error) for sequences of seq_len tokens.

        Exact (error 0.0) when every position is in _exact_positions. Beyond them, with
        a tight bracket, every later position's loss lies between the bounds, so
        the loss is exact up to a hard bound; otherwise it, and the accuracy
        always, is a Monte-Carlo estimate with its standard error.
        """
        self.check_seq_len(seq_len)
        if seq_len not in self._by_seq_len:
            n = seq_len - 1
            losses, accuracies = self._exact_positions(n)
            if n <= len(losses):
                numbers = (losses[:n].mean(), 0.0, accuracies[:n].mean(), 0.0)
            else:
                sampled_losses, sampled_accuracies = (values.mean(axis=1) for values in self._sampled(seq_len))
                numbers = (
                    sampled_losses.mean(),
                    standard_error(sampled_losses),
                    sampled_accuracies.mean(),
                    standard_error(sampled_accuracies),
                )
                bracket = self._bracket()
                if bracket is not None:
                    tail = n - len(losses)
                    numbers = (
                        (losses.sum() + tail * sum(bracket) / 2) / n,
                        tail * (bracket[1] - bracket[0]) / 2 / n,
                        *numbers[2:],
                    )
            self._by_seq_len[seq_len] = tuple(float(v) for v in numbers)
        return self._by_seq_len[seq_len]

    def optimal_loss(self, seq_len):
        """Expected loss of the optimal predictor on sequences of seq_len tokens (see _loss_and_accuracy)."""
        return self._loss_and_accuracy(seq_len)[0]

    def optimal_accuracy(self, seq_len):
        """Expected top-1 accuracy of the optimal predictor (see _loss_and_accuracy)."""
        return self._loss_and_accuracy(seq_len)[2]

    def optimal_loss_by_position(self, seq_len):
        """(losses, errors) of the optimal predictor at positions 1..L-1.

        Exact (error 0.0) at the positions of _exact_positions; beyond them the
        midpoint of the entropy-rate bracket with half its width when the
        bracket is tight, else the Monte-Carlo estimate and its standard error.
        """
        self.check_seq_len(seq_len)
        n = seq_len - 1
        head, _ = self._exact_positions(n)
        if n <= len(head):
            return head[:n].copy(), np.zeros(n)
        bracket, tail = self._bracket(), n - len(head)
        if bracket is not None:
            values = np.full(tail, sum(bracket) / 2)
            errors = np.full(tail, (bracket[1] - bracket[0]) / 2)
        else:
            sampled = self._sampled(seq_len)[0][:, len(head) :]
            values, errors = sampled.mean(axis=0), standard_error(sampled, axis=0)
        return np.concatenate([head, values]), np.concatenate([np.zeros(len(head)), errors])

    def standard_errors(self, seq_len):
        """Each "*_se" is 0.0 where exact, a hard bound from the entropy-rate bracket, else a standard error."""
        _, loss_se, _, accuracy_se = self._loss_and_accuracy(seq_len)
        return {"entropy_rate": self._entropy_rate[1], "optimal_loss": loss_se, "optimal_accuracy": accuracy_se}

    # -------------------------------------------------------------- sampling

    @cached_property
    def _samplers(self):
        """Alias tables, flattened: the hidden steps (startprob as the last row), then the emission rows.

        State-emitting, hidden row h is transmat[h]. Token-labelled, row x*H + i
        is the next hidden state's law given hidden i and token x, T[x][i] / E[i, x]
        (uniform where x cannot follow i: never drawn).
        """
        if self.token_transitions is None:
            steps = self.transmat
        else:
            mass = self._emission_rows.T[:, :, None]  # (K, H, 1): E[i, x]
            uniform = np.full(self.token_transitions.shape, 1.0 / self.n_hidden)
            steps = np.divide(self.token_transitions, mass, out=uniform, where=mass > 0).reshape(-1, self.n_hidden)
        hidden = alias_tables(np.vstack([steps, self.startprob]))
        emitted = alias_tables(self._emission_rows)
        return tuple(table.ravel() for table in hidden + emitted)

    def sample(self, n_sequences, seq_len, rng):
        """n_sequences BOS-led sequences of seq_len tokens, shape (n, seq_len).

        Two uniforms per token (the hidden state that emits it, then the token),
        laid out sequence by sequence: each sequence takes a contiguous run of
        2(L-1) numbers from `rng`, so the bytes do not depend on how n is chunked.
        Token-labelled, the hidden step after token x from state i draws from
        T[x][i] normalised, so (x, next state) has law T[x][i, j].
        """
        self.check_seq_len(seq_len)
        h, k = self.n_hidden, self.n_states
        keep_h, alias_h, keep_e, alias_e = self._samplers
        uniforms = rng.random((n_sequences, seq_len - 1, 2))
        out = np.empty((seq_len, n_sequences), dtype=token_dtype(self.vocab_size))
        out[0] = self.bos_token
        row = np.full(n_sequences, len(keep_h) // h - 1, dtype=np.int64)  # the last hidden row is startprob
        for t in range(seq_len - 1):
            hidden = alias_draw(keep_h, alias_h, row * h, uniforms[:, t, 0], h)
            out[t + 1] = token = alias_draw(keep_e, alias_e, hidden * k, uniforms[:, t, 1], k)
            row = hidden if self.token_transitions is None else token * h + hidden
        return out.T
