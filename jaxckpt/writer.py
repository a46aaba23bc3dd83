"""Writer: a host snapshot -> a committed checkpoint directory, on a thread pool.

What to write (``plan``) is kept apart from how it is written (``_write_run``):

* ``plan`` lays every unique shard out in ONE data file per process: shards of
  64 KiB or more start on a 4096-byte boundary (O_DIRECT, page-aligned reads),
  smaller ones on 64 bytes. Shards are cut into ``CHUNK_BYTES`` units, each with
  its own checksum, and the units are split into contiguous runs of nearly
  equal size, one per worker, cut only at 4096-aligned offsets (the way torch
  DCP spreads work by size, deterministically).
* each worker hashes its units (xxh3 releases the GIL) and writes its run with
  positioned writes: through a reused page-aligned staging buffer with O_DIRECT
  where the filesystem allows, else with buffered gather writes.
* then: truncate + fsync the data file, write + fsync the manifest, commit
  (``storage.commit``: fsync dir, rename, fsync parent).

Nothing here touches jax: the snapshot already holds host buffers.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable

import numpy as np

from jaxckpt import format as fmt
from jaxckpt import storage
from jaxckpt import tree as tree_mod
from jaxckpt.errors import CheckpointError, SaveTimeoutError
from jaxckpt.snapshot import Snapshot

_SMALL = 64 << 10
STAGING_BYTES = 8 << 20
_version = "unknown"


def set_library_version(v: str) -> None:
    global _version
    _version = v


def data_file_name(process_index: int) -> str:
    return f"data-{process_index:05d}.bin"


def _align(x: int, a: int) -> int:
    return -(-x // a) * a


@dataclasses.dataclass(frozen=True)
class Unit:
    """A contiguous piece of one shard: bytes ``src`` go to ``offset`` in the file."""
    offset: int
    src: np.ndarray  # uint8, contiguous
    leaf: int
    shard: int
    chunk: int


@dataclasses.dataclass(frozen=True)
class Layout:
    units: tuple[Unit, ...]
    shard_offsets: tuple[tuple[int, ...], ...]  # per leaf, per shard
    size: int  # data file size


def plan(snap: Snapshot, chunk_bytes: int) -> Layout:
    units: list[Unit] = []
    offsets: list[tuple[int, ...]] = []
    pos = 0
    for li, leaf in enumerate(snap.leaves):
        offs = []
        for si, (_, arr) in enumerate(leaf.shards):
            n = arr.nbytes
            pos = _align(pos, storage.ALIGN if n >= _SMALL else 64)
            offs.append(pos)
            if n:
                raw = arr.reshape(-1).view(np.uint8)
                for ci, a in enumerate(range(0, n, chunk_bytes)):
                    units.append(Unit(pos + a, raw[a:a + chunk_bytes], li, si, ci))
            pos += n
        offsets.append(tuple(offs))
    return Layout(tuple(units), tuple(offsets), pos)


def split_runs(units: tuple[Unit, ...], n: int) -> list[tuple[Unit, ...]]:
    """Contiguous runs of nearly equal bytes, cut only where a unit starts on an
    aligned offset (so each run can be written with O_DIRECT independently)."""
    total = sum(u.src.nbytes for u in units)
    target = max(total / max(n, 1), 1)
    runs: list[tuple[Unit, ...]] = []
    start, acc = 0, 0
    for i, u in enumerate(units):
        if acc >= target and len(runs) < n - 1 and u.offset % storage.ALIGN == 0:
            runs.append(units[start:i])
            start, acc = i, 0
        acc += u.src.nbytes
    if start < len(units):
        runs.append(units[start:])
    return runs


class Cancelled(CheckpointError):
    """Raised inside workers of a save that was abandoned (timeout or failure)."""


class _Abort:
    def __init__(self) -> None:
        self.flag = False

    def check(self) -> None:
        if self.flag:
            raise Cancelled("save abandoned")


class StagingPool:
    """Page-aligned staging buffers, reused between saves (fresh pages cost a
    page fault each: reuse makes the copy run at memcpy speed)."""

    def __init__(self) -> None:
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def get(self) -> np.ndarray:
        with self._lock:
            if self._free:
                return self._free.pop()
        return np.frombuffer(storage.aligned_buffer(STAGING_BYTES), dtype=np.uint8)

    def put(self, buf: np.ndarray) -> None:
        with self._lock:
            if len(self._free) < 32:
                self._free.append(buf)


def _write_run(f: storage.DataFile, run: tuple[Unit, ...], sums: list[list[list[int]]],
               staging: StagingPool, abort: _Abort) -> None:
    for u in run:
        sums[u.leaf][u.shard][u.chunk] = fmt.checksum(u.src)
    if f.direct:
        _write_direct(f, run, staging, abort)
    else:
        _write_buffered(f, run, abort)


def _write_buffered(f: storage.DataFile, run: tuple[Unit, ...], abort: _Abort) -> None:
    zeros = bytes(storage.ALIGN)
    batch: list = []
    batch_start = batch_end = run[0].offset
    for u in run:
        abort.check()
        gap = u.offset - batch_end
        if batch and (gap > len(zeros) or batch_end - batch_start >= (64 << 20)):
            f.pwritev(batch, batch_start)
            batch, batch_start = [], u.offset
        elif gap:
            batch.append(memoryview(zeros)[:gap])
        batch.append(u.src)
        batch_end = u.offset + u.src.nbytes
    if batch:
        f.pwritev(batch, batch_start)


def _write_direct(f: storage.DataFile, run: tuple[Unit, ...], pool: StagingPool, abort: _Abort) -> None:
    buf = pool.get()
    size = buf.nbytes
    base = run[0].offset  # aligned by construction (split_runs)
    fill = 0
    try:
        for u in run:
            abort.check()
            src, offset = u.src, u.offset
            while src.nbytes:
                rel = offset - base
                if rel >= size:
                    buf[fill:] = 0
                    f.pwrite(memoryview(buf), base, direct=True)
                    base, fill = base + size, 0
                    continue
                n = min(src.nbytes, size - rel)
                if rel > fill:
                    buf[fill:rel] = 0
                np.copyto(buf[rel:rel + n], src[:n])
                fill = rel + n
                offset += n
                src = src[n:]
        if fill:
            end = _align(fill, storage.ALIGN)
            buf[fill:end] = 0
            f.pwrite(memoryview(buf)[:end], base, direct=True)
    finally:
        pool.put(buf)


@dataclasses.dataclass(frozen=True)
class WriteResult:
    bytes: int
    files: int


class Job:
    """One save in the background: its abort flag and commit guard.

    The commit and a timeout race; ``try_commit`` and ``try_abort`` settle it
    under a lock so that a save that timed out can never commit afterwards.
    """

    def __init__(self, path: str, label: str) -> None:
        self.path = path
        self.label = label
        self.abort = _Abort()
        self._lock = threading.Lock()
        self._committing = False
        self.tmp: str | None = None

    def try_abort(self) -> bool:
        with self._lock:
            if self._committing:
                return False
            self.abort.flag = True
            return True

    def begin_commit(self) -> None:
        with self._lock:
            self.abort.check()
            self._committing = True


def _leaf_records(snap: Snapshot, paths: list[str], layout: Layout, sums: list[list[list[int]]],
                  file_index: int) -> list[fmt.LeafRecord]:
    records = []
    for li, (leaf, path) in enumerate(zip(snap.leaves, paths)):
        if leaf.kind == "value":
            records.append(fmt.LeafRecord(path, "value", value=leaf.value))
            continue
        shards = tuple(
            fmt.ShardRecord(box, file_index, layout.shard_offsets[li][si], arr.nbytes, tuple(sums[li][si]))
            for si, (box, arr) in enumerate(leaf.shards))
        records.append(fmt.LeafRecord(path, leaf.kind, leaf.dtype, tuple(leaf.shape), shards, impl=leaf.impl))
    return records


def write_data(snap: Snapshot, tmp: str, file_name: str, pool: ThreadPoolExecutor, n_workers: int,
               staging: StagingPool, job: Job, wait: Callable[[list[Future]], None], direct: bool = True
               ) -> tuple[Layout, list[list[list[int]]]]:
    """(every process) Write this process's shards into ``tmp/file_name``."""
    layout = plan(snap, fmt.CHUNK_BYTES)
    sums = [[[0] * fmt.chunk_count(arr.nbytes, fmt.CHUNK_BYTES) for _, arr in leaf.shards] for leaf in snap.leaves]
    if not layout.units and layout.size == 0:
        return layout, sums
    f = storage.DataFile(tmp, file_name, direct=direct)
    try:
        runs = split_runs(layout.units, n_workers) if layout.units else []
        wait([pool.submit(_write_run, f, run, sums, staging, job.abort) for run in runs])
        job.abort.check()
        wait([pool.submit(f.finish, layout.size)])
    finally:
        f.close()
    return layout, sums


def write_checkpoint(snap: Snapshot, path: str, *, metadata: Any, overwrite: bool, pool: ThreadPoolExecutor,
                     n_workers: int, staging: StagingPool, job: Job,
                     wait: Callable[[list[Future]], None]) -> WriteResult:
    """(single process) The whole save: data, manifest, commit. Cleans up on failure."""
    tmp = storage.make_temp_dir(path)
    job.tmp = tmp
    try:
        file_name = data_file_name(0)
        layout, sums = write_data(snap, tmp, file_name, pool, n_workers, staging, job, wait)
        tree_desc, paths = tree_mod.describe(snap.treedef)
        files = (fmt.FileRecord(file_name, layout.size),) if layout.size else ()
        manifest = fmt.Manifest(fmt.FORMAT_VERSION, f"jaxckpt {_version}", time.time(), fmt.CHUNK_BYTES, files,
                                tree_desc, tuple(_leaf_records(snap, paths, layout, sums, 0)), metadata)
        data = fmt.encode_manifest(manifest)
        wait([pool.submit(storage.write_file, tmp, fmt.MANIFEST_NAME, data)])
        os.unlink(os.path.join(tmp, storage.OWNER_FILE))  # the manifest now marks it as ours
        job.begin_commit()
        storage.commit(tmp, path, overwrite)
        return WriteResult(layout.size, len(files) + 1)
    except BaseException:
        job.try_abort()  # stop workers still writing into tmp
        storage.remove_tree(tmp)
        raise


def waiter(deadline: float | None, label: str) -> Callable[[list[Future]], None]:
    """Wait for futures, raising the first worker error, or SaveTimeoutError at the deadline."""
    def wait(futures: list[Future]) -> None:
        for fut in futures:
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
            try:
                fut.result(timeout=timeout)
            except FutureTimeout:
                raise SaveTimeoutError(f"save of {label} did not finish within the timeout") from None
            except BaseException:
                for other in futures:
                    other.cancel()
                raise
    return wait
