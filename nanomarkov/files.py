"""Reading and writing the small files every layer keeps: JSON records and whole-file replaces.

Two promises hold for every file written through here:
- atomic: the bytes go to `NAME.partial` in the same folder, are flushed to disk, and
  only then renamed over NAME, so a reader (or a kill, or a full disk) sees the old
  file or the new one, never half of one; a failed write removes its `.partial`;
- strict JSON: NaN and infinities are not JSON, so they are written as null and the
  record's writer is expected to say why (e.g. a flag that the model's outputs are not
  finite); `json.loads` of anything written here never needs Python's extensions.
"""

import json
import math
import os
from pathlib import Path

from nanomarkov.errors import NanoMarkovError

PARTIAL_SUFFIX = ".partial"


def partial_path(path):
    """Where `path` is written before it is renamed into place."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def finite_or_null(value):
    """`value` with every non-finite float (at any depth of dicts, lists and tuples) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def json_text(record, indent=2):
    """Strict JSON for `record` (non-finite numbers as null), ending in a newline when indented."""
    text = json.dumps(finite_or_null(record), indent=indent, allow_nan=False)
    return text + "\n" if indent is not None else text


def write_atomic(path, data, what="file"):
    """Replace `path` with `data` (bytes or str) all at once; a failure raises NanoMarkovError and leaves the old file."""
    path = Path(path)
    partial = partial_path(path)
    payload = data.encode() if isinstance(data, str) else data
    try:
        with open(partial, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise NanoMarkovError(
            f"cannot write the {what} {path} ({e.strerror or e}); free some space or choose another folder"
        ) from None
    return path


def write_json(path, record, what="record"):
    """Write `record` as strict, indented JSON, atomically (see write_atomic)."""
    return write_atomic(path, json_text(record), what=what)


def read_json(path, what="file", fix="write it again"):
    """The JSON object in `path`; a missing, unreadable or non-object file raises NanoMarkovError naming `fix`."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NanoMarkovError(f"{path}: no {what} there; {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise NanoMarkovError(f"{path}: not a readable {what} ({e}); {fix}") from None
    if not isinstance(record, dict):
        raise NanoMarkovError(
            f"{path}: not a {what} (a JSON object was expected, found {type(record).__name__}); {fix}"
        )
    return record


def read_json_or_none(path):
    """The JSON object in `path`, or None when it is missing, unreadable or not an object (for optional files)."""
    try:
        return read_json(path)
    except NanoMarkovError:
        return None
