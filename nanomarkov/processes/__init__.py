"""The processes nanoMarkov trains on, by name: `PROCESSES` maps a name to its class.

A process is a subclass of `nanomarkov.processes.base.Process` (the contract: read
its docstrings), added with `register(cls)`. A researcher's own process reaches the
`nanomarkov` command through the environment variable NANOMARKOV_PROCESSES: a list
of module names or .py files, separated by os.pathsep (":" on Linux), that the CLI
imports at start; each calls `register(MyProcess)` when imported.
"""

import contextlib
import importlib
import importlib.util
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from nanomarkov.errors import NanoMarkovError
from nanomarkov.processes.base import METRIC_FAMILIES, Option, Process
from nanomarkov.processes.composite import FactoredProcess, MixtureProcess
from nanomarkov.processes.ghmm import GeneralizedHMM
from nanomarkov.processes.hmm import HiddenMarkovModel
from nanomarkov.processes.incontext import InContextChain
from nanomarkov.processes.korder import KOrderChain
from nanomarkov.processes.literature import NAMED_PROCESSES
from nanomarkov.processes.markov import MarkovChain
from nanomarkov.processes.registry import PLUGINS_VARIABLE, PROCESSES, process_class
from nanomarkov.processes.trigger import TriggerChain

__all__ = ["PROCESSES", "DEFAULT_PROCESS", "PLUGINS_VARIABLE", "Option", "Process", "register", "process_class"]

DEFAULT_PROCESS = "markov"  # what a dataset without a "process" key, and `generate` without --process, is


def register(cls):
    """Add a process class under its `process` name (usable as a decorator); returns the class."""
    name = getattr(cls, "process", None)
    if not isinstance(name, str) or not name:
        raise NanoMarkovError(f'{cls.__name__} has no `process` name; give the class one, e.g. process = "mine"')
    if PROCESSES.get(name, cls) is not cls:
        raise NanoMarkovError(
            f"process {name!r} is already registered ({PROCESSES[name].__name__}); choose another name"
        )
    check_contract(cls)
    PROCESSES[name] = cls
    return cls


def check_contract(cls):
    """Refuse a class that lacks a method of the contract, or lists a metric family that does not exist, now rather
    than when the method is first called (processes/base.py says what each provides)."""
    unknown = [family for family in cls.METRICS if family not in METRIC_FAMILIES]
    if unknown:
        raise NanoMarkovError(
            f"{cls.__name__} (module {cls.__module__}) lists {', '.join(map(repr, unknown))} in METRICS, which is "
            f"no metric family; the families are {', '.join(METRIC_FAMILIES)}"
        )
    missing = cls.missing_members()
    if missing:
        reasons = {}
        for name, why in missing.items():
            reasons.setdefault(why, []).append(name)
        lacks = "; ".join(f"{', '.join(names)} ({why})" for why, names in reasons.items())
        raise NanoMarkovError(
            f"{cls.__name__} (module {cls.__module__}) does not provide {lacks}: implement them as "
            "nanomarkov/processes/base.py describes"
        )


def load_plugins(value=None):
    """Import every module or .py file that `value` (default: $NANOMARKOV_PROCESSES) lists, separated by os.pathsep.

    A .py file is imported under the name nanomarkov_plugin_<its stem>. What a plugin prints while imported goes to
    stderr, so that a command's stdout (`theory --json`) stays its own. Returns the imported modules.
    """
    value = os.environ.get(PLUGINS_VARIABLE, "") if value is None else value
    modules = []
    for entry in filter(None, (part.strip() for part in value.split(os.pathsep))):
        with noting_user_signals() as arrived, contextlib.redirect_stdout(sys.stderr):
            try:
                modules.append(import_plugin(entry))
            except NanoMarkovError:
                raise
            # A broken plugin can raise anything on import, sys.exit and BaseException included (which would end
            # every command with its code, or a traceback); Ctrl-C and SIGTERM are the user's, not the plugin's,
            # and go on.
            except BaseException as e:
                if signal_of_user(e, arrived):
                    raise
                raise NanoMarkovError(
                    f"{PLUGINS_VARIABLE}: cannot import {entry!r}: it raised {raised(e)}; fix or remove it"
                ) from None
    return modules


def import_plugin(entry):
    """The module a NANOMARKOV_PROCESSES entry names: a .py file's path, or a module name."""
    if not entry.endswith(".py"):
        return importlib.import_module(entry)
    path = Path(entry)
    spec = importlib.util.spec_from_file_location(f"nanomarkov_plugin_{path.stem}", path)
    if spec is None or not path.is_file():
        raise FileNotFoundError(f"no file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The signals a user ends a command with; the exception each raises (KeyboardInterrupt, the CLI's own for SIGTERM)
# is theirs only when the signal did arrive, not when a plugin raised it.
USER_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def noting_user_signals():
    """The set of USER_SIGNALS that arrive inside the block, each still handled as before; None outside the main
    thread, where no handler can be set and nothing can tell a Ctrl-C from a plugin's KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    arrived, previous = set(), {number: signal.getsignal(number) for number in USER_SIGNALS}

    def note(number, frame):
        arrived.add(number)
        previous[number](number, frame)

    # Only a Python handler is wrapped: the default action and "ignore" raise nothing a plugin could imitate.
    noted = [number for number, handler in previous.items() if callable(handler)]
    for number in noted:
        signal.signal(number, note)
    try:
        yield arrived
    finally:
        for number in noted:
            signal.signal(number, previous[number])


def signal_of_user(error, arrived):
    """Whether an exception raised inside noting_user_signals is the user's: a signal of theirs arrived there (or,
    where arrival cannot be noted, it is a KeyboardInterrupt)."""
    if arrived is None:
        return isinstance(error, KeyboardInterrupt)
    return bool(arrived) and not isinstance(error, Exception)  # a plugin that swallowed the signal raised the rest


def raised(error):
    """What an exception was, in one line: sys.exit(code) for SystemExit, else its type and message."""
    if isinstance(error, SystemExit):
        return f"SystemExit (it called sys.exit({error.code!r}))"
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def plugin_failure(error):
    """One line for an exception raised in a plugin's code: the process, its class and module, what it raised, the
    method and, where that is the plugin's own file, the line. None where no frame of the exception's traceback runs a
    plugin (the package's own failure, which stays a traceback to report)."""
    found = None
    for frame, line in traceback.walk_tb(getattr(error, "__traceback__", None)):
        cls, own_file = plugin_class_of(frame)
        if cls is not None:
            found = (cls, frame.f_code, line if own_file else None)
    if found is None:
        return None
    cls, code, line = found
    where = f"{code.co_name}()" + ("" if line is None else f" ({code.co_filename}:{line})")
    return (
        f"process {getattr(cls, 'process', None)} ({cls.__name__}, module {cls.__module__}) raised {raised(error)} "
        f"in {where}; fix the process"
    )


def raised_by_plugin(error):
    """The one line of plugin_failure for an exception that a plugin's own code raised: the innermost frame of its
    traceback, where it was raised, runs a plugin. None otherwise, as for a KeyboardInterrupt that a signal handler
    raised while a plugin ran (the handler's frame is the innermost)."""
    frames = list(traceback.walk_tb(getattr(error, "__traceback__", None)))
    if not frames or plugin_class_of(frames[-1][0])[0] is None:
        return None
    return plugin_failure(error)


def plugin_class_of(frame):
    """(the plugin class whose code a frame runs, whether the frame is in a plugin's own module), or (None, False).

    A plugin class: a registered process class defined outside this package. A frame runs it when its `self` or `cls`
    is one (an inherited method of processes/base.py on a plugin's numbers too), or when it is in a plugin's module."""
    plugins = {cls.__module__: cls for cls in PROCESSES.values() if not cls.__module__.startswith(f"{__package__}.")}
    module = frame.f_globals.get("__name__")
    owner = frame.f_locals.get("self", frame.f_locals.get("cls"))
    owner = owner if isinstance(owner, type) else type(owner)
    if issubclass(owner, Process) and not owner.__module__.startswith(f"{__package__}."):
        return owner, module in plugins or module == owner.__module__
    return plugins.get(module), module in plugins


register(MarkovChain)
register(KOrderChain)
register(InContextChain)
register(TriggerChain)
register(HiddenMarkovModel)
register(GeneralizedHMM)
for named in NAMED_PROCESSES:
    register(named)
register(FactoredProcess)
register(MixtureProcess)
