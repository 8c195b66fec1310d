"""What a command may hold in memory: the one check every big allocation passes first.

Each site that is about to hold something whose size the user chose (a process's matrices and
theory tables, a model and its training state, the arrays an .npz header names, a checkpoint's
model) estimates its bytes from the sizes alone and calls `check_fits` before allocating; what
will not fit in the memory this machine has free is refused in one line with both numbers.

Free memory is read, not guessed: Linux's MemAvailable (/proc/meminfo: free memory plus the page
cache the kernel can drop); elsewhere the free physical pages (sysconf); where neither can be
read, nothing is refused for lack of memory (the hard caps of each process still hold).

This module sits beside errors.py and files.py so that processes/ may use it.
"""

import math
import os
import zipfile
from pathlib import Path

import numpy as np

from nanomarkov.errors import NanoMarkovError
from nanomarkov.files import format_bytes

MEMINFO = Path("/proc/meminfo")
# Sizes up to this are never checked: any machine that runs Python holds them, and the checks on
# every sampled batch then cost no read of /proc/meminfo.
ALWAYS_FITS_BYTES = 64 << 20


def meminfo_available(text):
    """MemAvailable in bytes from the text of /proc/meminfo, or None when it has no such line."""
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name == "MemAvailable":
            fields = rest.split()
            return int(fields[0]) * 1024 if fields and fields[0].isdigit() else None
    return None


def free_memory_bytes():
    """The bytes this machine can give a new allocation now, or None when the system does not say."""
    try:
        available = meminfo_available(MEMINFO.read_text())
    except OSError:
        available = None
    if available is not None:
        return available
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(needed_bytes, what, fix, free_bytes=None, where="this machine"):
    """Raise NanoMarkovError unless `needed_bytes` fit in the free memory (`free_bytes`, else this machine's).

    `what` names what is held ("K = 30000's chain and its theory"), `fix` says how to hold less;
    `where` names the memory (a GPU's, when the caller read that one).
    """
    if needed_bytes <= ALWAYS_FITS_BYTES:
        return
    free = free_memory_bytes() if free_bytes is None else free_bytes
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
