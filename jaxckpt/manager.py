"""CheckpointManager: when to save, what to keep, and how a run resumes.

What users wrap around their training loop::

    with jaxckpt.CheckpointManager(d, save_interval_steps=500, max_to_keep=3, save_on_exception=True) as mgr:
        start = mgr.latest_step()
        state = mgr.restore(target=abstract_state) if start is not None else init_state()
        for step in range((start or 0) + 1, total + 1):
            state, metrics = train_step(state, batch)
            mgr.save(step, state, metrics=metrics)      # nearly free when no policy fires
            if mgr.reached_preemption(step):
                break

The manager wires the pieces: the decisions and records
(``jaxckpt/policies.py``: ``SavePolicy``, ``KeepPolicy``, ``StepNaming``,
the step record), the steps of its directory (``jaxckpt/steps.py``:
``StepTable``, ``StepDirectory``, ``Retention``), the one save path
(``jaxckpt/saving.py``: ``StepSaver``) and the SIGTERM flag
(``jaxckpt/preemption.py``); an ``AsyncCheckpointer`` writes.

Call order of one ``save()``. Threads: [T] the training thread (the
caller's), [S] the save's background thread.

1. [T] ``save`` remembers its arguments (for an exception save) and raises,
   once, the error of a background save that failed since the last call
   (``StepTable.prune``, then ``AsyncCheckpointer.check_for_errors``).
2. [T] ``_decide``: preemption (``preemption.SigtermWatch``, agreed on by
   every process), ``force``, then ``SavePolicy.due`` above the table's
   high-water mark. Most calls end here, having read no file.
3. [T] ``StepSaver.save``: check the metrics and metadata once, claim the
   step in the ``StepTable``, build the step record, then snapshot
   (``AsyncCheckpointer.save``) and return. A preemption save
   (``_preemption_save``) and the exception save (``__exit__``) wait here
   for the commit; with ``async_save=False`` the save writes and commits
   here, and step 4 runs on [T].
4. [S] right after the commit: ``StepTable.commit`` records the step, the
   save is logged (``last_save_stats``) and ``Retention.apply`` deletes what
   ``KeepPolicy`` no longer keeps (primary process only; crash-safe:
   ``storage.Backend.remove``). Only a newer commit ever deletes anything. A
   save that fails in the background leaves its handle for step 1 of a later
   call (or ``wait_until_finished``) to report.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import os
import time
import weakref
from typing import Any, Callable, Collection, Mapping

from jaxckpt import checkpointer as ckpt_mod
from jaxckpt import multihost
from jaxckpt import storage
from jaxckpt.errors import CheckpointError, CheckpointNotFoundError
from jaxckpt.policies import KeepPolicy, SavePolicy, StepMetadata, StepNaming, StepSaveStats, as_step
from jaxckpt.preemption import SigtermWatch
from jaxckpt.saving import SaveRequest, StepSaver
from jaxckpt.steps import Retention, StepDirectory, StepTable

logger = logging.getLogger("jaxckpt")

_manager_ids = itertools.count()  # equal on every process of an SPMD program (coordination keys)


def _release(backend: storage.Backend, root: storage.Location, token: str, watch: SigtermWatch) -> None:
    """Give up the directory lock; the SIGTERM handler turns inert (no reference to the manager here)."""
    watch.deactivate()
    backend.release_lock(root, token)


def _one_of(given: Any, built: Any, name: str, keywords: str) -> Any:
    """A policy object passed as ``name=`` (checked), or the one the loose keywords built; not both."""
    if given is None:
        return built
    if not isinstance(given, type(built)):
        raise TypeError(f"{name} must be a {type(built).__name__}, got {type(given).__name__}")
    if built != type(built)():
        raise ValueError(f"pass {name}= or {keywords}, not both")
    return given.checked()


class CheckpointManager:
    """Saves a training run's state by policy, keeps what the retention rules say,
    and resumes it. See the module docstring for the loop it is made for.

    Save policies (a step is saved when any fires; with none configured every
    ``save()`` saves): ``save_interval_steps`` (step % N == 0),
    ``save_interval_seconds`` (N seconds since the last save started, or since
    the manager was created), ``save_on_steps`` (a collection of steps). A step
    at or below the latest committed or in-flight step is never saved by a
    policy; ``save(..., force=True)`` saves regardless.

    Retention (the union of the rules; only with ``max_to_keep`` set is anything
    deleted): ``max_to_keep`` newest (or, with ``best_metric``, the best by
    ``metrics[best_metric]`` under ``best_mode`` "min"/"max"; steps without that
    metric rank last), plus one checkpoint per ``keep_time_interval`` (seconds
    or ``timedelta``) and every step that is a multiple of ``keep_period``. The
    newest committed checkpoint, steps still being written and checkpoints no
    manager wrote are never deleted. ``save_policy=`` / ``keep_policy=`` (a
    ``jaxckpt.policies.SavePolicy`` / ``KeepPolicy``) may stand for those
    keywords instead.

    ``save_on_exception``: when the ``with`` block exits through an exception
    (KeyboardInterrupt included), save the last state given to ``save()``
    synchronously (reason "exception"), then re-raise.
    ``save_on_preemption``: a SIGTERM handler marks preemption; the next
    ``save()`` saves and waits for the commit, and ``reached_preemption(step)``
    turns True.
    ``async_save``: snapshot on the caller's thread, write in the background
    (otherwise ``save()`` returns after the commit). ``read_only``: list and
    restore only; takes no lock, deletes and cleans nothing.

    Extra keywords: ``step_format`` / ``step_prefix`` name the step directories
    (default ``"{step}"``; with a prefix ``"{prefix}_{step}"``; MindSpore's
    layout is ``step_format="{prefix}-{epoch}_{step}"`` with
    ``step_prefix="resnet"``; ``{step:08d}`` zero-pads). ``save_timeout``:
    seconds after which a background save is abandoned with
    ``SaveTimeoutError``. ``copy_cpu_arrays``: see ``AsyncCheckpointer``.
    ``storage_options``: passed to the object-store client of an ``s3://`` /
    ``gs://`` directory (see the README, "Checkpointing to S3 and GCS"). ``_clock``: the wall clock (tests inject one); it
    drives ``save_interval_seconds`` and the step timestamps, hence
    ``keep_time_interval``.
    """

    def __init__(self, directory: str | os.PathLike, save_interval_steps: int | None = None,
                 save_interval_seconds: float | datetime.timedelta | None = None,
                 save_on_steps: Collection[int] | None = None, max_to_keep: int | None = None,
                 keep_time_interval: float | datetime.timedelta | None = None, keep_period: int | None = None,
                 best_metric: str | None = None, best_mode: str = "min", save_on_exception: bool = False,
                 save_on_preemption: bool = True, async_save: bool = True, read_only: bool = False, *,
                 step_format: str | None = None, step_prefix: str | None = None, save_timeout: float | None = None,
                 copy_cpu_arrays: bool | None = None, save_policy: SavePolicy | None = None,
                 keep_policy: KeepPolicy | None = None, storage_options: dict | None = None,
                 _clock: Callable[[], float] = time.time):
        self._root = storage.Location.parse(directory, storage_options)
        self._backend = storage.backend(self._root)
        self.directory = str(self._root)
        self._policy = _one_of(save_policy, SavePolicy.build(save_interval_steps, save_interval_seconds, save_on_steps),
                               "save_policy", "save_interval_steps/save_interval_seconds/save_on_steps")
        keep = _one_of(keep_policy, KeepPolicy.build(max_to_keep, keep_time_interval, keep_period, best_metric,
                                                     best_mode),
                       "keep_policy", "max_to_keep/keep_time_interval/keep_period/best_metric/best_mode")
        self._naming = StepNaming.build(step_format, step_prefix)
        self.save_on_exception = bool(save_on_exception)
        self.async_save = bool(async_save)
        self.read_only = bool(read_only)
        self._clock = _clock
        self._copy_cpu = None if copy_cpu_arrays is None else bool(copy_cpu_arrays)
        self._multi = multihost.coordinator()
        self._agree = multihost.Agreement(self._multi, f"jaxckpt/mgr/{next(_manager_ids)}")
        self._steps = StepTable(self._root)
        self._dir = StepDirectory(self._backend, self._root, self._naming, self._steps, self.read_only)
        self._retention = Retention(keep, self._steps, self._dir, self._backend, self._root, self._multi.is_primary)
        self._last: SaveRequest | None = None
        created = _clock()  # save_interval_seconds counts from here until the first save
        self._preempted_at: int | None = None
        self._restored_step: int | None = None
        self._closed = False
        self._watch = SigtermWatch()
        self._release: Callable[[], Any] = lambda: None
        self._ckptr: ckpt_mod.AsyncCheckpointer | None = None
        if not self.read_only:
            self._open_for_writing(save_timeout)
        self._saver = StepSaver(self._ckptr, self._steps, self._retention, self._naming, _clock, self.async_save,
                                self.directory, started=created)
        try:
            self.reload()
        except BaseException:
            self.close()
            raise
        if save_on_preemption and not self.read_only and not self._agree.jax_preemption:
            self._watch.install()  # (multi-process jobs with JAX's preemption service use its SIGTERM handler)
        self._save_on_preemption = bool(save_on_preemption)

    def _open_for_writing(self, save_timeout: float | None) -> None:
        self._backend.ensure_root(self._root)
        if not self._multi.is_primary:  # the primary holds the lock and cleans up for the whole job
            self._ckptr = ckpt_mod.AsyncCheckpointer(timeout=save_timeout, copy_cpu_arrays=self._copy_cpu)
            return
        token, stale = self._backend.acquire_lock(self._root)
        # Released by close(), or when the manager is garbage-collected / the interpreter exits unclosed.
        self._release = weakref.finalize(self, _release, self._backend, self._root, token, self._watch)
        if stale is not None:
            logger.warning("%s: took over the lock of a writer that is gone (host %r, pid %s)",
                           self.directory, stale.get("host"), stale.get("pid"))
        try:
            for path in self._backend.clean_stale(self._root, self._naming.parse):
                logger.info("removed the leftover of an interrupted save or deletion: %s", path)
            self._ckptr = ckpt_mod.AsyncCheckpointer(timeout=save_timeout, copy_cpu_arrays=self._copy_cpu)
        except BaseException:
            self._release()
            raise

    # ------------------------------------------------------------------ listing
    def reload(self) -> None:
        """Re-read the directory: the committed steps and their metadata (a
        read-only evaluator calls this to see what a writer committed since)."""
        self._dir.reload()

    def latest_step(self) -> int | None:
        """The newest committed step (never one still being written), or None."""
        return self._steps.latest()

    def all_steps(self) -> list[int]:
        """The committed steps, ascending."""
        return self._steps.steps()

    def metadata(self, step: int | None = None) -> StepMetadata:
        """The record saved with ``step`` (default: the latest); reads only the manifest."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointNotFoundError(f"{self.directory}: no committed checkpoint")
        return self._dir.lookup(as_step(step))[0]

    @property
    def last_save_stats(self) -> StepSaveStats | None:
        """The last committed save's figures (what the INFO log line says)."""
        return self._saver.last_stats

    @property
    def restored_step(self) -> int | None:
        """The step the last ``restore()`` returned (with ``fallback=True`` it may be older than asked)."""
        return self._restored_step

    # ------------------------------------------------------------------ saving
    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` would save now (policies and preemption; not ``force``)."""
        return self._decide(as_step(step), False) is not None

    def _decide(self, step: int, force: bool) -> str | None:
        """Why ``step`` is saved now, or None. In a multi-process job every
        process reaches the same answer: step-based rules are deterministic,
        and what depends on one process (its clock, a signal it received) is
        decided by agreement (``multihost.Agreement``)."""
        if self._preempted_at is None and self._save_on_preemption and self._agree.preempted(step, self._watch.requested):
            return "preemption"
        if force:
            return "forced"
        if step <= self._steps.high:
            return None
        last = self._saver.last_save_time
        if self._policy.interval_seconds is None:
            return "interval" if self._policy.due(step, 0.0, last) else None
        due = self._agree.primary_decides(step, lambda: self._policy.due(step, self._clock(), last))
        return "interval" if due else None

    def save(self, step: int, state: Any, *, epoch: int | None = None, metrics: Mapping[str, Any] | None = None,
             metadata: Any = None, force: bool = False, overwrite: bool = False) -> bool:
        """Save ``state`` as ``step`` if a policy says so (or ``force``, or after a
        preemption signal); True when a save started. Call it every step: when
        no save is due it only remembers ``(step, state)`` for an exception
        save. Pass ``step`` as a Python int (a device scalar would make every
        call wait for the device). ``metrics`` (plain numbers or scalar arrays)
        and ``metadata`` (msgpack-able values) are stored with the step.
        Raises ``CheckpointExistsError`` when the step exists, unless ``overwrite``."""
        if self._closed or self.read_only:
            raise CheckpointError(f"{self.directory}: this CheckpointManager is "
                                  f"{'closed' if self._closed else 'read-only'}; it cannot save")
        step = as_step(step)
        if epoch is None and self._naming.needs_epoch:
            raise ValueError(f"step_format {self._naming.template!r} names directories by epoch: pass epoch=")
        req = SaveRequest(step, state, epoch, metrics, metadata)
        if self.save_on_exception:
            self._last = req
        if self._steps.in_flight:
            self._raise_background_error()
        reason = self._decide(step, force)
        if reason is None:
            return False
        if reason == "preemption":
            return self._preemption_save(req)
        self._saver.save(req, reason, overwrite, wait=False)
        return True

    def _preemption_save(self, req: SaveRequest) -> bool:
        """Save now and wait for the commit; then ``reached_preemption`` turns True."""
        exists = self._steps.is_known(req.step)
        if exists:  # already saved (or being saved) as this step: make sure it committed
            self._wait_all()
            self._raise_background_error()
            logger.warning("preemption: step %d was already saved; stop at this step", req.step)
        else:
            self._saver.save(req, "preemption", False, wait=True)
            logger.warning("preemption: step %d committed; stop at this step", req.step)
        self._preempted_at = req.step
        return not exists

    # ------------------------------------------------------------------ restoring
    def restore(self, step: int | None = None, target: Any = None, *, partial: bool = False,
                fallback: bool = False, mmap: bool = True) -> Any:
        """Restore ``step`` (default: the latest committed), waiting first for
        saves in flight. ``target``, ``partial`` and ``mmap`` as in ``jaxckpt.restore``.
        ``fallback=True``: if that checkpoint is damaged or gone, try older
        committed steps in turn and log which one was restored
        (``restored_step`` tells it too)."""
        self._wait_all()
        out, self._restored_step = self._dir.restore(step, target, partial, fallback, mmap)
        return out

    # ------------------------------------------------------------------ preemption
    def reached_preemption(self, step: int) -> bool:
        """True once a preemption signal arrived and its checkpoint (at this step
        or an earlier one) committed: the loop should exit now."""
        return self._preempted_at is not None and step >= self._preempted_at

    # ------------------------------------------------------------------ background work
    def _wait_all(self) -> None:
        """Wait for saves in flight without consuming their errors."""
        for h in self._steps.handles():
            h.wait()

    def _raise_background_error(self) -> None:
        """Raise, once, the error of a background save that failed."""
        if self._steps.prune():
            self._ckptr.check_for_errors()

    def wait_until_finished(self) -> None:
        """Block until every save committed (or failed: its error is raised here, once)."""
        if self._ckptr is not None:
            self._wait_all()
            self._raise_background_error()
            self._ckptr.wait_until_finished()

    def close(self) -> None:
        """Wait for saves in flight, then release the lock and the SIGTERM handler.
        A background error is raised here if not reported before."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._ckptr is not None:
                self._wait_all()
                self._steps.clear_in_flight()
                self._ckptr.close()
        finally:
            self._watch.uninstall()
            self._release()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is not None and self.save_on_exception and not self.read_only and not self._closed:
                self._saver.save_last(self._last, exc_type, self._multi.process_count)
        finally:
            ckpt_mod.close_after(self.close, exc_type)
        return False

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else ("closed" if self._closed else "writer")
        return f"CheckpointManager({self.directory!r}, {mode}, steps={self.all_steps()[-5:]})"
