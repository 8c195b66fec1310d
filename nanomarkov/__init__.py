"""nanoMarkov: train small GPTs on Markov processes and check them against exact theory.

`nanomarkov.load(path)` opens a trained model (a ckpt.pt or an export folder);
ARCHITECTURE.md maps the package.
"""

from nanomarkov.errors import NanoMarkovError, TrainingDiverged
from nanomarkov.version import VERSION

__version__ = VERSION

__all__ = ["NanoMarkovError", "TrainingDiverged", "__version__", "load"]


def __getattr__(name):
    """`nanomarkov.load`, imported on first use: checkpoint.py loads torch, which what only generates or reads
    datasets (the command line's generate, theory, --help) never needs (PEP 562)."""
    if name == "load":
        from nanomarkov.checkpoint import load

        return load
    raise AttributeError(f"module 'nanomarkov' has no attribute {name!r}")
