"""AsyncCheckpointer: block for the snapshot only, persist in the background.

Call order: ``save()`` (training thread: validate, backpressure, snapshot,
CPU copies as ``hostcopy.CpuCopies`` decides) -> returns a ``SaveHandle`` -> a
coordinator thread runs ``writer.write_checkpoint`` (hash, write, fsync,
commit) on the I/O pool, then hands the save back to the copy policy
(``CpuCopies.committed``, ``prepare``). A background failure is logged
at once and raised exactly once: by ``SaveHandle.result()`` if the caller asks
that handle, otherwise by the next ``save()``, ``wait_until_finished()`` or
``close()`` (orbax's ``check_for_errors`` discipline).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from jaxckpt import config
from jaxckpt import crypto
from jaxckpt import format as fmt
from jaxckpt import hostcopy
from jaxckpt import layout
from jaxckpt import multihost
from jaxckpt import snapshot as snapshot_mod
from jaxckpt import storage
from jaxckpt import writer
from jaxckpt.errors import CheckpointError, UnsupportedValueError

logger = logging.getLogger("jaxckpt")

# Coordination keys must be equal on every process: SPMD programs create
# checkpointers and call the synchronous save in the same order everywhere.
_instances = itertools.count()
_sync_saves = itertools.count()


# The lowest priority: under CFS a nice-19 thread weighs 15 against a nice-0
# thread's 1024 (nice 10: 110), so a training loop that keeps every core busy
# loses ~1.5% of a core per runnable save thread instead of ~10%. Measured with
# a jitted 1024x1024 matmul loop on 2 cores during a W1 save
# (benchmarks.worker's concurrent phase, 5 runs each): slowdown median +8.5%
# at nice 19 vs +19% at nice 10; the save itself took ~1.4x longer under that
# load and the same time on an idle machine.
BACKGROUND_NICE = 19


def _background_priority() -> None:
    """Lower this thread's CPU priority (Linux: per-thread nice). A background
    save then takes CPU the training loop leaves idle instead of competing with
    its compute threads; the writes themselves are disk-bound."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass


def close_after(close, exc_type: type | None) -> None:
    """``close()`` at the end of a ``with`` block: its error is raised if the
    block succeeded; if the block raised, the block's exception wins and ours
    is logged."""
    if exc_type is None:
        close()
        return
    try:
        close()
    except Exception as err:
        logger.error("background save error while handling %s: %s", exc_type.__name__, err)


@dataclasses.dataclass(frozen=True)
class SaveStats:
    """What one save cost. ``blocking_s``: time until ``save()`` returned (the
    training loop's pause); ``total_s``: until the checkpoint was committed."""
    blocking_s: float
    total_s: float
    bytes: int
    files: int
    throughput_gbps: float


class SaveHandle:
    """The future of one background save."""

    def __init__(self, path: str, label: str):
        self.path = path
        self.label = label
        self._future: Future = Future()
        self._stats: SaveStats | None = None
        self._committed: tuple[Any] | None = None
        self._reported = False
        self._started = self._given_up = False
        self._lock = threading.Lock()

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the save to end (committed or failed) without raising its
        error (that stays for ``result()`` or the checkpointer to raise, once);
        returns ``done()``."""
        try:
            self._future.exception(timeout)
        except TimeoutError:
            pass
        return self.done()

    def result(self, timeout: float | None = None) -> None:
        """Wait for the save; return None once committed, or raise its error."""
        exc = self._future.exception(timeout)  # raises TimeoutError if not done in time
        if exc is not None:
            with self._lock:
                self._reported = True
            raise exc

    @property
    def stats(self) -> SaveStats | None:
        """The save's figures once it committed; None before (or after a failure)."""
        return self._stats

    @property
    def committed_metadata(self) -> tuple[Any] | None:
        """``(metadata,)``: what the manifest holds as metadata (in a
        multi-process job, process 0's), once committed; None before, after a
        failure, or on another process where process 0's did not fit in the
        commit's message (``writer.OUTCOME_METADATA_BYTES``)."""
        return self._committed

    def _start(self) -> bool:
        """(save thread) Claim the save; False if ``save()`` gave it up first."""
        with self._lock:
            self._started = not self._given_up
            return self._started

    def _give_up(self, why: BaseException) -> None:
        """``save()`` was interrupted (a KeyboardInterrupt) as it queued the job: unless the save thread
        has claimed it, it never runs, and the handle ends now (else waits on it would never end). The
        error is not raised again: the interrupt was."""
        with self._lock:
            if self._started:
                return
            self._given_up = self._reported = True
        self._future.set_exception(CheckpointError(f"{self.label}: the save was interrupted ({type(why).__name__}) "
                                                   "before it began; nothing was written"))

    def _take_error(self) -> BaseException | None:
        """The error, the first time it is asked for (each error is raised once)."""
        with self._lock:
            if self._reported or not self._future.done():
                return None
            exc = self._future.exception()
            if exc is not None:
                self._reported = True
            return exc

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("failed" if self._future.exception() else "committed")
        return f"SaveHandle({self.path!r}, {state})"


def validate_request(path: str | os.PathLike | storage.Location, metadata: Any, overwrite: bool,
                     metadata_checked: bool = False, storage_options: dict | None = None) -> storage.Location:
    """Checks done on the calling thread so that mistakes raise where they are made
    (else only the background write would fail). Returns the location.
    ``metadata_checked``: the caller checked ``metadata`` already (see ``AsyncCheckpointer.save``).
    Whether a checkpoint is there already is checked here on a local disk (a
    stat), and left to the save thread on an object store, where it is a round
    trip the training loop must not wait for (see ``_check_absent``)."""
    loc = storage.Location.parse(path, storage_options)  # refuses a NUL in the path, among others
    if not metadata_checked:
        try:
            fmt.check_metadata(metadata)
        except TypeError as e:
            raise UnsupportedValueError(f"{loc}: {e}") from None
    if not overwrite and loc.is_local:
        writer.refuse_existing(loc)
    return loc


def _check_absent(loc: storage.Location, overwrite: bool) -> bool:
    """Whether the writer must check that nothing is at ``loc`` (``validate_request`` did not)."""
    return not overwrite and not loc.is_local


def _check_per_process(loc: storage.Location, metadata: Any, per_process: Any) -> None:
    if not (isinstance(per_process, tuple) and len(per_process) == 2 and isinstance(per_process[0], str)):
        raise TypeError(f"per_process must be a (key, value) tuple, got {per_process!r:.80}")
    if metadata is not None and not isinstance(metadata, dict):
        raise UnsupportedValueError(f"{loc}: per_process needs dict metadata, found {type(metadata).__name__}")
    try:
        fmt.check_metadata(per_process[1])
    except TypeError as e:
        raise UnsupportedValueError(f"{loc}: per_process value {per_process[0]!r}: {e}") from None


@dataclasses.dataclass(frozen=True)
class _Save:
    """One background save, as ``save()`` hands it to the save thread."""
    handle: SaveHandle  # its path and label, and where its outcome goes
    copied: hostcopy.Copied  # the snapshot to write and what the copy policy gets back
    metadata: Any
    overwrite: bool
    t0: float  # perf_counter() when save() was called
    blocking: float  # seconds save() blocked the caller
    on_commit: Callable[[SaveHandle], None] | None
    key: str  # coordination key, equal on every process
    timeout: float | None
    location: storage.Location
    per_process: tuple[str, Any] | None = None
    encryption_key: bytes | None = None


class AsyncCheckpointer:
    """Saves pytrees in the background; see the module docstring for the contract.

    ``max_workers``: I/O threads (default: 4..16 by core count).
    ``max_in_flight``: saves allowed to run at once; ``save()`` beyond it waits
    for the oldest to finish (host memory stays bounded by that many snapshots).
    ``timeout``: seconds after which a background save is abandoned with
    ``SaveTimeoutError`` (nothing is committed).
    ``storage_options``: for ``s3://`` / ``gs://`` / ``az://`` paths, passed to the
    object-store client (see the README, "Checkpointing to S3 and GCS").
    ``encryption_key``: 16, 24 or 32 bytes, or a zero-argument callable
    returning them (asked at each save): every save is encrypted (AES-GCM;
    ``jaxckpt/crypto.py``, docs/FORMAT.md §12).
    ``file_mode`` / ``dir_mode``: permission bits of the files and directories
    saves create (e.g. ``0o640`` / ``0o750``; default: the process umask).
    ``copy_cpu_arrays``: on the CPU backend, whether to copy jax arrays at
    snapshot time instead of holding zero-copy views until the write ends.
    Views cost no blocking time and no memory, but a training step that
    donates its state cannot reuse viewed buffers while a save runs and
    allocates fresh memory instead, which costs more than the copy (see
    ``jaxckpt/hostcopy.py``). ``None`` (default) decides by watching: saves
    take views until one finds, when it ends, that the caller let go of
    arrays it viewed (donated, deleted or replaced them, as a training loop
    does); from then on saves copy, into host buffers faulted in ahead on a
    background thread and reused between saves. ``True``/``False`` always/never copy. A copying
    save copies only into buffers that are ready: a leaf without one (the first save, a tree
    that grew) stays a zero-copy view for that save, and a buffer for it is prepared in the
    background once the save ends. No effect on GPU/TPU, where the snapshot is always a host copy.
    """

    def __init__(self, *, max_workers: int | None = None, max_in_flight: int = 1, timeout: float | None = None,
                 copy_cpu_arrays: bool | None = None, storage_options: dict | None = None,
                 encryption_key: crypto.Key | None = None, file_mode: int | None = None,
                 dir_mode: int | None = None):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.max_workers = max_workers or config.write_workers()
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self.storage_options = storage_options
        self.encryption_key = encryption_key
        self.modes = storage.Modes(file_mode, dir_mode)
        if not callable(encryption_key):
            crypto.resolve_key(encryption_key)  # a bad key fails here, not at the first save
        if encryption_key is not None:
            crypto.load()  # the cipher library, imported now rather than during the first save
        self.copy_cpu_arrays = None if copy_cpu_arrays is None else bool(copy_cpu_arrays)
        self._copies = hostcopy.CpuCopies(self.copy_cpu_arrays, thread_setup=_background_priority)
        self._io = ThreadPoolExecutor(self.max_workers, thread_name_prefix="jaxckpt-io", initializer=_background_priority)
        self._bg = ThreadPoolExecutor(max_in_flight, thread_name_prefix="jaxckpt-save", initializer=_background_priority)
        self._multi = multihost.coordinator()
        self._instance = next(_instances)  # same on every process of an SPMD program
        self._seq = 0
        self._staging = layout.StagingPool()
        self._handles: deque[SaveHandle] = deque()
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------ public
    def save(self, path: str | os.PathLike, tree: Any, *, metadata: Any = None, overwrite: bool = False,
             label: str | None = None, on_commit: Callable[[SaveHandle], None] | None = None,
             timeout: float | None = None, metadata_checked: bool = False,
             per_process: tuple[str, Any] | None = None) -> SaveHandle:
        """Snapshot ``tree`` to host memory and return; the write runs in the background.
        A checkpoint already at ``path`` (and ``overwrite=False``) raises
        ``CheckpointExistsError`` here on a local disk, and from the handle on
        an object store, where checking is a request that ``save`` does not wait for.

        ``label``: how messages name this save (default: the path; the manager
        says "step 42"). ``on_commit(handle)``: called on the background thread
        right after the commit, before the handle resolves (``handle.stats`` is
        set); an error it raises fails the save's handle, though the
        checkpoint stays committed. ``timeout``: seconds for this save,
        overriding the checkpointer's. ``metadata_checked=True``: the caller
        has already checked ``metadata`` with ``format.check_metadata`` (the
        manager does, to name the bad value in its own words), so it is not
        encoded once more here; the write still encodes it.
        ``per_process=(key, value)``: every process passes its own msgpack-able
        ``value``; the committed metadata (a dict) holds ``key: [value of
        process 0, value of process 1, ...]``, in the same atomic commit (the
        manager stores each process's data-iterator state this way)."""
        if self._closed:
            raise CheckpointError("this AsyncCheckpointer is closed")
        t0 = time.perf_counter()
        self.check_for_errors()
        loc = validate_request(path, metadata, overwrite, metadata_checked, self.storage_options)
        if per_process is not None:
            _check_per_process(loc, metadata, per_process)
        path = str(loc)
        enc_key = crypto.resolve_key(self.encryption_key)  # a callable (KMS) is asked at each save
        self._backpressure()
        self.check_for_errors()
        copied = self._copies.take(tree, process_index=self._multi.process_index,
                                   process_count=self._multi.process_count)
        blocking = time.perf_counter() - t0
        handle = SaveHandle(path, label or path)
        self._seq += 1
        key = f"jaxckpt/{self._instance}/{self._seq}/{loc.name}"
        with self._lock:
            self._handles.append(handle)
        try:
            self._bg.submit(self._run, _Save(handle, copied, metadata, overwrite, t0, blocking, on_commit, key,
                                             self.timeout if timeout is None else timeout, loc, per_process, enc_key))
        except BaseException as e:
            handle._give_up(e)
            raise
        return handle

    def prepare(self, tree: Any) -> Future:
        """Get ready, in the background, to save trees shaped like ``tree`` (its
        arrays, or ``jax.ShapeDtypeStruct`` leaves as ``jax.eval_shape`` gives),
        so that the first save blocks no longer than later ones: on GPU/TPU the
        pinned host memory the snapshot copies into is allocated (the first
        save of a process otherwise pays it: 1.1 s for 1.1 GB on an H200 host)
        and the on-device packing of small shards is compiled
        (``jaxckpt/accelcopy.py``). Returns at once; the future resolves when
        that is done (failures are logged; saves work without it). Nothing to
        do on the CPU backend."""
        return snapshot_mod.prepare(tree, process_index=self._multi.process_index,
                                process_count=self._multi.process_count)

    def wait_until_finished(self) -> None:
        """Block until every save finished; raise a not-yet-reported background error."""
        for h in list(self._handles):
            h.wait()
        self._prune()
        self.check_for_errors()

    def check_for_errors(self) -> None:
        """Raise the error of a finished background save that was not reported
        yet (each error is raised once, here, by ``save``, ``wait_until_finished``,
        ``close`` or its handle's ``result``)."""
        with self._lock:
            handles = list(self._handles)
        for h in handles:
            exc = h._take_error()
            if exc is not None:
                self._prune()
                raise exc
        self._prune()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.wait_until_finished()
        finally:
            self._closed = True
            self._bg.shutdown(wait=True)
            self._copies.close()
            self._io.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "AsyncCheckpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        close_after(self.close, exc_type)
        return False

    # ------------------------------------------------------------ internals
    def _run(self, save: _Save) -> None:
        """(save thread) Write and commit one save, hand its copies back, resolve its handle."""
        handle, snap, t0, key = save.handle, save.copied.snapshot, save.t0, save.key
        if not handle._start():  # given up by an interrupted save()
            return
        metadata, overwrite = save.metadata, save.overwrite
        deadline = None if save.timeout is None else time.monotonic() + save.timeout - (time.perf_counter() - t0)
        job = writer.Job(handle.label)
        ctx = writer.Context(self._io, self.max_workers, self._staging, job, writer.waiter(deadline, handle.label),
                             self._multi, key, deadline, save.per_process, save.encryption_key, self.modes)
        try:
            res = writer.write_checkpoint(snap, save.location, metadata=metadata, overwrite=overwrite, ctx=ctx,
                                          check_absent=_check_absent(save.location, overwrite))
            # Only now: after a failure or timeout an abandoned worker may still read the
            # copies, so they are not handed back (the pool drops them).
            to_prepare = self._copies.committed(save.copied, handle.label)
            total = time.perf_counter() - t0
            handle._stats = SaveStats(save.blocking, total, res.bytes, res.files, res.bytes / max(total, 1e-9) / 1e9)
            handle._committed = res.metadata
            if save.on_commit is not None:
                save.on_commit(handle)
        except BaseException as e:
            logger.error("background save of %s failed: %s: %s", handle.label, type(e).__name__, e)
            handle._future.set_exception(e)
            return
        finally:
            del snap, save
        # queued before the handle resolves: whoever waits on it can then wait on this too
        self._copies.prepare(to_prepare)
        handle._future.set_result(None)

    def _prune(self) -> None:
        """Forget finished handles, except failed ones whose error is still to be raised."""
        with self._lock:
            self._handles = deque(h for h in self._handles if not h.done()
                                  or (h._future.exception() is not None and not h._reported))

    def _backpressure(self) -> None:
        while True:
            with self._lock:
                pending = [h for h in self._handles if not h.done()]
            if len(pending) < self.max_in_flight:
                return
            pending[0].wait()  # the oldest


def save_sync(path: str | os.PathLike, tree: Any, *, metadata: Any = None, overwrite: bool = False,
              max_workers: int | None = None, label: str | None = None,
              metadata_checked: bool = False, storage_options: dict | None = None,
              per_process: tuple[str, Any] | None = None,
              encryption_key: crypto.Key | None = None, file_mode: int | None = None,
              dir_mode: int | None = None) -> writer.WriteResult:
    """Synchronous save: the caller waits, so numpy inputs are not copied.
    ``metadata_checked`` as in ``AsyncCheckpointer.save``."""
    loc = validate_request(path, metadata, overwrite, metadata_checked, storage_options)
    if per_process is not None:
        _check_per_process(loc, metadata, per_process)
    path = str(loc)
    multi = multihost.coordinator()
    snap = snapshot_mod.take(tree, copy_numpy=False, process_index=multi.process_index,
                             process_count=multi.process_count)
    n = max_workers or config.write_workers()
    key = f"jaxckpt/sync/{next(_sync_saves)}/{loc.name}"
    with ThreadPoolExecutor(n, thread_name_prefix="jaxckpt-io") as pool:
        ctx = writer.Context(pool, n, layout.StagingPool(), writer.Job(label or path),
                             writer.waiter(None, label or path), multi, key, per_process=per_process,
                             encryption_key=crypto.resolve_key(encryption_key),
                             modes=storage.Modes(file_mode, dir_mode))
        return writer.write_checkpoint(snap, loc, metadata=metadata, overwrite=overwrite, ctx=ctx,
                                       check_absent=_check_absent(loc, overwrite))
