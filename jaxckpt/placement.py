"""Placement: host -> device, the last stage of a restore (snapshot's mirror).

``put`` turns host arrays that the reader filled into committed
single-device ``jax.Array`` s. It does what ``jax.device_put(arrays,
shardings)`` does for numpy inputs, minus that call's per-array Python
work: ``jax.device_put`` builds and canonicalises the abstract value of
every array several times and re-checks every sharding, ~50 us per array on
a 2-core VM, which was 0.45-0.6 s of a 10,000-leaf restore. ``put`` builds
one abstract value per distinct (shape, dtype), resolves each sharding's
device once, and hands each array to the runtime transfer that
``jax.device_put`` ends in (``xla_client.batched_device_put``, reached
through ``pxla.batched_device_put``): 8-10 us per array.

Neither function is public API. The transfer is looked up once (the
runtime's where it exists, else pxla's); if it is missing, rejects a call,
or returns something other than what ``jax.device_put`` would (checked on
the first array of every call: type, shape, dtype, sharding, committed),
``put`` logs that once and falls back to ``jax.device_put`` for good. Only plain numpy arrays whose
dtype JAX keeps as is (no float64 -> float32 narrowing with x64 off) bound
for a ``SingleDeviceSharding`` take the fast path; anything else goes to
``jax.device_put`` in one batched call. ``tests/test_placement.py`` checks
that both paths give identical arrays (values, dtype, sharding, committed,
weak type) and that the fast path is active on the pinned JAX version.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

from jaxckpt import accelcopy
from jaxckpt import arrayinfo
from jaxckpt import config

logger = logging.getLogger("jaxckpt")

# Host -> accelerator transfers are issued in windows of about
# ``config.Tuning.accel_window_bytes``; a window is waited for before the one
# after it is issued (two in flight). Fresh-process restores of W3 (4.2 GB, 392 leaves) on an H200 host took
# 2.90 / 3.11 s with 256 MiB windows, 3.16 / 3.02 s with 64 MiB and 4.34 /
# 3.80 s with every leaf in flight at once, at 8.3-8.9 GB of peak extra RSS
# instead of 10.0-12.2 GB (``python -m benchmarks.gpu_probe restore W3``;
# why more bytes in flight cost time, likely the runtime staging pageable
# memory, was not established). 0: no windows.

_fast: tuple[Any, Any] | None | bool = None  # (ShapedArray, batched_device_put); False once disabled


def _fast_path() -> tuple[Any, Any] | None:
    global _fast
    if _fast is None:
        try:
            from jax._src import core
            from jax._src.interpreters import pxla
            from jax._src.lib import xla_client
        except ImportError as err:
            _disable(err)
            return None
        # pxla.batched_device_put ends in the runtime's own batched_device_put
        # after bookkeeping that numpy inputs do not need (test hooks, a scan
        # for jax.Array inputs): calling that directly took 10,000 transfers
        # from 0.09-0.17 s to 0.076-0.10 s. Either is checked on first use.
        direct = getattr(xla_client, "batched_device_put", None)
        transfer = direct if callable(direct) else getattr(pxla, "batched_device_put", None)
        if not (callable(transfer) and hasattr(core, "ShapedArray")):
            _disable(AttributeError("no batched_device_put in jax._src.lib.xla_client or pxla"))
            return None
        _fast = (core.ShapedArray, transfer)
    return _fast or None


def _disable(err: BaseException) -> None:
    global _fast
    _fast = False
    logger.info("jaxckpt: direct host-to-device transfer unavailable (%s: %s); using jax.device_put",
                type(err).__name__, err)


def fast_path_active() -> bool:
    """Whether ``put`` uses the direct transfer (False after a fallback)."""
    return _fast_path() is not None


def put(arrays: Sequence[np.ndarray], shardings: Sequence[Any]) -> list[jax.Array]:
    """``jax.device_put(arrays, shardings)`` for host arrays bound for single devices.

    Transfers to an accelerator go in windows of about
    ``config.current().accel_window_bytes`` with at most two windows in flight
    (see the comment on the windows above)."""
    if len(arrays) != len(shardings):
        raise ValueError(f"put: {len(arrays)} arrays but {len(shardings)} shardings")
    windows = _windows(arrays, shardings)
    if len(windows) == 1:
        return _put(arrays, shardings)
    threads = config.current().accel_put_threads
    if threads > 1:
        return _put_in_parallel(arrays, shardings, windows, threads)
    out: list[jax.Array] = []
    previous: list[jax.Array] = []
    for lo, hi in windows:
        placed = _put_window(arrays[lo:hi], shardings[lo:hi])
        jax.block_until_ready(previous)  # the window before this one has landed
        out.extend(placed)
        previous = placed
    return out


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _put_in_parallel(arrays: Sequence[np.ndarray], shardings: Sequence[Any], windows: list[tuple[int, int]],
                     threads: int) -> list[jax.Array]:
    """The windows issued from ``threads`` threads, each waiting for its window
    to land before it takes the next (``threads`` windows in flight): the
    runtime's copy of each window into its staging memory then runs on
    several cores at once."""
    with _pools_lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="jaxckpt-put")

    def window(bounds: tuple[int, int]) -> list[jax.Array]:
        lo, hi = bounds
        return jax.block_until_ready(_put_window(arrays[lo:hi], shardings[lo:hi]))

    out: list[jax.Array] = []
    for placed in pool.map(window, windows):
        out.extend(placed)
    return out


STAGE_MIN_BYTES = 1 << 20  # smaller arrays go straight to the device (one runtime call each is cheaper)


def _put_window(arrays: Sequence[np.ndarray], shardings: Sequence[Any]) -> list[jax.Array]:
    """One window of transfers; with ``config.Tuning.accel_stage_pinned``, host
    arrays of at least ``STAGE_MIN_BYTES`` bound for one accelerator go first to
    its pinned host memory (one batched call), then from there to the device
    (a DMA at ~50 GB/s on an H200 host, where pageable memory moved at ~2 GB/s)."""
    if not config.current().accel_stage_pinned:
        return _put(arrays, shardings)
    staged, pinned = [], []
    for i, (a, s) in enumerate(zip(arrays, shardings)):
        if type(a) is np.ndarray and a.nbytes >= STAGE_MIN_BYTES and type(s) is jax.sharding.SingleDeviceSharding:
            p = accelcopy.pinned_sharding(arrayinfo.single_device(s))
            if p is not None:
                staged.append(i)
                pinned.append(p)
    if not staged:
        return _put(arrays, shardings)
    out: list[Any] = [None] * len(arrays)
    picked = set(staged)
    rest = [i for i in range(len(arrays)) if i not in picked]
    for i, x in zip(rest, _put([arrays[i] for i in rest], [shardings[i] for i in rest]) if rest else ()):
        out[i] = x
    on_host = jax.device_put([arrays[i] for i in staged], pinned)
    moved = jax.device_put(on_host, [shardings[i] for i in staged], may_alias=False)
    for i, x in zip(staged, moved):
        out[i] = x
    return out


def _windows(arrays: Sequence[np.ndarray], shardings: Sequence[Any]) -> list[tuple[int, int]]:
    """Index ranges of about ``accel_window_bytes`` each, or one range for all
    when no array goes to an accelerator (on the CPU backend a transfer adopts
    the host buffer: nothing is staged, nothing is in flight)."""
    n = len(arrays)
    window = config.current().accel_window_bytes
    if window <= 0 or n < 2:
        return [(0, n)]
    seen: dict[int, bool] = {}  # by sharding identity: a tree's leaves share a few
    for s in shardings:
        hit = seen.get(id(s))
        if hit is None:
            hit = seen[id(s)] = any(arrayinfo.on_accelerator(d) for d in s.device_set)
        if hit:
            break
    else:
        return [(0, n)]
    windows, start, acc = [], 0, 0
    for i, a in enumerate(arrays):
        acc += a.nbytes
        if acc >= window:
            windows.append((start, i + 1))
            start, acc = i + 1, 0
    if start < n:
        windows.append((start, n))
    return windows


def _put(arrays: Sequence[np.ndarray], shardings: Sequence[Any]) -> list[jax.Array]:
    out: list[Any] = [None] * len(arrays)
    slow: list[int] = []
    fast = _fast_path()
    if fast is not None:
        shaped_array, transfer = fast
        avals: dict[tuple, Any] = {}
        devices: dict[int, Any] = {}
        canonical: dict[np.dtype, bool] = {}
        checked = False
        for i, (a, sharding) in enumerate(zip(arrays, shardings)):
            dev = devices.get(id(sharding))
            if dev is None:
                dev = devices[id(sharding)] = _single_device(sharding)
            if dev is False or type(a) is not np.ndarray:
                slow.append(i)
                continue
            ok = canonical.get(a.dtype)
            if ok is None:
                ok = canonical[a.dtype] = jax.dtypes.canonicalize_dtype(a.dtype) == a.dtype
            if not ok:
                slow.append(i)
                continue
            key = (a.shape, a.dtype)
            aval = avals.get(key)
            if aval is None:
                aval = avals[key] = shaped_array(a.shape, a.dtype)
            try:
                x = transfer(aval, sharding, [a], [dev], True)
                if checked is False:
                    _check_like_device_put(x, a, sharding)
                    checked = True
            except (TypeError, AttributeError, ValueError) as err:  # the internal API changed
                _disable(err)
                slow.extend(range(i, len(arrays)))
                break
            out[i] = x
    else:
        slow = list(range(len(arrays)))
    if slow:
        placed = jax.device_put([arrays[i] for i in slow], [shardings[i] for i in slow])
        for i, x in zip(slow, placed):
            out[i] = x
    return out


def _check_like_device_put(x: Any, a: np.ndarray, sharding: Any) -> None:
    """The first array of each call is checked for what ``jax.device_put``
    guarantees, so a JAX release that changed the internal function's meaning
    (not only its signature) is caught too."""
    if not (isinstance(x, jax.Array) and x.shape == a.shape and x.dtype == a.dtype
            and x.sharding == sharding and x.committed):
        raise ValueError(f"unexpected result {type(x).__name__} "
                         f"(shape {getattr(x, 'shape', None)}, dtype {getattr(x, 'dtype', None)}, "
                         f"sharding {getattr(x, 'sharding', None)}, committed {getattr(x, 'committed', None)})")


def _single_device(sharding: Any) -> Any:
    """The device of a plain ``SingleDeviceSharding`` (what the direct transfer takes), else False."""
    if type(sharding) is not jax.sharding.SingleDeviceSharding:
        return False
    return arrayinfo.single_device(sharding)
