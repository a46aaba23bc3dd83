"""What a CheckpointManager decides and what it records, as plain data.

Decisions are pure and read no files, so a multi-process job can take them
once on the primary and share them: ``SavePolicy.due`` (when to save),
``KeepPolicy.keep`` (what to keep) and ``StepNaming`` (a step's directory
name, and which names are steps).

Records: on disk a step is a checkpoint whose manifest metadata is the step
record (``step_record``): ``{"jaxckpt_manager": 1, "step", "epoch",
"timestamp", "reason", "metrics", "jax_version", "jaxckpt_version", "user"}``,
plus ``"data_iterator": [state of process 0, state of process 1, ...]`` when
the step was saved with ``data_iterator=`` (each process's value, gathered by
the save's coordination and committed with the arrays). That record marks a
checkpoint as written by a manager: only such checkpoints are ever rotated
away. ``metadata_from`` reads it back as a ``StepMetadata``,
checked like any input from disk. ``StepSaveStats`` is what the log line of
one committed save says.

The caller's values in a record are checked once, by ``check_values``, on the
training thread, before anything is saved; the record around them holds only
values the manager made, so the checkpointer is told not to check it again
(``AsyncCheckpointer.save(..., metadata_checked=True)``).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import numbers
import operator
import os
import re
from typing import Any, Collection, Iterable, Mapping

import jax

from jaxckpt import display
from jaxckpt import format as fmt
from jaxckpt import version
from jaxckpt.errors import CorruptCheckpointError, UnsupportedValueError

RECORD_KEY = "jaxckpt_manager"  # its presence in a manifest's metadata marks a manager's checkpoint
RECORD_VERSION = 1
DATA_ITERATOR_KEY = "data_iterator"  # the step record's per-process data-iterator states
MAX_STEP = (1 << 63) - 1
DEFAULT_MAX_OVERHEAD = 0.02  # save_interval_steps="auto": the share of training time saves may cost


# ----------------------------------------------------------------------------- records
@dataclasses.dataclass(frozen=True)
class StepMetadata:
    """What the manager stored with one step (read from the manifest only).

    ``reason``: why it was saved ("interval", "forced", "exception",
    "preemption"); None for a checkpoint in the directory that no manager
    wrote (its ``metadata`` is then the manifest's raw metadata).
    ``timestamp``: seconds since the epoch when ``save()`` was called.
    ``nbytes``: bytes of array data. ``data_iterator_states``: the
    data-iterator state each process saved (index: process index), None when
    the step was saved without one (``CheckpointManager.data_iterator_state``
    returns this process's).
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
    data_iterator_states: tuple | None = None

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
        if self.data_iterator_states is not None:
            parts.append(f"data-iterator states of {len(self.data_iterator_states)} process(es)")
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
        if self.data_iterator_states is not None:
            rows.append(("data iterator", f"states of {len(self.data_iterator_states)} process(es)"))
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


def check_values(metrics: Mapping[str, Any] | None, metadata: Any, where: str) -> dict | None:
    """Check what the caller gives to store with a step, once: ``metadata``
    (msgpack-able plain values) and ``metrics`` (a mapping of str to values;
    jax/numpy scalars become Python numbers). Returns the plain metrics. An
    ``UnsupportedValueError`` names the bad value ("metadata['fn']: ...",
    "metrics['acc']: ..."), prefixed by ``where``."""
    try:
        fmt.check_metadata(metadata)
    except TypeError as e:
        raise UnsupportedValueError(f"{where}: {e}") from None
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


def step_record(step: int, epoch: int | None, timestamp: float, reason: str, metrics: dict | None,
                user: Any) -> dict:
    """The manifest metadata of a step; ``metrics`` and ``user`` as ``check_values`` passed them."""
    return {RECORD_KEY: RECORD_VERSION, "step": step, "epoch": epoch, "timestamp": timestamp, "reason": reason,
            "metrics": metrics, "jax_version": jax.__version__, "jaxckpt_version": version.VERSION, "user": user}


def metadata_from(raw: Any, step: int, path: str, created: float, nbytes: int) -> tuple[StepMetadata, bool]:
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

    states = field(DATA_ITERATOR_KEY, (list,))
    meta = StepMetadata(step, field("epoch", (int,)), float(field("timestamp", (int, float), optional=False)),
                        field("reason", (str,), optional=False), field("metrics", (dict,)), raw.get("user"),
                        field("jax_version", (str,)), field("jaxckpt_version", (str,)), path, nbytes,
                        None if states is None else tuple(states))
    return meta, True


# ----------------------------------------------------------------------------- checked arguments
def positive_int(name: str, v: Any) -> int | None:
    """``v`` as an int >= 1 (None stays None); ``name`` is the keyword errors name."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return int(v)


def seconds(name: str, v: Any) -> float | None:
    """A positive, finite duration (a number of seconds or a ``timedelta``) as float seconds."""
    if v is None:
        return None
    if isinstance(v, datetime.timedelta):
        v = v.total_seconds()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds or a datetime.timedelta, got {type(v).__name__}")
    if not v > 0 or math.isinf(v):
        raise ValueError(f"{name} must be a positive, finite duration, got {v}")
    return float(v)


def overhead_fraction(v: Any) -> float:
    """``max_overhead``: a fraction of training time in (0, 1)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"max_overhead must be a number (a fraction of training time), got {type(v).__name__}")
    if not 0 < v < 1:
        raise ValueError(f"max_overhead must be a fraction of training time in (0, 1), got {v}")
    return float(v)


def as_step(step: Any, what: str = "step") -> int:
    """A step number as a Python int in [0, 2**63)."""
    if isinstance(step, bool):
        raise TypeError(f"{what} must be an int, got bool")
    try:
        s = operator.index(step)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(step).__name__}") from None
    if not 0 <= s <= MAX_STEP:
        raise ValueError(f"{what} must be in [0, 2**63), got {s}")
    return s


# ----------------------------------------------------------------------------- policies
@dataclasses.dataclass(frozen=True)
class SavePolicy:
    """When a save is due. With no rule configured every step is due.
    ``interval_steps="auto"``: the manager chooses the interval from
    ``max_overhead`` (default 0.02) and ``mtbf`` (seconds), see
    ``jaxckpt/interval.py``; ``due`` here answers for the other rules only."""
    interval_steps: int | str | None = None
    interval_seconds: float | None = None
    on_steps: frozenset[int] = frozenset()
    max_overhead: float | None = None
    mtbf: float | None = None

    @classmethod
    def build(cls, interval_steps: Any, interval_seconds: Any, on_steps: Collection[int] | None,
              max_overhead: Any = None, mtbf: Any = None) -> "SavePolicy":
        steps = frozenset(as_step(s, "save_on_steps entry") for s in (on_steps or ()))
        auto = isinstance(interval_steps, str)
        if auto and interval_steps != "auto":
            raise ValueError(f"save_interval_steps must be an int or 'auto', got {interval_steps!r}")
        if not auto and (max_overhead is not None or mtbf is not None):
            raise ValueError("max_overhead= and mtbf= go with save_interval_steps='auto'")
        if auto:
            max_overhead = overhead_fraction(DEFAULT_MAX_OVERHEAD if max_overhead is None else max_overhead)
        return cls("auto" if auto else positive_int("save_interval_steps", interval_steps),
                   seconds("save_interval_seconds", interval_seconds), steps, max_overhead, seconds("mtbf", mtbf))

    def checked(self) -> "SavePolicy":
        """This policy with its fields checked (and converted) as ``build`` checks the keywords."""
        return self.build(self.interval_steps, self.interval_seconds, self.on_steps, self.max_overhead, self.mtbf)

    @property
    def auto(self) -> bool:
        return self.interval_steps == "auto"

    @property
    def every_step(self) -> bool:
        return self.interval_steps is None and self.interval_seconds is None and not self.on_steps

    def due(self, step: int, now: float, last_save: float) -> bool:
        if self.every_step:
            return True
        if isinstance(self.interval_steps, int) and step % self.interval_steps == 0:
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
        return cls(positive_int("max_to_keep", max_to_keep), seconds("keep_time_interval", keep_time_interval),
                   positive_int("keep_period", keep_period), best_metric, best_mode)

    def checked(self) -> "KeepPolicy":
        """This policy with its fields checked (and converted) as ``build`` checks the keywords."""
        return self.build(self.max_to_keep, self.time_interval, self.period, self.best_metric, self.best_mode)

    def metric(self, metrics: Mapping[str, Any] | None) -> float | None:
        """The value ``best_metric`` ranks by in a step's metrics: a finite number, else None (ranks last)."""
        v = (metrics or {}).get(self.best_metric) if self.best_metric else None
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return float(v) if ok else None

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
            unranked = [i for i in reversed(infos) if i.metric is None]  # rank last, the newer first
            kept.update(i.step for i in (ranked + unranked)[:self.max_to_keep])
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


# ----------------------------------------------------------------------------- naming
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
        if step > MAX_STEP or self.name(step, epoch) != entry:  # only canonical names ("7", not "007")
            return None
        return step, epoch
