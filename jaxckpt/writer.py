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
* then: finish the data file (durable), write the manifest (durable), commit
  (``storage.Staging.commit``; on POSIX: fsync dir, rename, fsync parent).
  The steps and which process runs each are numbered in ``jaxckpt/storage.py``.

Nothing here touches jax: the snapshot already holds host buffers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, NamedTuple

import msgpack
import numpy as np

from jaxckpt import gcpause
from jaxckpt import format as fmt
from jaxckpt import memory
from jaxckpt import multihost
from jaxckpt import storage
from jaxckpt import tree as tree_mod
from jaxckpt.errors import CheckpointError, CorruptCheckpointError, SaveTimeoutError, UnsupportedValueError
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


class Unit(NamedTuple):
    """A contiguous piece of one shard: bytes ``src`` go to ``offset`` in the file.
    (A tuple: plans of 10,000-leaf trees build one per leaf.)"""
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
        if not li & 31:
            _let_others_run()
        offs = []
        for si, (_, arr) in enumerate(leaf.shards):
            n = arr.nbytes
            pos = _align(pos, memory.ALIGN if n >= _SMALL else 64)
            offs.append(pos)
            if n:
                raw = arr.reshape(-1).view(np.uint8)
                if n <= chunk_bytes:
                    units.append(Unit(pos, raw, li, si, 0))
                else:
                    for ci, a in enumerate(range(0, n, chunk_bytes)):
                        units.append(Unit(pos + a, raw[a:a + chunk_bytes], li, si, ci))
            pos += n
        offsets.append(tuple(offs))
    return Layout(tuple(units), tuple(offsets), pos)


def _let_others_run() -> None:
    """Release the GIL for a moment. Background loops over many small items
    call this every few items: a training loop's next dispatch otherwise
    waits up to the interpreter's 5 ms switch interval for the GIL each time
    (measured: a niced pure-Python thread slowed a 11 ms jitted step by 62%,
    the same thread sleeping 0 s every ~50 us by 9%)."""
    time.sleep(0)


_PYTHON_BOUND_UNIT = 256 << 10


def _parallelism(layout: Layout, workers: int) -> int:
    """How many runs to write in parallel. Small units (many small leaves) are
    bound by Python work under the GIL, which more threads only contend for
    (a 10,000-leaf save took as long with one run as with four), and a
    training loop's dispatch waits behind every one of them."""
    if not layout.units or layout.size < len(layout.units) * _PYTHON_BOUND_UNIT:
        return min(2, workers)  # two: one run's Python work overlaps the other's disk writes
    return workers


def split_runs(units: tuple[Unit, ...], n: int) -> list[tuple[Unit, ...]]:
    """Contiguous runs of nearly equal bytes, cut only where a unit starts on an
    aligned offset (so each run can be written with O_DIRECT independently)."""
    total = sum(u.src.nbytes for u in units)
    target = max(total / max(n, 1), 1)
    runs: list[tuple[Unit, ...]] = []
    start, acc = 0, 0
    for i, u in enumerate(units):
        if acc >= target and len(runs) < n - 1 and u.offset % memory.ALIGN == 0:
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
        return np.frombuffer(memory.aligned_buffer(STAGING_BYTES), dtype=np.uint8)

    def put(self, buf: np.ndarray) -> None:
        with self._lock:
            if len(self._free) < 32:
                self._free.append(buf)


def _write_run(f: storage.DataSink, run: tuple[Unit, ...], sums: list[list[list[int]]],
               staging: StagingPool, abort: _Abort) -> None:
    for i, u in enumerate(run):
        if not i & 15:
            _let_others_run()
        sums[u.leaf][u.shard][u.chunk] = fmt.checksum(u.src)
    if f.direct:
        _write_direct(f, run, staging, abort)
    else:
        _write_buffered(f, run, abort)


def _write_buffered(f: storage.DataSink, run: tuple[Unit, ...], abort: _Abort) -> None:
    zeros = bytes(memory.ALIGN)
    batch: list = []
    batch_start = batch_end = run[0].offset
    for i, u in enumerate(run):
        if not i & 15:
            abort.check()
            _let_others_run()
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


def _direct_ok(src: np.ndarray, offset: int) -> bool:
    """Whether ``src`` can go to ``offset`` with O_DIRECT straight from its own
    memory: page-aligned address and file offset, at least one whole block."""
    return (offset % memory.ALIGN == 0 and src.nbytes >= memory.ALIGN
            and src.ctypes.data % memory.ALIGN == 0)


_ZEROS = memoryview(bytes(memory.ALIGN))


def _write_direct(f: storage.DataSink, run: tuple[Unit, ...], pool: StagingPool, abort: _Abort) -> None:
    buf = pool.get()
    size = buf.nbytes
    mv = memoryview(buf)
    base = run[0].offset  # file offset of buf[0]; aligned by construction (split_runs)
    fill = 0  # bytes of buf holding data (or padding) to write

    def flush(end: int) -> None:
        """Write buf[:end] (``end`` a multiple of the block size) at ``base``, zero-padded after ``fill``."""
        buf[fill:end] = 0
        f.pwrite(mv[:end], base, direct=True)

    try:
        for i, u in enumerate(run):
            if not i & 15:
                abort.check()
                _let_others_run()
            src, offset = u.src, u.offset
            rel = offset - base
            n = src.nbytes
            if n < _SMALL and rel + n <= size and 0 <= rel - fill <= memory.ALIGN:
                # The common case for small leaves, kept to a few memoryview
                # operations: 10,000 leaves of 1-16 KiB spent most of their
                # save time in the general path's numpy slicing below.
                mv[fill:rel] = _ZEROS[:rel - fill]
                mv[rel:rel + n] = memoryview(src)
                fill = rel + n
                continue
            if _direct_ok(src, offset):
                if fill:  # write what is staged, up to this unit's (aligned) start if it is in buf
                    flush(rel if rel <= size else _align(fill, memory.ALIGN))
                    fill = 0
                # page-aligned source memory: no staging copy for the whole blocks
                n -= n % memory.ALIGN
                f.pwrite(memoryview(src[:n]), offset, direct=True)
                base = offset = offset + n
                src = src[n:]
            while src.nbytes:
                rel = offset - base
                if rel >= size:
                    flush(size)
                    base, fill = base + size, 0
                    continue
                n = min(src.nbytes, size - rel)
                buf[fill:rel] = 0
                np.copyto(buf[rel:rel + n], src[:n])
                fill = rel + n
                offset += n
                src = src[n:]
        if fill:
            flush(_align(fill, memory.ALIGN))
    finally:
        pool.put(buf)


@dataclasses.dataclass(frozen=True)
class WriteResult:
    bytes: int  # data bytes this process wrote
    files: int  # files this process wrote


class Job:
    """One save in the background: its abort flag and commit guard.

    The commit and a timeout race; ``begin_commit`` and ``try_abort`` settle it
    under a lock so that a save that timed out can never commit afterwards.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.abort = _Abort()
        self._lock = threading.Lock()
        self._committing = False

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


def _own_shards(snap: Snapshot, layout: Layout, sums: list[list[list[int]]]) -> list[tuple]:
    """This process's shard records: (leaf, box, offset, length, checksums)."""
    # Zero-byte shards are left out: an empty array has no shards, and a
    # checkpoint holding only empty arrays lists no data file to point at.
    with gcpause.paused():
        return [(li, box, layout.shard_offsets[li][si], arr.nbytes, tuple(sums[li][si]))
                for li, leaf in enumerate(snap.leaves) for si, (box, arr) in enumerate(leaf.shards) if arr.nbytes]


def _from_report(shard: list) -> tuple:
    """A shard record received from another process (msgpack lists) as tuples."""
    li, box, offset, length, sums = shard
    return li, tuple(tuple(b) for b in box), offset, length, tuple(sums)


def _manifest(snap: Snapshot, metadata: Any, files: list[fmt.FileRecord], shards: list[tuple[int, list]],
              path: str, full_check: bool = False) -> bytes:
    """Encode the manifest from the snapshot's tree and every process's shard
    records (``(file index, [leaf, box, offset, length, checksums])``).

    Never returns a manifest our own reader would reject: with shards from
    other processes the full decoder checks that they tile every array; else
    the cheaper ``check_writable`` checks the caps on what the user stored.
    """
    with gcpause.paused():  # ~5 objects per leaf, acyclic: see jaxckpt/gcpause.py
        manifest = _build_manifest(snap, metadata, files, shards)
        data = fmt.encode_manifest(manifest)
        try:
            if full_check:
                fmt.decode_manifest(data, f"{path} (manifest being written)")
            else:
                fmt.check_writable(manifest, data, f"{path} (manifest being written)")
        except CorruptCheckpointError as e:
            raise UnsupportedValueError(f"refusing to write a checkpoint that cannot be read back: {e}") from None
        return data


def _build_manifest(snap: Snapshot, metadata: Any, files: list[fmt.FileRecord], shards: list[tuple[int, list]]
                    ) -> fmt.Manifest:
    tree_desc, paths = tree_mod.describe(snap.treedef)
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise UnsupportedValueError(f"leaf {dup!r}: two leaves have the same key path (e.g. keys 1 and '1')")
    per_leaf: list[list[fmt.ShardRecord]] = [[] for _ in snap.leaves]
    for file_index, (li, box, offset, length, sums) in shards:
        per_leaf[li].append(fmt.ShardRecord(box, file_index, offset, length, sums))
    records = []
    for i, (leaf, path, mine) in enumerate(zip(snap.leaves, paths, per_leaf)):
        if not i & 63:
            _let_others_run()
        if leaf.kind == "value":
            records.append(fmt.LeafRecord(path, "value", value=leaf.value))
        else:
            if len(mine) > 1:
                mine.sort(key=lambda r: r.box)
            records.append(fmt.LeafRecord(path, leaf.kind, leaf.dtype, tuple(leaf.shape), tuple(mine), impl=leaf.impl))
    return fmt.Manifest(fmt.FORMAT_VERSION, f"jaxckpt {_version}", time.time(), fmt.CHUNK_BYTES,
                        tuple(files), tree_desc, tuple(records), metadata)


@dataclasses.dataclass
class Context:
    """How one save runs: the I/O pool, its waiting rule, and (multi-process) coordination.

    ``key`` scopes every coordination key of this save; all processes must use
    the same one (the checkpointer derives it from a per-instance save counter).
    """
    pool: ThreadPoolExecutor
    n_workers: int
    staging: StagingPool
    job: Job
    wait: Callable[[list[Future]], None]
    coord: multihost.Coordinator = multihost.LOCAL
    key: str = ""
    deadline: float | None = None


def write_data(snap: Snapshot, staging: storage.Staging, file_name: str, ctx: Context, direct: bool = True
               ) -> tuple[Layout, list[list[list[int]]]]:
    """(every process) Write this process's shards into the data file ``file_name`` of ``staging``."""
    with gcpause.paused():  # a unit and an array view per shard, acyclic: see jaxckpt/gcpause.py
        layout = plan(snap, fmt.CHUNK_BYTES)
        sums = [[[0] * fmt.chunk_count(arr.nbytes, fmt.CHUNK_BYTES) for _, arr in leaf.shards] for leaf in snap.leaves]
    if layout.size == 0:
        return layout, sums
    f = staging.create(file_name, direct=direct)
    futures: list[Future] = []
    try:
        runs = split_runs(layout.units, _parallelism(layout, ctx.n_workers))
        futures = [ctx.pool.submit(_write_run, f, run, sums, ctx.staging, ctx.job.abort) for run in runs]
        ctx.wait(futures)
        ctx.job.abort.check()
        futures.append(ctx.pool.submit(f.finish, layout.size))
        ctx.wait(futures[-1:])
    finally:
        _close_when_done(f, futures)
    return layout, sums


def _close_when_done(f: storage.DataSink, futures: list[Future]) -> None:
    """Close ``f`` once no worker can write through it any more. A save that
    timed out gives up while a worker may still be inside a write: closing
    the descriptors then would let that write land in whatever file reuses
    their numbers next (the next save's data file)."""
    pending = [fut for fut in futures if not fut.done()]
    if not pending:
        f.close()
        return
    lock = threading.Lock()
    left = [len(pending)]

    def one_done(_: Future) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            f.close()

    for fut in pending:
        fut.add_done_callback(one_done)


def _commit(staging: storage.Staging, manifest: bytes, overwrite: bool, ctx: Context) -> None:
    """(primary) Write the manifest durably (on the pool: bounded by the save's
    deadline), then make the checkpoint visible, unless the save timed out."""
    ctx.wait([ctx.pool.submit(staging.write_manifest, manifest)])
    ctx.job.begin_commit()
    staging.commit(overwrite)


_PAUSE_WHOLE_SAVE_LEAVES = 2048


def write_checkpoint(snap: Snapshot, path: str | storage.Location, *, metadata: Any, overwrite: bool,
                     ctx: Context) -> WriteResult:
    """The whole save: data, manifest, commit. Cleans up on failure.

    (all processes) call it with the same ``ctx.key``; see ``_write_multi``.
    """
    loc = storage.Location.parse(path)
    if ctx.coord.process_count > 1:
        return _write_multi(snap, loc, metadata=metadata, overwrite=overwrite, ctx=ctx)
    staging = storage.backend(loc).begin_save(loc)
    try:
        # Trees of many leaves: one pause of the cyclic collector for the whole
        # save (see jaxckpt/gcpause.py). Paused stage by stage, each stage's
        # survivors (a unit per shard, then records and dicts per leaf) were
        # traversed by the collection that the next stage's first allocations
        # set off: 40-130 ms of a 10,000-leaf save. The pause is process-wide,
        # so it is kept to such trees, whose saves are short.
        with gcpause.paused() if len(snap.leaves) >= _PAUSE_WHOLE_SAVE_LEAVES else contextlib.nullcontext():
            name = data_file_name(0)
            layout, sums = write_data(snap, staging, name, ctx)
            files = [fmt.FileRecord(name, layout.size)] if layout.size else []
            manifest = _manifest(snap, metadata, files, [(0, r) for r in _own_shards(snap, layout, sums)], str(loc))
            size = layout.size
            del layout, sums  # a unit per shard: gone before the collector runs again
            _commit(staging, manifest, overwrite, ctx)
            return WriteResult(size, len(files) + 1)
    except BaseException:
        ctx.job.try_abort()  # stop workers still writing into the staging area
        staging.abandon()
        raise


def _write_multi(snap: Snapshot, loc: storage.Location, *, metadata: Any, overwrite: bool,
                 ctx: Context) -> WriteResult:
    """Multi-process save (the steps of ``jaxckpt/storage.py``, over the coordination service).

    1. (primary) begin the save, publish its staging token.
    2. (all) write own shards into ``data-<process>.bin``; publish a report
       (shard records, or the error).
    3. (primary) gather every report (failing fast on an error report, a dead
       process or the deadline), check the files are visible, write the
       manifest, commit; publish the outcome.
    4. (others) wait for the outcome: the save succeeds everywhere or nowhere.
    """
    coord, key, label = ctx.coord, ctx.key, ctx.job.label
    me = coord.process_index
    backend = storage.backend(loc)
    staging = None
    if coord.is_primary:
        staging = backend.begin_save(loc, hashlib.sha256(key.encode()).hexdigest()[:16])
        coord.set(f"{key}/tmp", staging.token.encode())
    else:
        token = coord.get(f"{key}/tmp", ctx.deadline, f"process 0 to start the save of {label}", from_process=0).decode()
    name = data_file_name(me)
    try:
        if staging is None:
            try:
                staging = backend.join_save(loc, token)
            except CheckpointError as e:
                raise CheckpointError(f"{coord.tag()} {e}") from None
        layout, sums = write_data(snap, staging, name, ctx)
        report = {"ok": True, "file": name, "size": layout.size, "shards": _own_shards(snap, layout, sums)}
    except BaseException as e:
        ctx.job.try_abort()
        coord.set(f"{key}/report/{me}", msgpack.packb({"ok": False, "error": f"{type(e).__name__}: {e}"}))
        if coord.is_primary:
            _fail_multi(staging, key, coord, f"process 0 failed: {type(e).__name__}: {e}")
        raise
    coord.set(f"{key}/report/{me}", msgpack.packb(report))
    if not coord.is_primary:
        outcome = msgpack.unpackb(coord.get(f"{key}/outcome", ctx.deadline, f"process 0 to commit {label}",
                                            from_process=0))
        if not outcome["ok"]:
            raise CheckpointError(f"{coord.tag()} save of {label} failed: {outcome['error']}")
        return WriteResult(layout.size, 1 if layout.size else 0)
    try:
        reports = [report] + [
            msgpack.unpackb(coord.get(f"{key}/report/{p}", ctx.deadline, f"process {p} to write its shards of {label}",
                                      from_process=p)) for p in range(1, coord.process_count)]
        files, shards = [], []
        for p, r in enumerate(reports):
            if not r["ok"]:
                raise CheckpointError(f"save of {label} failed on process {p}: {r['error']}")
            if r["size"]:
                staging.check_visible(r["file"], r["size"], p)
                shards.extend((len(files), s if p == 0 else _from_report(s)) for s in r["shards"])
                files.append(fmt.FileRecord(r["file"], r["size"]))
        manifest = _manifest(snap, metadata, files, shards, str(loc), full_check=True)
        _commit(staging, manifest, overwrite, ctx)
    except BaseException as e:
        _fail_multi(staging, key, coord, f"{type(e).__name__}: {e}")
        raise
    coord.set(f"{key}/outcome", msgpack.packb({"ok": True}))
    return WriteResult(sum(f.size for f in files), len(files) + 1)


def _fail_multi(staging: storage.Staging | None, key: str, coord: multihost.Coordinator, why: str) -> None:
    if staging is not None:
        staging.abandon()
    try:
        coord.set(f"{key}/outcome", msgpack.packb({"ok": False, "error": why}))
    except Exception as e:  # the service may be gone too; the others' deadlines still bound their wait
        multihost.logger.error("%s could not publish the failed outcome: %s", coord.tag(), e)


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
