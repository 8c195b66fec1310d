"""nanoMarkov: train small GPTs on Markov processes and check them against exact theory.

`nanomarkov.load(path)` opens a trained model (a ckpt.pt or an export folder);
ARCHITECTURE.md maps the package.
"""

from nanomarkov.checkpoint import load
from nanomarkov.errors import NanoMarkovError, TrainingDiverged

__all__ = ["NanoMarkovError", "TrainingDiverged", "load"]
