"""The process contract: what every process nanoMarkov trains on provides.

A process is a class that derives from `Process`, fills in the class
attributes below and the methods marked "a process provides", and is added to
the registry with `nanomarkov.processes.register(MyProcess)`. Everything else
(the CLI's --process choices and option flags, default folder names and their
parsing in error hints, the default recipe, which metrics `eval` runs) is read
from the class.

Sequences: a sequence of `seq_len` tokens is `[BOS, x1, ..., x_{L-1}]` with
states 0..K-1 and BOS = K (vocabulary K + 1). A model sees `seq[:-1]` and
predicts `seq[1:]`, so L - 1 positions are predicted per sequence; every loss
is in nats per predicted token.

Exact and estimated numbers: a number the process can compute exactly is
returned as a float. Where it can only be estimated (Monte-Carlo, or bounded
by a bracket), the same method returns the estimate, and `theory(seq_len)`
reports its error under a "<name>_se" key beside it (0.0 where that process's
number happens to be exact). `optimal_loss_by_position` always returns two
arrays, (losses, standard errors), the errors 0.0 where exact.
"""

import inspect
import re
from dataclasses import dataclass

import numpy as np

from nanomarkov.errors import NanoMarkovError
from nanomarkov.files import format_bytes
from nanomarkov.memory import check_fits
from nanomarkov.processes.numerics import entropy

# The largest float64 table a process may build for its theory or its optimal predictor (2 GiB):
# sizes beyond it are refused from the numbers alone, before anything is allocated.
MAX_TABLE_ENTRIES = 2**28
# Tables of table_entries(seq_len) a theory holds at once (the table, its logarithm or entropies, a
# product): within MAX_TABLE_ENTRIES they must also fit in the memory free.
THEORY_TABLES = 3


@dataclass(frozen=True)
class Option:
    """A generation option of a process: a `--name` flag of `nanomarkov generate` and a meta.json key.

    `default` is what the process uses when the option is not given (None: the
    process decides, e.g. from K); `choices` limits the values when not None.
    """

    name: str
    type: type
    default: object
    help: str
    choices: tuple | None = None


# The metric families of `nanomarkov eval` beyond the common ones (cross-entropy, perplexity,
# accuracy, agreement), by result key; a process lists in METRICS those that apply to it.
METRIC_FAMILIES = ("transition_fidelity", "markov_property", "optimal_fidelity", "korder_fidelity")

# What a process provides itself (ARCHITECTURE.md, "Add a process"): the base class's versions only raise.
REQUIRED_MEMBERS = (
    "n_states",
    "random",
    "sample",
    "optimal_log_probs",
    "optimal_loss_by_position",
    "optimal_accuracy",
    "entropy_rate",
    "unigram_loss",
)
# What eval reads beyond those, by the METRICS entry that makes it run (transition fidelity and the Markov
# property are one pass), and what the belief probes read where BELIEF_STATES is True.
METRIC_MEMBERS = {
    "transition_fidelity": ("transition_rows", "stationary"),
    "markov_property": ("transition_rows", "stationary"),
    "korder_fidelity": ("context_order", "first_order_rows"),
}
BELIEF_MEMBERS = ("belief_states", "n_hidden")


# The default recipe's changes for processes whose optimal predictor needs what the whole
# sequence so far says (counts for an in-context chain, a belief for an HMM), gathered by
# two attention layers. Measured in BENCHMARKS.md ("Default recipe per process").
# Position embeddings and the train split are named here because the first-order rows under
# them (config.DEFAULT_RECIPES) drop both above K = 10.
WHOLE_HISTORY_RECIPE = dict(
    mlp_only=False,
    pos_ape=True,
    data_source="fixed",
    n_layer=2,
    n_head=1,
    n_embd=64,
    learning_rate=1e-2,
    min_lr=1e-4,
    max_iters=1000,
    lr_decay_iters=1000,
    eval_interval=250,
)

# The whole-history recipe narrower (32 wide), with 4 heads, fresh sequences each step and twice the steps at half
# the batch, for the processes whose prediction needs a precise look back: the last 0 and the parity since (even),
# the depth (matching_parens), the scalings since the last reset (post_quantum), the token after the trigger's
# last occurrence (bietti), the component a sequence's counts point to (mixture); days_of_week, which it did not
# fit, takes RECENCY_RECIPE below. With the whole-history recipe they stayed 0.113, 0.012, 0.0127, 0.245 and 0.016 nats above the optimum. Several heads can each read one
# earlier position; fresh data keeps the run from revisiting the 10,000 train sequences. 32 wide costs 2.4x less
# a step than 64 on one core and learned better at lr 1e-2 (post_quantum 0.0042 nats at batch 64 and 1000 steps,
# against 0.0098 at 64 wide in 2000 steps and 565 s); the same tokens in 2000 steps of 32 sequences did better
# again at the same cost (even 0.0014 against 0.0109, post_quantum 0.0017 against 0.0042, mixture 0.0089
# against 0.0093, each ~200 s). One head at 32 wide did not learn even (0.134 at 1000 steps), 2 heads reached
# 0.028, lr 2e-2 0.018.
LOOKBACK_RECIPE = {
    **WHOLE_HISTORY_RECIPE,
    "n_embd": 32,
    "n_head": 4,
    "data_source": "online",
    "batch_size": 32,
    "max_iters": 2000,
    "lr_decay_iters": 2000,
    "eval_interval": 500,
}

# The look-back recipe with alibi (model.alibi_bias) in place of the position table, for the processes whose
# prediction needs the last few tokens by their distance: the 1s since the last 0 (fanizza), the day named before
# "tomorrow" or "yesterday" and the moves since (days_of_week), the last two bits and the phase (leaky_rrxor).
# Head 0 then reads the last token almost alone and each further head a window twice as long, where attention
# with positions has to learn each of those looks. Measured with one core each (the other busy), before this
# recipe: fanizza 0.029 nats above the optimum with the look-back recipe, 0.00044 with alibi beside the position
# table (2000 steps, 258 s), 0.00084 after 1000 steps without it; days_of_week 0.0235 in 612 s, with alibi and no
# positions 0.0012 in 500 steps (274 s: its sequences are 255 tokens, so it takes fewer steps); leaky_rrxor 0.049,
# with alibi 0.011 at lr 1e-2 and 0.0097 at lr 2e-2 (0.0089 beside positions). Press et al.'s slopes (the
# steepest 1/4 at 4 heads) left fanizza at 0.030 after 500 steps, these 0.0044. Without positions TransformerLens 3
# opens the model (its own ALiBi, holding these slopes).
RECENCY_RECIPE = {**LOOKBACK_RECIPE, "alibi": True, "pos_ape": False}

# The recency recipe with alibi's bias trained (alibi_trained: a table per layer, head and distance, started at the
# slopes), 1500 steps, for rrxor and leaky_rrxor, whose next bit hangs on the phase of the triples: a head can then
# come to read every third token back, which neither the fixed lines nor a position table gave in 5 minutes.
# Measured (throwaway runs, the other core busy, 2000 steps): rrxor 0.0062 nats at 1000 steps, 0.0018 at 1500,
# 0.0009 at 2000, against 0.064, 0.049, 0.044 with the lines fixed; leaky_rrxor 0.0054 at 1000, 0.0036 at 1500,
# against 0.015, 0.012 (lr 2e-2, which the fixed lines needed).
TRAINED_RECENCY_RECIPE = {**RECENCY_RECIPE, "alibi_trained": True, "max_iters": 1500, "lr_decay_iters": 1500}


class Process:
    """The contract of a process (see the module docstring). Subclass it; do not instantiate it.

    Class attributes a process declares:
      process     its registry name, e.g. "markov" (also meta.json's "process")
      FOLDER_PREFIX  the default folder name before K (None: the process name; markov: "mm")
      N_STATES    K where the process fixes it (the named processes of the literature), else None;
                  `nanomarkov generate` then takes no K (or only this one)
      SUMMARY     one line for `nanomarkov generate --help`
      ARRAYS      the names of the arrays saved in chain.npz; `cls.from_arrays(arrays)` rebuilds the process
      OPTIONS     its generation options beyond K, seed, alpha and sparsity: a tuple of `Option`;
                  options() reads each from the instance, self.<name>, unless the class overrides it
      RECIPE      TrainConfig fields the default recipe changes for this process ({}: none), over
                  the first-order row for its K (config.DEFAULT_RECIPES, zero layers, no position
                  embedding and online data above K = 10): a RECIPE that adds blocks names pos_ape (or alibi) too
      METRICS     the metric families of METRIC_FAMILIES that `eval` runs on it; each needs the
                  methods METRIC_MEMBERS names for it
      BELIEF_STATES  True when it has hidden states and provides belief_states(tokens) and n_hidden
      HISTORY_REASON why the next token depends on more than the current one, for eval's skip notes

    `register` refuses a class that does not override each of REQUIRED_MEMBERS, and those its
    METRICS and BELIEF_STATES need (missing_members), or whose OPTIONS the default options() cannot
    read from the instance (unreadable_options).
    """

    process = None
    FOLDER_PREFIX = None  # the default folder's name before K (None: the process name)
    N_STATES = None
    SUMMARY = ""
    ARRAYS = ()
    OPTIONS = ()
    RECIPE = {}
    METRICS = ("optimal_fidelity",)
    BELIEF_STATES = False
    HISTORY_REASON = None

    @classmethod
    def missing_members(cls):
        """{name: what needs it} for each member of the contract this class needs and does not provide (the base
        class's stub is not providing it); {} for a class that can be registered."""
        needs = dict.fromkeys(REQUIRED_MEMBERS, "the least a process provides")
        for family in cls.METRICS:
            needs.update({name: f"{family} in METRICS" for name in METRIC_MEMBERS.get(family, ()) if name not in needs})
        if cls.BELIEF_STATES:
            needs.update(dict.fromkeys(BELIEF_MEMBERS, "BELIEF_STATES = True"))
        missing = {name: why for name, why in needs.items() if not cls.provides(name)}
        unread = "an attribute named as in OPTIONS, which the default options() reads; or override options()"
        return {**missing, **dict.fromkeys(cls.unreadable_options(), unread)}

    # ------------------------------------------------------- construction

    @classmethod
    def random(cls, n_states, seed=42, alpha=1.0, sparsity=None, **options):
        """A process provides: a random instance with K = n_states; same arguments, same process.

        `alpha` and `sparsity` shape random rows where the process has any;
        `options` are the names of OPTIONS (None or absent: the default).
        """
        raise NotImplementedError(f"{cls.__name__} does not provide random()")

    def arrays(self):
        """The arrays saved in chain.npz, {name: array} for each name of ARRAYS."""
        return {name: getattr(self, name) for name in self.ARRAYS}

    @classmethod
    def from_arrays(cls, arrays):
        """The process that arrays() saved (`arrays` a mapping, e.g. an open .npz): cls(**arrays).

        A KeyError names an array of ARRAYS that `arrays` lacks.
        """
        return cls(**{name: arrays[name] for name in cls.ARRAYS})

    def options(self):
        """The values of this instance's OPTIONS, {name: value}: recorded in meta.json and theory's rows.

        This default reads each OPTIONS name as an attribute of the instance, `self.<name>` (set in
        __init__, a property or a class attribute); `register` refuses a class that keeps this default
        and declares an option it cannot read (unreadable_options). A process that keeps its options
        otherwise overrides it.
        """
        return {option.name: getattr(self, option.name) for option in self.OPTIONS}

    @classmethod
    def unreadable_options(cls):
        """The OPTIONS names the default options() cannot read: neither found on the class (an attribute, a
        property) nor assigned by an __init__ of its classes; () where the class overrides options()."""
        if cls.provides("options"):
            return ()
        assigned = set()
        for klass in cls.__mro__:
            init = vars(klass).get("__init__")
            assigned.update(getattr(getattr(init, "__code__", None), "co_names", ()))
        return tuple(
            name
            for name in cls.option_names()
            if name not in assigned and inspect.getattr_static(cls, name, None) is None
        )

    @classmethod
    def option_names(cls):
        """The names of OPTIONS, in order."""
        return tuple(option.name for option in cls.OPTIONS)

    @classmethod
    def folder_name(cls, n_states, **options):
        """The default dataset folder name (without -sparse-S): "{process}{K}", then "-{name}{value}" per option."""
        prefix = cls.FOLDER_PREFIX or cls.process
        return f"{prefix}{n_states}" + "".join(f"-{name}{value}" for name, value in options.items())

    @classmethod
    def parse_folder_name(cls, name):
        """(n_states, options) of a folder name that folder_name makes (without -sparse-S), or None."""
        names = "|".join(re.escape(o) for o in cls.option_names())
        pattern = rf"{re.escape(cls.FOLDER_PREFIX or cls.process)}(?P<k>\d+)" + (
            rf"((?:-(?:{names})[^-]+)*)" if names else "()"
        )
        match = re.fullmatch(pattern, name)
        if not match:
            return None
        options = cls.parse_folder_options(match.group(2))
        return None if options is None else (int(match.group("k")), options)

    @classmethod
    def parse_folder_options(cls, suffix):
        """{name: value} of the "-{name}{value}" parts of a folder name, or None where a value does not parse."""
        options = {}
        for option in cls.OPTIONS:
            found = re.search(rf"-{re.escape(option.name)}([^-]+)", suffix)
            if found:
                try:
                    options[option.name] = option.type(found.group(1))
                except ValueError:
                    return None
        return options

    # ------------------------------------------------------- vocabulary and checks

    @property
    def n_states(self):
        """A process provides: K, the number of states (token ids 0..K-1)."""
        raise NotImplementedError

    @property
    def bos_token(self):
        """The BOS token id: K."""
        return self.n_states

    @property
    def vocab_size(self):
        """K + 1: the states and BOS."""
        return self.n_states + 1

    def check_seq_len(self, seq_len):
        """Raise unless seq_len is an integer >= 2 (BOS plus at least one state) whose tables fit in memory."""
        if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
            raise NanoMarkovError(f"seq_len must be an integer >= 2 (BOS plus at least one state), got {seq_len!r}")
        entries = self.table_entries(int(seq_len))
        if entries > MAX_TABLE_ENTRIES:
            raise NanoMarkovError(
                f"--seq_len {seq_len} with K = {self.n_states} needs a {format_bytes(entries * 8)} table for its "
                f"exact theory (at most {format_bytes(MAX_TABLE_ENTRIES * 8)}); use a shorter --seq_len or fewer states"
            )
        check_fits(
            THEORY_TABLES * entries * 8,
            f"the exact theory of --seq_len {seq_len} with K = {self.n_states} ({THEORY_TABLES} float64 tables of "
            f"{entries:,} entries)",
            "use a shorter --seq_len or fewer states",
        )

    def table_entries(self, seq_len):
        """The entries of the largest float64 table the theory or the optimal predictor builds for seq_len.

        This default: one row of K per position (the first-order marginals, one sequence's
        predictive table). A process whose tables are larger overrides it.
        """
        return seq_len * self.n_states

    def check_tokens(self, tokens):
        """Validate BOS-led sequences (n, seq_len): BOS first, states after; returns them as an array."""
        tokens = np.asarray(tokens) if not isinstance(tokens, np.ndarray) else tokens
        if tokens.ndim != 2 or tokens.shape[1] < 2 or tokens.shape[0] == 0:
            raise NanoMarkovError(f"expected sequences of shape (n, seq_len >= 2), got {tokens.shape}")
        if np.any(tokens[:, 0] != self.bos_token):
            raise NanoMarkovError(f"every sequence must start with BOS = {self.bos_token}")
        if np.any(tokens[:, 1:] >= self.n_states):
            raise NanoMarkovError(f"tokens after BOS must be states 0..{self.n_states - 1}")
        return tokens

    # ------------------------------------------------------- what a process provides

    def sample(self, n_sequences, seq_len, rng):
        """A process provides: n_sequences BOS-led sequences (n, seq_len) of token_dtype, drawn from `rng`.

        Sampling 10 then 20 sequences from one rng must give the bytes of 30 at
        once, so that a dataset does not depend on the chunk size.
        """
        raise NotImplementedError

    def optimal_log_probs(self, tokens):
        """A process provides: the optimal predictor's next-state log-probs, (n, L-1, K) float64, exact.

        Entry [:, t] predicts tokens[:, t+1] from tokens[:, :t+1] (-inf where a
        probability is 0).
        """
        raise NotImplementedError

    def true_loss(self, tokens):
        """Exact mean NLL per predicted token of the optimal predictor on these BOS-led sequences.

        The floor for that very sample. This default averages optimal_log_probs;
        a process may override it with something faster that gives the same number.
        """
        tokens = np.asarray(self.check_tokens(tokens), dtype=np.int64)
        log_probs = self.optimal_log_probs(tokens)
        picked = np.take_along_axis(log_probs, tokens[:, 1:, None], axis=2)
        return float(-picked.sum() / (tokens.shape[0] * (tokens.shape[1] - 1)))

    def optimal_loss_by_position(self, seq_len):
        """A process provides: (losses, standard errors), two (L-1,) float64 arrays.

        losses[t-1] is the expected loss of the optimal predictor at predicted
        position t; an error is 0.0 where its loss is exact.
        """
        raise NotImplementedError

    def optimal_loss(self, seq_len):
        """Expected loss of the optimal predictor on sequences of seq_len tokens (its error: theory's *_se)."""
        return float(self.optimal_loss_by_position(seq_len)[0].mean())

    def optimal_accuracy(self, seq_len):
        """A process provides: the expected top-1 accuracy of the optimal predictor (argmax)."""
        raise NotImplementedError

    def entropy_rate(self):
        """A process provides: lim_t H(x_t | x_<t), the optimal per-token loss far from the start."""
        raise NotImplementedError

    def unigram_loss(self):
        """A process provides: the loss of a model that knows only the long-run token frequencies."""
        raise NotImplementedError

    def uniform_loss(self):
        """log K: the loss of a model that knows nothing."""
        return float(np.log(self.n_states))

    def standard_errors(self, seq_len):
        """The error of each estimated theory number, {name: error}; {} for a process whose theory is exact."""
        return {}

    def theory_note(self, seq_len):
        """One line saying how theory(seq_len) was computed where that needs saying (an HMM: exact from its
        mixed-state presentation, or estimated and why); None where there is nothing to say."""
        return None

    # ------------------------------------------------------- stage predictors

    def token_marginals(self, seq_len):
        """The distribution of x_t at each predicted position t = 1..L-1, (L-1, K); None where unknown.

        A process that knows it exactly provides it: the unigram stage is then
        exact for sequences of seq_len (see stage_losses); otherwise that stage
        is the long-run unigram_loss().
        """
        return None

    def stage_losses(self, seq_len):
        """The expected loss of each stage predictor on sequences of seq_len tokens, {name: loss}, worst first.

        A model learning the process passes through them on its way to the
        optimum (`nanomarkov dynamics` marks when it crosses each):
          uniform  log K: knows nothing
          unigram  one distribution at every position, the token frequencies: with
                   q the mean over predicted positions of the law of x_t (token_marginals),
                   the best such predictor costs H(q); the long-run unigram_loss() where
                   the marginals are unknown
          optimal  the optimal predictor (optimal_loss)
        A process adds its own stages (korder: first_order; icl: in_context_unigram,
        oracle). Estimated ones have their errors in stage_loss_errors(seq_len).
        """
        self.check_seq_len(seq_len)
        marginals = self.token_marginals(seq_len)
        unigram = self.unigram_loss() if marginals is None else float(entropy(np.mean(marginals, axis=0)))
        return {"uniform": self.uniform_loss(), "unigram": unigram, "optimal": self.optimal_loss(seq_len)}

    def unigram_law(self, seq_len):
        """The unigram stage's predictor, one distribution over the K states used at every position, (K,):
        the mean over predicted positions of token_marginals(seq_len), whose entropy is that stage's
        loss; None where the marginals are unknown (a process that knows its long-run token law, as
        hmm does, gives that law here: the one whose entropy its unigram_loss is)."""
        marginals = self.token_marginals(seq_len)
        return None if marginals is None else np.mean(marginals, axis=0)

    def stage_log_probs(self, tokens):
        """Each stage predictor's next-state log-probs on given BOS-led sequences (n, L): {name: (n, L-1, K)}.

        Entry [:, t] predicts tokens[:, t+1] from tokens[:, :t+1], as in optimal_log_probs
        (-inf where a probability is 0); on sequences drawn from the process each stage's mean
        NLL is its stage_losses entry in expectation. Only the stages that are a function of the
        tokens: icl's oracle reads the sequence's own matrix, which no token array holds. This
        default: uniform (1/K everywhere), unigram (unigram_law at every position, where known)
        and optimal; a process with more stages adds them, in stage_losses' order.
        """
        tokens = np.asarray(self.check_tokens(tokens), dtype=np.int64)
        shape = (tokens.shape[0], tokens.shape[1] - 1, self.n_states)
        stages = {"uniform": np.full(shape, -np.log(self.n_states))}
        law = self.unigram_law(tokens.shape[1])
        if law is not None:
            with np.errstate(divide="ignore"):
                stages["unigram"] = np.broadcast_to(np.log(law), shape).copy()
        stages["optimal"] = self.optimal_log_probs(tokens)
        return stages

    def stage_loss_errors(self, seq_len):
        """The standard error of each estimated stage loss, {name: error} (0.0 where exact)."""
        errors = self.standard_errors(seq_len)
        stages = dict.fromkeys(self.stage_losses(seq_len), 0.0)
        stages["optimal"] = float(errors.get("optimal_loss", 0.0))
        if self.token_marginals(seq_len) is None:
            stages["unigram"] = float(errors.get("unigram_loss", 0.0))
        return stages

    def theory(self, seq_len):
        """The theory numbers for sequences of seq_len tokens, as a dict.

        entropy_rate, optimal_loss, optimal_accuracy, uniform_loss and
        unigram_loss, each estimated one followed by its "<name>_se".
        """
        self.check_seq_len(seq_len)
        numbers = {
            "entropy_rate": self.entropy_rate(),
            "optimal_loss": self.optimal_loss(seq_len),
            "optimal_accuracy": self.optimal_accuracy(seq_len),
            "uniform_loss": self.uniform_loss(),
            "unigram_loss": self.unigram_loss(),
        }
        errors = self.standard_errors(seq_len)
        theory = {}
        for name, value in numbers.items():
            theory[name] = value
            if name in errors:
                theory[f"{name}_se"] = errors[name]
        return theory

    # ------------------------------------------------------- what eval and the probes read

    @property
    def context_order(self):
        """k when the next state depends on exactly the last k states (a k-th order chain), else None."""
        return None

    def transition_rows(self):
        """The (K+1, K) next-state distributions after each state, row K after BOS, where the next
        state depends on the current token alone (a first-order chain); None otherwise.

        A process whose METRICS list transition_fidelity or markov_property provides it."""
        return None

    def stationary(self):
        """The long-run distribution of the states, (K,): it weights eval's per-state transition KL.

        A process whose METRICS list transition_fidelity or markov_property provides it."""
        raise NotImplementedError

    def first_order_rows(self):
        """The best predictor from the last state alone, (K, K): korder_fidelity's baseline.

        A process whose METRICS list korder_fidelity provides it (with context_order)."""
        raise NotImplementedError

    @property
    def n_hidden(self):
        """The number of hidden states. A process with BELIEF_STATES = True provides it."""
        raise NotImplementedError

    def belief_states(self, tokens):
        """The belief over the hidden states after every prefix, (n, L, n_hidden) float64: what the belief probes
        target. A process with BELIEF_STATES = True provides it."""
        raise NotImplementedError

    @classmethod
    def provides(cls, name):
        """Whether the class provides a member of the contract itself (the base class's stub is not providing it)."""
        return inspect.getattr_static(cls, name, None) is not inspect.getattr_static(Process, name, None)

    def skipped_metrics(self):
        """{family: why} for each of METRIC_FAMILIES that eval does not run on this process, from what its class
        declares: a family whose members (METRIC_MEMBERS) the class provides is only not listed in METRICS;
        the first-order families of a class without transition_rows() name its HISTORY_REASON where it has one."""
        name = f"process {self.process}"
        reason = self.HISTORY_REASON or f"{name} provides no transition_rows()"
        history = (
            f"the optimal prediction depends on the whole history ({reason})"
            if self.HISTORY_REASON
            else f"a check of first-order chains, and {reason}"
        )
        why = {
            "transition_fidelity": f"no fixed token-to-token matrix to compare with ({reason}): see optimal_fidelity",
            "markov_property": history,
            "optimal_fidelity": f"{name} does not compare with its optimal predictor",
            "korder_fidelity": "defined for k-th order chains (process korder)",
        }
        for family, members in METRIC_MEMBERS.items():
            if all(map(self.provides, members)):
                why[family] = f"{name} provides {' and '.join(members)} but does not list {family} in METRICS"
        return {family: why[family] for family in METRIC_FAMILIES if family not in self.METRICS}
