"""Snapshot: device -> host. The only stage the training loop waits for.

``take`` starts every device-to-host transfer before it waits on any, so the
transfers overlap, then takes host buffers the checkpoint owns:

* GPU/TPU ``jax.Array``: one batched ``jax.device_put`` of every unique local
  shard to the device's ``pinned_host`` memory, then ``numpy.asarray`` of each
  copy (a view of the pinned buffer, which it keeps alive). DMA into pinned
  memory ran at 53 GB/s on an H200 where ``copy_to_host_async`` into fresh
  pageable memory ran at 1.9 GB/s (``python -m benchmarks.transfer_probe``).
  Devices without pinned host memory, or a refused transfer, fall back to
  ``copy_to_host_async`` on every shard, then ``numpy.asarray``. Either way
  the device buffers may be donated or deleted as soon as ``take`` returns.
* CPU ``jax.Array``: ``numpy.asarray`` is a zero-copy view. While the view is
  alive the runtime keeps the buffer: ``delete()`` does not free it and a
  jitted call with ``donate_argnums`` does not reuse it (tested in
  ``tests/test_async.py``), so no copy is needed for correctness. It has a
  cost, though: until the background write ends, a training step that
  donates its state cannot reuse those buffers and allocates fresh ones. With
  a 360 MiB state and 15 ms steps this doubled the step time during saves on
  a 2-core VM (+115%), where a copy at snapshot time cost +13%;
  ``copy_cpu=True`` (``AsyncCheckpointer(copy_cpu_arrays=True)``) takes the
  copy, into pooled host buffers (small leaves share one); the checkpointer
  passes ``missing`` so that only ready buffers are used and a leaf without
  one stays a view for that save (see ``take``).
* ``numpy.ndarray``: the caller may write into it after the save returns, so
  it is copied (``copy_numpy=False`` for synchronous saves skips that).

Only shards with ``replica_id == 0`` are taken: each unique shard is written
once. In a multi-process job, data local to one process (numpy arrays, arrays
whose devices are all local) is taken by process 0 only; every process still
records the leaf's dtype and shape, so all snapshots describe the same tree.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import mmap
import sys
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxckpt import arrayinfo
from jaxckpt import config
from jaxckpt import gcpause
from jaxckpt import format as fmt
from jaxckpt import memory
from jaxckpt import tree as tree_mod
from jaxckpt.errors import UnsupportedValueError

logger = logging.getLogger("jaxckpt")


class HostLeaf(NamedTuple):
    """One leaf of a snapshot. (A tuple, not a frozen dataclass: a snapshot of a
    10,000-leaf tree builds 10,000 of them on the training thread.)"""
    kind: str  # "array" | "scalar" | "key" | "value"
    dtype: str | None = None  # format dtype name
    shape: tuple[int, ...] = ()
    shards: tuple[tuple[arrayinfo.Box, np.ndarray], ...] = ()  # C-contiguous, little-endian host buffers
    value: Any = None
    impl: str | None = None
    cpu_view: bool = False  # shards are zero-copy views of CPU jax buffers


@dataclasses.dataclass(frozen=True)
class Snapshot:
    treedef: Any
    leaves: tuple[HostLeaf, ...]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for leaf in self.leaves for _, a in leaf.shards)


def _little_endian(a: np.ndarray, copy: bool) -> np.ndarray:
    if a.dtype.byteorder == ">":
        return a.astype(a.dtype.newbyteorder("<"), order="C")  # a copy in native order
    if copy or not a.flags.c_contiguous:
        return np.array(a, order="C", copy=True)
    return a


def _unsupported(tree: Any, i: int, what: str) -> UnsupportedValueError:
    paths, _, _ = tree_mod.leaf_paths(tree)
    return UnsupportedValueError(f"leaf {paths[i]!r}: {what}")


def _python_value(v: Any) -> bool:
    if isinstance(v, (bool, float, complex, str)):
        return True
    return isinstance(v, int) and -(1 << 63) <= v < (1 << 64)


def _page_aligned(n: int) -> np.ndarray:
    """At least ``n`` bytes (one page at the least) of ``memory.aligned_buffer`` memory:
    page-aligned, so the writer can hand a buffer to O_DIRECT as it is, with no
    copy into staging memory, and in huge pages where the kernel allows.
    Callers slice the first ``n`` bytes; the pool keeps this whole array."""
    return np.frombuffer(memory.aligned_buffer(n), np.uint8)


class HostPool:
    """Host buffers for CPU snapshot copies, reused from one save to the next:
    fresh memory costs a page fault per 4 KiB (slow on VMs), reused memory
    copies at memcpy speed. Holds about one state's worth per save in flight;
    buffers of a size no save has asked for in its last ``KEEP_SAVES`` saves
    (the tree changed) are let go (``end_save``)."""

    KEEP_SAVES = 4

    def __init__(self) -> None:
        self._free: dict[int, list[np.ndarray]] = {}
        self._asked: dict[int, int] = {}  # size -> number of the save that last asked for it
        self._saves = 0
        self._lock = threading.Lock()

    def get(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A free buffer of this size, else a new one."""
        buf = self.take(shape, dtype)
        if buf is None:
            n = math.prod(shape) * np.dtype(dtype).itemsize
            buf = _page_aligned(n)[:n].view(dtype).reshape(shape)
        return buf

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        """A free buffer of this size, or None: never allocates."""
        n = math.prod(shape) * np.dtype(dtype).itemsize
        with self._lock:
            self._asked[n] = self._saves
            bufs = self._free.get(n)
            raw = bufs.pop() if bufs else None
        return None if raw is None else raw[:n].view(dtype).reshape(shape)

    def end_save(self) -> None:
        """Count a finished save; drop free buffers of sizes no recent save asked for."""
        with self._lock:
            self._saves += 1
            for n in [n for n in {*self._asked, *self._free}
                      if self._saves - self._asked.get(n, -self.KEEP_SAVES - 1) > self.KEEP_SAVES]:
                self._asked.pop(n, None)
                self._free.pop(n, None)

    def warm(self, sizes: list[int]) -> None:
        """Make sure a free buffer is ready for each of these byte sizes
        (repeats counted), allocating and faulting in the pages of the ones
        that are not (called on a background thread), so that copies into the
        pool run at memcpy speed instead of page-fault speed. Buffers already
        free count: a second call for the same sizes allocates nothing."""
        need = collections.Counter(sizes)
        with self._lock:
            for n in need:  # asked for now, by the save that is to use them
                self._asked[n] = self._saves
            todo = [n for n, k in need.items() for _ in range(k - len(self._free.get(n, ())))]
        for n in todo:
            raw = _page_aligned(n)
            memory.prefault(memoryview(raw))  # one call populates every page (Linux), where supported
            raw[::mmap.PAGESIZE] = 0  # else one write per page faults it in
            with self._lock:
                self._free.setdefault(n, []).append(raw)

    def put(self, arrays: list[np.ndarray]) -> None:
        with self._lock:
            for a in arrays:
                raw = a.base if a.base is not None else a
                while raw.base is not None and isinstance(raw.base, np.ndarray):
                    raw = raw.base
                self._free.setdefault(a.nbytes, []).append(raw)


def take(tree: Any, *, copy_numpy: bool = True, copy_cpu: bool = False, process_index: int = 0,
         process_count: int = 1, pool: HostPool | None = None, pooled: list | None = None,
         viewed: Watch | None = None, missing: list[int] | None = None) -> Snapshot:
    """Copy ``tree``'s leaves to host memory the snapshot owns (see module doc).

    ``viewed``: when given (and ``copy_cpu`` is false), a ``Watch`` told about
    the CPU jax arrays the snapshot holds by zero-copy view.
    ``missing``: when given, CPU copies go only into buffers ``pool`` has
    ready; a leaf without one stays a zero-copy view (safe: the runtime keeps
    a viewed buffer, see the module doc) and the byte size it needed is
    appended to ``missing``, for the caller to ``pool.warm`` off the training
    thread. Copying into fresh memory faults in every page on the training
    thread: a first 1.1 GB copy blocked a save for 2.5 s on a 2-core VM."""
    with gcpause.paused():  # see jaxckpt/gcpause.py: half the time on 10k-leaf trees
        snap = _take(tree, copy_numpy, process_index, process_count, None if copy_cpu else viewed)
        if viewed is not None and not copy_cpu:  # counted once _take's own references are gone
            viewed.start()
    if copy_cpu:
        with gcpause.paused():  # a view and a tuple or two per leaf
            snap = _copy_into(snap, pool if pool is not None else HostPool(), pooled if pooled is not None else [],
                              missing)
    return snap


class Watch:
    """Tells whether the caller let go of the arrays a snapshot views: donated
    or deleted them, or dropped its references (a loop that went on to the
    next state). A view then holds memory the loop would have reused; with
    donation a step cannot reuse its buffers and allocates fresh ones.
    Uses CPython reference counts, taken by the same code at both times."""

    def __init__(self) -> None:
        self.arrays: list[jax.Array] = []  # the CPU arrays the snapshot views
        self._counts: list[int] = []

    def _now(self) -> list[int]:
        counts = []
        for a in self.arrays:
            counts.append(sys.getrefcount(a))
        return counts

    def start(self) -> None:
        self._counts = self._now()

    def moved_on(self) -> bool:
        if any(a.is_deleted() for a in self.arrays):
            return True
        return any(now < then for now, then in zip(self._now(), self._counts))


def _cpu_views(snap: Snapshot) -> Iterator[np.ndarray]:
    """The host arrays of ``snap`` that are views of CPU jax buffers (not the
    pinned-host copies of accelerator arrays, which are views too). Marked
    when taken: a view's ``base`` does not always lead back to its array
    (bfloat16 views hold a capsule)."""
    for leaf in snap.leaves:
        if leaf.cpu_view:
            for _, a in leaf.shards:
                yield a


# CPU views smaller than this are copied into one shared pooled buffer (an
# arena, each at a 64-byte aligned offset) instead of a pooled buffer each:
# a 10,000-leaf tree then costs one buffer, not 10,000 mappings and lookups.
ARENA_LEAF_BYTES = 64 << 10
_ARENA_ALIGN = 64


def _arena_offsets(views: list[np.ndarray]) -> tuple[dict[int, int], int]:
    """Offsets in the arena of the small ``views`` (by ``id``), and its size."""
    offsets: dict[int, int] = {}
    end = 0
    for a in views:
        if 0 < a.nbytes < ARENA_LEAF_BYTES:
            offsets[id(a)] = end
            end += -(-a.nbytes // _ARENA_ALIGN) * _ARENA_ALIGN
    return offsets, end


def cpu_view_sizes(snap: Snapshot) -> list[int]:
    """Bytes of each pooled buffer a copying snapshot of the same tree asks for."""
    views = list(_cpu_views(snap))
    _, arena = _arena_offsets(views)
    return [a.nbytes for a in views if a.nbytes >= ARENA_LEAF_BYTES] + ([arena] if arena else [])


def _copy_into(snap: Snapshot, pool: HostPool, pooled: list, missing: list[int] | None = None) -> Snapshot:
    """Replace views of CPU jax buffers by copies in pooled buffers (only ready
    ones when ``missing`` is given; see ``take``)."""
    offsets, arena_bytes = _arena_offsets(list(_cpu_views(snap)))

    def buffer(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        if missing is None:
            buf = pool.get(shape, dtype)
        else:
            buf = pool.take(shape, dtype)
            if buf is None:
                missing.append(math.prod(shape) * np.dtype(dtype).itemsize)
                return None
        pooled.append(buf)
        return buf

    arena = buffer((arena_bytes,), np.dtype(np.uint8)) if arena_bytes else None
    leaves = []
    for leaf in snap.leaves:
        if not leaf.cpu_view:
            leaves.append(leaf)
            continue
        shards = []
        viewed = False
        for box, a in leaf.shards:
            off = offsets.get(id(a))
            if not a.nbytes:
                buf = np.empty(a.shape, a.dtype)
            elif off is None:
                buf = buffer(a.shape, a.dtype)
            else:
                buf = None if arena is None else arena[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
            if buf is None:
                shards.append((box, a))  # no ready buffer: stays a view this time
                viewed = True
                continue
            np.copyto(buf, a)
            shards.append((box, buf))
        leaves.append(leaf._replace(shards=tuple(shards), cpu_view=viewed))
    return Snapshot(snap.treedef, tuple(leaves))


# Shards smaller than ``config.Tuning.pinned_min_bytes`` skip the pinned-host
# path and use copy_to_host_async (default 0: none). On an H200 host (W1, 1.1 GB, fresh device arrays per save) later saves
# blocked for 0.03 s with every shard pinned, 0.03-0.04 s with shards under
# 1 MiB on copy_to_host_async and 0.22-0.25 s with every shard on it; the first
# pinned save of a process, which allocates the pinned memory, blocked for
# 1.1-3.5 s (``python -m benchmarks.gpu_probe snapshot W1``).

_NO_PINNED = object()
_pinned: dict[Any, Any] = {}  # device -> its pinned_host SingleDeviceSharding, or _NO_PINNED


def _pinned_sharding(device: Any) -> Any:
    s = _pinned.get(device)
    if s is None:
        try:
            kinds = {m.kind for m in device.addressable_memories()}
        except Exception:  # noqa: BLE001 - a runtime without memory kinds
            kinds = set()
        s = _pinned[device] = (jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
                               if "pinned_host" in kinds else _NO_PINNED)
    return s


def _device_put(arrays: list[jax.Array], shardings: list[Any]) -> list[jax.Array]:
    return jax.device_put(arrays, shardings)  # (one place for tests to refuse it)


def _start_transfers(arrays: list[jax.Array]) -> dict[int, jax.Array]:
    """Start the device->host copy of every (single-device) array before any is
    waited on. Returns, by ``id`` of the source, the pinned-host copy to read;
    sources missing from it had ``copy_to_host_async`` started instead."""
    direct: list[jax.Array] = []
    targets: list[Any] = []
    min_bytes = config.current().pinned_min_bytes
    for d in arrays:
        s = _pinned_sharding(next(iter(d.sharding.device_set)))
        if s is _NO_PINNED or d.nbytes < min_bytes:
            d.copy_to_host_async()
        else:
            direct.append(d)
            targets.append(s)
    if not direct:
        return {}
    try:
        copies = _device_put(direct, targets)
    except Exception as e:  # noqa: BLE001 - e.g. pinned host memory exhausted: the slow path still works
        logger.debug("transfer to pinned host memory refused (%s: %s); using copy_to_host_async",
                     type(e).__name__, e)
        for d in direct:
            d.copy_to_host_async()
        return {}
    return {id(d): c for d, c in zip(direct, copies)}


def _take(tree: Any, copy_numpy: bool, process_index: int, process_count: int,
          viewed: Watch | None) -> Snapshot:
    # Process-local data (numpy arrays, arrays on this process's devices only)
    # is the same on every process of an SPMD job: the primary writes it once.
    local_owner = process_index == 0
    leaves, treedef = tree_mod.flatten(tree)
    # Per-leaf work is kept to a few microseconds: shardings are usually shared
    # objects (or equal ones), so what we learn about one is cached for this call.
    shard_info: dict[Any, tuple[Any, str, bool, bool]] = {}
    pending: list[tuple[int, str, str | None, tuple[int, ...], list[tuple[arrayinfo.Box, jax.Array]]]] = []
    accel: list[jax.Array] = []
    out: list[HostLeaf | None] = [None] * len(leaves)
    for i, x in enumerate(leaves):
        if isinstance(x, jax.Array):
            impl = None
            name = arrayinfo.DTYPE_NAMES.get(x.dtype)
            if name is None and arrayinfo.is_key_array(x):
                impl = str(jax.random.key_impl(x))
                x = jax.random.key_data(x)
                name = arrayinfo.DTYPE_NAMES.get(x.dtype)
            if name is None:
                raise _unsupported(tree, i, f"dtype {x.dtype} is not supported by the format")
            sharding = x.sharding
            info = shard_info.get(sharding)
            if info is None:
                devices = sharding.device_set
                local = sharding.is_fully_addressable
                if local and process_count > 1 and not local_owner:
                    mode = "skip"
                elif local and (len(devices) == 1 or sharding.is_fully_replicated):
                    mode = "whole"
                else:
                    mode = "shards"
                info = shard_info[sharding] = (sharding, mode, arrayinfo.on_accelerator(next(iter(devices))),
                                                   len(devices) > 1)
            shape = x.shape
            if info[1] == "whole":
                # a replicated accelerator array: one device's copy is transferred
                parts = [(arrayinfo.full_box(shape), x.addressable_shards[0].data if info[2] and info[3] else x)]
            elif info[1] == "shards":
                parts = [(arrayinfo.index_box(s.index, shape), s.data) for s in x.addressable_shards if s.replica_id == 0]
            else:
                parts = []
            if info[2]:
                accel.extend(d for _, d in parts)
            elif viewed is not None:
                viewed.arrays.append(x)
            pending.append((i, name, impl, shape, parts, not info[2]))
        elif isinstance(x, (np.ndarray, np.generic)):
            a = np.asarray(x)
            name = arrayinfo.dtype_name(a.dtype)
            if name is None:
                raise _unsupported(tree, i, f"dtype {a.dtype} is not supported by the format")
            kind = "scalar" if isinstance(x, np.generic) else "array"
            if local_owner:
                a = _little_endian(a, copy_numpy)
                out[i] = HostLeaf(kind, name, a.shape, ((arrayinfo.full_box(a.shape), a),))
            else:
                out[i] = HostLeaf(kind, name, a.shape, ())
        elif _python_value(x):
            out[i] = HostLeaf("value", value=x)
        else:
            raise _unsupported(tree, i, f"{type(x).__name__} is not storable (use arrays, "
                               "Python int/float/bool/complex/str, or None)")

    # Start every transfer before waiting on any.
    copies = _start_transfers(accel)
    for i, name, impl, shape, parts, cpu in pending:
        if len(parts) == 1:  # the common case, without a generator
            ((box, d),) = parts
            host = ((box, np.asarray(copies.get(id(d), d) if copies else d)),)
        else:
            host = tuple((box, np.asarray(copies.get(id(d), d))) for box, d in parts)
        out[i] = HostLeaf("key" if impl else "array", name, shape, host, None, impl, cpu)
    return Snapshot(treedef, tuple(out))
