"""Reading and writing the small files every layer keeps: JSON records and whole-file replaces.

Two promises hold for every file written through here:
- atomic: the bytes go to `NAME.partial` in the same folder, are flushed to disk, and
  only then renamed over NAME, so a reader (or a kill, or a full disk) sees the old
  file or the new one, never half of one; a failed write removes its `.partial`;
- strict JSON: NaN and infinities are not JSON, so they are written as null and the
  record's writer is expected to say why (e.g. a flag that the model's outputs are not
  finite); `json.loads` of anything written here never needs Python's extensions.
"""

import ctypes
import errno
import fcntl
import json
import math
import os
import pwd
import re
import shutil
import socket
import stat
import tempfile
from contextlib import contextmanager, suppress
from fnmatch import fnmatch
from pathlib import Path

from nanomarkov.errors import NanoMarkovError

PARTIAL_SUFFIX = ".partial"
# The most a file named by the user (a spec, a config, a grid, a JSON record) is read whole: more is refused.
MAX_READ_BYTES = 64 << 20
# What a path that is not a regular file is, by its mode, for the refusal that names it.
FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
# renameat2's flag that swaps two paths atomically (Linux 3.15+; ext4, xfs, btrfs, tmpfs among others).
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def partial_path(path):
    """Where `path` is written before it is renamed into place."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


BYTE_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")


def format_bytes(n_bytes):
    """A size in the largest binary unit in which it is at least 1 ("512 bytes", "3.4 MiB", "1.2 GiB"),
    so that no size below a GiB prints as 0.0 GiB; every message that prints a size uses this."""
    power = 0
    while power < len(BYTE_UNITS) - 1 and abs(n_bytes) >= 1024 ** (power + 1):
        power += 1
    if power == 0:
        return f"{int(n_bytes)} bytes"
    return f"{n_bytes / 1024**power:,.1f} {BYTE_UNITS[power]}"


def current_umask():
    """The process's umask, read from /proc where Linux shows it; elsewhere set and put back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path):
    """Give `path`, and everything under it when it is a folder, the modes a plain open() or mkdir() gives
    (0666 or 0777 less the umask): for what tempfile or a library made private (0600, 0700) that the user
    should find like every other file the package writes."""
    mask = current_umask()
    path = Path(path)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


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
    write_atomic_together({path: data}, what)
    return Path(path)


def write_atomic_together(payloads, what="files"):
    """Replace several files ({path: bytes or str}) so that a failure leaves every one of them as it was.

    Every file is written to its `.partial` and flushed first; only when all are on disk are they
    renamed into place, so a full disk never leaves new files beside old ones (a set that disagrees).
    """
    partials = {}
    try:
        for path, data in payloads.items():
            partial = partials[path] = partial_path(path)
            with open(partial, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        for path, partial in partials.items():
            os.replace(partial, path)
    except BaseException as e:
        # Any stop mid-write (a Ctrl-C, a SIGTERM turned into an exception) removes the partials too: a
        # stopped sweep says nothing is half-written. A cleanup that fails must not hide why the write
        # failed: a read-only file system refuses even to unlink a file that is not there (EROFS, not ENOENT).
        for partial in partials.values():
            with suppress(OSError):
                partial.unlink(missing_ok=True)
        if not isinstance(e, OSError):
            raise
        raise NanoMarkovError(
            f"cannot write the {what} {Path(path)} ({e.strerror or e}); free some space or choose another folder"
        ) from None


def exchange_folders(new, old):
    """Swap the folders `new` and `old` so that `old`'s path holds what `new` held, atomically where the
    system can (renameat2 RENAME_EXCHANGE): no reader of `old`'s path ever finds it missing or half.

    Where the file system cannot exchange (some network file systems), the two are renamed one after
    the other: `old`'s path is then missing for the instant between the renames. Afterwards `new`'s
    path holds what `old` held (for the caller to delete); raises OSError.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        if renameat2(AT_FDCWD, os.fsencode(new), AT_FDCWD, os.fsencode(old), RENAME_EXCHANGE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(old))
    aside = Path(str(new) + ".old")
    os.rename(old, aside)
    try:
        os.rename(new, old)
    except OSError:
        os.rename(aside, old)  # the old folder goes back where it was
        raise
    os.rename(aside, new)


def write_json(path, record, what="record"):
    """Write `record` as strict, indented JSON, atomically (see write_atomic)."""
    return write_atomic(path, json_text(record), what=what)


def open_regular(path):
    """`path` opened for binary reading; OSError (its strerror says why) unless it is a regular file once
    links are followed.

    The file is opened without blocking, so a FIFO with no writer is refused at once instead of
    hanging, and its kind is read from the open descriptor (fstat): a device such as /dev/zero, a FIFO
    or a folder is never read, whatever the link that names it.
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        kind = next((name for test, name in FILE_KINDS if test(mode)), "a special file")
        raise OSError(errno.EINVAL, f"{kind}, not a regular file", str(path))
    os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "rb")


def read_capped(path, max_bytes=MAX_READ_BYTES):
    """The bytes of the regular file `path` (see open_regular); OSError, unread, beyond `max_bytes`."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(max_bytes + 1) if size <= max_bytes else b""
    if size > max_bytes or len(data) > max_bytes:
        raise OSError(errno.EFBIG, f"{max(size, len(data)):,} bytes, more than the {max_bytes:,} read here", str(path))
    return data


def read_json(path, what="file", fix="write it again", object_pairs_hook=None, max_bytes=MAX_READ_BYTES):
    """The JSON object in `path`; a missing, unreadable or non-object file raises NanoMarkovError naming `fix`.

    Only a regular file of at most `max_bytes` is read (read_capped). `object_pairs_hook` is json's:
    it builds each object from its (key, value) pairs."""
    path = Path(path)
    try:
        record = json.loads(read_capped(path, max_bytes).decode("utf-8"), object_pairs_hook=object_pairs_hook)
    except FileNotFoundError:
        raise NanoMarkovError(f"{path}: no {what} there; {fix}") from None
    except OSError as e:
        raise NanoMarkovError(f"{path}: not a readable {what} ({e.strerror or e}); {fix}") from None
    except (UnicodeDecodeError, ValueError) as e:
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


def holds_record(folder, name, keys) -> bool:
    """Whether folder/name is a JSON object holding every one of `keys`: a record nanoMarkov wrote, told
    from a user's own file of that name (a meta.json, a sweep.json of theirs) by its content."""
    record = read_json_or_none(Path(folder) / name)
    return record is not None and all(key in record for key in keys)


LOCK_FILE = ".lock"


def _lock_file(folder, what):
    """An open handle on folder/.lock holding its exclusive flock, or NanoMarkovError naming the holder."""
    path = folder / LOCK_FILE
    if os.path.lexists(path) and not is_own_lock(path):
        raise NanoMarkovError(
            f"{path} is not a lock of nanoMarkov's (a file of yours?), and a {what} would replace it; "
            "move it away, or choose another folder"
        )
    while True:
        try:
            handle = open(path, "a+")
        except OSError as e:
            raise NanoMarkovError(
                f"cannot write in {folder} ({e.strerror or e}); choose a folder you can write"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder, _, holding = (handle.read().strip() or "another process").partition(": ")
            handle.close()
            raise NanoMarkovError(
                f"{folder}: another {holding or what} is writing here ({holder}); wait for it to finish or stop it, "
                "or choose another folder"
            ) from None
        # The holder before us may have removed the file between our open and our flock: then
        # we hold a lock on a name nobody else will open again, so take the new file instead.
        if path.exists() and os.fstat(handle.fileno()).st_ino == path.stat().st_ino:
            return handle
        handle.close()


@contextmanager
def writer_lock(folder, what):
    """Hold the one-writer lock of `folder` (a dataset or a run) for the duration of the block.

    The lock is an flock on `folder/.lock`, which the kernel releases when the holder exits in any
    way (kill -9 included), so a crashed writer never leaves a stale lock; the file holds the
    holder's pid for the message a second writer gets, and is removed when the block ends.
    NanoMarkovError if another process holds it.
    """
    folder = Path(folder)
    # The folders this makes (the folder and any parents): removed at the end where nothing was written in them,
    # so that a refused or failed command leaves no empty folder behind.
    created = [path for path in (folder, *folder.parents) if not os.path.lexists(path)]
    try:
        handle = _held_lock(folder, what)
        with handle:
            try:
                yield
            finally:
                (folder / LOCK_FILE).unlink(missing_ok=True)  # before unlocking: see _lock_file
    finally:
        for path in created:
            with suppress(OSError):
                path.rmdir()  # only where empty


def _held_lock(folder: Path, what):
    """The folder made and its lock taken, the holder's line written (writer_lock); NanoMarkovError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NanoMarkovError(f"cannot write in {folder} ({e.strerror or e}); choose a folder you can write") from None
    handle = _lock_file(folder, what)
    try:  # unbuffered: on a full disk the write fails here, not again when the handle is closed
        os.ftruncate(handle.fileno(), 0)
        os.write(handle.fileno(), f"pid {os.getpid()} on {socket.gethostname()}: {what}\n".encode())
    except OSError as e:  # a full disk: not even the holder's line fits
        (folder / LOCK_FILE).unlink(missing_ok=True)
        handle.close()
        raise NanoMarkovError(
            f"cannot write in {folder} ({e.strerror or e}); free some space or choose another folder"
        ) from None
    return handle


# A folder replaced whole is built in a hidden sibling named .{name}.partial-XXXX, then swapped in.
BUILD_SUFFIX = ".partial-"


def new_build_folder(folder: Path) -> Path:
    """A new hidden folder beside `folder` (BUILD_SUFFIX) to build its replacement in, with the modes the
    umask gives (mkdtemp's 0700 would become the folder's at the swap); OSError.

    Call it holding `folder`'s writer_lock: the builds of `folder` found beside it are then a killed
    writer's, stale by their name and the lock, and are removed first."""
    for stale in folder.parent.glob(f".{folder.name}{BUILD_SUFFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    build = Path(tempfile.mkdtemp(prefix=f".{folder.name}{BUILD_SUFFIX}", dir=folder.parent))
    follow_umask(build)
    return build


def swap_in(build: Path, folder: Path):
    """Put `build` in the place of `folder` (held under writer_lock) at once (exchange_folders); `build`'s
    path then holds the old folder, for the caller to clear away. OSError.

    The folder keeps its mode (a user's 0750, say), and the held lock's file, linked in, stays at
    folder/.lock through the swap: no second writer can take the folder while the old one is cleared."""
    os.link(folder / LOCK_FILE, build / LOCK_FILE)
    os.chmod(build, stat.S_IMODE(folder.stat().st_mode))
    exchange_folders(build, folder)


# Folders no command writes into, even with --force: the system's trees and everything below them
# (/tmp and /var/tmp are the exceptions below them: temporary places anyone may write in); the
# folders that hold other people's folders and each folder directly in them (a package in /opt, a
# service's /srv/NAME, a disk mounted at /mnt/NAME, a home in /home); a home folder itself and its
# hidden folders (~/.ssh, ~/.config), with all below them.
SYSTEM_TREES = tuple(
    Path(p)
    for p in (
        *("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run", "/sbin"),
        *("/snap", "/sys", "/usr", "/var"),
        # macOS: /etc is a link to /private/etc, followed before this check; /System and /Library are the system's
        *("/private/etc", "/System", "/Library"),
    )
)
TEMPORARY_TREES = (Path("/tmp"), Path("/var/tmp"))
HOLDING_FOLDERS = tuple(Path(p) for p in ("/home", "/media", "/mnt", "/opt", "/srv"))
# What a writer may leave in a folder without having written anything of its own there: its lock,
# whose content says whose it is (see writer_lock); a file of another content so named is the user's.
LEFT_BY_A_WRITER = (LOCK_FILE,)
LOCK_CONTENT = re.compile(r"(pid \d+( on \S*)?(: [A-Za-z ]+)?\n?)?")  # ": what": the holder's command


def _homes(folder: Path) -> set:
    """The home folders `folder` might be in: this user's, its (or its nearest existing parent's) owner's,
    that of the user it is named after, and the folder in /home it is below."""
    homes = {os.environ.get("HOME"), *(path for path in folder.parents if path.parent == Path("/home"))}
    with suppress(KeyError):
        homes.add(pwd.getpwuid(os.getuid()).pw_dir)
    with suppress(KeyError):
        homes.add(pwd.getpwnam(folder.name).pw_dir)
    for path in (folder, *folder.parents):  # the owner of the folder, or of the nearest one we may look at
        with suppress(OSError):
            with suppress(KeyError):
                homes.add(pwd.getpwuid(path.stat().st_uid).pw_dir)
            break
    return {Path(os.path.realpath(home)) for home in homes if home}


def _hidden_folder(folder: Path, homes) -> Path | None:
    """The hidden folder of a home (~/.ssh) that `folder` is or is inside, or None."""
    for home in homes:
        if folder != home and folder.is_relative_to(home) and folder.relative_to(home).parts[0].startswith("."):
            return home / folder.relative_to(home).parts[0]
    return None


def _inside(folder: Path, outer: Path, what: str) -> str:
    """'a system folder' where `folder` is `outer`, else 'inside the system folder /var'."""
    return what if folder == outer else f"inside {outer}, {what}"


def protected_folder(folder) -> str:
    """Why no command may write into `folder` ('the root folder', 'a home folder', 'inside /var, a system
    folder'...), or ''. Links are followed (a link to /etc is /etc); nothing is written or created to find out."""
    folder = Path(os.path.realpath(folder))
    if folder == Path("/"):
        return "the root folder"
    homes = _homes(folder)
    if folder in homes or folder.parent == Path("/home"):
        return "a home folder"
    hidden = _hidden_folder(folder, homes)
    if hidden is not None:
        return _inside(folder, hidden, "a hidden folder of a home folder")
    if any(folder.is_relative_to(tree) and folder != tree for tree in TEMPORARY_TREES):
        return ""
    if folder in TEMPORARY_TREES or folder in HOLDING_FOLDERS or folder.parent in HOLDING_FOLDERS:
        return "a system folder"
    tree = next((tree for tree in SYSTEM_TREES if folder.is_relative_to(tree)), None)
    return "" if tree is None else _inside(folder, tree, "a system folder")


def is_own_lock(path: Path) -> bool:
    """Whether `path` is a lock file writer_lock leaves (empty, or its holder's line), not a file of the user's.

    Never a link: the lock is opened to be truncated, and a link would truncate the file it names."""
    try:
        return (
            not path.is_symlink()
            and path.is_file()
            and LOCK_CONTENT.fullmatch(read_capped(path, 256).decode("ascii", "replace")) is not None
        )
    except OSError:
        return False


def own_entries(folder: Path) -> list:
    """The names in `folder` but a writer's lock (LEFT_BY_A_WRITER, see is_own_lock), sorted.

    Partial files count: a `.partial` may be the user's, or another program's unfinished write."""
    return sorted(
        entry.name for entry in folder.iterdir() if not (entry.name in LEFT_BY_A_WRITER and is_own_lock(entry))
    )


def check_output_folder(folder, kind, is_kind, force=False, flag="--out", fix=None, writes=None):
    """Refuse, before anything is written, to write a `kind` (e.g. "training run") into `folder` unless
    it is new or empty, already a `kind` (`is_kind(folder)` is true), or `force` is true (None: the
    command has no --force); never into the root, a home folder or a system folder, even with force.
    Even with force, never over a user's file: `writes`, the names (fnmatch patterns) the command writes
    at the folder's top level, must not be among the folder's entries (None: it replaces the folder
    whole, so no entry of the user's may be there).

    One rule for every command that writes a folder, so that none writes among a user's own files
    unasked. NanoMarkovError names the folder, why, and the fix (`fix`, where the command's way out
    is not a new `flag` folder). Returns the folder to write: `folder`, or the real folder its links
    name (a link to a folder is written through, never replaced), absolute where `folder` is . or ..
    """
    folder = Path(folder)
    elsewhere = fix or f"give {flag} a new or empty folder"
    why = protected_folder(folder)
    if why:
        raise NanoMarkovError(
            f"{folder} is {why}: nanoMarkov writes no {kind} there, even with --force; "
            f"{fix or f'give {flag} a folder of its own, e.g. {flag}=./NAME'}"
        )
    _refuse_a_broken_path(folder, kind, elsewhere)
    if not os.path.isdir(folder) or is_kind(folder):
        return _real_folder(folder)
    try:
        entries = own_entries(folder)
    except OSError as e:
        raise NanoMarkovError(f"cannot read the folder {folder} ({e.strerror or e}); {elsewhere}") from None
    if force:
        entries = [name for name in entries if writes is None or any(fnmatch(name, w) for w in writes)]
    if entries:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        if force:
            would = "replace the folder whole" if writes is None else "write files of these names"
            raise NanoMarkovError(
                f"{folder} holds files of yours ({shown}) and the {kind} would {would}; --force never replaces "
                f"a file nanoMarkov did not write: move them, or {elsewhere}"
            )
        fix = elsewhere if force is None or fix else f"{elsewhere}, or pass --force to write beside them"
        raise NanoMarkovError(f"{folder} holds files that are not a {kind} ({shown}); {fix}")
    return _real_folder(folder)


def check_own_files(folder, names, kind, record=None, marks=()):
    """Refuse to replace, in a folder `kind` may write into, what it did not write: an entry of one of the file
    `names` it writes that is not a file (a folder, a FIFO: the user's), or, where the kind's `record` (a JSON
    file holding `marks`) is not its own, any of them (they were written with the record, or are the user's)."""
    folder = Path(folder)
    found = [name for name in names if os.path.lexists(folder / name)]
    odd = [name for name in found if not (os.path.islink(folder / name) or os.path.isfile(folder / name))]
    if odd:
        raise NanoMarkovError(
            f"{folder / odd[0]} is not a file (a folder or a device of yours?), and the {kind} would replace it; "
            "move it away, or choose another folder"
        )
    if record is not None and found and not holds_record(folder, record, marks):
        raise NanoMarkovError(
            f"{folder} holds {', '.join(found)}, which no {kind} of nanoMarkov wrote (its {record} is "
            f"{'not its own' if record in found else 'not there'}); move them away, or choose another folder"
        )


def refuse_the_current_folder(folder, verb, what, flag="--out"):
    """Refuse to replace `folder` whole (a new folder swapped into its place) where it is, or holds, the
    current folder: the shell that ran the command would be left in the old, deleted one."""
    real = Path(os.path.realpath(folder))
    with suppress(OSError):
        if Path.cwd().is_relative_to(real):
            raise NanoMarkovError(
                f"{folder} is the current folder (or holds it), and {verb} replaces {what} folder whole, which "
                f"would leave this shell in a deleted folder; cd {real.parent} and give {flag} {real.name}"
            )


def _refuse_a_broken_path(folder: Path, kind, elsewhere):
    """Refuse a `folder` that is, or is below, a file or a link to nothing (dangling, or a loop).

    os.path's tests, not Path's: a path we may not look at (EACCES) is then one that is not there,
    and the write that follows says why it cannot be made."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NanoMarkovError(f"cannot write the {kind} to {folder}: a file, not a folder; {elsewhere}")
    for path in (folder, *folder.parents):
        if os.path.lexists(path) and not os.path.exists(path):
            raise NanoMarkovError(
                f"cannot write the {kind} to {folder}: {path} is a link to {os.readlink(path)}, which does not "
                f"exist (or leads back to itself); {elsewhere}, or make the folder the link names"
            )
        if path != folder and os.path.exists(path) and not os.path.isdir(path):
            raise NanoMarkovError(f"cannot write the {kind} to {folder}: {path} is a file, not a folder; {elsewhere}")


def _real_folder(folder: Path) -> Path:
    """`folder` as given where no link is on its way and it has a name; else the real path it names."""
    real = Path(os.path.realpath(folder))
    return folder if real == Path(os.path.abspath(folder)) and folder.name not in ("", "..") else real
