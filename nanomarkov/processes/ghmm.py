"""Generalized HMMs: token matrices of any sign, whose states are quasi-beliefs (Upper 1997).

The convention of the literature (and simplexity's): T[x] (K, H, H) of any sign, T = sum_x T[x]
has eigenvalue 1, r its right eigenvector (T r = r, the normalising vector) and a start eta_0 with
eta_0 . r = 1 (default: the left eigenvector of eigenvalue 1, the stationary quasi-belief). A word
has probability p(x_1..x_n) = eta_0 T[x_1] ... T[x_n] r, which sums to 1 over the words of every
length since T r = r. The quasi-belief after a prefix is eta = eta_0 T[x_1]...T[x_n] / p(x_1..x_n),
and the next token has p(x | eta) = eta T[x] r: the sampler draws from it token by token and the
optimal predictor is the same conditional. An HMM is the case r = 1 with T[x] >= 0.

Nothing guarantees that the numbers are probabilities: a GHMM is accepted once every word of length
1..CHECKED_LENGTH has p >= -NEGATIVE_TOLERANCE, CHECKED_LENGTH = the most of 8 whose K^n words stay
within CHECKED_WORDS (K = 2, 3, 4: 8; K = 11: 4); the mixed-state presentation checks every belief
it builds as well. Theory as for an HMM (hmm.py): exact where the MSP over quasi-beliefs closes.
"""

import numpy as np

from nanomarkov.errors import NanoMarkovError
from nanomarkov.processes.hmm import MAX_MATRIX_ENTRIES, HiddenMarkovModel
from nanomarkov.processes.numerics import token_dtype

CHECKED_WORDS = 2**16
MAX_CHECKED_LENGTH = 8
NEGATIVE_TOLERANCE = 1e-12  # float rounding of a signed sum of products
EIGENVALUE_TOLERANCE = 1e-9


def checked_length(n_tokens):
    """The longest words checked for non-negative probabilities: at most 8, and K^n <= CHECKED_WORDS."""
    length = 1
    while length < MAX_CHECKED_LENGTH and n_tokens ** (length + 1) <= CHECKED_WORDS:
        length += 1
    return length


def eigenvector_of_one(matrix, side):
    """The eigenvector of eigenvalue 1 of a square matrix ("right": matrix v = v; "left": v matrix = v)."""
    values, vectors = np.linalg.eig(matrix if side == "right" else matrix.T)
    closest = int(np.argmin(np.abs(values - 1)))
    if abs(values[closest] - 1) > EIGENVALUE_TOLERANCE:
        raise NanoMarkovError(
            f"sum_x T[x] has no eigenvalue 1 (the nearest is {values[closest]:.6g}): a generalized HMM's "
            "matrices are normalised so that it has one; divide them by its largest eigenvalue"
        )
    vector = vectors[:, closest]
    return np.real(vector / vector[np.argmax(np.abs(vector))])


def first_negative_word(tokens, start, normaliser):
    """The first word of length 1..checked_length(K) with p < -NEGATIVE_TOLERANCE, as (word, p), or None."""
    n_tokens, n_hidden, _ = tokens.shape
    forward = start[None]
    for length in range(1, checked_length(n_tokens) + 1):
        forward = np.einsum("ph,xhj->pxj", forward, tokens).reshape(-1, n_hidden)  # word index p*K + x
        probs = forward @ normaliser
        negative = np.flatnonzero(probs < -NEGATIVE_TOLERANCE)
        if len(negative):
            word = np.unravel_index(negative[0], (n_tokens,) * length)
            return [int(x) for x in word], float(probs[negative[0]])
    return None


class GeneralizedHMM(HiddenMarkovModel):
    """A generalized HMM: token_transitions (K, H, H) of any sign and a start quasi-belief (see the module docstring)."""

    process = "ghmm"
    SUMMARY = "generalized HMM, matrices of any sign (from a spec: --spec; named: post_quantum, tom_quantum, fanizza)"
    ARRAYS = ("token_transitions", "startprob")
    OPTIONS = ()
    HIDDEN_STATE_BOUND = False
    HISTORY_REASON = "the next token depends on the quasi-belief that the whole prefix sets"
    MSP_FLOOR = NEGATIVE_TOLERANCE  # a token whose signed sum is within rounding of 0 is impossible

    def __init__(self, token_transitions, startprob=None):
        tokens = np.array(token_transitions, dtype=np.float64)
        if tokens.ndim != 3 or tokens.shape[1] != tokens.shape[2] or tokens.shape[0] < 2:
            raise NanoMarkovError(f"token_transitions must have shape (K, H, H) with K >= 2, got {tokens.shape}")
        if tokens.size > MAX_MATRIX_ENTRIES or not np.all(np.isfinite(tokens)):
            raise NanoMarkovError("token_transitions must be finite, with at most 2^24 entries")
        hidden_chain = tokens.sum(axis=0)
        normaliser = eigenvector_of_one(hidden_chain, "right")
        start = eigenvector_of_one(hidden_chain, "left") if startprob is None else np.array(startprob, dtype=float)
        if start.shape != (tokens.shape[1],) or not np.all(np.isfinite(start)):
            raise NanoMarkovError(f"the start must be a finite vector of shape ({tokens.shape[1]},)")
        mass = start @ normaliser
        if abs(mass) < EIGENVALUE_TOLERANCE:
            raise NanoMarkovError("the start is orthogonal to the normalising eigenvector: no word has a probability")
        normaliser = normaliser / mass  # start . r = 1: every length's words sum to 1
        negative = first_negative_word(tokens, start, normaliser)
        if negative is not None:
            raise NanoMarkovError(
                f"not a process: the word {' '.join(map(str, negative[0]))} has probability {negative[1]:.3g} < 0 "
                f"(words up to length {checked_length(tokens.shape[0])} are checked); fix token_transitions or the start"
            )
        self.transmat = self.emissions = None
        self.token_transitions, self.startprob, self._hidden_chain = tokens, start, hidden_chain
        self._normaliser = normaliser
        self._emission_rows = (tokens @ normaliser).T  # E[i, x] = (T[x] r)_i: p(x | eta) = eta @ E
        for array in (tokens, start, hidden_chain, normaliser, self._emission_rows):
            array.flags.writeable = False
        self._by_seq_len, self._samples = {}, {}

    @classmethod
    def from_arrays(cls, arrays):
        return cls(arrays["token_transitions"], arrays["startprob"])

    @classmethod
    def random(cls, n_states=None, seed=42, alpha=1.0, sparsity=None, **options):
        raise NanoMarkovError(
            "a generalized HMM is given by its matrices: --spec FILE with process ghmm (docs/specs.md), "
            "or a named one (--process post_quantum)"
        )

    def options(self):
        return {}

    @classmethod
    def folder_name(cls, n_states, **options):
        return f"{cls.FOLDER_PREFIX or cls.process}{n_states}"

    @classmethod
    def parse_folder_name(cls, name):
        prefix = cls.FOLDER_PREFIX or cls.process
        return (int(name[len(prefix) :]), {}) if name[len(prefix) :].isdigit() and name.startswith(prefix) else None

    @property
    def unifilar(self):
        return False

    @property
    def _stationary(self):
        """The stationary quasi-belief: the left eigenvector of eigenvalue 1, normalised by r."""
        left = eigenvector_of_one(self._hidden_chain, "left")
        return left / (left @ self._normaliser)

    def sample(self, n_sequences, seq_len, rng):
        """BOS-led sequences drawn token by token from p(x | eta) = eta T[x] r, one uniform per token,
        laid out sequence by sequence (the bytes do not depend on how n is chunked)."""
        self.check_seq_len(seq_len)
        uniforms = rng.random((n_sequences, seq_len - 1))
        out = np.empty((n_sequences, seq_len), dtype=token_dtype(self.vocab_size))
        out[:, 0] = self.bos_token
        belief = np.tile(self.startprob, (n_sequences, 1))
        for t in range(seq_len - 1):
            probs = np.clip(belief @ self._emission_rows, 0.0, None)
            cumulative = np.cumsum(probs, axis=1)
            drawn = (uniforms[:, t, None] * cumulative[:, -1:] >= cumulative).sum(axis=1)
            token = np.minimum(drawn, self.n_states - 1)
            out[:, t + 1] = token
            joint = self._joint(belief, token)
            belief = joint / (joint @ self._normaliser)[:, None]
        return out
