"""Writer: a host snapshot -> a committed checkpoint, on a thread pool.

1. (every process) ``write_data``: lay out this process's shards in one data
   file (or several, where the storage asks for files of a target size) and
   write it in parallel runs (``jaxckpt/layout.py``: what goes where,
   how a run is written), then finish it (durable).
2. (process 0) build the manifest from every process's shard records, refuse
   one our own reader would reject (one process: as soon as every checksum
   is known, while the data is still being uploaded or fsynced), write it
   (durable) once the data is.
3. (process 0) commit (``storage.Staging.commit``; on POSIX: fsync dir,
   rename, fsync parent), unless the save timed out meanwhile (``Job``).

The storage steps and which process and thread runs each are numbered in
``jaxckpt/storage.py``. Nothing here touches jax: the snapshot already holds
host buffers.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import threading
import time
from concurrent.futures import CancelledError, Future, InvalidStateError, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Iterator

import msgpack

from jaxckpt import crypto
from jaxckpt import gcpause
from jaxckpt import format as fmt
from jaxckpt import layout as layout_mod
from jaxckpt import manifests
from jaxckpt import multihost
from jaxckpt import storage
from jaxckpt.errors import CheckpointError, CheckpointExistsError, SaveTimeoutError
from jaxckpt.snapshot import Snapshot

@dataclasses.dataclass(frozen=True)
class WriteResult:
    bytes: int  # data bytes this process wrote
    files: int  # files this process wrote
    # (the metadata the manifest holds,) where this process has it: its own
    # (one process, process 0), or process 0's sent with the outcome (when it
    # packs into OUTCOME_METADATA_BYTES); else None
    metadata: tuple[Any] | None = None


OUTCOME_METADATA_BYTES = 64 << 10


class Job:
    """One save in the background: its abort flag and commit guard.

    The commit and a timeout race; ``begin_commit`` and ``try_abort`` settle it
    under a lock so that a save that timed out can never commit afterwards.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.abort = layout_mod.Abort()
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


@dataclasses.dataclass
class Context:
    """How one save runs: the I/O pool, its waiting rule, and (multi-process) coordination.

    ``key`` scopes every coordination key of this save; all processes must use
    the same one (the checkpointer derives it from a per-instance save counter).
    """
    pool: ThreadPoolExecutor
    n_workers: int
    staging: layout_mod.StagingPool
    job: Job
    wait: Callable[[list[Future]], None]
    coord: multihost.Coordinator = multihost.LOCAL
    key: str = ""
    deadline: float | None = None
    per_process: tuple[str, Any] | None = None  # (key, this process's value): see ``manifests.with_per_process``
    encryption_key: bytes | None = None  # encrypt data and manifest (jaxckpt/crypto.py)
    modes: storage.Modes = storage.Modes()  # permission bits of what the save creates


@dataclasses.dataclass
class DataFile:
    """One data file this process wrote: its name in the staging area, its
    layout and, when encrypting, its (salt, tags)."""
    name: str
    layout: layout_mod.Layout
    sealed: tuple[bytes, bytes] | None = None


def write_data(snap: Snapshot, staging: storage.Staging, process: int, ctx: Context, direct: bool = True,
               meanwhile: Callable[[list[DataFile], list[list[list[int]]]], Any] | None = None
               ) -> tuple[list[DataFile], list[list[list[int]]], Any]:
    """(every process) Write this process's shards into its data files: one, or
    several of about ``staging.file_bytes`` each (written at once, on the
    pool). Returns the files that hold bytes, the checksums, and what
    ``meanwhile(files, checksums)`` returned: it runs on this thread as soon as
    every checksum is known, while the bytes may still be on their way (an
    upload in flight, a file's fsync)."""
    with gcpause.paused():  # a unit and an array view per shard, acyclic: see jaxckpt/gcpause.py
        layouts = [layout_mod.plan(snap, fmt.CHUNK_BYTES, group)
                   for group in layout_mod.file_groups(snap, staging.file_bytes)]
        sums = [[[0] * fmt.chunk_count(arr.nbytes, fmt.CHUNK_BYTES) for _, arr in leaf.shards] for leaf in snap.leaves]
    files = [DataFile(staging.data_name(layout_mod.data_file_name(process, k)), lay)
             for k, lay in enumerate([lay for lay in layouts if lay.size])]
    seals = [None if ctx.encryption_key is None else layout_mod.Sealing(
        crypto.FileCipher(ctx.encryption_key, f.name), [b""] * len(f.layout.units)) for f in files]
    sinks: list[storage.DataSink] = []
    futures: list[list[Future]] = []  # per file: its writes, then its finish
    hashed: list[Future] = []  # done once the file's checksums are all known
    try:
        for f, seal in zip(files, seals):
            sinks.append(staging.create(f.name, direct=direct))
            futures.append([])
            writes, done_hashing = _start_writes(sinks[-1], f.layout, sums, ctx, seal)
            futures[-1].extend(writes)
            hashed.extend(done_hashing)
        ctx.wait(hashed)
        finishes = _finish_written(sinks, files, futures, [None] * len(files), ctx)
        result = None if meanwhile is None else _meanwhile(meanwhile, files, sums, futures, ctx)
        ctx.wait([fut for per_file in futures for fut in per_file])
        ctx.wait(_finish_written(sinks, files, futures, finishes, ctx))
    finally:
        for sink, per_file in zip(sinks, futures):
            _close_when_done(sink, per_file)
    for f, seal in zip(files, seals):
        if seal is not None:
            f.sealed = (seal.cipher.salt, b"".join(seal.tags))
    return files, sums, result


def _finish_written(sinks: list[storage.DataSink], files: list[DataFile], futures: list[list[Future]],
                    finishes: list[Future | None], ctx: Context) -> list[Future | None]:
    """Start ``finish`` (durable) of each file whose writes have all succeeded
    and that is not finishing yet (its future joins the file's list)."""
    for i, (sink, f, per_file) in enumerate(zip(sinks, files, futures)):
        if finishes[i] is None and all(w.done() and not w.cancelled() and w.exception() is None for w in per_file):
            ctx.job.abort.check()
            finishes[i] = ctx.pool.submit(sink.finish, f.layout.size)
            per_file.append(finishes[i])
    return finishes


def _meanwhile(fn: Callable, files: list[DataFile], sums: list, futures: list[list[Future]], ctx: Context) -> Any:
    """``fn(files, sums)``; if it fails, the writes in flight are stopped and
    waited for (until the deadline) first, so that the caller's cleanup finds
    every object they create."""
    try:
        return fn(files, sums)
    except BaseException:
        ctx.job.try_abort()
        timeout = None if ctx.deadline is None else max(ctx.deadline - time.monotonic(), 0)
        concurrent.futures.wait([fut for per_file in futures for fut in per_file], timeout=timeout)
        raise


# An encrypted object's ciphertext is held until its upload is sent (a whole
# object where the store sends each in one request, GCS): at most this many
# such streams at once, in the whole process (~4 x 32 MiB).
_SEALED_STREAMS = threading.BoundedSemaphore(4)


def _sealed_stream(f: storage.DataSink, chunks, size: int) -> None:
    with _SEALED_STREAMS:
        f.write_stream(chunks, size)


def _start_writes(f: storage.DataSink, layout: layout_mod.Layout, sums: list[list[list[int]]], ctx: Context,
                  seal: layout_mod.Sealing | None) -> tuple[list[Future], list[Future]]:
    """Submit the writes of one data file: one stream (objects), or parallel
    runs (files). Returns their futures, and futures done once every
    checksum of the file is known (a stream's: as soon as it is read to the
    end, maybe well before its upload is)."""
    abort = ctx.job.abort
    if f.sequential:  # an object: one streamed upload (the client runs its parts in parallel)
        hashed: Future = Future()
        if seal is None:
            chunks = _signal_end(layout_mod.stream_units(layout, sums, abort), hashed)
            upload = ctx.pool.submit(f.write_stream, chunks, layout.size)
        else:
            chunks = _signal_end(layout_mod.stream_sealed(layout, sums, abort, seal), hashed)
            upload = ctx.pool.submit(_sealed_stream, f, chunks, layout.size)
        upload.add_done_callback(lambda fut: _settle(hashed, fut))
        return [upload], [hashed]
    runs = layout_mod.split_runs(layout.units, layout_mod.parallelism(layout, ctx.n_workers))
    if seal is None:
        writes = [ctx.pool.submit(layout_mod.write_run, f, run, sums, ctx.staging, abort) for run in runs]
        return writes, writes
    firsts = [sum(len(r) for r in runs[:i]) for i in range(len(runs))]
    writes = [ctx.pool.submit(layout_mod.write_sealed, f, run, first, sums, ctx.staging, abort, seal)
              for run, first in zip(runs, firsts)]
    return writes, writes


def _signal_end(chunks: Iterator, hashed: Future) -> Iterator:
    """``chunks``, then ``hashed`` done: every checksum was computed on the way."""
    yield from chunks
    _settle(hashed, None)


def _settle(hashed: Future, upload: Future | None) -> None:
    """Settle ``hashed`` (once): done, or failed as ``upload`` failed (a stream's
    upload may end without reading it to the end, or fail before)."""
    try:
        if upload is None or (not upload.cancelled() and upload.exception() is None):
            hashed.set_result(None)
        else:
            hashed.set_exception(CancelledError() if upload.cancelled() else upload.exception())
    except InvalidStateError:  # settled already (or cancelled by a waiter)
        pass


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


def _commit(staging: storage.Staging, manifest: bytes, overwrite: bool, ctx: Context,
            sealed: list[tuple[bytes, bytes]] | None = None) -> None:
    """(primary) Write the manifest durably (on the pool: bounded by the save's
    deadline; sealed with each file's salt and tags when encrypting), then make
    the checkpoint visible, unless the save timed out."""
    if ctx.encryption_key is not None:
        manifest = crypto.seal_manifest(ctx.encryption_key, manifest, sealed or [])
    ctx.wait([ctx.pool.submit(staging.write_manifest, manifest)])
    ctx.job.begin_commit()
    staging.commit(overwrite)


_PAUSE_WHOLE_SAVE_LEAVES = 2048


def refuse_existing(loc: storage.Location) -> None:
    """``CheckpointExistsError`` if a checkpoint (or anything but a save in flight) is at ``loc``."""
    b = storage.backend(loc)
    if b.exists(loc):
        raise CheckpointExistsError.at(loc) if b.is_committed(loc) else CheckpointExistsError.foreign(loc)


def write_checkpoint(snap: Snapshot, path: str | storage.Location, *, metadata: Any, overwrite: bool,
                     ctx: Context, check_absent: bool = False) -> WriteResult:
    """The whole save: data, manifest, commit. Cleans up on failure.
    ``check_absent``: refuse an existing checkpoint as the save begins
    (process 0 alone, for every process; ``begin_save(..., absent=True)``),
    where the caller left that to the save thread (object stores).

    (all processes) call it with the same ``ctx.key``; see ``_write_multi``.
    """
    loc = storage.Location.parse(path)
    if ctx.coord.process_count > 1:
        return _write_multi(snap, loc, metadata=metadata, overwrite=overwrite, ctx=ctx, check_absent=check_absent)
    staging = storage.backend(loc).begin_save(loc, None, ctx.modes, absent=check_absent)
    try:
        # Trees of many leaves: one pause of the cyclic collector for the whole
        # save (see jaxckpt/gcpause.py). Paused stage by stage, each stage's
        # survivors (a unit per shard, then records and dicts per leaf) were
        # traversed by the collection that the next stage's first allocations
        # set off: 40-130 ms of a 10,000-leaf save. The pause is process-wide,
        # so it is kept to such trees, whose saves are short.
        with gcpause.paused() if len(snap.leaves) >= _PAUSE_WHOLE_SAVE_LEAVES else contextlib.nullcontext():
            metadata = manifests.with_per_process(metadata, ctx.per_process, [ctx.per_process and ctx.per_process[1]])

            def describe(written: list[DataFile], sums: list) -> tuple[list[fmt.FileRecord], bytes]:
                # While the uploads are still in flight (or the files' fsyncs run).
                files = [fmt.FileRecord(f.name, f.layout.size) for f in written]
                return files, manifests.encode(snap, metadata, files, manifests.shard_records(snap, [f.layout for f in written], sums), str(loc))

            written, sums, (files, manifest) = write_data(snap, staging, 0, ctx, meanwhile=describe)
            size = sum(f.size for f in files)
            sealed = [f.sealed for f in written if f.sealed is not None]
            del written, sums  # a unit per shard: gone before the collector runs again
            _commit(staging, manifest, overwrite, ctx, sealed)
            return WriteResult(size, len(files) + 1, (metadata,))
    except BaseException:
        ctx.job.try_abort()  # stop workers still writing into the staging area
        staging.abandon()
        raise


def _write_multi(snap: Snapshot, loc: storage.Location, *, metadata: Any, overwrite: bool,
                 ctx: Context, check_absent: bool) -> WriteResult:
    """Multi-process save (the steps of ``jaxckpt/storage.py``, over the coordination service).

    1. (primary) begin the save, publish its staging token.
    2. (all) write own shards into ``data-<process>.bin`` (and, where the
       storage splits, ``data-<process>-<part>.bin``); publish a report
       (shard records, or the error).
    3. (primary) gather every report (failing fast on an error report, a dead
       process or the deadline), check the files are visible, write the
       manifest, commit; publish the outcome.
    4. (others) wait for the outcome: the save succeeds everywhere or nowhere.
    """
    coord, key, label = ctx.coord, ctx.key, ctx.job.label
    staging = _begin_multi(loc, ctx, check_absent)
    try:
        if staging is None:
            staging = _join_multi(loc, ctx)
        written, sums, _ = write_data(snap, staging, coord.process_index, ctx)
        report = {"ok": True, "files": [[f.name, f.layout.size] for f in written],
                  "value": ctx.per_process and ctx.per_process[1],
                  "sealed": [list(f.sealed) for f in written] if ctx.encryption_key is not None else None,
                  "shards": manifests.shard_records(snap, [f.layout for f in written], sums)}
    except BaseException as e:
        ctx.job.try_abort()
        coord.set(f"{key}/report/{coord.process_index}",
                  msgpack.packb({"ok": False, "error": f"{type(e).__name__}: {e}"}))
        if coord.is_primary:
            _fail_multi(staging, key, coord, f"process 0 failed: {type(e).__name__}: {e}")
        raise
    coord.set(f"{key}/report/{coord.process_index}", msgpack.packb(report))
    if not coord.is_primary:
        outcome = msgpack.unpackb(coord.get(f"{key}/outcome", ctx.deadline, f"process 0 to commit {label}",
                                            from_process=0))
        if not outcome["ok"]:
            raise CheckpointError(f"{coord.tag()} save of {label} failed: {outcome['error']}")
        committed = outcome.get("metadata")
        return WriteResult(sum(size for _, size in report["files"]), len(report["files"]),
                           None if committed is None else (msgpack.unpackb(committed, raw=False,
                                                                           strict_map_key=False),))
    try:
        written = _commit_multi(snap, staging, report, metadata, overwrite, loc, ctx)
    except BaseException as e:
        _fail_multi(staging, key, coord, f"{type(e).__name__}: {e}")
        raise
    coord.set(f"{key}/outcome", msgpack.packb({"ok": True, "metadata": _outcome_metadata(written.metadata[0])}))
    return written


def _outcome_metadata(metadata: Any) -> bytes | None:
    """The committed metadata for the outcome message, packed, if it packs into
    ``OUTCOME_METADATA_BYTES`` (else None: the others read the manifest if they need it)."""
    try:
        packed = msgpack.packb(metadata, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):  # packed once already, into the manifest
        return None
    return packed if len(packed) <= OUTCOME_METADATA_BYTES else None


def _begin_multi(loc: storage.Location, ctx: Context, check_absent: bool) -> storage.Staging | None:
    """(primary) Begin the save under a name derived from its key and publish the token
    (or ``!`` and why the save cannot begin); None elsewhere."""
    if not ctx.coord.is_primary:
        return None
    try:
        staging = storage.backend(loc).begin_save(loc, hashlib.sha256(ctx.key.encode()).hexdigest()[:16], ctx.modes,
                                                  absent=check_absent)
    except CheckpointExistsError as e:
        ctx.coord.set(f"{ctx.key}/tmp", b"!" + str(e).encode())
        raise
    ctx.coord.set(f"{ctx.key}/tmp", staging.token.encode())
    return staging


def _join_multi(loc: storage.Location, ctx: Context) -> storage.Staging:
    """(others) Join the save process 0 began."""
    coord = ctx.coord
    token = coord.get(f"{ctx.key}/tmp", ctx.deadline, f"process 0 to start the save of {ctx.job.label}",
                      from_process=0).decode()
    if token.startswith("!"):
        raise CheckpointExistsError(f"{coord.tag()} save of {ctx.job.label} refused by process 0: {token[1:]}")
    try:
        return storage.backend(loc).join_save(loc, token, ctx.modes)
    except CheckpointError as e:
        raise CheckpointError(f"{coord.tag()} {e}") from None


def _commit_multi(snap: Snapshot, staging: storage.Staging, report: dict, metadata: Any, overwrite: bool,
                  loc: storage.Location, ctx: Context) -> WriteResult:
    """(primary) Gather every process's report, check its data is there, write the manifest, commit."""
    coord, key, label = ctx.coord, ctx.key, ctx.job.label
    reports = [report] + [
        msgpack.unpackb(coord.get(f"{key}/report/{p}", ctx.deadline, f"process {p} to write its shards of {label}",
                                  from_process=p)) for p in range(1, coord.process_count)]
    for p, r in enumerate(reports):
        if not r["ok"]:
            raise CheckpointError(f"save of {label} failed on process {p}: {r['error']}")
    # One request per file on an object store (a HEAD): all at once, on the pool.
    ctx.wait([ctx.pool.submit(staging.check_visible, name, size, p)
              for p, r in enumerate(reports) for name, size in r["files"]])
    files, shards, sealed = [], [], []
    for p, r in enumerate(reports):
        first = len(files)
        shards.extend((first + fi, s if p == 0 else manifests.from_report(s)) for fi, s in r["shards"])
        files.extend(fmt.FileRecord(name, size) for name, size in r["files"])
        if ctx.encryption_key is not None:
            sealed.extend(tuple(x) for x in r["sealed"])
    metadata = manifests.with_per_process(metadata, ctx.per_process, [r.get("value") for r in reports])
    manifest = manifests.encode(snap, metadata, files, shards, str(loc), full_check=True)
    _commit(staging, manifest, overwrite, ctx, sealed)
    return WriteResult(sum(f.size for f in files), len(files) + 1, (metadata,))


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
