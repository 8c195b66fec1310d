"""The processes of the literature by name: each a registered process fixed by its parameters.

`nanomarkov generate --process golden_mean --p 0.4` writes that process; its K is
the process's own (no K to give), its parameters are its OPTIONS (each with the
literature's default), and its theory is exact where the HMM machinery makes it so.
The HMMs are written token-labelled, T[x][i, j] = P(token x, next hidden j |
hidden i), the form of the papers and of simplexity / epsilon-transformers, whose
matrices these follow (docs/processes.md lists each, its source and its entropy
rate). Every process starts from its stationary law, as the papers sample.

A named process has no random part: `random(seed=...)` builds the same process for
every seed (the seed of a dataset seeds its samples only), and alpha and sparsity,
which shape random rows, are refused. chain.npz holds the matrices and each
parameter as a 0-d array; the process is rebuilt from the parameters and checked
against the matrices.

Entropy rates h below are in bits (theory reports nats), H(p) the binary entropy.
"""

import math

import numpy as np

from nanomarkov.errors import NanoMarkovError
from nanomarkov.processes.base import LOOKBACK_RECIPE, RECENCY_RECIPE, TRAINED_RECENCY_RECIPE, Option
from nanomarkov.processes.ghmm import GeneralizedHMM
from nanomarkov.processes.hmm import MAX_MATRIX_ENTRIES, HiddenMarkovModel, stationary_law
from nanomarkov.processes.markov import MarkovChain


def check_probability(process, name, value, low=0.0, high=1.0):
    """Raise unless low < value < high: a parameter of a named process."""
    if not low < value < high:
        raise NanoMarkovError(
            f"--{name} of --process {process} must lie strictly between {low:g} and {high:g}, got {value}"
        )


def format_value(value):
    """A parameter as folder names write it: 0.3, 1e-05, 4."""
    return f"{value:g}" if isinstance(value, float) else str(value)


class NamedProcess:
    """What every named process shares; it comes before the process class it builds on.

    A subclass declares process, SUMMARY, N_STATES, OPTIONS (its parameters, each
    with its default) and `build(**parameters)`: the keyword arguments of the base
    class's constructor. Every float parameter is a probability strictly between
    0 and 1, or between the bounds BOUNDS gives it.
    """

    FOLDER_PREFIX = None  # not the base class's (markov's "mm")
    N_STATES = None
    BOUNDS = {}

    def __init__(self, **parameters):
        names = self.option_names()
        unknown = sorted(set(parameters) - set(names))
        if unknown:
            raise NanoMarkovError(
                f"--process {self.process} has no parameter {unknown[0]!r}; its parameters: "
                + (", ".join(f"--{name}" for name in names) or "none")
            )
        self.parameters = {
            option.name: option.type(option.default if parameters.get(option.name) is None else parameters[option.name])
            for option in self.OPTIONS
        }
        for name, value in self.parameters.items():
            if isinstance(value, float):
                check_probability(self.process, name, value, *self.BOUNDS.get(name, (0.0, 1.0)))
        super().__init__(**self.build(**self.parameters))

    @classmethod
    def build(cls, **parameters):
        raise NotImplementedError

    @classmethod
    def random(cls, n_states=None, seed=42, alpha=1.0, sparsity=None, **parameters):
        """The process with these parameters (defaults for those left out); the same for every seed."""
        if n_states is not None and n_states != cls.N_STATES:
            raise NanoMarkovError(
                f"--process {cls.process} has K = {cls.N_STATES} tokens, fixed by the process; got K = {n_states} "
                "(leave K out)"
            )
        if sparsity is not None or alpha != 1.0:
            raise NanoMarkovError(
                f"--alpha and --sparsity shape random rows; --process {cls.process} is fixed by its parameters "
                f"({', '.join('--' + name for name in cls.option_names()) or 'none'})"
            )
        return cls(**parameters)

    def options(self):
        return dict(self.parameters)

    def arrays(self):
        """The matrices of the base class, and each parameter as a 0-d array."""
        parameters = {name: np.array(value) for name, value in self.parameters.items()}
        return {**super().arrays(), **parameters}

    @classmethod
    def from_arrays(cls, arrays):
        """The process of the parameters in `arrays`, once its matrices are those `arrays` holds."""
        process = cls(**{name: arrays[name][()] for name in cls.option_names()})
        for name in cls.ARRAYS:
            if not np.array_equal(arrays[name], getattr(process, name)):
                raise NanoMarkovError(
                    f"{name} is not that of --process {cls.process} with {process.parameters} (edited?)"
                )
        return process

    @classmethod
    def folder_name(cls, n_states=None, **options):
        """The process name, then "-{name}{value}" for each parameter given other than its default."""
        defaults = {option.name: option.default for option in cls.OPTIONS}
        changed = {name: value for name, value in options.items() if value is not None and value != defaults[name]}
        return (cls.FOLDER_PREFIX or cls.process) + "".join(
            f"-{name}{format_value(value)}" for name, value in changed.items()
        )

    @classmethod
    def parse_folder_name(cls, name):
        prefix = cls.FOLDER_PREFIX or cls.process
        if name != prefix and not name.startswith(prefix + "-"):
            return None
        suffix = name[len(prefix) :]
        options = cls.parse_folder_options(suffix)
        if options is None or cls.folder_name(**options) != name:
            return None
        return cls.N_STATES, options


class NamedHMM(NamedProcess, HiddenMarkovModel):
    """A named token-labelled HMM; `build` returns {"token_transitions": T}, the start is stationary."""

    ARRAYS = ("token_transitions", "startprob")


class NamedChain(NamedProcess, MarkovChain):
    """A named first-order chain; `build` returns {"transmat": P, "startprob": pi}."""


def binary_chain(p, q):
    """transmat [[1-p, p], [q, 1-q]] and its stationary law (q, p) / (p + q)."""
    transmat = np.array([[1 - p, p], [q, 1 - q]])
    return {"transmat": transmat, "startprob": stationary_law(transmat)}


class Switching(NamedChain):
    """Makkuva et al. 2024, "Attention with Markov"; h = (q H(p) + p H(q)) / (p + q).

    The binary switching chain P = [[1-p, p], [q, 1-q]], started from its
    stationary law (q, p) / (p + q).
    """

    process = "switching"
    SUMMARY = "binary switching chain P = [[1-p, p], [q, 1-q]] (--p --q; K=2)"
    N_STATES = 2
    OPTIONS = (
        Option("p", float, 0.2, "the named process's p (switching: P(0 -> 1); see docs/processes.md)"),
        Option("q", float, 0.3, "the named process's q (switching: P(1 -> 0))"),
    )

    @classmethod
    def build(cls, p, q):
        return binary_chain(p, q)


class Coin(NamedChain):
    """A biased coin, i.i.d. tokens with P(1) = p (simplexity's coin, whose p is P(0)); h = H(p)."""

    process = "coin"
    SUMMARY = "biased coin, i.i.d. with P(1) = p (--p; K=2)"
    N_STATES = 2
    OPTIONS = (Option("p", float, 0.7, "P(1)"),)

    @classmethod
    def build(cls, p):
        return binary_chain(p, 1 - p)


class GoldenMean(NamedHMM):
    """Golden mean process, no two 1s in a row (Crutchfield & Feldman 2003); h = H(p) / (1 + p).

    State A emits 1 with probability p (to B) or 0 (stays); B emits 0 (to A).
    At p = 1/2, h = 2/3 bit. simplexity's no_consecutive_ones.
    """

    process = "golden_mean"
    SUMMARY = "golden mean: no two 1s in a row (--p; K=2)"
    N_STATES = 2
    OPTIONS = (Option("p", float, 0.5, "P(1) after a 0"),)

    @classmethod
    def build(cls, p):
        return {"token_transitions": [[[1 - p, 0], [1, 0]], [[0, p], [0, 0]]]}


class Even(NamedHMM):
    """Even process, runs of 1s of even length between 0s (Crutchfield & Feldman 2003); h = H(p) / (1 + p).

    State A emits 0 (stays) or, with probability p, 1 (to B); B emits 1 (to A).
    At p = 1/2, h = 2/3 bit. simplexity's even_ones, epsilon-transformers' Even.
    """

    process = "even"
    SUMMARY = "even process: runs of 1s of even length (--p; K=2)"
    N_STATES = 2
    RECIPE = LOOKBACK_RECIPE
    OPTIONS = (Option("p", float, 0.5, "P(a pair of 1s) from the start state"),)

    @classmethod
    def build(cls, p):
        return {"token_transitions": [[[1 - p, 0], [0, 0]], [[0, p], [1, 0]]]}


class ZeroOneRandom(NamedHMM):
    """Zero-one-random (Z1R): 0, 1, then a random bit, repeated (Crutchfield & Feldman 2003); h = H(p) / 3.

    States 0, 1, R: 0 emits 0, 1 emits 1, R emits 1 with probability p, each to
    the next state. At p = 1/2, h = 1/3 bit. simplexity's zero_one_random.
    """

    process = "z1r"
    SUMMARY = "zero-one-random: 0, 1, a random bit, repeated (--p; K=2)"
    N_STATES = 2
    OPTIONS = (Option("p", float, 0.5, "P(1) at the random step"),)

    @classmethod
    def build(cls, p):
        zero = [[0, 1, 0], [0, 0, 0], [1 - p, 0, 0]]
        one = [[0, 0, 0], [0, 0, 1], [p, 0, 0]]
        return {"token_transitions": [zero, one]}


def rrxor_matrices(p1, p2):
    """RRXOR's T on states S, 0, 1, T, F: two random bits (P(0) = p1, then p2), then their XOR."""
    t = np.zeros((2, 5, 5))
    start, zero, one, true, false = range(5)
    t[0, start, zero], t[1, start, one] = p1, 1 - p1
    t[0, zero, false], t[1, zero, true] = p2, 1 - p2
    t[0, one, true], t[1, one, false] = p2, 1 - p2
    t[1, true, start] = t[0, false, start] = 1.0
    return t


class RRXOR(NamedHMM):
    """Random-random-XOR (Crutchfield & Feldman 2003; Shai et al. 2024); h = (H(p1) + H(p2)) / 3.

    Two random bits (the first 0 with probability p1, the second p2), then their
    XOR, repeated. At p1 = p2 = 1/2, h = 2/3 bit. simplexity's and epsilon-transformers' rrxor.
    """

    process = "rrxor"
    SUMMARY = "random-random-XOR: two random bits, then their XOR (--p1 --p2; K=2)"
    N_STATES = 2
    # Every pair of its tokens is independent and uniform, so a model at the uniform prediction gets no pull
    # towards any one earlier token, only towards two of them jointly (and the phase), as in learning a sparse
    # parity. It sat at ln 2 (0.22 nats above the optimum) with the whole-history recipe, the look-back recipe and
    # at lr 3e-3. With alibi's fixed lines (RECENCY_RECIPE) it learns slowly: 0.044 nats after 2000 steps, 0.035
    # beside the position table; 3 layers 0.037, mlp_ratio 4 0.036, lr 2e-2 0.053, lr 5e-3 worse, a head with
    # slope 0 worse, batch 16 no better a token. Such a model predicts most XOR bits surely (median loss 2e-4)
    # but is unsure of the phase at 23 % of them past position 30: it reads the phase from the last few
    # triples. With the lines trained (TRAINED_RECENCY_RECIPE) a head can read every third token back.
    RECIPE = TRAINED_RECENCY_RECIPE
    OPTIONS = (
        Option("p1", float, 0.5, "P(0) of the first random bit"),
        Option("p2", float, 0.5, "P(0) of the second random bit"),
    )

    @classmethod
    def build(cls, p1, p2):
        return {"token_transitions": rrxor_matrices(p1, p2)}


class LeakyRRXOR(RRXOR):
    """simplexity's leaky RRXOR: (1 - epsilon) RRXOR + epsilon/10 on every entry; h has no closed form.

    Every (token, next state) pair gets epsilon/10, so every sequence is
    possible and the beliefs never synchronise (epsilon = 0: RRXOR).
    """

    process = "leaky_rrxor"
    SUMMARY = "RRXOR with every transition leaking epsilon/10 (--p1 --p2 --epsilon; K=2)"
    # The default recipe left 0.049 nats; alibi's fixed lines 0.011 at lr 1e-2, 0.0097 at 2e-2 (RECENCY_RECIPE);
    # trained, the phase of the triples is in reach as for rrxor (TRAINED_RECENCY_RECIPE).
    RECIPE = TRAINED_RECENCY_RECIPE
    OPTIONS = RRXOR.OPTIONS + (Option("epsilon", float, 0.1, "leaky_rrxor's leak"),)

    @classmethod
    def build(cls, p1, p2, epsilon):
        return {"token_transitions": (1 - epsilon) * super().build(p1, p2)["token_transitions"] + epsilon / 10}


def mess3_matrices(x, a):
    """T[k][i, j] = (a if j == k else b) (y if i == j else x), b = (1-a)/2, y = 1-2x: the literature's mess3."""
    b, y = (1 - a) / 2, 1 - 2 * x
    eye = np.eye(3, dtype=bool)
    return np.where(eye, a, b)[:, None, :] * np.where(eye, y, x)[None]


class Mess3(NamedHMM):
    """Mess3 (Marzen & Crutchfield 2017; Shai et al. 2024), written token-labelled; h has no closed form.

    The same token process as `--process hmm --preset mess3` (the state-emitting
    form); its belief is over the state after each token.
    """

    process = "mess3"
    FOLDER_PREFIX = "mess3-mealy"  # data/mess3 is `--process hmm --preset mess3`'s
    BOUNDS = {"x": (0.0, 0.5)}
    SUMMARY = "mess3, token-labelled (--x --a; K=3)"
    N_STATES = 3
    OPTIONS = (
        Option("x", float, 0.05, "the probability of each switch"),
        Option("a", float, 0.85, "the probability of emitting the state's own token"),
    )

    @classmethod
    def build(cls, x, a):
        return {"token_transitions": mess3_matrices(x, a)}


class SimpleNonunifilarSource(NamedHMM):
    """Simple nonunifilar source (Marzen & Crutchfield 2017, arXiv:1702.08565 Fig. 2); h has no closed form.

    A emits 0 and stays (1-p) or moves to B (p); B emits 0 and stays (1-q) or
    emits 1 and returns to A (q). A run of 0s does not say which state it is in.
    """

    process = "sns"
    SUMMARY = "simple nonunifilar source (--p --q; K=2)"
    N_STATES = 2
    OPTIONS = (
        Option("p", float, 0.5, "P(A -> B), emitting 0"),
        Option("q", float, 0.5, "P(B -> A), emitting 1"),
    )

    @classmethod
    def build(cls, p, q):
        return {"token_transitions": [[[1 - p, p], [0, 1 - q]], [[0, 0], [q, 0]]]}


class MatchingParens(NamedHMM):
    """simplexity's matching parentheses, nesting at most `depth`; h = (1 - pi_0 - pi_D) H(p).

    Tokens "(" = 0 and ")" = 1; the hidden state is the depth 0..D. At depth 0
    it opens, at depth D it closes, in between it opens with probability p.
    pi is the stationary law of the depth, a birth-death chain.
    """

    process = "matching_parens"
    SUMMARY = "matching parentheses up to a depth (--depth --p; K=2)"
    N_STATES = 2
    RECIPE = LOOKBACK_RECIPE
    OPTIONS = (
        Option("depth", int, 4, "the deepest nesting"),
        Option("p", float, 0.5, "P(open) at a depth strictly between 0 and the deepest"),
    )

    # The deepest nesting whose K (depth+1) x (depth+1) matrices stay within the HMM's MAX_MATRIX_ENTRIES:
    # a larger --depth is refused before any matrix is built.
    MAX_DEPTH = math.isqrt(MAX_MATRIX_ENTRIES // N_STATES) - 1

    @classmethod
    def build(cls, depth, p):
        if depth < 1:
            raise NanoMarkovError(f"--depth of --process {cls.process} must be an integer >= 1, got {depth}")
        if depth > cls.MAX_DEPTH:
            raise NanoMarkovError(
                f"--depth of --process {cls.process} must be at most {cls.MAX_DEPTH} (its 2 matrices of "
                f"(depth+1)^2 entries stay within {MAX_MATRIX_ENTRIES} (2^24), MAX_MATRIX_ENTRIES), got {depth}; "
                "use a smaller --depth"
            )
        opens = np.array([1.0] + [p] * (depth - 1) + [0.0])  # P(open) at each depth
        return {"token_transitions": [np.diag(opens[:-1], k=1), np.diag(1 - opens[1:], k=-1)]}


def days_of_week_matrices():
    """simplexity's days of the week: tokens M..Su, Tmrw, Yest, Wknd, Wkdy; the state is today."""
    n_days = 7
    weights = np.zeros((11, n_days, n_days))
    for day in range(n_days):
        weights[day, :, day] = 1.0  # a day's own name: every day can move to it
        weights[day, (day - 1) % n_days, day] = 5.0  # and most likely the day after
        weights[7, day, (day + 1) % n_days] = 1.0  # "tomorrow"
        weights[8, day, (day - 1) % n_days] = 1.0  # "yesterday"
    weights[9, :, 5:] = 1 / 2  # "weekend": one of its two days
    weights[10, :, :5] = 1 / 5  # "weekday": one of the five
    return weights / weights.sum(axis=(0, 2), keepdims=True)


class DaysOfWeek(NamedHMM):
    """simplexity's days of the week (11 tokens, 7 hidden days); h has no closed form.

    From today, the next token names a day (most likely tomorrow), says
    "tomorrow" or "yesterday" (and moves there), or "weekend" / "weekday"
    (and moves to one of those days at random).
    """

    process = "days_of_week"
    SUMMARY = "days of the week: 7 days, 11 words (K=11)"
    N_STATES = 11
    # Its excess was all after "tomorrow" and "yesterday" (KL 0.18 nats there, ~0 elsewhere) while models did not
    # learn to read the day named before them and count the moves since: the look-back recipe left 0.0235 nats
    # in 612 s on its 255-token sequences (64 wide, batch 32: 0.024 in 992 s; lr 3e-3: 0.025). With alibi (see
    # RECENCY_RECIPE) 500 steps left 0.0012 in 274 s with the other core busy; 450 keep it within 5 minutes (a step
    # of its 255-token sequences costs twice one of 127).
    RECIPE = {**RECENCY_RECIPE, "max_iters": 450, "lr_decay_iters": 450, "eval_interval": 225}
    OPTIONS = ()

    @classmethod
    def build(cls):
        return {"token_transitions": days_of_week_matrices()}


class MrName(NamedHMM):
    """simplexity's "Mr. Dursley" process: Mr. name (Something|Blah)* ...; h = sum_s pi_s H(row s).

    Tokens Mr. = 0, Something = 1, Blah = 2, name = 3; the hidden state is the
    last token, so the tokens form a first-order chain: Mr. -> name; name ->
    Something or Blah (1/2 each); Something and Blah -> Mr. (q), the other
    word (p), themselves (1 - p - q).
    """

    process = "mr_name"
    SUMMARY = "Mr. name (Something|Blah)* (--p --q; K=4)"
    N_STATES = 4
    OPTIONS = (
        Option("p", float, 0.3, "P(the other word)"),
        Option("q", float, 0.2, "P(Mr.) after a word"),
    )

    @classmethod
    def build(cls, p, q):
        if p + q >= 1:
            raise NanoMarkovError(f"--p and --q of --process {cls.process} must sum to less than 1, got {p} + {q}")
        mister, something, blah, name = range(4)
        rows = np.zeros((4, 4))  # the next token after each token
        rows[mister, name] = 1.0
        rows[name, something] = rows[name, blah] = 0.5
        rows[something] = rows[blah] = q, 1 - p - q, p, 0.0
        rows[blah, something], rows[blah, blah] = p, 1 - p - q
        # The token is the next state: T[x][i, j] = rows[i, x] when j == x.
        return {"token_transitions": np.einsum("ix,xj->xij", rows, np.eye(4))}


class NamedGHMM(NamedProcess, GeneralizedHMM):
    """A named generalized HMM; `build` returns {"token_transitions": T}, the start is stationary."""

    ARRAYS = ("token_transitions", "startprob")


def post_quantum_matrices(log_alpha, beta):
    """The post-quantum process's three 3x3 matrices, scaled so that their sum has spectral radius 1."""

    def scaling(value):
        return np.array([[value, 0, 0], [0, 1, 0], [0, np.log(value), 1]])

    reset = np.outer([1.0, 1.0, 0.0], [1.0, -1.0, -1.0])
    tokens = np.stack([reset, scaling(np.exp(log_alpha)), scaling(beta)])
    return tokens / np.abs(np.linalg.eigvals(tokens.sum(axis=0))).max()


class PostQuantum(NamedGHMM):
    """The post-quantum process (Riechers, Bigelow, Alt & Shai 2025, arXiv:2507.07432; simplexity's post_quantum).

    A 3-state generalized HMM with no finite-state HMM of its own: a reset token (the outer
    product of (1, 1, 0) and (1, -1, -1)) and two scalings by alpha = e^log_alpha > 1 and beta < 1.
    """

    process = "post_quantum"
    SUMMARY = "post-quantum generalized HMM (--log_alpha --beta; K=3)"
    N_STATES = 3
    RECIPE = LOOKBACK_RECIPE
    BOUNDS = {"log_alpha": (0.0, np.inf)}
    OPTIONS = (
        Option("log_alpha", float, 1.0, "ln(alpha), alpha > 1"),
        Option("beta", float, 0.5, "beta, 0 < beta < 1"),
    )

    @classmethod
    def build(cls, log_alpha, beta):
        return {"token_transitions": post_quantum_matrices(log_alpha, beta)}


def tom_quantum_matrices(alpha, beta):
    """The tom_quantum process's four 3x3 matrices: a qubit measured in one of two bases, 1/2 each.

    Tokens 0, 1 are the two outcomes of the first basis, 2, 3 of the second; with c = 1/4,
    m = (alpha^2 - beta^2) / (4 (alpha^2 + beta^2)) and o = alpha beta / (2 (alpha^2 + beta^2)),
    tokens 0, 1 are [[c, 0, +-o], [0, m, 0], [+-o, 0, c]] and 2, 3 [[c, +-o, 0], [+-o, c, 0], [0, 0, m]].
    """
    c, scale = 0.25, 4 * (alpha**2 + beta**2)
    m, o = (alpha**2 - beta**2) / scale, 2 * alpha * beta / scale
    tokens = np.zeros((4, 3, 3))
    for token, (axis, other, sign) in enumerate([(2, 1, 1), (2, 1, -1), (1, 2, 1), (1, 2, -1)]):
        tokens[token, 0, 0] = tokens[token, axis, axis] = c
        tokens[token, other, other] = m
        tokens[token, 0, axis] = tokens[token, axis, 0] = sign * o
    return tokens


class TomQuantum(NamedGHMM):
    """simplexity's tom_quantum: a generalized HMM of a qubit measured in one of two bases at random.

    At alpha = beta = 1 each measurement leaves the qubit in the state it found: the next
    measurement in the same basis repeats the outcome, in the other basis it is a fair coin, so
    every token after the first has entropy 1.5 bits and the first is uniform (2 bits).
    """

    process = "tom_quantum"
    SUMMARY = "qubit measured in one of two bases, a generalized HMM (--tom_alpha --tom_beta; K=4)"
    N_STATES = 4
    # simplexity's alpha and beta: --alpha is the Dirichlet concentration of every random process.
    BOUNDS = {"tom_alpha": (0.0, np.inf), "tom_beta": (0.0, np.inf)}
    OPTIONS = (
        Option("tom_alpha", float, 1.0, "tom_quantum's alpha (> 0)"),
        Option("tom_beta", float, 1.0, "tom_quantum's beta (> 0)"),
    )

    @classmethod
    def build(cls, tom_alpha, tom_beta):
        return {"token_transitions": tom_quantum_matrices(tom_alpha, tom_beta)}


def fanizza_matrices(alpha, lamb):
    """Fanizza et al.'s two 4x4 matrices: a reset D_a = w pi0 (the outer product) and D_b, lamb times a
    rotation by alpha in the last two coordinates (and 1 in the second)."""
    cos, sin = np.cos(alpha), np.sin(alpha)
    denominator = 1 - 2 * lamb * cos + lamb**2
    a_la = (1 - lamb * cos + lamb * sin) / denominator
    b_la = (1 - lamb * cos - lamb * sin) / denominator
    reset = np.array([1 - (2 / (1 - lamb) - a_la - b_la) / 4, 1 / (2 * (1 - lamb)), -a_la / 4, -b_la / 4])
    w = np.array([1, 1 - lamb, 1 + lamb * (sin - cos), 1 - lamb * (sin + cos)])
    rotation = lamb * np.array([[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, cos, -sin], [0, 0, sin, cos]])
    return np.stack([np.outer(w, reset), rotation])


class Fanizza(NamedGHMM):
    """The process of Fanizza, Lumbreras & Winter (arXiv:2209.11225; simplexity's fanizza): a generalized
    HMM of 4 states that no finite-dimensional quantum model realises.

    Token 0 resets the quasi-belief to pi0 whatever came before; token 1 rotates it by alpha and
    scales it by lamb. The sum of the matrices has rows summing to 1 (r = 1).
    """

    process = "fanizza"
    SUMMARY = "Fanizza et al.'s generalized HMM, no finite quantum model (--angle --lamb; K=2)"
    N_STATES = 2
    # Its optimal prediction is a function of n, the 1s since the last 0 (one value per n on 127,000 val
    # positions). Every recipe with a position table stayed at the excess of knowing only whether the last token
    # was 0 (0.030 nats): knowing n up to 1 would leave 0.0295, up to 2 0.0128, up to 3 0.0034, so the step that
    # pays needs two earlier tokens jointly. Tried (issue 24): whole-history 0.031; look-back 0.029 (1560 steps);
    # 64 wide 0.031; one layer 0.028; lr 3e-3 0.031. Alibi's heads each read the last few tokens by distance
    # (RECENCY_RECIPE): 0.00084 after 1000 steps.
    RECIPE = {**RECENCY_RECIPE, "max_iters": 1000, "lr_decay_iters": 1000}
    # The paper's alpha: --alpha is the Dirichlet concentration of every random process.
    BOUNDS = {"angle": (-np.inf, np.inf)}
    OPTIONS = (
        Option("angle", float, 2000.0, "fanizza's alpha, the rotation angle in radians"),
        Option("lamb", float, 0.49, "the damping lambda, 0 < lamb < 1"),
    )

    @classmethod
    def build(cls, angle, lamb):
        return {"token_transitions": fanizza_matrices(angle, lamb)}


NAMED_PROCESSES = (
    Switching,
    Coin,
    GoldenMean,
    Even,
    ZeroOneRandom,
    RRXOR,
    LeakyRRXOR,
    Mess3,
    SimpleNonunifilarSource,
    MatchingParens,
    DaysOfWeek,
    MrName,
    PostQuantum,
    TomQuantum,
    Fanizza,
)
