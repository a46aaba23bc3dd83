"""The one save path of a CheckpointManager: claim -> save -> commit (or fail).

Threads: [T] the training thread, [S] the save's background thread.

1. [T] ``StepSaver.save``: ``policies.check_values`` checks the caller's
   metrics and metadata, once (a bad value raises here, named);
   ``dataiter.check`` the data-iterator state, if any;
   ``StepTable.claim`` refuses an existing step (unless ``overwrite``) and
   reserves it; ``policies.step_record`` builds the record around the checked
   values, so the checkpointer does not check it again.
2. [T] The save, one of three ways:
   a. in the background (``async_save``): ``AsyncCheckpointer.save`` snapshots
      the state and returns; ``StepTable.attach`` keeps the handle;
   b. the same, then waiting for the commit (``wait``: preemption and
      exception saves, which must be committed before the loop goes on or
      exits, also with ``async_save=False``);
   c. on this thread (``async_save=False``): ``checkpointer.save_sync`` writes
      and commits, and step 3 runs on [T].
   A save that cannot start gives its claim back (``StepTable.fail``) and raises.
3. [S] right after the commit (``on_commit``): ``StepTable.commit`` records
   the step, the save is logged (``last_stats``), and ``Retention`` deletes
   the directory the step replaced, if it was renamed, and what the keep
   rules no longer keep. A save that fails in the background leaves its
   handle in the table for the manager's next call to report.

``save_last`` is the exception save: the last ``save()`` arguments, way b
(with the data-iterator state taken at that call: ``dataiter.take``).
The data-iterator state goes to the checkpointer as ``per_process``, so
that every process's value is committed with the arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Callable

import jax

from jaxckpt import checkpointer as ckpt_mod
from jaxckpt import dataiter
from jaxckpt import display
from jaxckpt import policies
from jaxckpt import storage
from jaxckpt.policies import StepNaming, StepSaveStats, as_step
from jaxckpt.steps import Retention, StepTable

logger = logging.getLogger("jaxckpt")

EXCEPTION_SAVE_TIMEOUT_S = 60.0  # multi-process exception saves: see StepSaver.save_last


@dataclasses.dataclass(frozen=True)
class SaveRequest:
    """The arguments of one ``CheckpointManager.save()`` (the manager keeps the
    last ones for an exception save)."""
    step: int
    state: Any
    epoch: int | None
    metrics: Any
    metadata: Any
    per_process: tuple[str, Any] | None = None  # ("data_iterator", this process's state): see dataiter.py


def deleted_leaves(state: Any) -> tuple[int, int]:
    """(deleted, all) jax.Array leaves of ``state`` (deleted: donated or freed)."""
    arrays = [x for x in jax.tree_util.tree_leaves(state) if isinstance(x, jax.Array)]
    return sum(1 for x in arrays if x.is_deleted()), len(arrays)


class StepSaver:
    """Saves steps for one manager (see the module docstring). ``ckptr`` is None
    for a read-only manager, which never saves. ``last_save_time``: when the
    last save started (at first: when the manager was created), for
    ``save_interval_seconds``."""

    def __init__(self, ckptr: ckpt_mod.AsyncCheckpointer | None, table: StepTable, retention: Retention,
                 naming: StepNaming, clock: Callable[[], float], async_save: bool, directory: str,
                 started: float):
        self._ckptr = ckptr
        self._table = table
        self._retention = retention
        self._naming = naming
        self._clock = clock
        self._async = async_save
        self._directory = directory
        self.last_save_time = started
        self.last_stats: StepSaveStats | None = None
        self._prepared = False

    def prepare(self, state: Any) -> None:
        """Start the checkpointer's background preparation of the first save of
        ``state`` (``AsyncCheckpointer.prepare``): once, and only for a state."""
        if state is not None and self._ckptr is not None and not self._prepared:
            self._prepared = True
            self._ckptr.prepare(state)

    def save(self, req: SaveRequest, reason: str, overwrite: bool, wait: bool, timeout: float | None = None) -> None:
        """Save ``req`` as ``reason``: steps 1-2 of the module docstring, and 3 for a synchronous save."""
        step = req.step
        epoch = None if req.epoch is None else as_step(req.epoch, "epoch")
        metrics = policies.check_values(req.metrics, req.metadata, f"{self._directory}: step {step}")
        dataiter.check(req.per_process, f"{self._directory}: step {step}")
        name = self._naming.name(step, epoch)
        replaced = self._table.claim(step, name, overwrite)
        now = self._clock()
        record = policies.step_record(step, epoch, now, reason, metrics, req.metadata)
        path = self._table.location(name)
        background = self._async or wait
        try:
            if background:
                on_commit = functools.partial(self._on_commit, step, name, record, replaced)
                handle = self._ckptr.save(path, req.state, metadata=record, overwrite=overwrite, label=f"step {step}",
                                          on_commit=on_commit, timeout=timeout, metadata_checked=True,
                                          per_process=req.per_process)
                self._table.attach(step, handle)
            else:
                stats, committed = self._save_here(path, req, record, overwrite)
        except BaseException:
            self._table.fail(step)
            raise
        self.last_save_time = now
        if not background:
            self._committed(step, name, record, replaced, stats, committed)
        elif wait:
            handle.result()

    def _save_here(self, path: storage.Location, req: SaveRequest, record: dict, overwrite: bool
                   ) -> tuple[ckpt_mod.SaveStats, tuple[Any] | None]:
        """A synchronous save on the calling thread (numpy inputs are not copied), with
        the manager's checkpointer's key and modes: (its figures, (the metadata committed,))."""
        t0 = time.perf_counter()
        ck = self._ckptr
        res = ckpt_mod.save_sync(path, req.state, metadata=record, overwrite=overwrite, metadata_checked=True,
                                 per_process=req.per_process, encryption_key=ck.encryption_key,
                                 file_mode=ck.modes.file, dir_mode=ck.modes.dir)
        total = time.perf_counter() - t0
        return ckpt_mod.SaveStats(total, total, res.bytes, res.files, res.bytes / max(total, 1e-9) / 1e9), res.metadata

    def _on_commit(self, step: int, name: str, record: dict, replaced: str | None,
                   handle: ckpt_mod.SaveHandle) -> None:
        """Runs on the background thread right after the commit."""
        try:
            self._committed(step, name, record, replaced, handle.stats, handle.committed_metadata)
        except Exception:  # the checkpoint is committed: bookkeeping trouble must not fail the save
            logger.exception("after committing step %d", step)

    def _committed(self, step: int, name: str, record: dict, replaced: str | None,
                   stats: ckpt_mod.SaveStats, committed: tuple[Any] | None) -> None:
        """Step 3: record, log and rotate after the commit of ``step`` as ``name``
        (``committed``: ``(the manifest's metadata,)``, where this process has it)."""
        path = self._table.path(name)
        info = StepSaveStats(step, record["reason"], path, stats.blocking_s, stats.total_s, stats.bytes,
                             stats.files, stats.throughput_gbps)
        self._table.commit(step, name)
        self.last_stats = info
        logger.info("saved step %d (%s) to %s: blocked %.3f s, committed after %.3f s, %s, %s",
                    step, info.reason, path, info.blocking_s, info.total_s, display.format_bytes(info.bytes),
                    display.format_rate(info.throughput_gbps))
        if committed is not None:
            self._retention.remember(step, name, committed[0])
        if replaced is not None and replaced != name:  # overwritten under a new name (another epoch)
            self._retention.delete(step, replaced)
        self._retention.apply()

    def save_last(self, req: SaveRequest | None, exc_type: type, process_count: int) -> None:
        """The exception save: ``req``, the last ``save()`` arguments, with reason
        "exception", waiting for the commit. Logs what happened; raises nothing
        of its own (the caller's exception is what the ``with`` block raises)."""
        try:
            self._ckptr.wait_until_finished()
        except Exception as err:
            logger.error("a background save failed while handling %s: %s", exc_type.__name__, err)
        latest = self._table.latest()
        if req is None:
            logger.warning("save_on_exception: %s before any save() call; nothing to save", exc_type.__name__)
            return
        if self._table.is_committed(req.step):
            logger.info("save_on_exception: step %d is already committed", req.step)
            return
        deleted, arrays = deleted_leaves(req.state)
        if deleted:
            logger.warning("save_on_exception: the state given for step %d has deleted arrays (%d of %d; donated to "
                           "the step that failed?), so it cannot be saved; the last committed checkpoint (step %s) "
                           "stays the latest", req.step, deleted, arrays, latest)
            return
        # In a multi-process job the other processes may not be failing with us: then they
        # never join this save. Bound the wait so that the failing process exits promptly.
        timeout = None
        if process_count > 1:
            timeout = min(self._ckptr.timeout or EXCEPTION_SAVE_TIMEOUT_S, EXCEPTION_SAVE_TIMEOUT_S)
        try:
            self.save(req, "exception", False, wait=True, timeout=timeout)
        except Exception as err:
            logger.error("save_on_exception: saving step %d failed (%s: %s); the last committed checkpoint "
                         "(step %s) stays the latest", req.step, type(err).__name__, err, latest)
            return
        logger.warning("save_on_exception: saved step %d after %s", req.step, exc_type.__name__)
