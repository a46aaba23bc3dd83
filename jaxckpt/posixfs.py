"""POSIX file primitives: durable writes, safe opens, positioned reads, and
the data file several threads write into.

Reads open files with ``O_NOFOLLOW | O_NONBLOCK`` and accept only regular
files, so a symlink or FIFO planted in a checkpoint directory is refused
rather than followed or blocked on. Errors of calls on a file descriptor get
the file's path (``named``): a user must learn which file the disk failed on.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from typing import Any, BinaryIO, Callable

import msgpack

from jaxckpt import memory
from jaxckpt.errors import CheckpointError, CheckpointExistsError, CorruptCheckpointError

O_DIRECT = getattr(os, "O_DIRECT", 0)  # 0: never tried (tests set it to force buffered writes)
RECORD_CAP = 4096  # bytes of a small record file (owner marker, lock)


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


def ensure_dir(path: str, mode: int | None = None) -> None:
    """``os.makedirs(path, exist_ok=True)``, durably: each directory created is
    fsynced into its parent (a commit fsyncs only the checkpoint's own parent,
    so a new parent's entry would otherwise be lost by a power failure).
    ``mode``: the permission bits of each directory created (default: umask)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent != path:
        ensure_dir(parent, mode)
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: exists and is not a directory, so nothing can be made under it") from None
        return
    if mode is not None:
        os.chmod(path, mode)
    fsync_dir(parent)


def write_file(directory: str, name: str, data: bytes, sync: bool = True, mode: int | None = None) -> None:
    """Create (or replace) ``name`` in ``directory`` holding ``data``; ``mode``: its
    permission bits exactly (default: 0o644 less the umask)."""
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
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


def pread_direct_into(direct_fd: int, fd: int, buf: memoryview, offset: int, path: str) -> bool:
    """``pread_into`` through ``direct_fd`` (an O_DIRECT descriptor of the same
    file) for the whole blocks of ``buf``, where its address and ``offset`` are
    block-aligned, and through ``fd`` for the rest (the tail, a short read).
    Returns False where the filesystem refused O_DIRECT at read time (EINVAL):
    the whole buffer was then read through ``fd``."""
    head = len(buf) // memory.ALIGN * memory.ALIGN
    if head and (offset % memory.ALIGN or memory.address(buf) % memory.ALIGN):
        head = 0
    done, ok = 0, True
    while done < head:
        try:
            n = os.preadv(direct_fd, [buf[done:head]], offset + done)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise named(e, path)
            ok = False
            break
        if n <= 0 or n % memory.ALIGN:  # the end of the file (a truncated file): the rest is read buffered
            done += max(n, 0)
            break
        done += n
    if done < len(buf):
        pread_into(fd, buf[done:], offset + done, path)
    return ok


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


def write_atomic(path: str, fill: Callable[[BinaryIO], None]) -> None:
    """Create or replace ``path`` by ``fill(file)`` into a temporary sibling
    (mode 0o666 less the umask, as any new file), fsync, rename over ``path``,
    fsync the directory (made first, with its parents, if missing); the
    temporary file is removed if anything fails."""
    directory = os.path.dirname(os.path.abspath(path))
    ensure_dir(directory)  # as a checkpoint's save makes its parents
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except IsADirectoryError:
        os.unlink(tmp)
        raise CheckpointExistsError(f"{path}: a directory is there; refusing to replace it with a file") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def list_entries(directory: str) -> list[str]:
    """The names in ``directory``; none when it does not exist."""
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


def read_record(directory: str, name: str, cap: int = RECORD_CAP) -> Any:
    """A small msgpack record file decoded, or None when it is missing,
    unreadable, larger than ``cap`` or not msgpack (the callers treat all of
    these alike: not a record they can trust)."""
    try:
        return msgpack.unpackb(read_small(directory, name, cap), raw=False)
    except (OSError, ValueError, CorruptCheckpointError, msgpack.UnpackException):
        return None


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


class DataFile:
    """One data file written with positioned writes from several threads.

    Tries ``O_DIRECT`` (bypasses the page cache: steady disk bandwidth and no
    cache pollution) and falls back to buffered I/O where the filesystem
    refuses it (tmpfs, some network filesystems) or where ``direct=False``.
    (A ``storage.DataSink``.)
    """

    sequential = False  # written at offsets, not as one stream

    def __init__(self, directory: str, name: str, direct: bool = True, mode: int | None = None):
        self.path = os.path.join(directory, name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        self.fd = os.open(self.path, flags, 0o644)
        if mode is not None:
            os.fchmod(self.fd, mode)
        self.direct_fd = -1
        if direct and O_DIRECT:
            try:
                self.direct_fd = os.open(self.path, os.O_WRONLY | O_DIRECT | os.O_NOFOLLOW)
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
