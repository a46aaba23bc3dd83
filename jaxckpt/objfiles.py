"""Single files in a bucket (a foreign checkpoint: safetensors, MindSpore,
flax msgpack; an orbax checkpoint's objects), and the ranged reads that
jaxckpt's own data objects share.

* ``RangedReads``: one object read at offsets, a large read split into
  parallel 16 MiB ranged GETs.
* ``ObjectFile``: a ``storage.FileSource`` over one object.
* ``write``: one object from what a writer writes, appearing whole or not at
  all. A writer that declares its exact size and writes in order (never
  seeking) is streamed: its bytes go up as they come, a few 16 MiB parts in
  flight (``Upload``), with no local copy. Any other writer seeks (a header
  written first, tensors at their offsets), which an upload cannot: it writes
  into a temporary local file (``$TMPDIR``), uploaded once complete.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import tempfile
import threading
from typing import Any, BinaryIO, Callable, Iterator

from jaxckpt import objclient
from jaxckpt import storage
from jaxckpt.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from jaxckpt.objclient import NotFound, ObjectClient
from jaxckpt.storage import Location

# Ranged GETs of one large read run in parallel (the reader's pool already
# runs different reads at once; this splits a single large one).
PARALLEL_READ_BYTES = 2 * objclient.PART_BYTES
_read_pool = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="jaxckpt-get")
QUEUED_PARTS = 4  # parts a streamed upload holds waiting for the client (memory: 4 x 16 MiB)


def key_of(loc: Location) -> str:
    """The key prefix of ``loc`` inside its bucket ('' for the bucket itself)."""
    return loc.path.partition("/")[2]


class RangedReads:
    """Reads of one object (``self.client``, ``self.key``) by ranged GETs, a large one split in parallel."""

    client: ObjectClient
    key: str

    def _get(self, buf: memoryview, offset: int, what: str) -> None:
        try:
            got = self.client.read_into(self.key, buf, offset)
        except NotFound:
            raise CheckpointNotFoundError(f"{self.client.describe(self.key)}: deleted or replaced while {what} was "
                                          "being read") from None
        if got < len(buf):
            raise CorruptCheckpointError(f"{self.client.describe(self.key)}: {what}: the object ends at byte "
                                         f"{offset + got}, before {offset + len(buf)}")

    def read_into(self, buf: memoryview, offset: int, what: str) -> None:
        buf = memoryview(buf).cast("B") if memoryview(buf).format != "B" else memoryview(buf)
        n = len(buf)
        if n <= PARALLEL_READ_BYTES:
            self._get(buf, offset, what)
            return
        step = objclient.PART_BYTES
        futures = [_read_pool.submit(self._get, buf[a:a + step], offset + a, what) for a in range(0, n, step)]
        for f in futures:
            f.result()


class ObjectFile(RangedReads, storage.FileSource):
    """A single object, read with ranged GETs."""

    read_ahead = 1 << 20  # a request costs milliseconds: fetch more per walk step than from a disk
    prefetch_bytes = 64 << 20  # and keep several requests in flight (16 of 4 MiB)

    def __init__(self, client: ObjectClient, loc: Location):
        self.client, self.key, self.where = client, key_of(loc), str(loc)
        info = client.head(self.key) if self.key else None
        if info is None:
            client.check_bucket()
            raise CheckpointNotFoundError(f"{loc}: no such object")
        self.size = info.size

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- writing
class _Abort(Exception):
    """Ends a streamed upload's chunks with an error: the object is never completed."""


class Upload:
    """A file object whose bytes, written in order, become one object: parts of
    ``PART_BYTES`` are handed to ``client.put_stream`` on a thread of its own
    while the writer goes on. ``close()`` completes the object (exactly
    ``size`` bytes, else nothing is completed); ``abort()`` drops it."""

    def __init__(self, client: ObjectClient, key: str, size: int, where: str):
        self.size, self.where, self.written = size, where, 0
        self._part, self._queue = bytearray(), queue.Queue(QUEUED_PARTS)
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(client, key), name="jaxckpt-upload", daemon=True)
        self._thread.start()

    def _chunks(self) -> Iterator[memoryview]:
        while (item := self._queue.get()) is not None:
            if isinstance(item, _Abort):
                raise item
            yield item

    def _run(self, client: ObjectClient, key: str) -> None:
        try:
            client.put_stream(key, self._chunks(), self.size)
        except BaseException as e:  # re-raised on the writer's thread
            self._error = e
        finally:
            self._done.set()

    def _hand(self, item: Any) -> None:
        while True:
            if self._done.is_set():  # the upload ended early: nothing takes from the queue any more
                raise self._error or CheckpointError(f"{self.where}: the upload ended before the file was written")
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.written += len(view)
        if self.written > self.size:
            raise CheckpointError(f"{self.where}: the writer wrote more than the {self.size} bytes it announced")
        while len(view):
            take = objclient.PART_BYTES - len(self._part)
            self._part += view[:take]
            view = view[take:]
            if len(self._part) == objclient.PART_BYTES:
                self._hand(memoryview(bytes(self._part)))
                self._part.clear()
        return len(memoryview(data).cast("B"))

    def close(self) -> None:
        if self.written != self.size:
            self.abort()
            raise CheckpointError(f"{self.where}: the writer wrote {self.written} bytes, not the {self.size} it "
                                  "announced; nothing was stored")
        if self._part:
            self._hand(memoryview(bytes(self._part)))
        self._hand(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        if not self._done.is_set():
            try:
                self._hand(_Abort(f"{self.where}: the writer failed"))
            except BaseException:  # the upload had already failed: nothing to stop
                pass
        self._thread.join()


def _staged_chunks(f: BinaryIO, size: int) -> Iterator[memoryview]:
    left = size
    while left:
        chunk = f.read(min(objclient.PART_BYTES, left))
        if not chunk:
            raise CheckpointError("the temporary copy of the file shrank while it was uploaded")
        left -= len(chunk)
        yield memoryview(chunk)


def write(client: ObjectClient, loc: Location, fill: Callable[[BinaryIO], None], size: int | None) -> None:
    """``storage.Backend.write_file`` on a bucket (see the module docstring)."""
    key = key_of(loc)
    if not key or key.endswith("/"):
        raise CheckpointError(f"{loc}: a file needs a name inside the bucket (e.g. {loc.join('model.safetensors')})")
    if size is not None and size > 0:
        up = Upload(client, key, size, str(loc))
        try:
            fill(up)  # type: ignore[arg-type]
        except BaseException:
            up.abort()
            raise
        up.close()
        return
    with tempfile.TemporaryFile(prefix="jaxckpt-upload-") as f:
        try:
            fill(f)
            f.flush()
        except OSError as e:
            raise CheckpointError(f"{loc}: staging the upload in a temporary file in {tempfile.gettempdir()} "
                                  f"failed: {e} (set TMPDIR to a disk with room for the whole file)") from e
        total = f.seek(0, os.SEEK_END)
        f.seek(0)
        if total == 0:
            client.put(key, b"")
        else:
            client.put_stream(key, _staged_chunks(f, total), total)


def list_files(client: ObjectClient, loc: Location) -> list[tuple[str, int]]:
    """``storage.Backend.list_files`` on a bucket."""
    prefix = key_of(loc).rstrip("/")
    start = len(prefix) + 1 if prefix else 0
    return sorted((o.key[start:], o.size) for o in client.list(prefix + "/" if prefix else ""))
