"""Bietti et al. 2023 ("Birth of a transformer: a memory viewpoint", NeurIPS): a global bigram with
in-context triggers.

Tokens 0..K-1 follow a global bigram (a first-order chain `transmat`, the same for every
sequence), except after a trigger: each of the T trigger tokens q_1..q_T (fixed for the process)
is followed, everywhere in a sequence, by that sequence's own output token o_i, drawn once per
sequence and independently for each trigger from `output_law`. x1 ~ startprob.

The optimal predictor knows transmat, the triggers and output_law, not the outputs: after a
non-trigger s, transmat[s]; after q_i seen before in this sequence (so x_{s+1} = o_i was seen),
o_i with probability 1; after q_i not seen before, output_law. Nothing else says anything about
o_i: the outputs are independent of each other and of the bigram.

Theory. Given the outputs o the tokens are a Markov chain M_o (transmat with each trigger's row
one-hot at its output), so the law v_t of x_t is startprob M_o^(t-1), and the probability that
x_t = q_i is q_i's first visit is that of a walk that avoids q_i before t (M_o with q_i's mass
dropped at each step). The optimal loss at position t is then
    sum_{s not a trigger} v_t(s) H(transmat[s]) + sum_i P(first visit of q_i at t) H(output_law),
exact given o; `theory` averages it over every output tuple with its probability where there
are at most MAX_EXACT_OUTPUTS of them, else over THEORY_OUTPUTS tuples drawn from THEORY_SEED,
with standard errors. The same holds for the accuracy, the global bigram stage and the entropy
rate (sum_s pi_o(s) H(M_o[s]) with pi_o the stationary law of M_o).

Choices (docs/processes.md): random() draws transmat's rows ~ Dirichlet(alpha) from the seed,
starts from its stationary law (the paper starts from the corpus unigram), takes the T most likely
tokens under it as triggers (the paper's fixed triggers) and draws outputs uniformly from the
tokens that are not triggers: an output that is itself a trigger would chain two associations,
and two triggers that output each other would trap a sequence in a deterministic cycle.
"""

import itertools
from functools import cached_property

import numpy as np

from nanomarkov.errors import NanoMarkovError
from nanomarkov.processes.base import LOOKBACK_RECIPE, Option, Process
from nanomarkov.processes.incontext import positive_stationary, settled_law, settled_laws
from nanomarkov.processes.numerics import (
    check_distribution,
    check_random_parameters,
    entropy,
    random_rows,
    standard_error,
    token_dtype,
)

# theory averages over every output tuple up to this many, else over THEORY_OUTPUTS drawn ones.
MAX_EXACT_OUTPUTS = 4096
THEORY_OUTPUTS = 2000
THEORY_SEED = 0
MAX_STATES = 256
DEFAULT_TRIGGERS = 3


class TriggerChain(Process):
    """Bietti et al.'s process: `transmat` (K, K) the global bigram, `startprob` (K,) the law of x1,
    `triggers` (T,) the trigger tokens, `output_law` (K,) the law of each sequence's output for each
    trigger (zero on the triggers). The four arrays are the process (chain.npz)."""

    process = "bietti"
    SUMMARY = "Bietti et al. 2023: a global bigram whose trigger tokens are followed by per-sequence outputs"
    ARRAYS = ("transmat", "startprob", "triggers", "output_law")
    OPTIONS = (
        Option(
            "n_triggers",
            int,
            None,
            f"the number T of trigger tokens, the T most likely under the bigram (default min({DEFAULT_TRIGGERS}, K // 2), which leaves two outputs or more)",
        ),
    )
    # The induction head this needs (find the trigger's last occurrence, read the token after it) took 4 heads
    # on fresh data: 0.0016 nats in 208 s (BENCHMARKS.md); the whole-history recipe's 1 head stayed at 0.245.
    RECIPE = LOOKBACK_RECIPE
    HISTORY_REASON = "a trigger is followed by the output this sequence showed after it before"

    def __init__(self, transmat, startprob, triggers, output_law):
        transmat, startprob = np.array(transmat, dtype=np.float64), np.array(startprob, dtype=np.float64)
        output_law, triggers = np.array(output_law, dtype=np.float64), np.array(triggers)
        if transmat.ndim != 2 or transmat.shape[0] != transmat.shape[1] or not 2 <= len(transmat) <= MAX_STATES:
            raise NanoMarkovError(
                f"transmat must be a square K x K matrix, 2 <= K <= {MAX_STATES}, got {transmat.shape}"
            )
        k = len(transmat)
        check_distribution("transmat", transmat)
        whole = np.issubdtype(triggers.dtype, np.floating) and np.all(np.isfinite(triggers))
        if whole and np.all(triggers == np.round(triggers)):
            triggers = triggers.astype(np.int64)  # whole numbers read as floats (a spec file's numbers)
        for name, array in (("startprob", startprob), ("output_law", output_law)):
            if array.shape != (k,):
                raise NanoMarkovError(f"{name} must have shape ({k},) to match transmat, got {array.shape}")
            check_distribution(name, array)
        if triggers.ndim != 1 or not np.issubdtype(triggers.dtype, np.integer) or not 1 <= len(triggers) < k:
            raise NanoMarkovError(f"triggers must be a vector of 1..{k - 1} token ids, got {triggers.tolist()}")
        if len(set(triggers.tolist())) != len(triggers) or triggers.min() < 0 or triggers.max() >= k:
            raise NanoMarkovError(f"triggers must be distinct tokens of 0..{k - 1}, got {triggers.tolist()}")
        if np.any(output_law[triggers] > 0):
            raise NanoMarkovError("output_law must put no mass on a trigger (an output that is a trigger chains two)")
        triggers = triggers.astype(np.int64)
        for array in (transmat, startprob, triggers, output_law):
            array.flags.writeable = False
        self.transmat, self.startprob, self.triggers, self.output_law = transmat, startprob, triggers, output_law
        self.trigger_index = np.full(k, -1, dtype=np.int64)  # token -> its trigger's number, -1 for the others
        self.trigger_index[triggers] = np.arange(len(triggers))
        self._theory = {}  # seq_len -> per-position arrays; the process is immutable

    @classmethod
    def random(cls, n_states, seed=42, alpha=1.0, sparsity=None, n_triggers=None):
        """Rows ~ Dirichlet(alpha) from `seed`, x1 from their stationary law, the n_triggers most likely tokens
        under it as triggers, outputs uniform on the other tokens."""
        check_random_parameters(n_states, alpha, sparsity)
        if sparsity:
            raise NanoMarkovError("bietti takes dense bigram rows: drop --sparsity")
        n_triggers = default_triggers(n_states) if n_triggers is None else n_triggers
        if not 1 <= n_triggers < n_states:
            raise NanoMarkovError(f"--n_triggers must be in 1..K-1 = 1..{n_states - 1}, got {n_triggers}")
        transmat = random_rows(np.random.default_rng(seed), n_states, n_states, alpha, None)
        startprob = settled_law(transmat, np.full(n_states, 1.0 / n_states))
        triggers = np.argsort(-startprob, kind="stable")[:n_triggers]
        output_law = np.full(n_states, 1.0 / (n_states - n_triggers))
        output_law[triggers] = 0.0
        return cls(transmat, startprob, triggers, output_law)

    def options(self):
        default = default_triggers(self.n_states)
        return {} if len(self.triggers) == default else {"n_triggers": len(self.triggers)}

    @property
    def n_states(self):
        return self.transmat.shape[0]

    # -------------------------------------------------------------- sampling and the predictor

    def sample(self, n_sequences, seq_len, rng):
        """n_sequences BOS-led sequences (n, seq_len): per sequence T uniforms for its outputs, then one per token."""
        self.check_seq_len(seq_len)
        k, n_triggers = self.n_states, len(self.triggers)
        out = np.empty((n_sequences, seq_len), dtype=token_dtype(self.vocab_size))
        out[:, 0] = self.bos_token
        uniforms = rng.random((n_sequences, n_triggers + seq_len - 1))
        outputs = draw(np.broadcast_to(self.output_law, (n_sequences, n_triggers, k)), uniforms[:, :n_triggers])
        state = draw(np.broadcast_to(self.startprob, (n_sequences, k)), uniforms[:, n_triggers])
        rows = np.arange(n_sequences)
        for t in range(1, seq_len):
            out[:, t] = state
            if t == seq_len - 1:
                break
            following = draw(self.transmat[state], uniforms[:, n_triggers + t])
            trigger = self.trigger_index[state]
            state = np.where(trigger >= 0, outputs[rows, np.maximum(trigger, 0)], following)
        return out

    def optimal_log_probs(self, tokens):
        """startprob for x1; after a trigger seen before, its output with probability 1 (-inf elsewhere); after
        one not seen before, output_law; after any other token, its bigram row."""
        tokens = np.asarray(self.check_tokens(tokens), dtype=np.int64)
        states, n = tokens[:, 1:], tokens.shape[0]
        out = np.empty((n, states.shape[1], self.n_states))
        revealed = np.full((n, len(self.triggers)), -1)  # each trigger's output once seen, else -1
        rows = np.arange(n)
        with np.errstate(divide="ignore"):
            out[:, 0] = np.log(self.startprob)
            log_rows, log_output = np.log(self.transmat), np.log(self.output_law)
            for t in range(1, states.shape[1]):
                trigger = self.trigger_index[states[:, t - 1]]
                known = revealed[rows, np.maximum(trigger, 0)]
                out[:, t] = np.where((trigger >= 0)[:, None], log_output, log_rows[states[:, t - 1]])
                seen = (trigger >= 0) & (known >= 0)
                out[seen, t] = -np.inf
                out[seen, t, known[seen]] = 0.0
                unseen = (trigger >= 0) & (known < 0)
                revealed[rows[unseen], trigger[unseen]] = states[unseen, t]
        return out

    def global_bigram_log_probs(self, tokens):
        """The global_bigram stage (n, L-1, K): startprob for x1, then the row of the last token, output_law after a
        trigger: the best predictor from the last token alone, blind to this sequence's outputs."""
        tokens = np.asarray(self.check_tokens(tokens), dtype=np.int64)
        with np.errstate(divide="ignore"):
            rows = np.log(self.bigram_rows())
            out = np.empty((tokens.shape[0], tokens.shape[1] - 1, self.n_states))
            out[:, 0] = np.log(self.startprob)
        out[:, 1:] = rows[tokens[:, 1:-1]]
        return out

    def bigram_rows(self):
        """(K, K): transmat's rows, output_law for each trigger's row."""
        rows = self.transmat.copy()
        rows[self.triggers] = self.output_law
        return rows

    def stage_log_probs(self, tokens):
        stages = super().stage_log_probs(tokens)
        optimal = stages.pop("optimal")
        return stages | {"global_bigram": self.global_bigram_log_probs(tokens), "optimal": optimal}

    # ---------------------------------------------------------------- theory

    @cached_property
    def output_tuples(self):
        """(tuples (n, T), weights (n,), exact): every output tuple with its probability where there are at most
        MAX_EXACT_OUTPUTS, else THEORY_OUTPUTS tuples drawn from output_law (THEORY_SEED), weight 1/n each."""
        support, n_triggers = np.flatnonzero(self.output_law > 0), len(self.triggers)
        if len(support) ** n_triggers <= MAX_EXACT_OUTPUTS:
            tuples = np.array(list(itertools.product(support, repeat=n_triggers)), dtype=np.int64)
            return tuples, self.output_law[tuples].prod(axis=1), True
        tuples = np.random.default_rng(THEORY_SEED).choice(
            self.n_states, (THEORY_OUTPUTS, n_triggers), p=self.output_law
        )
        return tuples, np.full(THEORY_OUTPUTS, 1.0 / THEORY_OUTPUTS), False

    def table_entries(self, seq_len):
        """theory's laws: (T + 1) of K per output tuple, and three of seq_len per tuple."""
        n_tuples = len(self.output_tuples[0])
        return max(seq_len * self.n_states, n_tuples * max(self.n_states * (len(self.triggers) + 1), 3 * seq_len))

    def step(self, laws, tuples):
        """Laws (..., n, K) of x_t, one per output tuple (n, T), carried one step by each tuple's chain M_o."""
        moved = laws.copy()
        moved[..., self.triggers] = 0.0
        moved = moved @ self.transmat
        rows = np.arange(len(tuples))
        for i, trigger in enumerate(self.triggers):
            moved[..., rows, tuples[:, i]] += laws[..., trigger]
        return moved

    def by_position(self, seq_len):
        """Per output tuple (n, L-1): the optimal loss, its accuracy and the global bigram's loss at each position,
        exact given the tuple; and the law of x_t at each position averaged over the tuples (L-1, K)."""
        self.check_seq_len(seq_len)
        if seq_len not in self._theory:
            self._theory[seq_len] = self._by_position(seq_len)
        return self._theory[seq_len]

    def _by_position(self, seq_len):
        tuples, weights, _ = self.output_tuples
        n_triggers, positions, nontrigger = len(self.triggers), seq_len - 1, self.trigger_index < 0
        row_entropy, row_best = entropy(self.transmat, axis=1)[nontrigger], self.transmat.max(axis=1)[nontrigger]
        surprise = -np.log(self.output_law[tuples])  # (n, T): the global bigram's loss on each output
        # laws[0]: the law of x_t; laws[1 + i]: the same on the walks that did not visit trigger i before t.
        laws = np.broadcast_to(self.startprob, (n_triggers + 1, len(tuples), self.n_states)).copy()
        loss, accuracy, bigram = (np.empty((len(tuples), positions)) for _ in range(3))
        loss[:, 0] = bigram[:, 0] = entropy(self.startprob)
        accuracy[:, 0] = self.startprob.max()
        marginals = np.empty((positions, self.n_states))
        for t in range(1, positions + 1):
            marginals[t - 1] = weights @ laws[0]
            if t == positions:
                break
            visits = laws[0][:, self.triggers]
            first = laws[1 + np.arange(n_triggers), :, self.triggers].T  # (n, T): first visits of each trigger at t
            common = laws[0][:, nontrigger] @ row_entropy
            loss[:, t] = common + first.sum(axis=1) * entropy(self.output_law)
            accuracy[:, t] = laws[0][:, nontrigger] @ row_best + (first * self.output_law.max() + visits - first).sum(1)
            bigram[:, t] = common + (visits * surprise).sum(axis=1)
            laws[1 + np.arange(n_triggers), :, self.triggers] = 0.0
            laws = self.step(laws, tuples)
        return loss, accuracy, bigram, marginals

    @cached_property
    def long_run(self):
        """Per output tuple: the entropy rate of M_o (n,) and its stationary law (n, K)."""
        tuples, k = self.output_tuples[0], self.n_states
        chains = np.broadcast_to(self.transmat, (len(tuples), k, k)).copy()
        chains[:, self.triggers] = 0.0
        for i, trigger in enumerate(self.triggers):
            chains[np.arange(len(tuples)), trigger, tuples[:, i]] = 1.0
        if np.all(self.transmat > 0):  # every token reaches every other: one class, which state reduction solves
            laws = positive_stationary(chains)
        else:  # a row with zeros can leave several closed classes: the law the chain settles into from startprob
            laws = settled_laws(chains, self.startprob)
        return (laws * entropy(chains, axis=2)).sum(axis=1), laws

    def _mean(self, values, axis=0):
        """(the weighted mean over output tuples, its standard error: 0.0 where every tuple was enumerated)."""
        tuples, weights, exact = self.output_tuples
        mean = np.tensordot(weights, values, axes=(0, axis))
        return mean, np.zeros_like(mean) if exact else standard_error(values, axis=axis)

    def optimal_loss_by_position(self, seq_len):
        return self._mean(self.by_position(seq_len)[0])

    def optimal_accuracy(self, seq_len):
        return float(self._mean(self.by_position(seq_len)[1].mean(axis=1))[0])

    def entropy_rate(self):
        return float(self._mean(self.long_run[0])[0])

    def unigram_loss(self):
        """H of the long-run token law, averaged over the output tuples."""
        return float(entropy(self._mean(self.long_run[1])[0]))

    def token_marginals(self, seq_len):
        """The law of x_t, exact where every output tuple is enumerated; else None (unigram_law: the long-run law)."""
        return self.by_position(seq_len)[3] if self.output_tuples[2] else None

    def unigram_law(self, seq_len):
        return super().unigram_law(seq_len) if self.output_tuples[2] else self._mean(self.long_run[1])[0]

    def standard_errors(self, seq_len):
        if self.output_tuples[2]:
            return {}
        loss, accuracy, bigram, _ = self.by_position(seq_len)
        laws = self.long_run[1]
        gradient = -(np.log(np.maximum(self._mean(laws)[0], 1e-300)) + 1)  # the delta method for H(mean law)
        return {
            "optimal_loss": float(standard_error(loss.mean(axis=1))),
            "optimal_accuracy": float(standard_error(accuracy.mean(axis=1))),
            "global_bigram_loss": float(standard_error(bigram.mean(axis=1))),
            "entropy_rate": float(standard_error(self.long_run[0])),
            "unigram_loss": float(standard_error(laws @ gradient)),
        }

    def global_bigram_loss(self, seq_len):
        return float(self._mean(self.by_position(seq_len)[2].mean(axis=1))[0])

    def stage_losses(self, seq_len):
        """uniform, unigram, global_bigram (the bigram rows, output_law after a trigger: what a model knows before
        its induction head reads this sequence's outputs), optimal."""
        stages = super().stage_losses(seq_len)
        optimal = stages.pop("optimal")
        return stages | {"global_bigram": self.global_bigram_loss(seq_len), "optimal": optimal}

    def stage_loss_errors(self, seq_len):
        errors = super().stage_loss_errors(seq_len)
        optimal = errors.pop("optimal")
        bigram = self.standard_errors(seq_len).get("global_bigram_loss", 0.0)
        return errors | {"global_bigram": bigram, "optimal": optimal}

    def theory(self, seq_len):
        """The base theory plus global_bigram_loss and output_tuples (how many tuples it averaged)."""
        theory = super().theory(seq_len)
        theory["global_bigram_loss"] = self.global_bigram_loss(seq_len)
        errors = self.standard_errors(seq_len)
        if "global_bigram_loss" in errors:
            theory["global_bigram_loss_se"] = errors["global_bigram_loss"]
        theory["output_tuples"] = len(self.output_tuples[0])
        return theory

    def theory_note(self, seq_len):
        tuples, _, exact = self.output_tuples
        if exact:
            return f"exact: averaged over all {len(tuples)} output tuples with their probabilities"
        return f"estimated: exact given the outputs, averaged over {len(tuples)} drawn output tuples (errors: *_se)"


def draw(weights, uniforms):
    """One index per row of weights (..., K) (each row summing to 1), by inverting its cumulative sums."""
    cumulative = np.cumsum(weights, axis=-1)
    return (cumulative[..., :-1] <= (uniforms * cumulative[..., -1])[..., None]).sum(axis=-1)


def default_triggers(n_states):
    """min(DEFAULT_TRIGGERS, K // 2): at least as many other tokens as triggers, so an output is a real draw
    (with K - 1 triggers the one other token would be every output)."""
    return max(1, min(DEFAULT_TRIGGERS, n_states // 2))
