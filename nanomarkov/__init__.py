"""nanoMarkov: train small GPTs on Markov chains and check them against exact theory."""


class NanoMarkovError(Exception):
    """Bad input or a broken file: the message says what is wrong and what to do.

    Library code raises this instead of exiting; the CLI prints the message as
    one line on stderr and exits with code 2.
    """


class TrainingDiverged(NanoMarkovError):
    """The training loss became NaN or infinite: a failed run (exit code 1), not bad input.

    The last good checkpoint is kept as it was.
    """


def load(path):
    """A trained GPT (eval mode, CPU) from an export folder or a ckpt.pt; no pickle is executed.

    An export folder is what `nanomarkov export CKPT --format safetensors --out DIR`
    writes (model.safetensors + config.json). Imported lazily so that
    `import nanomarkov` stays light and torch-free.
    """
    from nanomarkov.export import load as _load

    return _load(path)


__all__ = ["NanoMarkovError", "TrainingDiverged", "load"]
