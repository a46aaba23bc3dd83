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

Call order of one save: ``save()`` (training thread: decide with the save
policy; if a save is due, build the step record and snapshot the state) ->
the ``AsyncCheckpointer`` writes and commits in the background -> right after
the commit, on that background thread, ``_committed()`` records the step,
logs the save and applies the retention rules (only a newer commit ever
deletes anything, and deletion is crash-safe: ``storage.Backend.remove``).

Decisions are pure: ``SavePolicy.due`` (when to save) and
``KeepPolicy.keep`` (what to keep) read no files, so a multi-process job can
take them once on the primary and share them.

On disk a step is a checkpoint directory named by ``StepNaming`` (``"42"`` by
default) whose manifest metadata is the step record: ``{"jaxckpt_manager": 1,
"step", "epoch", "timestamp", "reason", "metrics", "jax_version",
"jaxckpt_version", "user"}``. That record is what marks a checkpoint as
written by a manager: only such checkpoints are ever rotated away.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import itertools
import logging
import math
import numbers
import operator
import os
import re
import signal
import threading
import time
import weakref
from typing import Any, Callable, Collection, Iterable, Mapping

import jax

from jaxckpt import api
from jaxckpt import checkpointer as ckpt_mod
from jaxckpt import display
from jaxckpt import format as fmt
from jaxckpt import multihost
from jaxckpt import reader as reader_mod
from jaxckpt import storage
from jaxckpt import writer
from jaxckpt.errors import (CheckpointError, CheckpointExistsError, CheckpointNotFoundError, CorruptCheckpointError,
                            UnsupportedValueError)

logger = logging.getLogger("jaxckpt")

RECORD_KEY = "jaxckpt_manager"  # its presence in a manifest's metadata marks a manager's checkpoint
RECORD_VERSION = 1
_MAX_STEP = (1 << 63) - 1
_MAX_RELISTS = 100  # restore(): re-listings after the latest step was deleted under a follower
EXCEPTION_SAVE_TIMEOUT_S = 60.0  # multi-process exception saves: see _exception_save
_manager_ids = itertools.count()  # equal on every process of an SPMD program (coordination keys)


# ----------------------------------------------------------------------------- records
@dataclasses.dataclass(frozen=True)
class StepMetadata:
    """What the manager stored with one step (read from the manifest only).

    ``reason``: why it was saved ("interval", "forced", "exception",
    "preemption"); None for a checkpoint in the directory that no manager
    wrote (its ``metadata`` is then the manifest's raw metadata).
    ``timestamp``: seconds since the epoch when ``save()`` was called.
    ``nbytes``: bytes of array data.
    """
    step: int
    epoch: int | None
    timestamp: float
    reason: str | None
    metrics: dict | None
    metadata: Any
    jax_version: str | None
    jaxckpt_version: str | None
    path: str
    nbytes: int

    def __repr__(self) -> str:
        when = display.local_time(self.timestamp)
        parts = [f"step={self.step}"]
        if self.epoch is not None:
            parts.append(f"epoch={self.epoch}")
        parts += [f"reason={self.reason!r}", f"saved {when}", display.format_bytes(self.nbytes)]
        if self.metrics:
            parts.append(f"metrics={self.metrics!r}")
        if self.metadata is not None:
            parts.append(f"metadata={self.metadata!r}")
        if self.jax_version or self.jaxckpt_version:
            parts.append(f"jax {self.jax_version}, jaxckpt {self.jaxckpt_version}")
        return f"StepMetadata({', '.join(parts)})"

    def _repr_html_(self) -> str:
        """The notebook view: a small key/value table."""
        rows = [("step", str(self.step))]
        if self.epoch is not None:
            rows.append(("epoch", str(self.epoch)))
        rows.append(("reason", self.reason if self.reason is not None else "(not written by a CheckpointManager)"))
        rows += [("saved", display.local_time(self.timestamp)), ("size", display.format_bytes(self.nbytes))]
        for name, value in (self.metrics or {}).items():
            shown = format(value, ".6g") if isinstance(value, float) else repr(value)
            rows.append((f"metrics[{name!r}]", display.shorten(shown, 200)))
        if self.metadata is not None:
            rows.append(("metadata", display.shorten(repr(self.metadata), 1000)))
        if self.jax_version or self.jaxckpt_version:
            rows.append(("versions", f"jax {self.jax_version}, jaxckpt {self.jaxckpt_version}"))
        rows.append(("path", self.path))
        return "<b>StepMetadata</b>\n" + display.html_table(None, rows)


@dataclasses.dataclass(frozen=True)
class StepSaveStats:
    """One committed save, as logged: ``blocking_s`` is the training loop's pause,
    ``total_s`` the time until the commit."""
    step: int
    reason: str
    path: str
    blocking_s: float
    total_s: float
    bytes: int
    files: int
    throughput_gbps: float


# ----------------------------------------------------------------------------- policies
def _positive_int(name: str, v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return int(v)


def _seconds(name: str, v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, datetime.timedelta):
        v = v.total_seconds()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds or a datetime.timedelta, got {type(v).__name__}")
    if not v > 0 or math.isinf(v):
        raise ValueError(f"{name} must be a positive, finite duration, got {v}")
    return float(v)


def as_step(step: Any, what: str = "step") -> int:
    """A step number as a Python int in [0, 2**63)."""
    if isinstance(step, bool):
        raise TypeError(f"{what} must be an int, got bool")
    try:
        s = operator.index(step)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(step).__name__}") from None
    if not 0 <= s <= _MAX_STEP:
        raise ValueError(f"{what} must be in [0, 2**63), got {s}")
    return s


@dataclasses.dataclass(frozen=True)
class SavePolicy:
    """When a save is due. With no rule configured every step is due."""
    interval_steps: int | None = None
    interval_seconds: float | None = None
    on_steps: frozenset[int] = frozenset()

    @classmethod
    def build(cls, interval_steps: Any, interval_seconds: Any, on_steps: Collection[int] | None) -> "SavePolicy":
        steps = frozenset(as_step(s, "save_on_steps entry") for s in (on_steps or ()))
        return cls(_positive_int("save_interval_steps", interval_steps),
                   _seconds("save_interval_seconds", interval_seconds), steps)

    @property
    def every_step(self) -> bool:
        return self.interval_steps is None and self.interval_seconds is None and not self.on_steps

    def due(self, step: int, now: float, last_save: float) -> bool:
        if self.every_step:
            return True
        if self.interval_steps is not None and step % self.interval_steps == 0:
            return True
        if self.on_steps and step in self.on_steps:
            return True
        return self.interval_seconds is not None and now - last_save >= self.interval_seconds


@dataclasses.dataclass(frozen=True)
class RetentionInfo:
    """What the keep rules look at for one committed step."""
    step: int
    timestamp: float
    metric: float | None = None


@dataclasses.dataclass(frozen=True)
class KeepPolicy:
    """Which checkpoints survive: the union of the rules (a checkpoint survives if
    any rule keeps it). ``max_to_keep=None`` keeps everything."""
    max_to_keep: int | None = None
    time_interval: float | None = None
    period: int | None = None
    best_metric: str | None = None
    best_mode: str = "min"

    @classmethod
    def build(cls, max_to_keep: Any, keep_time_interval: Any, keep_period: Any, best_metric: Any,
              best_mode: Any) -> "KeepPolicy":
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        if best_metric is not None:
            if not isinstance(best_metric, str):
                raise TypeError(f"best_metric must be a str (a key of metrics), got {type(best_metric).__name__}")
            if max_to_keep is None:
                raise ValueError("best_metric needs max_to_keep: it keeps the best max_to_keep checkpoints")
        return cls(_positive_int("max_to_keep", max_to_keep), _seconds("keep_time_interval", keep_time_interval),
                   _positive_int("keep_period", keep_period), best_metric, best_mode)

    def keep(self, infos: Iterable[RetentionInfo]) -> set[int]:
        """The steps to keep among ``infos``; the newest is always kept."""
        infos = sorted(infos, key=lambda i: i.step)
        if self.max_to_keep is None or not infos:
            return {i.step for i in infos}
        kept = {infos[-1].step}
        if self.best_metric is None:
            kept.update(i.step for i in infos[-self.max_to_keep:])
        else:
            ranked = [i for i in infos if i.metric is not None]
            sign = 1.0 if self.best_mode == "min" else -1.0
            ranked.sort(key=lambda i: (sign * i.metric, -i.step))  # ties: the newer wins
            kept.update(i.step for i in ranked[:self.max_to_keep])
        if self.period is not None:
            kept.update(i.step for i in infos if i.step % self.period == 0)
        if self.time_interval is not None:
            # One per window, walking forward from the oldest: a checkpoint is kept
            # when it is at least the interval younger than the last one kept this
            # way. The choice of an older step never changes as newer ones arrive.
            last = None
            for i in infos:
                if last is None or i.timestamp - last >= self.time_interval:
                    kept.add(i.step)
                    last = i.timestamp
        return kept


_FIELD = re.compile(r"\{(step|epoch|prefix)(?::(0[1-9][0-9]?d|d))?\}")
_LITERAL = re.compile(r"[A-Za-z0-9_.\-]*")
_PREFIX = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")


@dataclasses.dataclass(frozen=True)
class StepNaming:
    """Step directory names: a format with ``{step}`` and optionally ``{epoch}``
    and ``{prefix}`` (each may carry a zero-padding spec like ``{step:08d}``).
    Parsing accepts only names that the format would produce exactly."""
    template: str = "{step}"
    prefix: str | None = None

    @classmethod
    def build(cls, step_format: str | None, step_prefix: str | None) -> "StepNaming":
        if step_prefix is not None and (not isinstance(step_prefix, str) or not _PREFIX.fullmatch(step_prefix)):
            raise ValueError(f"step_prefix must be 1-128 characters of letters, digits, '_', '.', '-' and not "
                             f"start with '.' or '-', got {step_prefix!r}")
        if step_format is None:
            step_format = "{step}" if step_prefix is None else "{prefix}_{step}"
        if not isinstance(step_format, str):
            raise TypeError(f"step_format must be a str, got {type(step_format).__name__}")
        fields = [m.group(1) for m in _FIELD.finditer(step_format)]
        literals = _FIELD.split(step_format)[::3]
        problem = None
        if fields.count("step") != 1 or any(fields.count(f) > 1 for f in ("epoch", "prefix")):
            problem = "it must contain {step} once, and {epoch} and {prefix} at most once"
        elif not all(_LITERAL.fullmatch(lit) for lit in literals):
            problem = "outside the fields only letters, digits, '_', '.' and '-' are allowed"
        elif any(not lit for lit in literals[1:-1]):
            problem = "two fields must be separated by some text"
        elif step_format.startswith((".", "-")):
            problem = "a name must not start with '.' or '-'"
        elif ("prefix" in fields) != (step_prefix is not None):
            problem = "{prefix} in the format and step_prefix= go together"
        if problem:
            raise ValueError(f"step_format {step_format!r}: {problem}")
        return cls(step_format, step_prefix)

    @functools.cached_property
    def _regex(self) -> re.Pattern:
        out, pos = [], 0
        for m in _FIELD.finditer(self.template):
            out.append(re.escape(self.template[pos:m.start()]))
            field = m.group(1)
            out.append(re.escape(self.prefix) if field == "prefix" else f"(?P<{field}>[0-9]{{1,19}})")
            pos = m.end()
        out.append(re.escape(self.template[pos:]))
        return re.compile("".join(out))

    @property
    def needs_epoch(self) -> bool:
        return "{epoch" in self.template

    def name(self, step: int, epoch: int | None) -> str:
        return self.template.format(step=step, epoch=epoch if epoch is not None else 0, prefix=self.prefix)

    def parse(self, entry: str) -> tuple[int, int | None] | None:
        """``(step, epoch)`` of a step directory name; None for anything else."""
        m = self._regex.fullmatch(entry)
        if m is None:
            return None
        step = int(m.group("step"))
        epoch = int(m.group("epoch")) if self.needs_epoch else None
        if step > _MAX_STEP or self.name(step, epoch) != entry:  # only canonical names ("7", not "007")
            return None
        return step, epoch


# ----------------------------------------------------------------------------- step records
def _plain_metrics(metrics: Mapping[str, Any] | None, where: str) -> dict | None:
    """Metrics as plain values (jax/numpy scalars become Python numbers)."""
    if metrics is None:
        return None
    if not isinstance(metrics, Mapping):
        raise TypeError(f"{where}: metrics must be a mapping of str to values, got {type(metrics).__name__}")
    out = {}
    for k, v in metrics.items():
        if not isinstance(k, str):
            raise TypeError(f"{where}: metrics key {k!r} must be a str")
        if hasattr(v, "item") and getattr(v, "size", None) == 1:
            v = v.item()  # a device scalar: waits for the value (only when a save happens)
        out[k] = v
    try:
        fmt.check_metadata(out)
    except TypeError as e:
        raise UnsupportedValueError(f"{where}: {str(e).replace('metadata', 'metrics', 1)}") from None
    return out


def _record(step: int, epoch: int | None, timestamp: float, reason: str, metrics: dict | None, user: Any) -> dict:
    return {RECORD_KEY: RECORD_VERSION, "step": step, "epoch": epoch, "timestamp": timestamp, "reason": reason,
            "metrics": metrics, "jax_version": jax.__version__, "jaxckpt_version": writer._version, "user": user}


def _metadata_from(raw: Any, step: int, path: str, created: float, nbytes: int) -> tuple[StepMetadata, bool]:
    """(StepMetadata, written by a manager) from a manifest's metadata, checked like any input from disk."""
    if not (isinstance(raw, dict) and raw.get(RECORD_KEY) == RECORD_VERSION):
        return StepMetadata(step, None, created, None, None, raw, None, None, path, nbytes), False
    where = os.path.join(path, fmt.MANIFEST_NAME)

    def field(key: str, types: tuple, optional: bool = True) -> Any:
        v = raw.get(key)
        if (v is None and optional) or (isinstance(v, types) and not isinstance(v, bool)):
            return v
        expected = "/".join(t.__name__ for t in types)
        raise CorruptCheckpointError(f"{where}: step record field {key!r}: expected {expected}, "
                                     f"found {type(v).__name__}")

    meta = StepMetadata(step, field("epoch", (int,)), float(field("timestamp", (int, float), optional=False)),
                        field("reason", (str,), optional=False), field("metrics", (dict,)), raw.get("user"),
                        field("jax_version", (str,)), field("jaxckpt_version", (str,)), path, nbytes)
    return meta, True


def _deleted_leaves(state: Any) -> tuple[int, int]:
    """(deleted, all) jax.Array leaves of ``state`` (deleted: donated or freed)."""
    arrays = [x for x in jax.tree_util.tree_leaves(state) if isinstance(x, jax.Array)]
    return sum(1 for x in arrays if x.is_deleted()), len(arrays)


# ----------------------------------------------------------------------------- preemption
class _SigtermWatch:
    """Marks preemption on SIGTERM. Installed only from the main thread (Python
    allows no other); chains the previous handler; ``uninstall`` restores it."""

    def __init__(self) -> None:
        self.requested = False
        self._prev: Any = None
        self._installed = False
        self._active = True

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("CheckpointManager created outside the main thread: no SIGTERM handler installed, "
                           "preemption is not detected")
            return
        self._prev = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._handle)
        self._installed = True

    def _handle(self, signum: int, frame: Any) -> None:
        if self._active:
            self.requested = True  # no logging here: a signal handler may run inside logging's own lock
        if callable(self._prev):
            self._prev(signum, frame)
        elif not self._active and self._prev == signal.SIG_DFL:
            # Closed, but still installed (closed off the main thread, or another handler was
            # chained on top of ours): do what the default would have done.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    def uninstall(self) -> None:
        self._active = False
        if not self._installed or threading.current_thread() is not threading.main_thread():
            return  # stays installed but inert: it only forwards to the previous handler
        if signal.getsignal(signal.SIGTERM) == self._handle:
            signal.signal(signal.SIGTERM, self._prev if self._prev is not None else signal.SIG_DFL)
            self._installed = False


def _release(backend: storage.Backend, root: storage.Location, token: str, watch: _SigtermWatch) -> None:
    """Give up the directory lock; the SIGTERM handler turns inert (no reference to the manager here)."""
    watch._active = False
    backend.release_lock(root, token)


@dataclasses.dataclass(frozen=True)
class _Request:
    """The last ``save()`` arguments, kept for an exception save."""
    step: int
    state: Any
    epoch: int | None
    metrics: Any
    metadata: Any


# ----------------------------------------------------------------------------- the manager
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
    manager wrote are never deleted.

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
    ``SaveTimeoutError``. ``copy_cpu_arrays``: see ``AsyncCheckpointer``. ``_clock``: the wall clock (tests inject one); it
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
                 copy_cpu_arrays: bool | None = None,
                 _clock: Callable[[], float] = time.time):
        self._root = storage.Location.parse(directory)
        self._backend = storage.backend(self._root)
        self.directory = str(self._root)
        self._policy = SavePolicy.build(save_interval_steps, save_interval_seconds, save_on_steps)
        self._keep = KeepPolicy.build(max_to_keep, keep_time_interval, keep_period, best_metric, best_mode)
        self._naming = StepNaming.build(step_format, step_prefix)
        self.save_on_exception = bool(save_on_exception)
        self.async_save = bool(async_save)
        self.read_only = bool(read_only)
        self._clock = _clock
        self._copy_cpu = None if copy_cpu_arrays is None else bool(copy_cpu_arrays)
        self._multi = multihost.coordinator()
        self._agree = multihost.Agreement(self._multi, f"jaxckpt/mgr/{next(_manager_ids)}")
        self._lock = threading.RLock()       # guards the step tables below
        self._rotate_lock = threading.Lock()  # one rotation at a time
        self._committed: dict[int, str] = {}  # step -> directory name
        self._meta: dict[str, tuple[StepMetadata, bool]] = {}  # name -> (metadata, written by a manager)
        self._pending: dict[int, ckpt_mod.SaveHandle] = {}
        self._high = -1                        # latest committed or in-flight step
        self._last: _Request | None = None
        self._last_save_time = _clock()
        self._last_stats: StepSaveStats | None = None
        self._preempted_at: int | None = None
        self._restored_step: int | None = None
        self._closed = False
        self._watch = _SigtermWatch()
        self._release: Callable[[], Any] = lambda: None
        self._ckptr: ckpt_mod.AsyncCheckpointer | None = None
        if not self.read_only:
            self._open_for_writing(save_timeout)
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
        found: dict[int, tuple[int, str]] = {}
        for entry in self._backend.list_committed(self._root, self._naming.parse):
            step, epoch = self._naming.parse(entry)
            rank = (epoch if epoch is not None else -1, entry)  # two names for one step: the larger epoch wins
            if step not in found or rank > found[step]:
                found[step] = rank
        with self._lock:
            self._committed = {s: name for s, (_, name) in found.items()}
            self._meta.clear()
            self._high = max([*self._committed, *self._pending, -1])

    def latest_step(self) -> int | None:
        """The newest committed step (never one still being written), or None."""
        with self._lock:
            return max(self._committed) if self._committed else None

    def all_steps(self) -> list[int]:
        """The committed steps, ascending."""
        with self._lock:
            return sorted(self._committed)

    def _path(self, name: str) -> str:
        return str(self._root.join(name))

    def _step_path(self, step: int) -> str:
        with self._lock:
            name = self._committed.get(step)
        if name is None:
            shown = ", ".join(map(str, self.all_steps()[-10:])) or "none"
            hint = "; call reload() to see steps committed since" if self.read_only else ""
            raise CheckpointNotFoundError(f"{self.directory}: step {step} is not a committed checkpoint here "
                                          f"(latest committed steps: {shown}){hint}")
        return self._path(name)

    def _lookup(self, step: int) -> tuple[StepMetadata, bool]:
        path = self._step_path(step)
        name = os.path.basename(path)
        with self._lock:
            hit = self._meta.get(name)
        if hit is None:
            try:
                with reader_mod.CheckpointReader(path) as r:
                    m = r.manifest
                    hit = _metadata_from(m.metadata, step, path, m.created, m.total_bytes)
            except (CorruptCheckpointError, CheckpointNotFoundError):
                gone = self._gone(step)
                if gone is not None:
                    raise gone from None
                raise
            with self._lock:
                self._meta[name] = hit
        return hit

    def metadata(self, step: int | None = None) -> StepMetadata:
        """The record saved with ``step`` (default: the latest); reads only the manifest."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointNotFoundError(f"{self.directory}: no committed checkpoint")
        return self._lookup(as_step(step))[0]

    @property
    def last_save_stats(self) -> StepSaveStats | None:
        """The last committed save's figures (what the INFO log line says)."""
        return self._last_stats

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
        if step <= self._high:
            return None
        if self._policy.interval_seconds is None:
            return "interval" if self._policy.due(step, 0.0, self._last_save_time) else None
        due = self._agree.primary_decides(step, lambda: self._policy.due(step, self._clock(), self._last_save_time))
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
        if self.save_on_exception:
            self._last = _Request(step, state, epoch, metrics, metadata)
        if self._pending:
            self._raise_background_error()
        reason = self._decide(step, force)
        if reason is None:
            return False
        if reason == "preemption":
            return self._preemption_save(step, state, epoch, metrics, metadata)
        self._save_step(step, state, epoch, metrics, metadata, reason, overwrite, wait=False)
        return True

    def _preemption_save(self, step: int, state: Any, epoch: int | None, metrics: Any, metadata: Any) -> bool:
        """Save now and wait for the commit; then ``reached_preemption`` turns True."""
        with self._lock:
            exists = step in self._committed or step in self._pending
        if exists:  # already saved (or being saved) as this step: make sure it committed
            self._wait_all()
            self._raise_background_error()
            logger.warning("preemption: step %d was already saved; stop at this step", step)
        else:
            self._save_step(step, state, epoch, metrics, metadata, "preemption", False, wait=True)
            logger.warning("preemption: step %d committed; stop at this step", step)
        self._preempted_at = step
        return not exists

    def _save_step(self, step: int, state: Any, epoch: int | None, metrics: Any, metadata: Any, reason: str,
                   overwrite: bool, wait: bool, timeout: float | None = None) -> None:
        """Build the step record and save; ``wait``: return after the commit."""
        where = f"{self.directory}: step {step}"
        if epoch is not None:
            epoch = as_step(epoch, "epoch")
        try:
            fmt.check_metadata(metadata)
        except TypeError as e:
            raise UnsupportedValueError(f"{where}: {e}") from None
        name = self._naming.name(step, epoch)
        replaced = self._claim(step, name, overwrite)
        now = self._clock()
        record = _record(step, epoch, now, reason, _plain_metrics(metrics, where), metadata)
        path = self._path(name)
        if self.async_save or wait:
            on_commit = functools.partial(self._on_commit, step, name, record, replaced)
            handle = self._ckptr.save(path, state, metadata=record, overwrite=overwrite, label=f"step {step}",
                                       on_commit=on_commit, timeout=timeout)
            self._last_save_time = now
            with self._lock:
                self._high = max(self._high, step)
                self._pending[step] = handle  # (if it committed already, pruned as done later)
            if wait:
                handle.result()
            return
        t0 = time.perf_counter()
        res = ckpt_mod.save_sync(path, state, metadata=record, overwrite=overwrite)
        total = time.perf_counter() - t0
        self._last_save_time = now
        stats = ckpt_mod.SaveStats(total, total, res.bytes, res.files, res.bytes / max(total, 1e-9) / 1e9)
        self._committed_step(step, name, record, replaced, stats)

    def _claim(self, step: int, name: str, overwrite: bool) -> str | None:
        """Refuse an existing step unless ``overwrite``; returns the existing
        directory name of the step when it is being replaced."""
        with self._lock:
            handle = self._pending.get(step)
        if handle is not None and not handle.done():
            if not overwrite:
                raise CheckpointExistsError(f"{self._path(name)}: step {step} is being saved already "
                                            "(pass overwrite=True to replace it)")
            handle.wait()
        with self._lock:
            existing = self._committed.get(step)
        if existing is not None and not overwrite:
            raise CheckpointExistsError(f"{self._path(existing)}: step {step} already exists "
                                        "(pass overwrite=True to replace it)")
        return existing

    def _on_commit(self, step: int, name: str, record: dict, replaced: str | None,
                   handle: ckpt_mod.SaveHandle) -> None:
        """Runs on the background thread right after the commit."""
        try:
            self._committed_step(step, name, record, replaced, handle.stats)
        except Exception:  # the checkpoint is committed: bookkeeping trouble must not fail the save
            logger.exception("after committing step %d", step)

    def _committed_step(self, step: int, name: str, record: dict, replaced: str | None,
                        stats: ckpt_mod.SaveStats) -> None:
        path = self._path(name)
        info = StepSaveStats(step, record["reason"], path, stats.blocking_s, stats.total_s, stats.bytes,
                             stats.files, stats.throughput_gbps)
        with self._lock:
            self._committed[step] = name
            self._meta.pop(name, None)  # read back from the manifest when needed (an overwrite changed it)
            self._pending.pop(step, None)
            self._high = max(self._high, step)
            self._last_stats = info
        logger.info("saved step %d (%s) to %s: blocked %.3f s, committed after %.3f s, %s, %s",
                    step, info.reason, path, info.blocking_s, info.total_s, display.format_bytes(info.bytes),
                    display.format_rate(info.throughput_gbps))
        if replaced is not None and replaced != name:  # overwritten under a new name (another epoch)
            self._delete(step, replaced)
        self._rotate()

    # ------------------------------------------------------------------ retention
    def _rotate(self) -> None:
        if self._keep.max_to_keep is None:
            return
        with self._rotate_lock:
            with self._lock:
                committed = dict(self._committed)
                busy = set(self._pending)
            infos = []
            for step in committed:
                try:
                    meta, managed = self._lookup(step)
                except (CheckpointError, OSError):
                    continue  # unreadable: never ours to delete
                if managed:
                    metric = (meta.metrics or {}).get(self._keep.best_metric) if self._keep.best_metric else None
                    ok = isinstance(metric, (int, float)) and not isinstance(metric, bool) and math.isfinite(metric)
                    infos.append(RetentionInfo(step, meta.timestamp, float(metric) if ok else None))
            keep = self._keep.keep(infos) | busy | {max(committed)}
            for step in sorted(i.step for i in infos if i.step not in keep):
                self._delete(step, committed[step])

    def _delete(self, step: int, name: str) -> None:
        """Crash-safe deletion of one step directory (renamed away first).
        In a multi-process job the primary deletes; the others, which took the
        same decision from the same manifests, only forget the step."""
        path = self._path(name)
        with self._lock:
            if self._committed.get(step) == name:
                del self._committed[step]
            self._meta.pop(name, None)
        if not self._multi.is_primary:
            return
        try:
            self._backend.remove(self._root.join(name))
        except FileNotFoundError:
            return
        except OSError as e:
            logger.error("could not delete %s (step %d): %s", path, step, e)
            if self._backend.is_committed(self._root.join(name)):  # still there (else renamed away, left for the next start to clean)
                with self._lock:
                    self._committed.setdefault(step, name)
            return
        logger.info("deleted step %d (%s) by the retention rules", step, path)

    # ------------------------------------------------------------------ restoring
    def restore(self, step: int | None = None, target: Any = None, *, partial: bool = False,
                fallback: bool = False, mmap: bool = True) -> Any:
        """Restore ``step`` (default: the latest committed), waiting first for
        saves in flight. ``target``, ``partial`` and ``mmap`` as in ``jaxckpt.restore``.
        ``fallback=True``: if that checkpoint is damaged or gone, try older
        committed steps in turn and log which one was restored
        (``restored_step`` tells it too)."""
        self._wait_all()
        asked = step
        # A read-only follower may see steps deleted under it by the writer's
        # retention (only ever after a newer commit): it then re-lists and,
        # for the latest, moves on to the newer one. Bounded: the writer
        # would have to commit and rotate within each short open-and-read.
        for _ in range(_MAX_RELISTS):
            with self._lock:
                steps = sorted(self._committed, reverse=True)
            if asked is None:
                if not steps:
                    raise CheckpointNotFoundError(f"{self.directory}: no committed checkpoint")
                step = steps[0]
            step = as_step(step)
            self._step_path(step)  # raises for an unknown step
            candidates = [s for s in steps if s <= step] if fallback else [step]
            failures = []
            deleted = False
            for s in candidates:
                try:
                    out = api.restore(self._step_path(s), target, partial=partial, mmap=mmap)
                except (CorruptCheckpointError, CheckpointNotFoundError) as e:
                    gone = self._gone(s)
                    if gone is not None:  # deleted, not damaged
                        deleted = True
                        if asked is None and s == step:
                            break  # a newer step is the latest now
                        if not fallback:
                            raise gone from None
                        continue
                    if not fallback:
                        raise
                    logger.warning("restore: step %d is unusable (%s); trying an older step", s, e)
                    failures.append(f"step {s}: {e}")
                    continue
                if s != step:
                    logger.warning("restore(fallback=True): restored step %d; step %d could not be restored", s, step)
                self._restored_step = s
                return out
            if not deleted:
                raise CorruptCheckpointError(f"{self.directory}: no committed step could be restored: "
                                             + "; ".join(failures))
        raise CheckpointNotFoundError(f"{self.directory}: the latest step was deleted while being read "
                                      f"{_MAX_RELISTS} times in a row")

    def _gone(self, step: int) -> CheckpointNotFoundError | None:
        """If the directory of ``step`` no longer exists (a writer's retention
        deleted it while we read it), re-list the directory and return the
        error saying so; None if it is still there (a read error is damage)."""
        with self._lock:
            name = self._committed.get(step)
        if name is None or self._backend.exists(self._root.join(name)):
            return None
        self.reload()  # the directory changed under us: see what is there now
        return CheckpointNotFoundError(f"{self.directory}: step {step} was deleted (by the writer's retention rules) "
                                       "while being read")

    # ------------------------------------------------------------------ preemption
    def reached_preemption(self, step: int) -> bool:
        """True once a preemption signal arrived and its checkpoint (at this step
        or an earlier one) committed: the loop should exit now."""
        return self._preempted_at is not None and step >= self._preempted_at

    # ------------------------------------------------------------------ background work
    def _wait_all(self) -> None:
        """Wait for saves in flight without consuming their errors."""
        with self._lock:
            handles = list(self._pending.values())
        for h in handles:
            h.wait()

    def _raise_background_error(self) -> None:
        """Raise, once, the error of a background save that failed."""
        with self._lock:
            done = [s for s, h in self._pending.items() if h.done()]
            for s in done:
                del self._pending[s]
            if done:
                self._high = max([*self._committed, *self._pending, -1])
        if done:
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
                with self._lock:
                    self._pending.clear()
                self._ckptr.close()
        finally:
            self._watch.uninstall()
            self._release()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is not None and self.save_on_exception and not self.read_only and not self._closed:
                self._exception_save(exc_type)
        finally:
            ckpt_mod.close_after(self.close, exc_type)
        return False

    def _exception_save(self, exc_type: type) -> None:
        """Save the last state given to ``save()`` (reason "exception"), synchronously."""
        try:
            self._ckptr.wait_until_finished()
        except Exception as err:
            logger.error("a background save failed while handling %s: %s", exc_type.__name__, err)
        req, latest = self._last, self.latest_step()
        if req is None:
            logger.warning("save_on_exception: %s before any save() call; nothing to save", exc_type.__name__)
            return
        with self._lock:
            done = req.step in self._committed
        if done:
            logger.info("save_on_exception: step %d is already committed", req.step)
            return
        deleted, arrays = _deleted_leaves(req.state)
        if deleted:
            logger.warning("save_on_exception: the state given for step %d has deleted arrays (%d of %d; donated to "
                           "the step that failed?), so it cannot be saved; the last committed checkpoint (step %s) "
                           "stays the latest", req.step, deleted, arrays, latest)
            return
        # In a multi-process job the other processes may not be failing with us: then they
        # never join this save. Bound the wait so that the failing process exits promptly.
        timeout = None
        if self._multi.process_count > 1:
            timeout = min(self._ckptr.timeout or EXCEPTION_SAVE_TIMEOUT_S, EXCEPTION_SAVE_TIMEOUT_S)
        try:
            self._save_step(req.step, req.state, req.epoch, req.metrics, req.metadata, "exception", False, wait=True,
                            timeout=timeout)
        except Exception as err:
            logger.error("save_on_exception: saving step %d failed (%s: %s); the last committed checkpoint "
                         "(step %s) stays the latest", req.step, type(err).__name__, err, latest)
            return
        logger.warning("save_on_exception: saved step %d after %s", req.step, exc_type.__name__)

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else ("closed" if self._closed else "writer")
        return f"CheckpointManager({self.directory!r}, {mode}, steps={self.all_steps()[-5:]})"
