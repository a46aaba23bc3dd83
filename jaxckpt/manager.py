"""CheckpointManager: when to save, what to keep, and how a run resumes.

What users wrap around their training loop::

    with jaxckpt.CheckpointManager(d, save_interval_steps=500, max_to_keep=3, save_on_exception=True) as mgr:
        start = mgr.latest_step()
        batches = iter(loader)                          # e.g. a grain DataLoader
        state = (mgr.restore(target=abstract_state, data_iterator=batches) if start is not None
                 else init_state())
        for step in range((start or 0) + 1, total + 1):
            state, metrics = train_step(state, next(batches))
            mgr.save(step, state, data_iterator=batches, metrics=metrics)  # nearly free when no policy fires
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

1. [T] ``save`` remembers its arguments (for an exception save, with the
   data iterator's state: ``dataiter.take``) and raises, once, the error of a
   background save that failed since the last call (``StepTable.prune``, then
   ``AsyncCheckpointer.check_for_errors``). With ``save_interval_steps="auto"``,
   ``AutoInterval.before`` takes a timing point when one is due (the first
   call, and the first call that finds the last save written).
2. [T] ``_decide``: preemption (``preemption.SigtermWatch``, agreed on by
   every process), ``force``, then ``SavePolicy.due`` (and ``AutoInterval.due``)
   above the table's high-water mark. Most calls end here, having read no file.
3. [T] The data iterator's state (``dataiter.take``; taken in step 1 with
   an exception save configured), the auto interval's ready point
   (``AutoInterval.ready``); ``StepSaver.save``: check the metrics, metadata
   and iterator state once, claim the step in the ``StepTable``, build the
   step record, then snapshot (``AsyncCheckpointer.save``, the iterator state
   as ``per_process``) and return; ``AutoInterval.saved`` notes the blocking
   time. A preemption save
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

import contextlib
import dataclasses
import datetime
import functools
import itertools
import logging
import os
import time
import weakref
from typing import Any, Callable, Collection, Mapping

from jaxckpt import checkpointer as ckpt_mod
from jaxckpt import dataiter
from jaxckpt import interval
from jaxckpt import multihost
from jaxckpt import storage
from jaxckpt.errors import CheckpointError, CheckpointNotFoundError
from jaxckpt.interval import AutoInterval, SaveInterval
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


def _open_for_writing(mgr: "CheckpointManager", save_timeout: float | None, copy_cpu_arrays: bool | None
                      ) -> tuple[ckpt_mod.AsyncCheckpointer, Callable[[], Any], list[str] | None]:
    """(checkpointer, release of the lock, the committed names the cleaning listed) of a
    writing manager; the primary takes the lock and cleans up (the others list nothing here)."""
    backend, root = mgr._backend, mgr._root
    backend.ensure_root(root, mgr._modes)
    copy_cpu = None if copy_cpu_arrays is None else bool(copy_cpu_arrays)
    ckptr = functools.partial(ckpt_mod.AsyncCheckpointer, timeout=save_timeout, copy_cpu_arrays=copy_cpu,
                              encryption_key=mgr._key, file_mode=mgr._modes.file, dir_mode=mgr._modes.dir)
    if not mgr._multi.is_primary:  # the primary holds the lock and cleans up for the whole job
        return ckptr(), lambda: None, None
    token, stale = backend.acquire_lock(root, mgr._modes)
    # Released by close(), or when the manager is garbage-collected / the interpreter exits unclosed.
    release = weakref.finalize(mgr, _release, backend, root, token, mgr._watch)
    if stale is not None:
        logger.warning("%s: took over the lock of a writer that is gone (host %r, pid %s)",
                       mgr.directory, stale.get("host"), stale.get("pid"))
    try:
        removed, committed = backend.clean_stale(root, mgr._naming.parse)
        for path in removed:
            logger.info("removed the leftover of an interrupted save or deletion: %s", path)
        return ckptr(), release, committed
    except BaseException:
        release()
        raise


class CheckpointManager:
    """Saves a training run's state by policy, keeps what the retention rules say,
    and resumes it. See the module docstring for the loop it is made for.

    Save policies (a step is saved when any fires; with none configured every
    ``save()`` saves): ``save_interval_steps`` (step % N == 0),
    ``save_interval_seconds`` (N seconds since the last save started, or since
    the manager was created), ``save_on_steps`` (a collection of steps).
    ``save_interval_steps="auto"``: the interval whose saves cost at most
    ``max_overhead`` (default 0.02) of training time, or with ``mtbf`` (the
    job's expected time between failures) the Young-Daly optimum above that
    (``save_interval()`` says what and why; formulas in ``jaxckpt/interval.py``).
    A step at or below the latest committed or in-flight step is never saved
    by a policy; ``save(..., force=True)`` saves regardless.

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
    synchronously (reason "exception"), then re-raise; its data-iterator
    state is the one taken at that ``save()`` call.
    ``save_on_preemption``: a SIGTERM handler marks preemption; the next
    ``save()`` saves and waits for the commit, and ``reached_preemption(step)``
    turns True.
    ``async_save``: snapshot on the caller's thread, write in the background
    (otherwise ``save()`` returns after the commit). ``read_only``: list and
    restore only; takes no lock, deletes and cleans nothing.

    Extra keywords: ``step_format`` / ``step_prefix`` name the step directories (default ``"{step}"``; with
    a prefix ``"{prefix}_{step}"``; MindSpore's layout is ``step_format="{prefix}-{epoch}_{step}"`` with
    ``step_prefix="resnet"``; ``{step:08d}`` zero-pads). ``save_timeout``: seconds after which a background
    save is abandoned with ``SaveTimeoutError``. ``copy_cpu_arrays``: see ``AsyncCheckpointer``.
    ``storage_options``: passed to the object-store client of an ``s3://`` / ``gs://`` / ``az://`` directory (see the
    README, "Checkpointing to S3 and GCS"). ``encryption_key``: steps are saved encrypted and read with it
    (bytes or a callable, see ``AsyncCheckpointer``); ``file_mode`` / ``dir_mode``: the permission bits of
    step files and directories, the lock and markers. ``expected_state``: a state (or ``jax.eval_shape``) to
    prepare the first save for in the background (``AsyncCheckpointer.prepare``; else the first ``save()``
    that does not save does). ``_clock``: the wall clock (tests inject one); it drives
    ``save_interval_seconds``, the auto interval's measurements and the step timestamps, hence
    ``keep_time_interval``.
    """

    def __init__(self, directory: str | os.PathLike, save_interval_steps: int | str | None = None,
                 save_interval_seconds: float | datetime.timedelta | None = None,
                 save_on_steps: Collection[int] | None = None, max_to_keep: int | None = None,
                 keep_time_interval: float | datetime.timedelta | None = None, keep_period: int | None = None,
                 best_metric: str | None = None, best_mode: str = "min", save_on_exception: bool = False,
                 save_on_preemption: bool = True, async_save: bool = True, read_only: bool = False, *,
                 max_overhead: float | None = None, mtbf: float | datetime.timedelta | None = None,
                 step_format: str | None = None, step_prefix: str | None = None, save_timeout: float | None = None,
                 copy_cpu_arrays: bool | None = None, save_policy: SavePolicy | None = None,
                 keep_policy: KeepPolicy | None = None, storage_options: dict | None = None,
                 encryption_key: Any = None, file_mode: int | None = None, dir_mode: int | None = None,
                 expected_state: Any = None, _clock: Callable[[], float] = time.time):
        self._root = storage.Location.parse(directory, storage_options)
        self._backend = storage.backend(self._root)
        self.directory = str(self._root)
        self._policy = _one_of(save_policy, SavePolicy.build(save_interval_steps, save_interval_seconds, save_on_steps,
                                                             max_overhead, mtbf),
                               "save_policy", "save_interval_steps/save_interval_seconds/save_on_steps")
        keep = _one_of(keep_policy, KeepPolicy.build(max_to_keep, keep_time_interval, keep_period, best_metric,
                                                     best_mode),
                       "keep_policy", "max_to_keep/keep_time_interval/keep_period/best_metric/best_mode")
        self._naming = StepNaming.build(step_format, step_prefix)
        self.save_on_exception, self.async_save, self.read_only = bool(save_on_exception), bool(async_save), bool(
            read_only)
        self._clock, self._multi = _clock, multihost.coordinator()
        self._agree = multihost.Agreement(self._multi, f"jaxckpt/mgr/{next(_manager_ids)}")
        self._auto = AutoInterval.build(self._policy, _clock, self._multi, self._agree.prefix)
        self._steps = StepTable(self._root)
        self._key, self._modes = encryption_key, storage.Modes(file_mode, dir_mode)
        self._dir = StepDirectory(self._backend, self._root, self._naming, self._steps, self.read_only,
                                  encryption_key)
        self._retention = Retention(keep, self._steps, self._dir, self._backend, self._root, self._multi.is_primary)
        self._last: SaveRequest | None = None
        self._preempted_at: int | None = None
        self._restored_step: int | None = None
        self._closed = False
        self._watch = SigtermWatch()
        self._ckptr, self._release, listed = ((None, lambda: None, None) if self.read_only
                                              else _open_for_writing(self, save_timeout, copy_cpu_arrays))
        self._saver = StepSaver(self._ckptr, self._steps, self._retention, self._naming, _clock, self.async_save,
                                self.directory, started=_clock())
        try:
            self._dir.reload(listed)  # a listing of the cleaning's, where it made one
        except BaseException:
            self.close()
            raise
        if save_on_preemption and not self.read_only and not self._agree.jax_preemption:
            self._watch.install()  # (multi-process jobs with JAX's preemption service use its SIGTERM handler)
        self._save_on_preemption = bool(save_on_preemption)
        self._saver.prepare(expected_state)

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
        """Whether ``save(step, ...)`` would save now (policies, preemption; not ``force``; never when it raises)."""
        return not (self._closed or self.read_only) and self._decide(as_step(step), False) is not None

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
        if self._policy.interval_seconds is None and self._auto is None:
            return "interval" if self._policy.due(step, 0.0, last) else None
        due = self._agree.primary_decides(step, lambda: self._policy.due(step, self._clock(), last) or (
            self._auto is not None and self._auto.due(step)))
        if due and self._auto is not None:
            self._auto.fetch(step)  # (the other processes: process 0's choice, published with its decision)
        return "interval" if due else None

    def save(self, step: int, state: Any, *, data_iterator: Any = None, epoch: int | None = None,
             metrics: Mapping[str, Any] | None = None, metadata: Any = None, force: bool = False,
             overwrite: bool = False) -> bool:
        """Save ``state`` as ``step`` if a policy says so (or ``force``, or after a
        preemption signal); True when a save started. Call it every step: when
        no save is due it only remembers ``(step, state)`` for an exception
        save. Pass ``step`` as a Python int (a device scalar would make every
        call wait for the device). ``metrics`` (plain numbers or scalar arrays)
        and ``metadata`` (msgpack-able values) are stored with the step.
        ``data_iterator``: an object with ``get_state()`` (a grain iterator) or a
        state value, taken when the save starts (with ``save_on_exception``: at
        every call) and stored for this process (pass it on all processes or none).
        Raises ``CheckpointExistsError`` when the step exists, unless ``overwrite``."""
        if self._closed or self.read_only:
            raise CheckpointError(f"{self.directory}: this CheckpointManager is "
                                  f"{'closed' if self._closed else 'read-only'}; it cannot save")
        step = as_step(step)
        if epoch is None and self._naming.needs_epoch:
            raise ValueError(f"step_format {self._naming.template!r} names directories by epoch: pass epoch=")
        taken = dataiter.take(data_iterator) if self.save_on_exception and data_iterator is not None else None
        req = SaveRequest(step, state, epoch, metrics, metadata, taken)
        if self.save_on_exception:
            self._last = req
        if self._steps.in_flight:
            self._raise_background_error()
        if self._auto is not None:
            self._auto.before(step, state, self._steps.in_flight)
        reason = self._decide(step, force)
        if reason is None:
            self._saver.prepare(state)
            return False
        if data_iterator is not None and taken is None:
            req = dataclasses.replace(req, per_process=dataiter.take(data_iterator))
        if reason == "preemption":
            return self._preemption_save(req)
        ready = self._auto.ready(state) if self._auto is not None else None
        self._saver.save(req, reason, overwrite, wait=False)
        if self._auto is not None:
            self._auto.saved(step, ready, writing=self.async_save)
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
    def restore(self, step: int | None = None, target: Any = None, *, data_iterator: Any = None,
                partial: bool = False, fallback: bool = False, mmap: bool = True) -> Any:
        """Restore ``step`` (default: the latest committed), waiting first for
        saves in flight. ``target``, ``partial`` and ``mmap`` as in ``jaxckpt.restore``.
        ``fallback=True``: if that checkpoint is damaged or gone, try older
        committed steps in turn and log which one was restored
        (``restored_step`` tells it too). ``data_iterator`` (with ``set_state()``,
        a grain iterator) gets the state this process saved with the restored
        step; ``CheckpointError`` (before reading arrays, unless ``fallback``) if
        the step has none or was saved by a different number of processes."""
        if data_iterator is not None:
            dataiter.check_restorable(data_iterator)
        self._wait_all()
        if data_iterator is not None and not fallback:  # refuse before reading arrays (a missing step: see below)
            with contextlib.suppress(CheckpointNotFoundError):
                self._iterator_state(step, required=True)
        out, self._restored_step = self._dir.restore(step, target, partial, fallback, mmap)
        if data_iterator is not None:
            data_iterator.set_state(self._iterator_state(self._restored_step, required=True))
        return out

    def data_iterator_state(self, step: int | None = None) -> Any:
        """This process's data-iterator state saved with ``step`` (default: the latest), raw (tuples read
        back as lists); None if there is none; ``CheckpointError`` if saved by another process count."""
        return self._iterator_state(step, required=False)

    def _iterator_state(self, step: int | None, required: bool) -> Any:
        return dataiter.state_of(self.metadata(step), self._multi.process_index, self._multi.process_count, required)

    def save_interval(self) -> SaveInterval:
        """The step interval saves follow now, and why: with ``"auto"`` the choice and
        its figures (process 0's, as of the last save it decided), else the fixed one."""
        return self._auto.choice if self._auto is not None else interval.fixed(self._policy.interval_steps)

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
