"""Numeric helpers every process shares: entropy, token types, distribution checks,
random rows, alias tables (O(1) sampling) and the evolution of a marginal distribution."""

import numpy as np

from nanomarkov.errors import NanoMarkovError

ROW_SUM_TOLERANCE = 1e-9
# The largest Dirichlet concentration (alpha, an icl chain's concentration) accepted. Above it a row drawn
# is its mean to within 1e-6 (the standard deviation is about 1/sqrt(concentration)): the process is the
# chain of the mean rows, to every digit theory prints. Far above it the parameters' sum overflows float64
# (near 1e308) and the draws become NaN.
MAX_CONCENTRATION = 1e12
CONCENTRATION_RANGE = f"> 0 and at most {MAX_CONCENTRATION:g} (above it every Dirichlet draw is its mean to 1e-6)"


def valid_concentration(value):
    """Whether every entry of a Dirichlet concentration is finite, > 0 and at most MAX_CONCENTRATION."""
    value = np.asarray(value, dtype=np.float64)
    return bool(np.all(np.isfinite(value)) and np.all(value > 0) and np.all(value <= MAX_CONCENTRATION))


def token_dtype(vocab_size):
    """The smallest unsigned integer type that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def entropy(p, axis=-1):
    """Shannon entropy in nats, with 0 log 0 = 0."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=axis)


def check_distribution(name, p):
    """Raise unless every row (last axis) of `p` is a probability distribution."""
    if not np.all(np.isfinite(p)):
        raise NanoMarkovError(f"{name} has non-finite entries")
    if np.any(p < 0):
        raise NanoMarkovError(f"{name} has negative entries")
    worst = np.max(np.abs(p.sum(axis=-1) - 1.0))
    if worst > ROW_SUM_TOLERANCE:
        raise NanoMarkovError(f"{name} does not sum to 1 (off by {worst:.3g}, tolerance {ROW_SUM_TOLERANCE})")


def check_random_parameters(n_states, alpha, sparsity):
    """Raise unless K, alpha and sparsity are valid arguments of a process's `random`."""
    if not isinstance(n_states, (int, np.integer)) or n_states < 2:
        raise NanoMarkovError(f"n_states must be an integer >= 2, got {n_states!r}")
    if not valid_concentration(alpha):
        raise NanoMarkovError(f"alpha must be {CONCENTRATION_RANGE}, got {alpha}")
    if sparsity is not None and not 0 <= sparsity < 100:
        raise NanoMarkovError(f"sparsity must be a percentage in [0, 100), got {sparsity}")


def random_rows(rng, n_rows, n_states, alpha, sparsity):
    """n_rows random distributions over n_states: Dirichlet(alpha), or sparse by the seed's rule.

    With `sparsity` S (percent), each row keeps max(1, int(K*(100-S)/100))
    targets chosen uniformly without replacement and puts Dirichlet(alpha)
    weights on them.
    """
    if not sparsity:
        return rng.dirichlet(np.full(n_states, float(alpha)), size=n_rows)
    keep = max(1, int(n_states * (100 - sparsity) / 100))
    targets = np.argsort(rng.random((n_rows, n_states)), axis=1)[:, :keep]
    rows = np.zeros((n_rows, n_states))
    np.put_along_axis(rows, targets, rng.dirichlet(np.full(keep, float(alpha)), size=n_rows), axis=1)
    return rows


def alias_tables(probs):
    """Walker/Vose alias tables, one per row of `probs` (n_rows x K).

    Drawing column j uniformly and keeping it with probability keep[j] (else
    taking alias[j]) samples the row exactly, with O(1) work per draw; that is
    what makes per-token sampling vectorisable over many sequences at once.
    """
    n_rows, k = probs.shape
    keep = np.ones((n_rows, k))
    alias = np.tile(np.arange(k, dtype=np.int64), (n_rows, 1))
    for r in range(n_rows):
        scaled = (probs[r] * k).tolist()
        small = [j for j, w in enumerate(scaled) if w < 1.0]
        large = [j for j, w in enumerate(scaled) if w >= 1.0]
        keep_row, alias_row = keep[r], alias[r]
        while small and large:
            s, g = small.pop(), large[-1]
            keep_row[s] = scaled[s]
            alias_row[s] = g
            scaled[g] -= 1.0 - scaled[s]
            if scaled[g] < 1.0:
                small.append(large.pop())
        # Whatever is left is 1 up to rounding (the deficits balance to ~1e-15),
        # so it keeps itself; a zero-probability column always has deficit 1 and
        # is paired before the larges run out, so it is never left here.
    return keep, alias


def alias_draw(keep, alias, row_starts, uniforms, k):
    """One draw per entry from flattened alias tables of K columns, rows starting at `row_starts`."""
    # One uniform gives both the column (integer part of u*K) and the coin
    # (fractional part): for K <= 2**16 that leaves >= 37 bits for the coin.
    scaled = uniforms * k
    column = scaled.astype(np.int64)
    coin = scaled - column
    flat = row_starts + column
    return np.where(coin < keep[flat], column, alias[flat])


def evolve(first, step, n_rows):
    """Read-only (n_rows, len(first)) array: first, step(first), step(step(first)), ..."""
    marginals = np.empty((n_rows, len(first)))
    if n_rows:
        marginals[0] = first
    for t in range(1, n_rows):
        marginals[t] = step(marginals[t - 1])
        # Once a distribution stops moving in float64 it stays put: the remaining
        # rows are the same up to 1e-15 in total, far below any loss digit.
        if np.abs(marginals[t] - marginals[t - 1]).sum() < 1e-15:
            marginals[t + 1 :] = marginals[t]
            break
    marginals.flags.writeable = False
    return marginals


def standard_error(values, axis=0):
    """The standard error of the mean of `values` along `axis` (sample standard deviation / sqrt(n))."""
    values = np.asarray(values)
    return values.std(ddof=1, axis=axis) / np.sqrt(values.shape[axis])
