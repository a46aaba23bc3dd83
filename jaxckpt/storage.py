"""Storage: bytes <-> files on a POSIX filesystem, and the atomic commit.

Call order of one save (all functions here are synchronous and thread-safe
per file):

1. ``make_temp_dir(final)``        -> a sibling ``.<name>.jaxckpt-tmp-<id>`` with an owner marker
2. ``DataFile(tmp, name)``         -> ``pwrite`` from any number of threads, ``finish(size)`` (truncate + fsync)
3. ``write_file(tmp, MANIFEST)``   -> written and fsynced
4. ``commit(tmp, final, overwrite)`` -> fsync(tmp) ; rename / exchange ; fsync(parent)

A directory is a checkpoint only once it holds a manifest and carries its final
name; until the rename nothing is visible at ``final``. Deletion
(``remove_checkpoint``) first renames the directory away (one atomic step, after
which it is no longer a checkpoint), then deletes it.

Reads open files with ``O_NOFOLLOW | O_NONBLOCK`` and accept only regular files,
so a symlink or FIFO planted in a checkpoint directory is refused rather than
followed or blocked on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import re
import shutil
import socket
import stat
import time
import uuid
from typing import Callable, Iterable

import msgpack

from jaxckpt.errors import (CheckpointExistsError, CheckpointLockedError, CheckpointNotFoundError,
                            CorruptCheckpointError)

TMP_MARK = "jaxckpt-tmp"
DEL_MARK = "jaxckpt-del"
OLD_MARK = "jaxckpt-old"
OWNER_FILE = ".jaxckpt-owner"
_AUX_RE = re.compile(r"^\.(?P<name>.+)\.(?P<mark>jaxckpt-tmp|jaxckpt-del|jaxckpt-old)-(?P<id>[0-9a-f]{8,32})$")

ALIGN = 4096  # O_DIRECT alignment for offsets, lengths and buffers
_O_DIRECT = getattr(os, "O_DIRECT", 0)


# ------------------------------------------------------------------- helpers
def named(e: OSError, path: str) -> OSError:
    """The error of a call on a file descriptor names no file: add ``path``
    (the user must learn where the disk failed, e.g. ENOSPC on which file)."""
    if e.filename is None:
        e.filename = path
    return e


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        raise named(e, path)
    finally:
        os.close(fd)


def aux_name(final: str, mark: str, ident: str | None = None) -> str:
    parent, name = os.path.split(os.path.abspath(final))
    return os.path.join(parent, f".{name}.{mark}-{ident or uuid.uuid4().hex[:16]}")


def parse_aux(entry: str) -> tuple[str, str] | None:
    """``(final name, mark)`` for one of our temporary/deleting/old directory names."""
    m = _AUX_RE.match(entry)
    return (m.group("name"), m.group("mark")) if m else None


def owner_record() -> dict:
    # The start time tells a live writer from a later process that got the same pid.
    return {"kind": TMP_MARK, "host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid())}


def ensure_dir(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)``, durably: each directory created is
    fsynced into its parent (a commit fsyncs only the checkpoint's own parent,
    so a new parent's entry would otherwise be lost by a power failure)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent != path:
        ensure_dir(parent)
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return
    fsync_dir(parent)


def make_temp_dir(final: str, ident: str | None = None) -> str:
    """Create the temporary sibling of ``final`` and mark it as ours."""
    tmp = aux_name(final, TMP_MARK, ident)
    ensure_dir(os.path.dirname(tmp))
    try:
        os.mkdir(tmp)
    except FileExistsError:
        if ident is None:
            raise
    try:
        write_file(tmp, OWNER_FILE, msgpack.packb(owner_record()), sync=False)
    except BaseException:  # e.g. ENOSPC: a live owner's unmarked directory would never be cleaned
        remove_tree(tmp)
        raise
    return tmp


def is_ours(path: str) -> bool:
    """True when ``path`` is a directory that jaxckpt created (owner marker or manifest)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        return False
    try:
        rec = msgpack.unpackb(read_small(path, OWNER_FILE, 4096), raw=False)
        if isinstance(rec, dict) and rec.get("kind") == TMP_MARK:
            return True
    except (OSError, ValueError, CorruptCheckpointError, msgpack.UnpackException):
        pass
    try:
        fd = open_regular(os.path.join(path, "manifest.msgpack"))
        try:  # the envelope's first field is format: "jaxckpt"; any manifest size (up to the 256 MiB cap) is fine
            return b"jaxckpt" in os.pread(fd, 64, 0)
        finally:
            os.close(fd)
    except (OSError, CorruptCheckpointError):
        return False


def write_file(directory: str, name: str, data: bytes, sync: bool = True) -> None:
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    except OSError as e:
        raise named(e, path)
    finally:
        os.close(fd)


def open_regular(path: str) -> int:
    """Open an existing regular file for reading; refuse symlinks, FIFOs, devices."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: file is missing") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CorruptCheckpointError(f"{path}: is a symbolic link; checkpoint files must be regular files") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CorruptCheckpointError(f"{path}: is not a regular file (mode {stat.filemode(st.st_mode)})")
    return fd


def read_small(directory: str, name: str, cap: int) -> bytes:
    """Read a whole file whose size must not exceed ``cap`` bytes."""
    path = os.path.join(directory, name)
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > cap:
            raise CorruptCheckpointError(f"{path}: {size} bytes, above the cap of {cap}")
        data = os.pread(fd, size + 1, 0)
        return data[:size]
    finally:
        os.close(fd)


def pread_into(fd: int, buf: memoryview, offset: int, path: str) -> None:
    """Fill ``buf`` from ``offset``; a short read means the file was truncated."""
    total = len(buf)
    done = 0
    while done < total:
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise CorruptCheckpointError(
                f"{path}: truncated: expected {total} bytes at offset {offset}, found {done}")
        done += n


_MADV_POPULATE_READ = 22  # Linux >= 5.14
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14
_MADV_WILLNEED = 3
_madvise = None


def _libc_madvise():
    global _madvise
    if _madvise is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _madvise = libc.madvise
            _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (OSError, AttributeError):
            _madvise = False
    return _madvise


def _page_range(buf: memoryview) -> tuple[int, int]:
    """(start, length) of the whole pages under a writable buffer."""
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    page = mmap.PAGESIZE
    start = addr // page * page
    return start, -(-(addr + len(buf)) // page) * page - start


def prefault(buf: memoryview) -> None:
    """Ask the kernel to back ``buf``'s pages now, in one call (Linux
    MADV_POPULATE_WRITE), instead of one page fault per 4 KiB during the read
    that fills it. Best effort: elsewhere the read faults pages in as usual."""
    madvise = _libc_madvise()
    if not madvise or len(buf) < (1 << 20) or buf.readonly:
        return
    start, length = _page_range(buf)
    madvise(start, length, _MADV_POPULATE_WRITE)  # an error (old kernel) just means: fault as usual


# ------------------------------------------------------------------- mapping
_can_populate_read: bool | None = None


def can_map() -> bool:
    """Whether ``map_range`` + ``populate`` work here: Linux >= 5.14
    (MADV_POPULATE_READ), probed once on an anonymous page."""
    global _can_populate_read
    if _can_populate_read is None:
        madvise = _libc_madvise()
        ok = False
        if madvise and hasattr(mmap, "MAP_PRIVATE"):
            probe = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            start, length = _page_range(memoryview(probe))
            ok = madvise(start, length, _MADV_POPULATE_READ) == 0
        _can_populate_read = ok
    return _can_populate_read


def map_range(fd: int, offset: int, length: int) -> memoryview:
    """A private, copy-on-write mapping of ``length`` file bytes at ``offset``
    (the mapping starts at the page below ``offset``; the view skips to it).

    Reads see the page cache's pages themselves: no fresh memory, no copy.
    Writes to the view copy the page first and never reach the file. The
    mapping lives as long as any view of it; it stays valid when the file is
    unlinked (rotation, overwrite), not when the file is truncated in place
    (jaxckpt never does that to a committed file). Nothing is read until
    ``populate``."""
    page = mmap.ALLOCATIONGRANULARITY
    base = offset // page * page
    m = mmap.mmap(fd, offset + length - base, flags=mmap.MAP_PRIVATE,
                  prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
    return memoryview(m)[offset - base:offset - base + length]


def populate(view: memoryview, path: str, offset: int) -> bool:
    """Read the file bytes under a ``map_range`` view now (Linux
    MADV_POPULATE_READ: the pages are read into the page cache if they are
    not there and mapped, copy-on-write, without a fault per page), so that
    an I/O error is raised here, naming ``path``, rather than killing the
    process with SIGBUS on first touch later. False where the kernel refuses
    this for the file's mapping (EINVAL: some special file systems); the
    caller then reads the bytes into the (writable, private) view instead.

    The range's reads are first queued all at once (MADV_WILLNEED): populating
    alone faults the pages in one read-around window at a time, each waited
    for, and each reaching back into the neighbouring chunk that another
    thread populates. Restores after dropping the page cache on the 2-core
    VM, interleaved with restores without the hint: 1.12 GB in 0.12-0.16 s
    vs 0.70-1.12 s (6 repeats) and 4.2 GB in 0.45-0.48 s vs 3.1-3.4 s (3
    repeats) while its disk served cold reads slowly; alike (0.12-0.15 s vs
    0.13-0.20 s, 8 repeats) while it served them fast; from the page cache
    no different (4.2 GB 0.41-0.44 s vs 0.39-0.48 s)."""
    start, length = _page_range(view)
    madvise = _libc_madvise()
    madvise(start, length, _MADV_WILLNEED)  # a hint: an error here changes nothing below
    if madvise(start, length, _MADV_POPULATE_READ) != 0:
        err = ctypes.get_errno()
        if err == errno.EINVAL:
            return False
        if err == errno.EFAULT:  # beyond the end of the file: it shrank after it was opened
            raise CorruptCheckpointError(f"{path}: truncated: {len(view)} bytes at offset {offset} are "
                                         f"no longer in the file")
        raise OSError(err, f"reading {len(view)} bytes at offset {offset}: {os.strerror(err)}", path)
    return True


def preadv_into(fd: int, bufs: list[memoryview], offset: int, path: str) -> None:
    """Scatter-read consecutive file bytes from ``offset`` into ``bufs`` (one
    syscall per 1024 buffers); a short read means the file was truncated."""
    total = sum(len(b) for b in bufs)
    done = 0
    pending = [b for b in bufs if len(b)]
    while pending:
        n = os.preadv(fd, pending[:1024], offset + done)
        if n == 0:
            raise CorruptCheckpointError(
                f"{path}: truncated: expected {total} bytes at offset {offset}, found {done}")
        done += n
        while pending and n >= len(pending[0]):
            n -= len(pending[0])
            pending.pop(0)
        if n:
            pending[0] = pending[0][n:]


# ------------------------------------------------------------------- writing
def aligned_buffer(nbytes: int) -> mmap.mmap:
    """Page-aligned private anonymous memory (what O_DIRECT needs), backed by
    transparent huge pages where the kernel allows.

    Private, not ``mmap.mmap(-1, n)``'s default MAP_SHARED: shared anonymous
    memory is shmem, which gets no huge pages. On this project's VM (virtio
    disk) O_DIRECT writes ran at 4.4-5.8 GB/s from huge-page memory and at
    1.9-2.8 GB/s from 4 KiB pages, shared or private
    (``python -m benchmarks.limits`` measures both).
    """
    buf = mmap.mmap(-1, max(ALIGN, nbytes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if nbytes >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # no transparent huge pages here: 4 KiB pages it is
            pass
    return buf


HUGE_PAGE = 2 << 20


class DataFile:
    """One data file written with positioned writes from several threads.

    Tries ``O_DIRECT`` (bypasses the page cache: steady disk bandwidth and no
    cache pollution) and falls back to buffered I/O where the filesystem
    refuses it (tmpfs, some network filesystems) or where ``direct=False``.
    """

    def __init__(self, directory: str, name: str, direct: bool = True):
        self.path = os.path.join(directory, name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        self.fd = os.open(self.path, flags, 0o644)
        self.direct_fd = -1
        if direct and _O_DIRECT:
            try:
                self.direct_fd = os.open(self.path, os.O_WRONLY | _O_DIRECT | os.O_NOFOLLOW)
            except OSError:  # EINVAL: the filesystem has no O_DIRECT
                self.direct_fd = -1

    @property
    def direct(self) -> bool:
        return self.direct_fd >= 0

    def pwrite(self, view: memoryview, offset: int, direct: bool = False) -> None:
        fd = self.direct_fd if direct else self.fd
        while view:
            try:
                n = os.pwrite(fd, view, offset)
            except OSError as e:
                if direct and fd != self.fd and e.errno == errno.EINVAL:
                    # Some filesystems accept O_DIRECT at open and refuse it at
                    # write: this (aligned, whole-block) write goes buffered.
                    fd = self.fd
                    continue
                raise named(e, self.path)
            view = view[n:]
            offset += n

    def pwritev(self, views: list, offset: int) -> None:
        """Buffered gather write of consecutive buffers (many small leaves, one syscall)."""
        while views:
            try:
                n = os.pwritev(self.fd, views[:1024], offset)  # IOV_MAX
            except OSError as e:
                raise named(e, self.path)
            offset += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views = views[1:]
            if n and views:
                views[0] = memoryview(views[0])[n:]

    def finish(self, size: int) -> None:
        """Set the exact size (O_DIRECT rounds the tail up), fsync, close."""
        try:
            os.ftruncate(self.fd, size)
            os.fsync(self.fd)
        except OSError as e:
            raise named(e, self.path)
        finally:
            self.close()

    def close(self) -> None:
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
            self.direct_fd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ------------------------------------------------------------------- commit
_libc = None


def _renameat2_exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.renameat2  # noqa: B018  (raises AttributeError where absent)
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    rc = _libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) failed: {os.strerror(err)}", a, None, b)


def commit(tmp: str, final: str, overwrite: bool) -> None:
    """Make the fully written ``tmp`` visible at ``final``, durably.

    ``overwrite=True`` replaces an existing checkpoint so that a crash at any
    instant leaves either the old or the new one readable: an atomic exchange
    where the OS offers one; otherwise the old one is renamed aside first and
    :func:`recover` puts it back if we die before the new one is in place.
    """
    fsync_dir(tmp)
    parent = os.path.dirname(os.path.abspath(final))
    if os.path.lexists(final):
        if not overwrite:
            raise CheckpointExistsError(f"{final}: a checkpoint already exists (pass overwrite=True to replace it)")
        if not is_ours(final):  # overwrite replaces checkpoints, never a user's other files
            raise CheckpointExistsError(f"{final}: exists and is not a jaxckpt checkpoint; refusing to replace it")
        if _renameat2_exchange(tmp, final):
            fsync_dir(parent)
            remove_tree(tmp)  # the old checkpoint; identifying files last, so a crash leaves it recognisable
            return
        old = aux_name(final, OLD_MARK)
        os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(parent)
        remove_tree(old)
        return
    try:
        os.rename(tmp, final)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise CheckpointExistsError(f"{final}: a checkpoint appeared there during the save") from None
        raise
    fsync_dir(parent)


def recover(final: str) -> None:
    """Finish an interrupted non-atomic overwrite: if ``final`` is missing and an
    old copy was set aside, put it back."""
    if os.path.lexists(final):
        return
    parent, name = os.path.split(os.path.abspath(final))
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for e in entries:
        parsed = parse_aux(e)
        if parsed == (name, OLD_MARK) and is_ours(os.path.join(parent, e)):
            try:
                os.rename(os.path.join(parent, e), final)
                fsync_dir(parent)
            except OSError:
                pass
            return


def remove_checkpoint(path: str) -> None:
    """Delete a committed checkpoint crash-safely: rename it away (atomic: it is
    no longer listed), fsync the parent, then delete the files."""
    gone = aux_name(path, DEL_MARK)
    os.rename(path, gone)
    try:
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException:
        # Not durably renamed away: deleting the files now could leave a
        # half-deleted checkpoint under its name after a power failure. Put
        # it back (the deletion failed as a whole) rather than leave it aside.
        try:
            os.rename(gone, path)
        except OSError:
            pass
        raise
    remove_tree(gone)


def remove_tree(path: str) -> None:
    """Delete a directory tree, its identifying files (owner marker, manifest)
    last: a crash midway leaves a directory still recognisable as ours by
    :func:`is_ours`, or an empty one, which :func:`clean_stale` can remove."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            os.unlink(path)  # a symlink planted in place of a directory: remove it, never what it points to
            return
        entries = os.listdir(path)
    except OSError:
        return
    marks = (OWNER_FILE, "manifest.msgpack")
    for e in [e for e in entries if e not in marks] + [e for e in marks if e in entries]:
        p = os.path.join(path, e)
        try:
            if stat.S_ISDIR(os.lstat(p).st_mode):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)
        except OSError:
            pass
    try:
        os.rmdir(path)
    except OSError:  # a worker of an abandoned save created a file meanwhile
        shutil.rmtree(path, ignore_errors=True)


def require_dir(path: str) -> None:
    recover(path)
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"{path}: no checkpoint directory here")


def list_entries(directory: str) -> Iterable[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


def is_committed(path: str) -> bool:
    """A real directory (not a symlink) holding a regular manifest file."""
    try:
        st = os.lstat(path)
        mst = os.lstat(os.path.join(path, "manifest.msgpack"))
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and stat.S_ISREG(mst.st_mode)


# ------------------------------------------------------------------- processes
def _proc_stat(pid: int) -> tuple[bytes, int] | None:
    """(state, start time in clock ticks since boot) from Linux /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        fields = data[data.rindex(b")") + 2:].split()  # the command name may hold spaces and ')'
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def process_start(pid: int) -> int | None:
    st = _proc_stat(pid)
    return st[1] if st else None


def process_alive(host: object, pid: object, start: object) -> bool:
    """False only when sure the process is gone: same host, and the pid no longer
    exists, is a zombie, or now belongs to a process started later (pid reuse)."""
    if host != socket.gethostname() or type(pid) is not int or not 0 < pid < 2**31:  # (os.kill: C int)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return True
    st = _proc_stat(pid)
    if st is not None and (st[0] == b"Z" or (type(start) is int and st[1] != start)):
        return False
    return True


def _owner_alive(path: str) -> bool:
    try:
        rec = msgpack.unpackb(read_small(path, OWNER_FILE, 4096), raw=False)
    except (OSError, ValueError, CorruptCheckpointError, msgpack.UnpackException):
        return False
    return isinstance(rec, dict) and process_alive(rec.get("host"), rec.get("pid"), rec.get("start"))


# ------------------------------------------------------------------- cleanup
def clean_stale(directory: str, accept: Callable[[str], bool]) -> list[str]:
    """Remove what interrupted saves, overwrites and deletions left in ``directory``
    for the checkpoint names that ``accept`` recognises: our temporary directories whose writer
    is gone, half-deleted checkpoints, old copies set aside by an overwrite (put
    back first when the checkpoint itself is missing). A directory is removed
    only when its name is one of ours AND it carries our owner marker or
    manifest (or is empty). Call with the directory's lock held. Returns the
    removed paths."""
    removed = []
    for entry in list_entries(directory):
        parsed = parse_aux(entry)
        if parsed is None or not accept(parsed[0]):
            continue
        name, mark = parsed
        path = os.path.join(directory, entry)
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                continue
        except OSError:
            continue
        if mark == OLD_MARK:
            recover(os.path.join(directory, name))
            if not os.path.lexists(path):
                continue  # it was put back
        if mark == TMP_MARK and _owner_alive(path):
            continue  # a save still running in another process
        if is_ours(path):
            remove_tree(path)
        else:
            try:
                # A writer killed between creating the directory and writing its
                # owner marker (one write) leaves the empty marker alone in it.
                marker = os.path.join(path, OWNER_FILE)
                if os.listdir(path) == [OWNER_FILE]:
                    st = os.lstat(marker)
                    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
                        os.unlink(marker)
                os.rmdir(path)  # only succeeds on an empty directory
            except OSError:
                continue
        removed.append(path)
    return removed


# ------------------------------------------------------------------- directory lock
LOCK_NAME = ".jaxckpt-lock"
_LOCK_KIND = "jaxckpt-lock"


def lock_record(token: str) -> dict:
    pid = os.getpid()
    return {"kind": _LOCK_KIND, "host": socket.gethostname(), "pid": pid, "start": process_start(pid),
            "token": token, "time": time.time()}


def read_lock(directory: str) -> dict | None:
    """The lock holder's record, or None when the directory is not locked."""
    path = os.path.join(directory, LOCK_NAME)
    try:
        rec = msgpack.unpackb(read_small(directory, LOCK_NAME, 4096), raw=False)
    except CorruptCheckpointError as e:
        if not os.path.lexists(path):
            return None
        raise CheckpointLockedError(f"{path}: unreadable lock file ({e}); if no writer uses this directory, "
                                    "delete the file") from None
    except (ValueError, msgpack.UnpackException) as e:
        rec = e
    if not isinstance(rec, dict) or rec.get("kind") != _LOCK_KIND:
        raise CheckpointLockedError(f"{path}: not a valid jaxckpt lock file; if no writer uses this directory, "
                                    "delete the file")
    return rec


def _create_lock(directory: str, token: str) -> bool:
    """Create the lock file with its content in one atomic step (hard link of a
    fully written file); False when it exists already."""
    path = os.path.join(directory, LOCK_NAME)
    data = msgpack.packb(lock_record(token))
    tmp_name = f"{LOCK_NAME}.{token}"
    try:
        write_file(directory, tmp_name, data)
        try:
            os.link(os.path.join(directory, tmp_name), path)
        except (FileExistsError, FileNotFoundError):  # ENOENT: the new holder removed our empty temp file
            return False
        except OSError as e:  # a filesystem without hard links: exclusive create in place
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        try:
            os.unlink(os.path.join(directory, tmp_name))
        except OSError:
            pass
    fsync_dir(directory)
    return True


def _take_over(directory: str, stale: dict) -> None:
    """Remove a stale lock, unless a competitor replaced it meanwhile (then put theirs back)."""
    path = os.path.join(directory, LOCK_NAME)
    aside = os.path.join(directory, f"{LOCK_NAME}.stale-{uuid.uuid4().hex[:16]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        moved = msgpack.unpackb(read_small(directory, os.path.basename(aside), 4096), raw=False)
    except (OSError, ValueError, CorruptCheckpointError, msgpack.UnpackException):
        moved = None
    if not (isinstance(moved, dict) and moved.get("token") == stale.get("token")):
        try:
            os.link(aside, path)
        except OSError:
            pass
    try:
        os.unlink(aside)
    except FileNotFoundError:  # removed by _clean_lock_leftovers of a writer that got the lock meanwhile
        pass


_LOCK_LEFTOVER_RE = re.compile(r"^\.jaxckpt-lock\.(?:stale-[0-9a-f]{16}|[0-9a-f]{32})$")


def _clean_lock_leftovers(directory: str) -> None:
    """Remove the lock's temporary files (``_create_lock``, ``_take_over``) that
    a writer killed while taking the lock left behind: only those whose
    recorded process is gone, so a competitor's file in use is never touched."""
    for entry in list_entries(directory):
        if not _LOCK_LEFTOVER_RE.match(entry):
            continue
        try:
            data = read_small(directory, entry, 4096)
            # Empty: its writer was killed between creating and writing it (a
            # competitor's file caught in that instant makes its link fail: it retries).
            rec = msgpack.unpackb(data, raw=False) if data else None
        except (OSError, ValueError, CorruptCheckpointError, msgpack.UnpackException):
            continue
        if rec is None or (isinstance(rec, dict) and rec.get("kind") == _LOCK_KIND
                           and not process_alive(rec.get("host"), rec.get("pid"), rec.get("start"))):
            try:
                os.unlink(os.path.join(directory, entry))
            except OSError:
                pass


def _held_message(directory: str, holder: dict) -> str:
    path = os.path.join(directory, LOCK_NAME)
    when = holder.get("time")
    try:  # the record is read from disk: NaN or a year past 9999 must not break the message
        since = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(when)) if isinstance(when, (int, float)) else ""
    except (ValueError, OverflowError, OSError):
        since = ""
    who = f"host {holder.get('host')!r}, pid {holder.get('pid')}{since}"
    if holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid():
        return (f"{path}: this process already writes to this directory ({who}): close the other "
                "CheckpointManager first, or open this one with read_only=True")
    return (f"{path}: the directory is locked by another writer ({who}); one writer at a time. Open it with "
            "read_only=True to follow that writer; if that process is gone (on another host), delete the lock file")


def acquire_lock(directory: str) -> tuple[str, dict | None]:
    """Take the directory's writer lock. Returns ``(token, stale)``: the token to
    release it with, and the record of a dead holder whose lock was taken over
    (None if there was none). Raises ``CheckpointLockedError`` while a live
    process (or one on another host, whose liveness we cannot check) holds it."""
    token = uuid.uuid4().hex
    stale = None
    for _ in range(5):
        try:
            created = _create_lock(directory, token)
            if created:
                _clean_lock_leftovers(directory)
        except BaseException:  # failed after the lock was made: do not leave it held by nobody's token
            release_lock(directory, token)
            raise
        if created:
            return token, stale
        holder = read_lock(directory)
        if holder is None:
            continue  # released meanwhile
        if process_alive(holder.get("host"), holder.get("pid"), holder.get("start")):
            raise CheckpointLockedError(_held_message(directory, holder))
        _take_over(directory, holder)
        stale = holder
    raise CheckpointLockedError(f"{os.path.join(directory, LOCK_NAME)}: could not take the lock: other processes "
                                "keep competing for it")


def release_lock(directory: str, token: str) -> None:
    """Remove the lock if it is still ours."""
    try:
        holder = read_lock(directory)
    except CheckpointLockedError:
        return
    if holder is not None and holder.get("token") == token:
        try:
            os.unlink(os.path.join(directory, LOCK_NAME))
        except FileNotFoundError:
            pass
