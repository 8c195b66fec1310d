"""The two exceptions every layer raises; the CLI turns them into one line on stderr."""


class NanoMarkovError(Exception):
    """Bad input or a broken file: the message says what is wrong and what to do.

    Library code raises this instead of exiting; the CLI prints the message as
    one line on stderr and exits with code 2.
    """


class TrainingDiverged(NanoMarkovError):
    """The training loss became NaN or infinite: a failed run (exit code 1), not bad input.

    The last good checkpoint is kept as it was.
    """
