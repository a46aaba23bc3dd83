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
  donates its state cannot reuse those buffers and allocates fresh ones.
  Whether a background save replaces the views by copies, and into which
  memory, is ``jaxckpt/hostcopy.py``'s policy; the leaves holding views are
  marked (``HostLeaf.cpu_view``).
* ``numpy.ndarray``: the caller may write into it after the save returns, so
  it is copied (``copy_numpy=False`` for synchronous saves skips that).

Only shards with ``replica_id == 0`` are taken: each unique shard is written
once. In a multi-process job, data local to one process (numpy arrays, arrays
whose devices are all local) is taken by process 0 only; every process still
records the leaf's dtype and shape, so all snapshots describe the same tree.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from concurrent.futures import Future
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np

from jaxckpt import accelcopy
from jaxckpt import arrayinfo
from jaxckpt import config
from jaxckpt import gcpause
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
    """A tree in host memory: its leaves in flattening order and its treedef."""
    treedef: Any
    leaves: tuple[HostLeaf, ...]


class ViewWatch(Protocol):
    """What ``take`` tells about the CPU jax arrays it holds by zero-copy view
    (``hostcopy.Watch``): each is appended to ``arrays``, then ``start()`` is
    called once, after ``take``'s own references to them are gone."""
    arrays: list[jax.Array]

    def start(self) -> None: ...


def take(tree: Any, *, copy_numpy: bool = True, process_index: int = 0, process_count: int = 1,
         watch: ViewWatch | None = None) -> Snapshot:
    """Copy ``tree``'s leaves to host memory the snapshot owns, CPU jax arrays
    by zero-copy view (see the module doc). ``watch``: told about those views."""
    with gcpause.paused():  # see jaxckpt/gcpause.py: half the time on 10k-leaf trees
        snap = _take(tree, copy_numpy, process_index, process_count, watch)
        if watch is not None:  # counted once _take's own references are gone
            watch.start()
    return snap


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


# Shards smaller than ``config.Tuning.pinned_min_bytes`` skip the pinned-host
# path and use copy_to_host_async (default 0: none). On an H200 host (W1, 1.1 GB, fresh device arrays per save) later saves
# blocked for 0.03 s with every shard pinned, 0.03-0.04 s with shards under
# 1 MiB on copy_to_host_async and 0.22-0.25 s with every shard on it; the first
# pinned save of a process, which allocates the pinned memory, blocked for
# 1.1-3.5 s (``python -m benchmarks.gpu_probe snapshot W1``).

def has_pinned_host(device: Any) -> bool:
    """Whether snapshots of arrays on ``device`` go through its pinned host memory."""
    return accelcopy.pinned_sharding(device) is not None


def _device_put(arrays: list[jax.Array], shardings: list[Any]) -> list[jax.Array]:
    return jax.device_put(arrays, shardings)  # (one place for tests to refuse it)


def _pack_small(direct: list[jax.Array], devices: list[Any], targets: list[Any]
                ) -> tuple[list[jax.Array], list[Any], list]:
    """Replace the small shards of ``direct`` whose chunk function is compiled by
    their packed chunks (``jaxckpt/accelcopy.py``); chunks not compiled yet are
    queued for compiling and stay shard by shard. Returns (arrays to transfer,
    their targets, [(position of a packed chunk in them, its sources, shapes)])."""
    items = [(dev, d.shape, d.dtype, d.nbytes) for d, dev in zip(direct, devices)]
    chunks = accelcopy.chunks(items, config.current().pack_max_bytes)
    if not chunks:
        return direct, targets, []
    packed_away: set[int] = set()
    moves, move_targets, packs = [], [], []
    for chunk in chunks:
        fn = accelcopy.packers.get(chunk.key)
        if fn is None:
            continue
        sources = [direct[i] for i in chunk.indices]
        try:
            moves.append(fn(*sources))
        except Exception as e:  # noqa: BLE001 - e.g. a sharding or layout the compiled function refuses
            logger.info("jaxckpt: packing %d small shards failed (%s: %s); they are copied one by one",
                        len(sources), type(e).__name__, e)
            accelcopy.packers.drop(chunk.key)  # not tried again
            continue
        move_targets.append(targets[chunk.indices[0]])
        packs.append((len(moves) - 1, sources, chunk.key[2]))
        packed_away.update(chunk.indices)
    rest = [i for i in range(len(direct)) if i not in packed_away]
    base = len(rest)
    packs = [(base + pos, sources, shapes) for pos, sources, shapes in packs]
    return [direct[i] for i in rest] + moves, [targets[i] for i in rest] + move_targets, packs


def _start_transfers(arrays: list[jax.Array]) -> dict[int, Any]:
    """Start the device->host copy of every (single-device) array before any is
    waited on. Returns, by ``id`` of the source, the pinned-host copy to read
    (a jax.Array, or a numpy view of a packed chunk's copy); sources missing
    from it had ``copy_to_host_async`` started instead."""
    direct: list[jax.Array] = []
    devices: list[Any] = []
    targets: list[Any] = []
    min_bytes = config.current().pinned_min_bytes
    for d in arrays:
        device = next(iter(d.sharding.device_set))
        s = accelcopy.pinned_sharding(device)
        if s is None or d.nbytes < min_bytes:
            d.copy_to_host_async()
        else:
            direct.append(d)
            devices.append(device)
            targets.append(s)
    if not direct:
        return {}
    moves, move_targets, packs = _pack_small(direct, devices, targets)
    try:
        copies = _device_put(moves, move_targets)
    except Exception as e:  # noqa: BLE001 - e.g. pinned host memory exhausted: the slow path still works
        logger.debug("transfer to pinned host memory refused (%s: %s); using copy_to_host_async",
                     type(e).__name__, e)
        for d in direct:
            d.copy_to_host_async()
        return {}
    unpacked = len(moves) - len(packs)  # the packed chunks come last
    out: dict[int, Any] = {id(d): c for d, c in zip(moves[:unpacked], copies[:unpacked])}
    for pos, sources, shapes in packs:
        host = np.asarray(copies[pos])
        for d, view in zip(sources, accelcopy.unpack(host, shapes)):
            out[id(d)] = view
    return out


class _Placement(NamedTuple):
    """What a snapshot takes of the arrays of one sharding (learnt once per
    sharding and ``take``: shardings are usually shared, or equal, objects)."""
    part: str  # "whole": the whole array; "shards": each local shard with replica_id 0; "skip": nothing
    accelerator: bool  # a device->host transfer (else a zero-copy view of a CPU buffer)
    one_copy: bool  # "whole" of a replicated accelerator array: one device's copy is transferred


def _placement(sharding: Any, others_take_local: bool) -> _Placement:
    # Process-local data (numpy arrays, arrays on this process's devices only)
    # is the same on every process of an SPMD job: the primary writes it once.
    devices = sharding.device_set
    local = sharding.is_fully_addressable
    if local and others_take_local:
        part = "skip"
    elif local and (len(devices) == 1 or sharding.is_fully_replicated):
        part = "whole"
    else:
        part = "shards"
    accelerator = arrayinfo.on_accelerator(next(iter(devices)))
    return _Placement(part, accelerator, accelerator and len(devices) > 1)


# Builds a NamedTuple from a tuple of all its fields, in C: a NamedTuple's own
# constructor is a Python function (0.3 us a call on the 2-core VM, 8x a tuple),
# and the training thread builds two records per jax array leaf.
_record = tuple.__new__


class _Pending(NamedTuple):
    """A jax array leaf, to be read into host memory once every transfer started."""
    index: int  # in the flattened tree
    dtype: str
    impl: str | None  # PRNG key implementation, for a key array
    shape: tuple[int, ...]
    parts: list[tuple[arrayinfo.Box, jax.Array]]  # the device arrays to read, by box
    cpu_view: bool


class _FirstPass(NamedTuple):
    """Every leaf looked at, nothing waited for."""
    out: list[HostLeaf | None]  # the leaves done already (host data), None where pending
    pending: list[_Pending]
    accel: list[jax.Array]  # the single-device arrays to transfer


def _key_data(tree: Any, i: int, x: jax.Array) -> tuple[jax.Array, str, str]:
    """(data, its dtype name, key implementation) of a jax array whose dtype
    the format has no name for: a PRNG key array, else an error."""
    if arrayinfo.is_key_array(x):
        impl = str(jax.random.key_impl(x))
        x = jax.random.key_data(x)
        name = arrayinfo.DTYPE_NAMES.get(x.dtype)
        if name is not None:
            return x, name, impl
    raise _unsupported(tree, i, f"dtype {x.dtype} is not supported by the format")


def _first_pass(tree: Any, leaves: list[Any], copy_numpy: bool, local_owner: bool, others_take_local: bool,
                watch: ViewWatch | None) -> _FirstPass:
    # Per-leaf work is kept to a few microseconds: what a sharding means is cached.
    placements: dict[Any, _Placement] = {}
    names = arrayinfo.DTYPE_NAMES
    pending: list[_Pending] = []
    accel: list[jax.Array] = []
    viewed = None if watch is None else watch.arrays.append
    out: list[HostLeaf | None] = [None] * len(leaves)
    for i, x in enumerate(leaves):
        if isinstance(x, jax.Array):
            impl = None
            name = names.get(x.dtype)
            if name is None:
                x, name, impl = _key_data(tree, i, x)
            sharding = x.sharding
            p = placements.get(sharding)
            if p is None:
                p = placements[sharding] = _placement(sharding, others_take_local)
            shape = x.shape
            if p.part == "whole":
                parts = [(arrayinfo.full_box(shape), x.addressable_shards[0].data if p.one_copy else x)]
            elif p.part == "shards":
                parts = [(arrayinfo.index_box(s.index, shape), s.data) for s in x.addressable_shards if s.replica_id == 0]
            else:
                parts = []
            if p.accelerator:
                accel.extend(d for _, d in parts)
            elif viewed is not None:
                viewed(x)
            pending.append(_record(_Pending, (i, name, impl, shape, parts, not p.accelerator)))
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
    return _FirstPass(out, pending, accel)


def _take(tree: Any, copy_numpy: bool, process_index: int, process_count: int,
          watch: ViewWatch | None) -> Snapshot:
    leaves, treedef = tree_mod.flatten(tree)
    local_owner = process_index == 0
    out, pending, accel = _first_pass(tree, leaves, copy_numpy, local_owner, process_count > 1 and not local_owner,
                                      watch)
    # Start every transfer before waiting on any.
    copies = _start_transfers(accel)
    for i, name, impl, shape, parts, cpu in pending:
        if len(parts) == 1:  # the common case, without a generator
            ((box, d),) = parts
            host = ((box, np.asarray(copies.get(id(d), d) if copies else d)),)
        else:
            host = tuple((box, np.asarray(copies.get(id(d), d))) for box, d in parts)
        out[i] = _record(HostLeaf, ("key" if impl else "array", name, shape, host, None, impl, cpu))
    return Snapshot(treedef, tuple(out))


def _planned_parts(shape: tuple[int, ...], sharding: Any, p: _Placement) -> list[tuple[Any, tuple[int, ...]]]:
    """(device, shard shape) of each transfer ``_first_pass`` makes for an
    array of ``shape`` with ``sharding``, in the same order."""
    if p.part == "skip":
        return []
    if p.part == "whole":
        return [(next(iter(sharding.addressable_devices_indices_map(shape))), shape)]
    me = jax.process_index()
    seen: set[tuple] = set()
    out = []
    for device, index in sharding.devices_indices_map(shape).items():
        box = arrayinfo.index_box(index, shape)
        if box in seen:
            continue  # not replica 0 of its shard
        seen.add(box)
        if device.process_index == me:
            out.append((device, tuple(hi - lo for lo, hi in box)))
    return out


def planned_transfers(tree: Any, process_index: int = 0, process_count: int = 1
                      ) -> list[tuple[Any, tuple[int, ...], np.dtype, int]]:
    """(device, shape, dtype, bytes) of each device->host transfer a snapshot of
    ``tree`` starts, in order; ``tree`` may hold ``jax.ShapeDtypeStruct`` leaves
    (as ``jax.eval_shape`` gives; without a sharding: the default device)."""
    leaves, _ = tree_mod.flatten(tree)
    others_take_local = process_count > 1 and process_index != 0
    placements: dict[Any, _Placement] = {}
    items = []
    for x in leaves:
        if not isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
            continue
        shape, dtype, extra = tuple(x.shape), x.dtype, ()
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            data = jax.eval_shape(jax.random.key_data, x)
            extra, dtype = tuple(data.shape[len(shape):]), data.dtype
        if arrayinfo.DTYPE_NAMES.get(np.dtype(dtype)) is None:
            continue
        sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        p = placements.get(sharding)
        if p is None:
            p = placements[sharding] = _placement(sharding, others_take_local)
        if not p.accelerator:
            continue
        itemsize = np.dtype(dtype).itemsize
        for device, part in _planned_parts(shape, sharding, p):
            full = part + extra
            items.append((device, full, np.dtype(dtype), math.prod(full) * itemsize))
    return items


def prepare(tree: Any, *, process_index: int = 0, process_count: int = 1) -> Future:
    """(any thread; returns at once) Get ready, in the background, to snapshot
    trees shaped like ``tree``: warm the pinned host memory its transfers
    take and compile the packing of its small accelerator shards
    (``jaxckpt/accelcopy.py``). Even the tree is looked at on the background
    thread. The future resolves when all that is done. ``tree`` is let go of
    once planned, before the compiles: holding a state's arrays that long
    would keep a replaced state alive on a full device."""
    held = [tree]
    del tree

    def plan() -> tuple[list[tuple], list[tuple[Any, int]]]:
        items = planned_transfers(held.pop(), process_index, process_count)
        chunks = accelcopy.chunks(items, config.current().pack_max_bytes)
        packed = {i for c in chunks for i in c.indices}
        min_bytes = config.current().pinned_min_bytes
        sizes = [(d, n) for i, (d, _, _, n) in enumerate(items) if i not in packed and n >= min_bytes]
        sizes += [(c.key[0], sum(items[i][3] for i in c.indices)) for c in chunks]
        return [c.key for c in chunks], sizes

    return accelcopy.prepare(plan)
