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
import uuid
from typing import Iterable

import msgpack

from jaxckpt.errors import CheckpointExistsError, CheckpointNotFoundError, CorruptCheckpointError

TMP_MARK = "jaxckpt-tmp"
DEL_MARK = "jaxckpt-del"
OLD_MARK = "jaxckpt-old"
OWNER_FILE = ".jaxckpt-owner"
_AUX_RE = re.compile(r"^\.(?P<name>.+)\.(?P<mark>jaxckpt-tmp|jaxckpt-del|jaxckpt-old)-(?P<id>[0-9a-f]{8,32})$")

ALIGN = 4096  # O_DIRECT alignment for offsets, lengths and buffers
_O_DIRECT = getattr(os, "O_DIRECT", 0)


# ------------------------------------------------------------------- helpers
def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _aux_name(final: str, mark: str, ident: str | None = None) -> str:
    parent, name = os.path.split(os.path.abspath(final))
    return os.path.join(parent, f".{name}.{mark}-{ident or uuid.uuid4().hex[:16]}")


def parse_aux(entry: str) -> tuple[str, str] | None:
    """``(final name, mark)`` for one of our temporary/deleting/old directory names."""
    m = _AUX_RE.match(entry)
    return (m.group("name"), m.group("mark")) if m else None


def owner_record() -> dict:
    return {"kind": TMP_MARK, "host": socket.gethostname(), "pid": os.getpid()}


def make_temp_dir(final: str, ident: str | None = None) -> str:
    """Create the temporary sibling of ``final`` and mark it as ours."""
    tmp = _aux_name(final, TMP_MARK, ident)
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    try:
        os.mkdir(tmp)
    except FileExistsError:
        if ident is None:
            raise
    write_file(tmp, OWNER_FILE, msgpack.packb(owner_record()), sync=False)
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
        head = read_small(path, "manifest.msgpack", 64 << 20)
        return b"jaxckpt" in head[:64]
    except (OSError, CorruptCheckpointError):
        return False


def write_file(directory: str, name: str, data: bytes, sync: bool = True) -> None:
    fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
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


# ------------------------------------------------------------------- writing
def aligned_buffer(nbytes: int) -> mmap.mmap:
    """Page-aligned anonymous memory (what O_DIRECT needs)."""
    return mmap.mmap(-1, max(ALIGN, nbytes))


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
                raise
            view = view[n:]
            offset += n

    def pwritev(self, views: list, offset: int) -> None:
        """Buffered gather write of consecutive buffers (many small leaves, one syscall)."""
        while views:
            n = os.pwritev(self.fd, views[:1024], offset)  # IOV_MAX
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
        if _renameat2_exchange(tmp, final):
            fsync_dir(parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = _aux_name(final, OLD_MARK)
        os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
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
    gone = _aux_name(path, DEL_MARK)
    os.rename(path, gone)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(gone, ignore_errors=True)


def remove_tree(path: str) -> None:
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
