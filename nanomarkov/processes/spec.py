"""Spec files: a process given exactly by its numbers, in JSON (or .npz for large arrays).

A spec is a dict whose "process" names a registered process. It gives the process in one of
two forms (docs/specs.md has an example of each):

- by its arrays, for the built-in kinds
    markov  transmat (K, K), startprob (K,) or "stationary"
    korder  transitions (K,)*(k+1), start (K,)*k or "stationary"
    hmm     transmat (H, H), emissions (H, K), startprob (H,) or "stationary"   (state-emitting)
            token_transitions (K, H, H), startprob (H,) or "stationary"        (token-labelled)
    ghmm    token_transitions (K, H, H) of any sign, start (H,) or "stationary"     (generalized HMM)
    icl     concentration (K,); optional support_size (default K), startprob (default uniform), start and
            order (default 1)
    factored  factors: a list of specs, side by side (processes/composite.py)
    mixture   components: a list of specs of one K, and weights
  and for a process of your own its ARRAYS, all of them (`cls(**arrays)`);
- by the arguments of its `random`: n_states, seed (default 42), alpha, sparsity and the
  process's OPTIONS, e.g. {"process": "hmm", "n_states": 3, "preset": "mess3"}. A process of the
  literature registered by name is given this way with its parameters.

A .npz spec holds one entry per field: an array field is its array, a scalar field a 0-d array
(np.savez(path, process="hmm", token_transitions=T, startprob="stationary")).

Every field is checked before anything is built, and a bad one is refused in one line naming the
field and what it must satisfy. Rows must sum to 1 within SPEC_ROW_TOLERANCE and are then divided
by their sum, so numbers copied from a paper with a few digits are read as they were meant.
"""

import hashlib
import json
import math
import warnings
import zipfile
from pathlib import Path

import numpy as np

from nanomarkov.errors import NanoMarkovError
from nanomarkov.files import open_regular, read_json
from nanomarkov.memory import check_fits, npz_bytes, npz_headers
from nanomarkov.processes import PROCESSES, process_class
from nanomarkov.processes.base import MAX_TABLE_ENTRIES
from nanomarkov.processes.composite import FactoredProcess, MixtureProcess
from nanomarkov.processes.ghmm import GeneralizedHMM
from nanomarkov.processes.hmm import HiddenMarkovModel
from nanomarkov.processes.incontext import START_RULES, InContextChain
from nanomarkov.processes.korder import KOrderChain
from nanomarkov.processes.markov import PEAK_MATRICES, MarkovChain
from nanomarkov.processes.numerics import CONCENTRATION_RANGE, valid_concentration

SPEC_ROW_TOLERANCE = 1e-6
# Larger JSON specs are refused before parsing: their arrays belong in a .npz spec.
MAX_JSON_BYTES = 64 << 20
STATIONARY = "stationary"
# The arguments of every process's `random` besides its OPTIONS, and their defaults.
RANDOM_FIELDS = {"n_states": None, "seed": 42, "alpha": 1.0, "sparsity": None}
MAX_SEED = 2**32 - 1


def field_error(field, must, got=None):
    """The one-line refusal of a spec field: what it must be, and what it was."""
    return NanoMarkovError(f"spec field {field!r} must {must}" + ("" if got is None else f", got {got}"))


# ------------------------------------------------------------------ reading


def read_spec(path):
    """The spec dict in a .json or .npz file (npz: arrays as arrays, 0-d entries as Python scalars)."""
    path = Path(path)
    if path.suffix == ".npz":
        return read_npz_spec(path)
    if path.suffix != ".json":
        raise NanoMarkovError(f"{path}: a spec file is .json or .npz, got {path.suffix or 'no extension'}")
    if path.is_file() and path.stat().st_size > MAX_JSON_BYTES:
        raise NanoMarkovError(
            f"{path}: {path.stat().st_size:,} bytes, more than a JSON spec's {MAX_JSON_BYTES:,}; "
            "write its arrays to a .npz spec (docs/specs.md)"
        )
    try:
        return read_json(
            path,
            what="spec file",
            fix="a spec is a JSON object naming its process (docs/specs.md)",
            object_pairs_hook=unique_fields,
            max_bytes=MAX_JSON_BYTES,
        )
    except RecursionError:
        raise NanoMarkovError(f"{path}: nested too deep for a spec file (docs/specs.md)") from None


def unique_fields(pairs):
    """A JSON object as a dict, refusing a key given twice (json alone keeps the last one silently).

    The ValueError is read_json's "not a readable spec file (...)", one line naming the file."""
    fields = {}
    for key, value in pairs:
        if key in fields:
            raise ValueError(f"spec field {key!r} is given twice")
        fields[key] = value
    return fields


def process_from_file(path):
    """(the spec, its process) of a .json or .npz spec file; every error names the file."""
    spec = read_spec(path)
    try:
        return spec, process_from_spec(spec)
    except NanoMarkovError as e:
        raise NanoMarkovError(f"{path}: {e}") from None


def read_npz_spec(path):
    """The spec in a .npz file: each entry a field. Only a regular file is opened, and every entry's
    shape is read from its header first: one over MAX_TABLE_ENTRIES, or all of them together beyond
    the free memory, is refused unread."""
    fix = "write one with np.savez(path, process=..., **arrays) (docs/specs.md)"
    try:
        with open_regular(path) as file:
            check_npz_entries(path, npz_headers(file))
            file.seek(0)
            with np.load(file, allow_pickle=False) as npz:
                return {name: value.item() if value.ndim == 0 else value for name, value in npz.items()}
    except FileNotFoundError:
        raise NanoMarkovError(f"{path}: no spec file there; {fix}") from None
    except OSError as e:
        raise NanoMarkovError(f"{path}: not a readable .npz spec ({e.strerror or e}); {fix}") from None
    except (EOFError, zipfile.BadZipFile, ValueError) as e:
        raise NanoMarkovError(f"{path}: not a readable .npz spec ({e}); {fix}") from None


def check_npz_entries(path, headers):
    """Refuse a .npz spec whose headers ({name: (shape, dtype)}) claim more than a spec may hold."""
    for name, (shape, _) in headers.items():
        entries = math.prod(shape)
        if entries > MAX_TABLE_ENTRIES:
            raise NanoMarkovError(
                f"{path}: entry {name}.npy holds {entries:,} entries (shape {shape}), more than "
                f"{MAX_TABLE_ENTRIES:,} (MAX_TABLE_ENTRIES); use a smaller process"
            )
    check_fits(npz_bytes(headers), f"the arrays of {path}", "use a smaller process")
    try:
        check_build_memory(headers)
    except NanoMarkovError as e:
        raise NanoMarkovError(f"{path}: {e}") from None


def check_build_memory(headers):
    """Refuse, from the headers alone, a spec whose process will not fit once built: reading an array is
    only the start, as checking and building it copies it and the theory adds temporaries beside it.

    A square matrix (K, K) is a chain's: it gets generate K's own estimate (MarkovChain.check_memory), so
    a spec and a named process of one K are refused alike. Any other array is taken to be held
    PEAK_MATRICES times at the peak, the factor measured for a chain's matrix."""
    for name, (shape, _) in headers.items():
        if len(shape) == 2 and shape[0] == shape[1]:
            MarkovChain.check_memory(shape[0])
        else:
            check_fits(
                PEAK_MATRICES * math.prod(shape) * 8,
                f"entry {name}.npy (shape {shape}) and the process built from it ({PEAK_MATRICES} float64 copies "
                "at once)",
                "use a smaller process",
            )


# ------------------------------------------------------------------ checking fields


def numbers(spec, field, ndim=None):
    """Field `field` as a finite float64 array of `ndim` dimensions (None: any)."""
    value = spec[field]
    if isinstance(value, str):
        raise field_error(field, "be an array of numbers", repr(value))
    try:
        array = np.asarray(value)
    except ValueError:
        raise field_error(field, "be an array of numbers with rows of equal length", "a ragged list") from None
    if array.dtype.kind not in "iuf":
        raise field_error(field, "hold numbers only", f"entries of type {array.dtype}")
    at = first_bool(value)
    if at is not None:  # numpy reads true / false as 1 / 0
        raise field_error(field, "hold numbers only", f"a bool at index {list(at)}")
    if ndim is not None and array.ndim != ndim:
        raise field_error(field, f"be a {ndim}-dimensional array", f"shape {array.shape}")
    if array.size > MAX_TABLE_ENTRIES:
        raise field_error(field, f"have at most {MAX_TABLE_ENTRIES:,} entries (MAX_TABLE_ENTRIES)", array.size)
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        at = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        raise field_error(field, "have finite entries", f"{array[at]} at index {list(at)}")
    return array


CONTAINERS_AND_BOOLS = (list, tuple, bool, np.bool_)


def first_bool(value):
    """The index of the first bool in nested lists `value`, or None (an array's dtype already says).

    Called once np.asarray has read `value`, so its nesting is at most numpy's few dimensions deep."""
    if isinstance(value, (bool, np.bool_)):
        return ()
    if not isinstance(value, (list, tuple)) or set(map(type, value)).isdisjoint(CONTAINERS_AND_BOOLS):
        return None  # the common case, a list of plain numbers, at C speed
    for i, item in enumerate(value):
        if isinstance(item, CONTAINERS_AND_BOOLS):
            at = first_bool(item)
            if at is not None:
                return (i, *at)
    return None


def check_nonnegative(field, array):
    if np.any(array < 0):
        at = tuple(int(i) for i in np.argwhere(array < 0)[0])
        raise field_error(field, "have entries >= 0 (probabilities)", f"{array[at]:g} at index {list(at)}")


def distribution_rows(field, array, rows="row", must=None):
    """`array` with each distribution along its last axis divided by its sum, once each is >= 0 and sums to 1.

    `rows` names what indexes a distribution in the message (a row, a context), `must` replaces its demand."""
    check_nonnegative(field, array)
    sums = array.sum(axis=-1)
    bad = np.argwhere(np.abs(sums - 1) > SPEC_ROW_TOLERANCE)
    if len(bad):
        at = tuple(int(i) for i in bad[0])
        must = must or f"sum to 1 (within {SPEC_ROW_TOLERANCE:g})" + (f" in every {rows}" if at else "")
        where = f"{rows} {at[0] if len(at) == 1 else list(at)} sums to" if at else "a sum of"
        raise field_error(field, must, f"{where} {float(sums[at])!r}")
    return array / sums[..., None]


def distribution_or_stationary(spec, field, shape, stationary):
    """Field `field`: a distribution of `shape`, or "stationary" (then `stationary()` computes it, refused
    where the law is not unique)."""
    if isinstance(spec[field], str):
        if spec[field] != STATIONARY:
            raise field_error(field, f'be an array of shape {shape} or "stationary"', repr(spec[field]))
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # MarkovChain.stationary's "not unique"
            try:
                return stationary()
            except UserWarning:
                raise field_error(
                    field,
                    "be an array: the chain has several closed classes, so no unique stationary law",
                    '"stationary"',
                ) from None
    array = numbers(spec, field, len(shape))
    if array.shape != shape:
        raise field_error(field, f'have shape {shape} to match the others, or be "stationary"', f"shape {array.shape}")
    return distribution_rows(field, array.reshape(-1)).reshape(shape)


def square(field, array, least=2):
    if array.shape[0] < least or len(set(array.shape)) != 1:
        raise field_error(field, f"be square with at least {least} states", f"shape {array.shape}")
    return array


def integer(spec, field, low, high=None):
    value = spec[field]
    if isinstance(value, np.integer):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        raise field_error(field, f"be an integer in {low}..{'' if high is None else high}", repr(spec[field]))
    return value


def choice(spec, field, choices):
    if isinstance(spec[field], (list, tuple, dict, np.ndarray)) or spec[field] not in choices:
        raise field_error(field, f"be one of {', '.join(map(repr, choices))}", repr(spec[field]))
    return spec[field]


def number(spec, field, must, holds):
    """A finite number (int or float, not bool) for which holds(value) is true."""
    value = spec[field]
    numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not numeric or not math.isfinite(value) or not holds(value):
        raise field_error(field, f"be a number {must}", repr(value))
    return value


def option_value(spec, option):
    """The value of one of a process's OPTIONS, of the Option's type (an int is a float where a float is asked)."""
    value = spec[option.name]
    if option.type is float:
        value = float(number(spec, option.name, f"({option.help})", lambda v: True))
    elif option.type is int:
        value = integer(spec, option.name, 0)
    elif not isinstance(value, option.type):
        raise field_error(option.name, f"be of type {option.type.__name__} ({option.help})", repr(value))
    if option.choices is not None:
        choice(spec, option.name, option.choices)
    return value


def check_fields(spec, required, optional, what):
    """Refuse a field that `what` does not have, and a required one that is missing."""
    known = ("process", *required, *optional)
    for field in spec:
        if field not in known:
            raise NanoMarkovError(f"spec field {field!r} is not a field of {what} (its fields: {', '.join(known)})")
    for field in required:
        if field not in spec:
            raise NanoMarkovError(f"spec field {field!r} is missing: {what} gives {', '.join(required)}")


# ------------------------------------------------------------------ the forms of a spec


def markov_from_spec(spec):
    transmat = distribution_rows("transmat", square("transmat", numbers(spec, "transmat", 2)))
    uniform = np.full(len(transmat), 1 / len(transmat))
    startprob = distribution_or_stationary(
        spec, "startprob", (len(transmat),), lambda: MarkovChain(transmat, uniform).stationary()
    )
    return MarkovChain(transmat, startprob)


def korder_from_spec(spec):
    transitions = numbers(spec, "transitions")
    if transitions.ndim < 2:
        raise field_error("transitions", "have shape (K,)*(order+1) with order >= 1", f"shape {transitions.shape}")
    transitions = distribution_rows("transitions", square("transitions", transitions), rows="context")
    shape = transitions.shape[:-1]
    uniform = np.full(shape, 1 / math.prod(shape))
    start = distribution_or_stationary(spec, "start", shape, lambda: KOrderChain(transitions, uniform).stationary())
    return KOrderChain(transitions, start)


def hidden_start(spec, transmat):
    """An HMM's startprob (H,): given, or the stationary law of its hidden chain."""
    uniform = np.full(len(transmat), 1 / len(transmat))
    return distribution_or_stationary(
        spec, "startprob", (len(transmat),), lambda: MarkovChain(transmat, uniform).stationary()
    )


def hmm_from_spec(spec):
    transmat = distribution_rows("transmat", square("transmat", numbers(spec, "transmat", 2)))
    emissions = numbers(spec, "emissions", 2)
    if emissions.shape[0] != len(transmat) or emissions.shape[1] < 2:
        raise field_error(
            "emissions", f"have shape (H={len(transmat)}, K) with K >= 2 tokens", f"shape {emissions.shape}"
        )
    return HiddenMarkovModel(transmat, distribution_rows("emissions", emissions), hidden_start(spec, transmat))


def token_hmm_from_spec(spec):
    tokens = numbers(spec, "token_transitions", 3)
    if tokens.shape[0] < 2 or tokens.shape[1] != tokens.shape[2]:
        raise field_error(
            "token_transitions",
            "have shape (K, H, H) with K >= 2 tokens",
            f"shape {tokens.shape}",
        )
    check_nonnegative("token_transitions", tokens)
    # T[x][i, j] = P(token x, next hidden j | hidden i): from each hidden state i, all of them sum to 1.
    must = f"sum to 1 over tokens x and next states j (within {SPEC_ROW_TOLERANCE:g}) for every hidden state i"
    transmat = distribution_rows("token_transitions", tokens.sum(axis=0), rows="hidden state", must=must)
    tokens = tokens / tokens.sum(axis=(0, 2))[None, :, None]
    return HiddenMarkovModel.from_token_transitions(tokens, hidden_start(spec, transmat))


def ghmm_from_spec(spec):
    tokens = numbers(spec, "token_transitions", 3)
    if tokens.shape[0] < 2 or tokens.shape[1] != tokens.shape[2]:
        raise field_error("token_transitions", "have shape (K, H, H) with K >= 2 tokens", f"shape {tokens.shape}")
    if isinstance(spec["start"], str):
        if spec["start"] != STATIONARY:
            raise field_error(
                "start", f'be an array of shape ({tokens.shape[1]},) or "stationary"', repr(spec["start"])
            )
        return GeneralizedHMM(tokens)
    start = numbers(spec, "start", 1)
    if start.shape != (tokens.shape[1],):
        raise field_error(
            "start", f"have shape ({tokens.shape[1]},) to match token_transitions", f"shape {start.shape}"
        )
    return GeneralizedHMM(tokens, start)


def icl_from_spec(spec):
    concentration = numbers(spec, "concentration", 1)
    if len(concentration) < 2 or not valid_concentration(concentration):
        raise field_error(
            "concentration", f"be a vector of K >= 2 Dirichlet parameters, each {CONCENTRATION_RANGE}",
            concentration.tolist(),
        )  # fmt: skip
    k = len(concentration)
    support_size = integer(spec, "support_size", 1, k) if "support_size" in spec else k
    startprob = np.full(k, 1 / k)
    if "startprob" in spec:
        startprob = numbers(spec, "startprob", 1)
        if startprob.shape != (k,):
            raise field_error("startprob", f"have shape ({k},) to match concentration", f"shape {startprob.shape}")
        startprob = distribution_rows("startprob", startprob)
    start = choice(spec, "start", START_RULES) if "start" in spec else "uniform"
    if start == STATIONARY and "startprob" in spec:
        raise field_error("startprob", 'be left out with start "stationary" (x1 follows each sequence\'s own matrix)')
    if start == STATIONARY and support_size < k:
        raise field_error(
            "start", 'be "uniform" with support_size < K (a sparse matrix can have several stationary laws)'
        )
    order = integer(spec, "order", 1) if "order" in spec else 1
    return InContextChain(concentration, startprob, support_size, start, order)


# ------------------------------------------------------------------ composite processes (processes/composite.py)


def part_specs(spec, field):
    """The processes of the spec list in `field` (a factored spec's factors, a mixture's components), each read
    as a spec of its own; an error names the part."""
    parts = spec[field]
    if not isinstance(parts, (list, tuple)) or not parts or not all(isinstance(part, dict) for part in parts):
        raise field_error(
            field, "be a non-empty list of specs (JSON objects naming their process)", type(parts).__name__
        )
    built = []
    for index, part in enumerate(parts):
        try:
            built.append(process_from_spec(part))
        except NanoMarkovError as e:
            raise NanoMarkovError(f"{field}[{index}]: {e}") from None
        except RecursionError:
            raise NanoMarkovError(f"{field}[{index}]: specs nested too deep (docs/specs.md)") from None
    return built


def factored_from_spec(spec):
    return FactoredProcess(part_specs(spec, "factors"))


def mixture_from_spec(spec):
    components = part_specs(spec, "components")
    sizes = [component.n_states for component in components]
    if len(set(sizes)) != 1:
        raise field_error("components", "share one vocabulary (the same K)", f"K = {', '.join(map(str, sizes))}")
    weights = numbers(spec, "weights", 1)
    if weights.shape != (len(components),):
        raise field_error("weights", f"have one weight per component ({len(components)})", f"shape {weights.shape}")
    return MixtureProcess(components, distribution_rows("weights", weights))


class Form:
    """One way to give a process by its arrays: the fields it requires and allows, and its builder."""

    def __init__(self, process, what, required, optional, build):
        self.process, self.what, self.required, self.optional, self.build = process, what, required, optional, build


# A process's forms, the first whose first required field the spec has being the one it is read in.
FORMS = (
    Form("markov", "a markov spec", ("transmat", "startprob"), (), markov_from_spec),
    Form("korder", "a korder spec", ("transitions", "start"), (), korder_from_spec),
    Form("hmm", "a token-labelled hmm spec", ("token_transitions", "startprob"), (), token_hmm_from_spec),
    Form("hmm", "a state-emitting hmm spec", ("transmat", "emissions", "startprob"), (), hmm_from_spec),
    Form("ghmm", "a ghmm spec", ("token_transitions", "start"), (), ghmm_from_spec),
    Form("icl", "an icl spec", ("concentration",), ("support_size", "startprob", "start", "order"), icl_from_spec),
    Form("factored", "a factored spec", ("factors",), (), factored_from_spec),
    Form("mixture", "a mixture spec", ("components", "weights"), (), mixture_from_spec),
)


def arrays_form(cls, spec):
    """The Form a spec of `cls` is read in, or None where it gives no array (then: the arguments of random)."""
    forms = [form for form in FORMS if form.process == cls.process and PROCESSES.get(form.process) is cls]
    if not forms:  # a process of your own: all of its ARRAYS, checked by its constructor
        forms = [
            Form(
                cls.process,
                f"a {cls.process} spec",
                cls.ARRAYS,
                (),
                lambda s: cls(**{n: numbers(s, n) for n in cls.ARRAYS}),
            )
        ]
    arrays = set(cls.ARRAYS).union(form.required[0] for form in forms)
    if not arrays.intersection(spec):
        return None
    return next((form for form in forms if form.required[0] in spec), forms[-1])


def random_from_spec(cls, spec):
    """A process from the arguments of its `random`: n_states, seed, alpha, sparsity and its OPTIONS."""
    check_fields(spec, (), (*RANDOM_FIELDS, *cls.option_names()), f"a {cls.process} spec without arrays")
    given = {name: spec.get(name, default) for name, default in RANDOM_FIELDS.items()}
    if "n_states" in spec:
        given["n_states"] = integer(spec, "n_states", 2)
    if "seed" in spec:
        given["seed"] = integer(spec, "seed", 0, MAX_SEED)
    if "alpha" in spec:
        given["alpha"] = number(spec, "alpha", CONCENTRATION_RANGE, valid_concentration)
    if spec.get("sparsity") is not None:
        given["sparsity"] = number(spec, "sparsity", "in [0, 100) (percent)", lambda v: 0 <= v < 100)
    options = {option.name: option_value(spec, option) for option in cls.OPTIONS if spec.get(option.name) is not None}
    return cls.random(given.pop("n_states"), **given, **options)


def process_from_spec(spec):
    """The process a spec dict gives (see the module docstring); every field checked, a bad one refused in one line."""
    if not isinstance(spec, dict):
        raise NanoMarkovError(f"a spec is a dict (a JSON object) naming its process, got {type(spec).__name__}")
    if "process" not in spec:
        raise NanoMarkovError(f"spec field 'process' is missing: name the process, one of {', '.join(PROCESSES)}")
    if not isinstance(spec["process"], str):
        raise field_error("process", f"be a process name, one of {', '.join(PROCESSES)}", repr(spec["process"]))
    cls = process_class(spec["process"])
    form = arrays_form(cls, spec)
    if form is None:
        return random_from_spec(cls, spec)
    check_fields(spec, form.required, form.optional, form.what)
    return form.build(spec)


# ------------------------------------------------------------------ what a dataset records


def is_array(value):
    return isinstance(value, (list, tuple, np.ndarray))


def is_spec_list(value):
    """A composite's parts: a list of specs (factored's factors, a mixture's components)."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(item, dict) for item in value)


def canonical_spec(spec):
    """A spec with arrays as float64 lists and numpy scalars as Python's, its parts likewise."""
    return {
        name: [canonical_spec(part) for part in value]
        if is_spec_list(value)
        else np.asarray(value, dtype=np.float64).tolist()
        if is_array(value)
        else (value.item() if isinstance(value, np.generic) else value)
        for name, value in spec.items()
    }


def spec_record(spec):
    """What meta.json keeps of a spec: the sha256 of its canonical JSON (keys sorted, arrays as float64
    lists: the same for a dict, its .json and its .npz), its scalar fields, and its arrays' shapes; a
    composite's parts as records of their own (without their sha256) under "fields"."""
    canonical = canonical_spec(spec)
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), allow_nan=False)
    parts = {
        name: [{key: part[key] for key in ("fields", "arrays")} for part in map(spec_record, value)]
        for name, value in spec.items()
        if is_spec_list(value)
    }
    return {
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "fields": {name: value for name, value in canonical.items() if not is_array(spec[name])} | parts,
        "arrays": {
            name: list(np.shape(value)) for name, value in spec.items() if is_array(value) and name not in parts
        },
    }
