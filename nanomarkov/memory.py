"""What a command may hold in memory: the one check every big allocation passes first.

Each site that is about to hold something whose size the user chose (a process's matrices and
theory tables, a model and its training state, the arrays an .npz header names, a checkpoint's
model) estimates its bytes from the sizes alone and calls `check_fits` before allocating; what
will not fit in the memory this machine has free is refused in one line with both numbers.

Free memory is read, not guessed: the least of what limits this process, each where the system says it
(`free_memory`): the machine's (Linux's MemAvailable in /proc/meminfo: free memory plus the page
cache the kernel can drop; elsewhere the free physical pages, sysconf), the address space left under
`ulimit -v` (RLIMIT_AS less the process's VmSize), and the room left in its memory cgroup (a container's
or a SLURM job's limit less its usage: cgroup v2's memory.max and memory.current, v1's
memory.limit_in_bytes and memory.usage_in_bytes). Where none can be read, nothing is refused for lack of
memory (the hard caps of each process still hold).

This module sits beside errors.py and files.py so that processes/ may use it.
"""

import math
import os
import resource
import zipfile
from pathlib import Path

import numpy as np

from nanomarkov.errors import NanoMarkovError
from nanomarkov.files import format_bytes

MEMINFO = Path("/proc/meminfo")
PROCESS_STATUS = Path("/proc/self/status")
# (limit, usage) files of the memory cgroup this process is in, as a container or a scheduler mounts it.
CGROUP_FILES = (
    (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")),  # cgroup v2
    (Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"), Path("/sys/fs/cgroup/memory/memory.usage_in_bytes")),
)
# Sizes up to this are never checked: any machine that runs Python holds them, and the checks on
# every sampled batch then cost no read of /proc/meminfo.
ALWAYS_FITS_BYTES = 64 << 20


def kib_field(text, name):
    """The bytes of a "Name:  N kB" line of /proc/meminfo or /proc/self/status, or None when it has no such line."""
    for line in text.splitlines():
        field, _, rest = line.partition(":")
        if field == name:
            fields = rest.split()
            return int(fields[0]) * 1024 if fields and fields[0].isdigit() else None
    return None


def machine_available_bytes():
    """The machine's free memory: MemAvailable, else the free physical pages; None when the system does not say."""
    try:
        available = kib_field(MEMINFO.read_text(), "MemAvailable")
    except OSError:
        available = None
    if available is not None:
        return available
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def address_space_left(limit, mapped):
    """What `ulimit -v` (RLIMIT_AS's soft `limit`, bytes) still lets a process that maps `mapped` bytes
    map; None when there is no limit or the mapped size is unknown."""
    if limit is None or limit == resource.RLIM_INFINITY or limit < 0 or mapped is None:
        return None
    return max(0, limit - mapped)


def cgroup_room(limit_text, usage_text):
    """A memory cgroup's limit less its usage from its two files' texts; None for 'max' (no limit), a
    missing file (None) or text that is no number. cgroup v1 writes no limit as a number near 2**63."""
    if limit_text is None or usage_text is None:
        return None
    limit, usage = limit_text.strip(), usage_text.strip()
    if not (limit.isdigit() and usage.isdigit()) or int(limit) >= 2**62:
        return None
    return max(0, int(limit) - int(usage))


def read_text_or_none(path):
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None


def process_limits(status_file=PROCESS_STATUS, cgroup_files=CGROUP_FILES):
    """[(room, what limits it)] for each limit on this process that applies: the address space, each memory cgroup."""
    status = read_text_or_none(status_file)
    rooms = [
        (
            address_space_left(resource.getrlimit(resource.RLIMIT_AS)[0], status and kib_field(status, "VmSize")),
            "the address space ulimit -v leaves",
        )
    ]
    rooms += [
        (cgroup_room(read_text_or_none(limit), read_text_or_none(usage)), "this process's memory cgroup")
        for limit, usage in cgroup_files
    ]
    return [(room, where) for room, where in rooms if room is not None]


def free_memory():
    """(the bytes this process can give a new allocation now, what sets that number): the least of the
    machine's free memory and the room its limits leave (ulimit -v, its memory cgroup); (None, ...) when
    none of them says."""
    known = [(room, where) for room, where in ((machine_available_bytes(), "this machine"), *process_limits())]
    known = [(room, where) for room, where in known if room is not None]
    return min(known, key=lambda pair: pair[0]) if known else (None, "this machine")


def check_fits(needed_bytes, what, fix, free_bytes=None, where="this machine"):
    """Raise NanoMarkovError unless `needed_bytes` fit in the free memory (`free_bytes`, else free_memory's).

    `what` names what is held ("K = 30000's chain and its theory"), `fix` says how to hold less;
    `where` names the memory given (a GPU's, when the caller read that one).
    """
    if needed_bytes <= ALWAYS_FITS_BYTES:
        return
    free, where = free_memory() if free_bytes is None else (free_bytes, where)
    if free is not None and needed_bytes > free:
        raise NanoMarkovError(
            f"{what} needs {format_bytes(needed_bytes)}, {where} has {format_bytes(free)} free; {fix}"
        )


def npz_headers(file):
    """{name: (shape, dtype)} of each array in the .npz `file` (a path or an open binary file), read from
    the .npy headers alone: no array's data is read, whatever size its header claims.

    Raises OSError, zipfile.BadZipFile or ValueError for a file that is not an .npz of plain arrays.
    """
    headers = {}
    with zipfile.ZipFile(file) as archive:
        for entry in archive.infolist():
            with archive.open(entry) as member:
                version = np.lib.format.read_magic(member)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = read_header(member)
            headers[entry.filename.removesuffix(".npy")] = (shape, dtype)
    return headers


def npz_bytes(headers):
    """The bytes the arrays of npz_headers' `headers` take once loaded."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in headers.values())
