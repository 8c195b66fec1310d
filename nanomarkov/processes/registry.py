"""The registry of processes by name: `PROCESSES` maps a `process` name to its class.

`nanomarkov.processes` fills it (`register`) and re-exports it; it lives here, below the processes, so that
a process made of others (composite.py) finds its parts' classes by name without importing the package.
"""

from nanomarkov.errors import NanoMarkovError

PROCESSES = {}
PLUGINS_VARIABLE = "NANOMARKOV_PROCESSES"


def process_class(process):
    """The registered class of a process name."""
    if process not in PROCESSES:
        raise NanoMarkovError(
            f"unknown process {process!r}; known: {', '.join(PROCESSES)} (a process of your own is "
            f"registered by a module that {PLUGINS_VARIABLE} names)"
        )
    return PROCESSES[process]
