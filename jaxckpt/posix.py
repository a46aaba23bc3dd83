"""The POSIX backend: checkpoints as directories on a local or shared file
system, committed by rename + fsync (``jaxckpt/posixdirs.py`` has the
protocol, ``jaxckpt/posixfs.py`` the file primitives, ``jaxckpt/lock.py``
the writer lock). Implements ``storage.Backend``; see its call order.
"""

from __future__ import annotations

import os
import stat
import threading
from typing import Any, BinaryIO, Callable

from jaxckpt import lock
from jaxckpt import memory
from jaxckpt import posixdirs
from jaxckpt import posixfs
from jaxckpt import storage
from jaxckpt.errors import CheckpointError, CheckpointExistsError, CheckpointNotFoundError, CorruptCheckpointError
from jaxckpt.format import MANIFEST_NAME
from jaxckpt.storage import Location


class PosixStaging(storage.Staging):
    """A temporary sibling directory ``.<name>.jaxckpt-tmp-<id>`` of the checkpoint."""

    def __init__(self, final: str, tmp: str, modes: storage.Modes = storage.Modes()):
        self.final = final
        self.tmp = tmp
        self.token = tmp
        self.modes = modes

    def create(self, name: str, direct: bool = True) -> posixfs.DataFile:
        return posixfs.DataFile(self.tmp, name, direct=direct, mode=self.modes.file)

    def check_visible(self, name: str, size: int, process: int) -> None:
        try:
            found = os.stat(os.path.join(self.tmp, name)).st_size
        except FileNotFoundError:
            found = None
        if found != size:
            raise CheckpointError(
                f"process 0 cannot see {os.path.join(self.tmp, name)} as written by process {process} "
                f"({size} bytes; found {'nothing' if found is None else f'{found} bytes'}): the checkpoint "
                "directory must be on a filesystem that all processes share")

    def write_manifest(self, data: bytes) -> None:
        posixdirs.write_manifest(self.tmp, data, self.modes.file)

    def commit(self, overwrite: bool) -> None:
        posixdirs.commit(self.tmp, self.final, overwrite)

    def abandon(self) -> None:
        posixdirs.remove_tree(self.tmp)


class PosixData(storage.DataSource):
    """A data file opened for positioned reads (a regular file, never a link)."""

    def __init__(self, path: str, size: int):
        self.path = path
        self.fd = posixfs.open_regular(path)
        self._direct_fd: int | None = None  # read_uncached_into's descriptor, opened on first use
        self._direct_refused = False
        self._lock = threading.Lock()
        found = os.fstat(self.fd).st_size
        if found < size:
            os.close(self.fd)
            raise CorruptCheckpointError(f"{path}: truncated: the manifest records {size} bytes, found {found}")

    def read_into(self, buf: memoryview, offset: int, what: str) -> None:
        posixfs.pread_into(self.fd, buf, offset, what)

    def read_uncached_into(self, buf: memoryview, offset: int, what: str) -> None:
        fd = self._direct()
        if fd < 0:
            posixfs.pread_into(self.fd, buf, offset, what)
        elif not posixfs.pread_direct_into(fd, self.fd, buf, offset, what):
            self._direct_refused = True  # at read time (this buffer went buffered): buffered from now on

    def _direct(self) -> int:
        """An O_DIRECT descriptor of this same file (reopened through its own
        descriptor, so the same inode), opened on first use; -1 where O_DIRECT
        is unavailable."""
        if self._direct_refused:
            return -1
        with self._lock:
            if self._direct_fd is None:
                self._direct_fd = -1
                if posixfs.O_DIRECT:
                    try:
                        self._direct_fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | posixfs.O_DIRECT)
                    except OSError:  # no /proc, or a filesystem without O_DIRECT
                        pass
            return self._direct_fd

    def readv_into(self, bufs: list[memoryview], offset: int, what: str) -> None:
        posixfs.preadv_into(self.fd, bufs, offset, what)

    def map(self, offset: int, length: int) -> memoryview | None:
        if not memory.can_map():
            return None
        try:
            return memory.map_range(self.fd, offset, length)
        except (OSError, ValueError):  # a file system without mmap, or no address space
            return None

    def close(self) -> None:
        if self._direct_fd is not None and self._direct_fd >= 0:
            os.close(self._direct_fd)
        self._direct_fd = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PosixFile(storage.FileSource):
    """A single file (a foreign checkpoint), links followed (the Hugging Face
    cache links its snapshots to blobs), ``O_NONBLOCK`` so that a FIFO cannot
    hang the open; anything but a regular file is refused."""

    def __init__(self, path: str):
        self.where = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{path}: no such file") from None
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            raise CorruptCheckpointError(f"{path}: not a regular file (mode {stat.filemode(st.st_mode)})")
        self.size = st.st_size

    def read_into(self, buf: memoryview, offset: int, what: str) -> None:
        posixfs.pread_into(self.fd, buf, offset, what)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PosixSource(storage.Source):
    """A committed checkpoint directory."""

    def __init__(self, loc: Location):
        self.location = loc
        path = loc.path
        posixdirs.recover(path)
        if not os.path.isdir(path):
            raise CheckpointNotFoundError(f"{path}: no checkpoint here (not a directory)")
        if not os.path.lexists(os.path.join(path, MANIFEST_NAME)):
            raise CheckpointNotFoundError(f"{path}: not a committed checkpoint ({MANIFEST_NAME} is missing)")

    def read_manifest(self, cap: int) -> bytes:
        return posixfs.read_small(self.location.path, MANIFEST_NAME, cap)

    def open_data(self, name: str, size: int) -> PosixData:
        return PosixData(os.path.join(self.location.path, name), size)

    def describe(self, name: str) -> str:
        return os.path.join(self.location.path, name)


class PosixBackend(storage.Backend):
    def exists(self, loc: Location) -> bool:
        return os.path.lexists(loc.path) and not posixdirs.is_empty_dir(loc.path)

    def is_committed(self, loc: Location, follow: bool = False) -> bool:
        return posixdirs.is_committed(loc.path, follow)

    def begin_save(self, loc: Location, attempt: str | None = None,
                   modes: storage.Modes = storage.Modes(), absent: bool = False) -> PosixStaging:
        if absent and self.exists(loc):
            raise CheckpointExistsError.at(loc) if self.is_committed(loc) else CheckpointExistsError.foreign(loc)
        if attempt is not None:  # a stale one of the same attempt, from a crashed run
            posixdirs.remove_tree(posixdirs.aux_name(loc.path, posixdirs.TMP_MARK, attempt))
        return PosixStaging(loc.path, posixdirs.make_temp_dir(loc.path, attempt, modes.file, modes.dir), modes)

    def join_save(self, loc: Location, token: str, modes: storage.Modes = storage.Modes()) -> PosixStaging:
        if not os.path.isdir(token):
            raise CheckpointError(f"cannot see {token}, created by process 0: the checkpoint directory must be on a "
                                  "filesystem that all processes share")
        return PosixStaging(loc.path, token, modes)

    def open(self, loc: Location) -> PosixSource:
        return PosixSource(loc)

    def ensure_root(self, root: Location, modes: storage.Modes = storage.Modes()) -> None:
        posixfs.ensure_dir(root.path, modes.dir)

    def list_committed(self, root: Location, accept: Callable[[str], Any]) -> list[str]:
        return [e for e in posixfs.list_entries(root.path)
                if accept(e) and posixdirs.is_committed(os.path.join(root.path, e))]

    def remove(self, loc: Location) -> None:
        posixdirs.remove_checkpoint(loc.path)

    def clean_stale(self, root: Location, accept: Callable[[str], Any]) -> tuple[list[str], list[str]]:
        return posixdirs.clean_stale(root.path, accept), self.list_committed(root, accept)

    def acquire_lock(self, root: Location, modes: storage.Modes = storage.Modes()) -> tuple[str, dict | None]:
        return lock.acquire(root.path, modes.file)

    def release_lock(self, root: Location, token: str) -> None:
        lock.release(root.path, token)

    def open_file(self, loc: Location) -> PosixFile:
        return PosixFile(loc.path)

    def write_file(self, loc: Location, fill: Callable[[BinaryIO], None], size: int | None = None) -> None:
        posixfs.write_atomic(loc.path, fill)

    def list_files(self, loc: Location) -> list[tuple[str, int]]:
        found = []
        for top, _, files in os.walk(loc.path):  # links to directories are not followed
            for name in files:
                st = os.lstat(os.path.join(top, name))
                if stat.S_ISREG(st.st_mode):
                    found.append((os.path.relpath(os.path.join(top, name), loc.path).replace(os.sep, "/"), st.st_size))
        return sorted(found)


BACKEND = PosixBackend()
