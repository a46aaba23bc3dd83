"""Tuning knobs, in one documented place.

Each knob was set by a measurement (the figures are at the code that uses it)
and is exposed so that benchmarks can compare settings on new hardware
without patching module globals::

    from jaxckpt import config
    with config.tuned(accel_window_bytes=64 << 20):
        jaxckpt.restore(path, target)

``config.current()`` is read when an operation starts (a snapshot, a
restore), so a change takes effect from the next operation on. Not part of
the stable API: the knobs may change with the code that uses them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Iterator


@dataclasses.dataclass(frozen=True)
class Tuning:
    """``pinned_min_bytes``: device shards smaller than this skip the
    pinned-host snapshot path and use ``copy_to_host_async`` (0: every shard
    is pinned; see ``jaxckpt/snapshot.py``).
    ``pack_max_bytes``: accelerator shards of at most this many bytes are
    packed on their device into chunks moved to the host in one transfer
    each (0: none; see ``jaxckpt/accelcopy.py``).
    ``accel_put_threads``: threads that issue a restore's host-to-accelerator
    windows (1: one after the other; see ``jaxckpt/placement.py``).
    ``accel_stage_pinned``: whether those windows go through the device's
    pinned host memory (host -> pinned -> device) instead of straight from
    pageable memory (off: not yet measured on a GPU; ``python -m
    benchmarks.gpu_probe restore W3`` compares both).
    ``map_for_accelerators``: whether a restore's host arrays bound for an
    accelerator may be copy-on-write mappings of the file, like those that
    stay on the host (off until measured on a GPU: ``python -m
    benchmarks.gpu_probe restore W3`` compares both).
    ``accel_window_bytes``: host-to-accelerator transfers of a restore go in
    windows of about this many bytes, two in flight (0: no windows; see
    ``jaxckpt/placement.py``).
    ``lease_seconds``: how long the writer lock of a directory in a bucket
    holds without renewal (its holder renews it every third of that); a
    lease expired by twice this is taken over (``jaxckpt/objlock.py``)."""
    pinned_min_bytes: int = 0
    pack_max_bytes: int = 1 << 20
    accel_put_threads: int = 1
    accel_stage_pinned: bool = False
    map_for_accelerators: bool = False
    accel_window_bytes: int = 256 << 20
    lease_seconds: float = 60.0

    def __post_init__(self) -> None:
        for name in ("pinned_min_bytes", "pack_max_bytes", "accel_window_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if isinstance(self.lease_seconds, bool) or not isinstance(self.lease_seconds, (int, float)) \
                or not self.lease_seconds > 0:
            raise ValueError(f"lease_seconds must be a number > 0, got {self.lease_seconds!r}")
        if isinstance(self.accel_put_threads, bool) or not isinstance(self.accel_put_threads, int) \
                or self.accel_put_threads < 1:
            raise ValueError(f"accel_put_threads must be an int >= 1, got {self.accel_put_threads!r}")
        if not isinstance(self.accel_stage_pinned, bool):
            raise ValueError(f"accel_stage_pinned must be a bool, got {self.accel_stage_pinned!r}")
        if not isinstance(self.map_for_accelerators, bool):
            raise ValueError(f"map_for_accelerators must be a bool, got {self.map_for_accelerators!r}")


_current = Tuning()
_lock = threading.Lock()


def current() -> Tuning:
    """The settings in force."""
    return _current


def configure(**changes) -> Tuning:
    """Change some settings for the rest of the process; returns the previous ones."""
    global _current
    with _lock:
        previous = _current
        _current = dataclasses.replace(previous, **changes)
    return previous


@contextlib.contextmanager
def tuned(**changes) -> Iterator[Tuning]:
    """Settings changed for the duration of a ``with`` block (process-wide)."""
    global _current
    previous = configure(**changes)
    try:
        yield _current
    finally:
        with _lock:
            _current = previous


def write_workers() -> int:
    """I/O threads of a save (``AsyncCheckpointer(max_workers=None)``): 4..16 by
    core count. Writes wait on the disk: a few threads keep its queue full even
    on 2 cores, and hashing and copying release the GIL."""
    return min(16, max(4, os.cpu_count() or 1))


def read_workers() -> int:
    """Read threads of a restore: 8..16 by core count. Reads wait on the disk
    (and on page faults of fresh buffers): more requests in flight than cores
    measured faster on cold reads (8 vs 4: 0.47 s vs 0.54 s for 0.86 GB on 2 cores)."""
    return min(16, max(8, 2 * (os.cpu_count() or 1)))
