"""Storage: where a checkpoint's bytes live, behind one small interface.

The writer, the reader, the manager and the CLI talk to a :class:`Backend`
and the objects it hands out, never to files directly. Two implementations:
POSIX file systems (``jaxckpt/posix.py``: rename + fsync) and object stores
(``jaxckpt/objstore.py`` over the clients of ``jaxckpt/objclient.py``: S3,
GCS, Azure; no rename, no fsync, no directories, but an atomic single-object
PUT, conditional create, ranged GET and listing by prefix): data objects
named per attempt, the manifest PUT as the commit, ranged GETs for reads.

Paths are :class:`Location` values: a scheme and a path, so that a URL is
never mistaken for a local directory.

Call order of one save. Threads: [T] the caller's (training) thread, [S] the
save's background thread, [P] an I/O pool thread. Processes: (all) every
process of the job, (P0) process 0 only.

1. (all) [T]   ``backend.exists(loc)``: an existing checkpoint is refused where the mistake
   is made (unless ``overwrite``); on an object store ``begin_save(absent=True)`` does it.
2. (P0) [S]    ``staging = backend.begin_save(loc, attempt)``: a place for the
   data that nothing lists. ``attempt`` (multi-process: derived from the
   save's coordination key) names it, so a crashed run's leftover of the same
   attempt is replaced.
   (others) [S] ``staging = backend.join_save(loc, token)`` with the
   ``staging.token`` process 0 published through the coordination service.
3. (all) [P]   ``sink = staging.create(name)``; ``sink.pwrite`` / ``sink.pwritev``
   from any pool thread; ``sink.finish(size)`` makes it durable;
   ``sink.close()``.
4. (P0) [S]    ``staging.check_visible(name, size, process)`` for every other
   process's data, before the manifest names it.
5. (P0) [P]    ``staging.write_manifest(data)``: durable, not yet visible.
6. (P0) [S]    ``staging.commit(overwrite)``: the commit, one atomic step after
   which the checkpoint is listed, whole. Refuses an existing checkpoint
   unless ``overwrite``; an overwrite leaves the old checkpoint readable
   until this step.
   On a failure at any step: (P0) [S] ``staging.abandon()`` removes what the
   attempt wrote; it never touches a committed checkpoint.

Reading (any process, any thread)::

    source = backend.open(loc)                 # CheckpointNotFoundError if nothing is committed at loc
    data = source.read_manifest(cap)           # (or here: a bucket sends nothing before this GET);
                                               # CorruptCheckpointError above cap bytes
    f = source.open_data(name, size)           # CorruptCheckpointError if missing or shorter than size
                                               # (a bucket: at the first read that needs those bytes)
    f.read_into(buf, offset, what); f.readv_into(bufs, offset, what); f.map(offset, length)
    f.close(); source.close()

Single files, the foreign formats' (safetensors, MindSpore, flax msgpack)::

    with backend.open_file(loc) as f:          # CheckpointNotFoundError if there is none
        f.size; f.read_into(buf, offset, what); f.pread(n, offset); f.reader()
    backend.write_file(loc, fill, size)        # fill(file object); atomic: the old file or the whole new one
    backend.list_files(loc)                    # (relative path, size) of every file under a directory (prefix)

Managing a root, a directory of checkpoints ((P0) [T], except ``remove``: [S]
after a commit)::

    backend.ensure_root(root)
    token, stale = backend.acquire_lock(root); ...; backend.release_lock(root, token)
    backend.clean_stale(root, accept)          # leftovers of interrupted saves and deletions; and then
    backend.list_committed(root, accept)       # names of committed checkpoints only
    backend.remove(loc)                        # un-commit first (atomic), then delete the data
"""

from __future__ import annotations

import abc
import dataclasses
import io
import os
import threading
from typing import Any, BinaryIO, Callable, Iterable

from jaxckpt import location
from jaxckpt.errors import CheckpointNotFoundError, UnsupportedLocationError

Location = location.Location  # re-exported: every layer names it through storage


# ----------------------------------------------------------------------------- writing
@dataclasses.dataclass(frozen=True)
class Modes:
    """Permission bits of what a writer creates (``file_mode`` / ``dir_mode`` of
    ``save``, ``AsyncCheckpointer``, ``CheckpointManager``): data files, the
    manifest, lock and marker files get ``file``, checkpoint directories (and
    parents created for them) ``dir``; None: the process umask decides, as for
    any new file. Object stores have no permission bits and ignore them."""
    file: int | None = None
    dir: int | None = None

    def __post_init__(self) -> None:
        for name in ("file", "dir"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0o7777):
                raise ValueError(f"{name}_mode must be permission bits (an int in 0..0o7777, e.g. 0o640), got {v!r}")


class DataSink(abc.ABC):
    """One data file (object) of a save, written at offsets from several pool threads."""

    direct: bool  # whether ``pwrite(..., direct=True)`` bypasses the page cache (aligned, whole blocks)
    sequential: bool = False  # written once, in order, with ``write_stream`` (objects), not at offsets

    def write_stream(self, chunks: Iterable[memoryview], size: int) -> None:
        """(``sequential`` sinks) The whole content, ``size`` bytes, in order; durable when it returns."""
        raise NotImplementedError

    @abc.abstractmethod
    def pwrite(self, view: memoryview, offset: int, direct: bool = False) -> None: ...

    @abc.abstractmethod
    def pwritev(self, views: list, offset: int) -> None:
        """Consecutive buffers from ``offset`` (many small leaves, one call)."""

    @abc.abstractmethod
    def finish(self, size: int) -> None:
        """Set the exact size, make the bytes durable, close."""

    @abc.abstractmethod
    def close(self) -> None: ...


class Staging(abc.ABC):
    """One save attempt, between ``begin_save`` and ``commit`` (module docstring, steps 2-6)."""

    token: str  # what another process passes to ``join_save`` to write into this attempt
    # The size each process's data should be cut into files of (between
    # leaves), or None for one file per process; see ``layout.file_groups``.
    file_bytes: int | None = None

    def data_name(self, base: str) -> str:
        """The name a data file called ``base`` (``data-00000.bin``) gets in this
        attempt: object stores make it unique to the attempt."""
        return base

    @abc.abstractmethod
    def create(self, name: str, direct: bool = True) -> DataSink: ...

    @abc.abstractmethod
    def check_visible(self, name: str, size: int, process: int) -> None:
        """Raise ``CheckpointError`` unless ``name`` of ``size`` bytes, written by ``process``, is there."""

    @abc.abstractmethod
    def write_manifest(self, data: bytes) -> None: ...

    @abc.abstractmethod
    def commit(self, overwrite: bool) -> None: ...

    @abc.abstractmethod
    def abandon(self) -> None: ...


# ----------------------------------------------------------------------------- reading
class DataSource(abc.ABC):
    """One data file (object) of a committed checkpoint, read at offsets from any thread."""

    @abc.abstractmethod
    def read_into(self, buf: memoryview, offset: int, what: str) -> None:
        """Fill ``buf`` from ``offset``; ``CorruptCheckpointError`` naming ``what`` if the data ends first."""

    def read_uncached_into(self, buf: memoryview, offset: int, what: str) -> None:
        """``read_into`` for bytes read once into memory that is not a view of the
        file (an encrypted chunk, decrypted where it lands): bypassing the page
        cache where the storage can (POSIX: O_DIRECT), which saves the kernel's
        copy of every byte. By default the same as ``read_into``."""
        self.read_into(buf, offset, what)

    @abc.abstractmethod
    def readv_into(self, bufs: list[memoryview], offset: int, what: str) -> None:
        """Fill consecutive ``bufs`` from ``offset`` (a scatter read)."""

    @abc.abstractmethod
    def map(self, offset: int, length: int) -> memoryview | None:
        """A private copy-on-write mapping of the bytes (see ``memory.map_range``),
        or None where this storage cannot map (the caller reads instead)."""

    @abc.abstractmethod
    def close(self) -> None: ...


class Source(abc.ABC):
    """A committed checkpoint opened for reading."""

    location: Location

    @abc.abstractmethod
    def read_manifest(self, cap: int) -> bytes: ...

    @abc.abstractmethod
    def open_data(self, name: str, size: int) -> DataSource: ...

    def describe(self, name: str) -> str:
        """How messages name one file of the checkpoint."""
        return str(self.location.join(name))

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- single files
class FileSource(abc.ABC):
    """One whole file (object) opened for positioned reads: a foreign
    checkpoint (safetensors, MindSpore, flax msgpack) at a path or a URL."""

    where: str  # how messages name it: the path or the URL
    size: int
    read_ahead: int = 1 << 16  # bytes a reader walking small records should fetch at once
    prefetch_bytes: int = 0  # bytes of the next tensors a tensor iterator may read ahead (``prefetch``)

    @abc.abstractmethod
    def read_into(self, buf: memoryview, offset: int, what: str) -> None:
        """Fill ``buf`` from ``offset``; ``CorruptCheckpointError`` naming ``what`` if the file ends first."""

    def pread(self, n: int, offset: int) -> bytes:
        """Up to ``n`` bytes from ``offset`` (fewer where the file ends)."""
        n = max(0, min(n, self.size - offset))
        buf = bytearray(n)
        if n:
            self.read_into(memoryview(buf), offset, self.where)
        return bytes(buf)

    def reader(self) -> BinaryIO:
        """A buffered, seekable file object over the same bytes, for a stream
        read in small pieces (MindSpore's records, decrypted block by block):
        it fetches ``16 * read_ahead`` bytes at once (1 MiB from a disk, 16 MiB
        from a bucket); a larger read goes through whole."""
        return io.BufferedReader(_RawFile(self), 16 * self.read_ahead)

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "FileSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _RawFile(io.RawIOBase):
    """``FileSource`` as a raw stream (what ``io.BufferedReader`` wraps)."""

    def __init__(self, src: FileSource):
        self.src, self.pos = src, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = max(0, min(len(view), self.src.size - self.pos))
        if n:
            self.src.read_into(view[:n], self.pos, self.src.where)
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.src.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos


def open_file(where: "str | os.PathLike | Location") -> FileSource:
    """The single file (object) at a path or URL, for reading:
    ``CheckpointNotFoundError`` if there is none."""
    loc = Location.parse(where)
    return backend(loc).open_file(loc)


def is_file(where: "str | os.PathLike | Location") -> bool:
    """Whether a single file (object) is at a path or URL."""
    try:
        open_file(where).close()
    except CheckpointNotFoundError:
        return False
    return True


def write_file(where: "str | os.PathLike | Location", fill: Callable[[BinaryIO], None],
               size: int | None = None) -> None:
    """Create or replace the single file (object) at a path or URL with what
    ``fill(f)`` writes to the seekable file object ``f``, atomically: a reader
    sees the old file or the whole new one, and nothing if ``fill`` raises.
    ``size``: the exact number of bytes ``fill`` writes, in order, never
    seeking (``f`` then has ``write`` alone); a bucket streams them up as they
    come instead of staging them in a temporary local file."""
    loc = Location.parse(where)
    backend(loc).write_file(loc, fill, size)


# ----------------------------------------------------------------------------- the backend
class Backend(abc.ABC):
    """One kind of storage; see the module docstring for the call order."""

    @abc.abstractmethod
    def exists(self, loc: Location) -> bool:
        """Whether anything (a checkpoint, or something else) is at ``loc``; an
        empty directory, or a bucket's zero-byte folder marker, is nothing."""

    @abc.abstractmethod
    def is_committed(self, loc: Location, follow: bool = False) -> bool:
        """Whether ``loc`` is a committed checkpoint (``follow``: ``loc`` itself may be a link the user named)."""

    @abc.abstractmethod
    def begin_save(self, loc: Location, attempt: str | None = None, modes: Modes = Modes(),
                   absent: bool = False) -> Staging:
        """``absent``: first ``CheckpointExistsError.at(loc)`` if ``exists(loc)``."""

    @abc.abstractmethod
    def join_save(self, loc: Location, token: str, modes: Modes = Modes()) -> Staging: ...

    @abc.abstractmethod
    def open(self, loc: Location) -> Source: ...

    @abc.abstractmethod
    def ensure_root(self, root: Location, modes: Modes = Modes()) -> None: ...

    @abc.abstractmethod
    def list_committed(self, root: Location, accept: Callable[[str], Any]) -> list[str]:
        """Names under ``root`` that ``accept`` recognises and that are committed checkpoints."""

    @abc.abstractmethod
    def remove(self, loc: Location) -> None:
        """Delete a committed checkpoint: un-commit first, then the data. ``FileNotFoundError`` if gone."""

    @abc.abstractmethod
    def clean_stale(self, root: Location, accept: Callable[[str], Any]) -> tuple[list[str], list[str]]:
        """Remove leftovers of interrupted saves and deletions of the names ``accept``
        recognises whose writer is gone. Lock held. Returns what was removed, and
        what ``list_committed`` lists after (a store may take both from one listing)."""

    @abc.abstractmethod
    def acquire_lock(self, root: Location, modes: Modes = Modes()) -> tuple[str, dict | None]:
        """Take the writer lock of ``root``: ``(token, stale holder's record or None)``;
        ``CheckpointLockedError`` while a live writer holds it."""

    @abc.abstractmethod
    def release_lock(self, root: Location, token: str) -> None: ...

    @abc.abstractmethod
    def open_file(self, loc: Location) -> FileSource:
        """``loc`` as one file to read (see ``open_file``)."""

    @abc.abstractmethod
    def write_file(self, loc: Location, fill: Callable[[BinaryIO], None], size: int | None = None) -> None:
        """``loc`` written as one file, atomically (see ``write_file``)."""

    @abc.abstractmethod
    def list_files(self, loc: Location) -> list[tuple[str, int]]:
        """Every file under the directory (prefix) ``loc``, at any depth: its path
        relative to ``loc`` (``/``-separated, as stored: not checked) and size."""


_backends: dict[tuple, tuple[tuple, "Backend"]] = {}
_backends_lock = threading.Lock()
# The environment the object-store clients configure themselves from (region,
# endpoint, credentials, emulators): a client is rebuilt when any of it changed.
_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCE_", "AZURE_", "STORAGE_EMULATOR_HOST")


def _client_environment() -> tuple:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)))


def backend(loc: Location) -> "Backend":
    """The backend that serves ``loc``: one per bucket, ``storage_options`` and
    cloud environment (the ``AWS_*``, ``GOOGLE_*``, ``GCE_*``, ``AZURE_*`` and
    ``STORAGE_EMULATOR_HOST`` variables), shared by every reader and writer of
    the process: setting ``AWS_REGION`` after an error, say, takes effect on the
    next call. (Backends are imported when first used: object-store clients are
    optional extras.)"""
    if loc.scheme == "file":
        from jaxckpt import posix
        return posix.BACKEND
    bucket = loc.path.partition("/")[0]
    key = (loc.scheme, bucket, loc.options)
    env = _client_environment()
    with _backends_lock:
        found = _backends.get(key)
        if found is None or found[0] != env:  # one still in use keeps its client; the new one, its leases
            previous = found[1] if found else None
            found = _backends[key] = (env, _object_backend(loc.scheme, bucket, dict(loc.options), previous))
        return found[1]


def _object_backend(scheme: str, bucket: str, options: dict, previous: "Backend | None") -> "Backend":
    from jaxckpt import objstore
    if scheme == "s3":
        from jaxckpt import s3client
        return objstore.ObjectBackend(s3client.S3Client(bucket, options), previous)
    if scheme == "gs":
        from jaxckpt import gcsclient
        return objstore.ObjectBackend(gcsclient.GcsClient(bucket, options), previous)
    if scheme == "az":
        from jaxckpt import azclient
        return objstore.ObjectBackend(azclient.AzureClient(bucket, options), previous)
    raise UnsupportedLocationError(f"{scheme}://{bucket}: no storage backend for {scheme}://")
