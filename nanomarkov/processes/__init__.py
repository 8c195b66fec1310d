"""The processes nanoMarkov trains on, by name: `PROCESSES` maps a name to its class.

A class plugs in by providing: `process`; ARRAYS (the chain.npz arrays, its constructor's
keyword arguments); OPTIONS (its own generation options, each a CLI flag --name and a top-level
meta.json key); random(n_states, seed, alpha, sparsity, **options); options(); folder_name(n_states,
**options); n_states, vocab_size, bos_token; sample, true_loss, optimal_log_probs and theory.
`register(cls)` adds one.
"""

from nanomarkov.errors import NanoMarkovError
from nanomarkov.processes.hmm import HiddenMarkovModel
from nanomarkov.processes.incontext import InContextChain
from nanomarkov.processes.korder import KOrderChain
from nanomarkov.processes.markov import MarkovChain

PROCESSES = {}


def register(cls):
    """Add a process class under its `process` name (usable as a decorator); returns the class."""
    name = getattr(cls, "process", None)
    if not isinstance(name, str) or not name:
        raise NanoMarkovError(f'{cls.__name__} has no `process` name; give the class one, e.g. process = "mine"')
    if PROCESSES.get(name, cls) is not cls:
        raise NanoMarkovError(
            f"process {name!r} is already registered ({PROCESSES[name].__name__}); choose another name"
        )
    PROCESSES[name] = cls
    return cls


def process_class(process):
    """The registered class of a process name."""
    if process not in PROCESSES:
        raise NanoMarkovError(f"unknown process {process!r}; known: {', '.join(PROCESSES)}")
    return PROCESSES[process]


register(MarkovChain)
register(KOrderChain)
register(InContextChain)
register(HiddenMarkovModel)
