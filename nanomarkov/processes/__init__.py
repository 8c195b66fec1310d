"""The processes nanoMarkov trains on, by name: `PROCESSES` maps a name to its class.

A process is a subclass of `nanomarkov.processes.base.Process` (the contract: read
its docstrings), added with `register(cls)`. A researcher's own process reaches the
`nanomarkov` command through the environment variable NANOMARKOV_PROCESSES: a list
of module names or .py files, separated by os.pathsep (":" on Linux), that the CLI
imports at start; each calls `register(MyProcess)` when imported.
"""

import importlib
import importlib.util
import os
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

    A .py file is imported under the name nanomarkov_plugin_<its stem>. Returns the imported modules.
    """
    value = os.environ.get(PLUGINS_VARIABLE, "") if value is None else value
    modules = []
    for entry in filter(None, (part.strip() for part in value.split(os.pathsep))):
        try:
            if entry.endswith(".py"):
                path = Path(entry)
                spec = importlib.util.spec_from_file_location(f"nanomarkov_plugin_{path.stem}", path)
                if spec is None or not path.is_file():
                    raise FileNotFoundError(f"no file {path}")
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            else:
                module = importlib.import_module(entry)
        except NanoMarkovError:
            raise
        # A broken plugin can raise anything on import, sys.exit included (which would end every command with
        # its code, silently); Ctrl-C and SIGTERM are the user's, not the plugin's, and go on.
        except (Exception, SystemExit) as e:
            raise NanoMarkovError(
                f"{PLUGINS_VARIABLE}: cannot import {entry!r}: it raised {raised(e)}; fix or remove it"
            ) from None
        modules.append(module)
    return modules


def raised(error):
    """What an exception was, in one line: sys.exit(code) for SystemExit, else its type and message."""
    if isinstance(error, SystemExit):
        return f"SystemExit (it called sys.exit({error.code!r}))"
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


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
