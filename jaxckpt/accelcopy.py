"""Accelerator -> host copies for the snapshot: pinned host memory, small
shards packed on their device, and both prepared ahead of the first save.

``snapshot.take`` moves accelerator shards into the device's ``pinned_host``
memory with one batched ``jax.device_put``. Two costs remain that this module
takes off the training thread:

* **Many small shards.** Each transfer costs the runtime tens of
  microseconds whatever its size: a 10,000-leaf state of 1-16 KiB vectors
  (W2) blocked a save for 0.74 s on an H200 host. Shards of at most
  ``config.Tuning.pack_max_bytes`` are instead grouped by (device, dtype), in
  tree order, into chunks of at most ``PACK_LEAVES`` shards and
  ``PACK_BYTES`` bytes; each chunk is concatenated on its device by one
  compiled function (``lax.concatenate`` of the flattened shards: no
  bitcasts, which made XLA's compile 20x slower) and moved to the host as one
  array, whose slices are the shards' host copies (views, no copy).
* **Compiling a chunk** takes 0.1-0.3 s (512 shards, 2-core VM), so it never
  happens on the training thread: a chunk whose function is not compiled yet
  is transferred shard by shard that time, and its function is compiled on
  a background thread (``packer``) for the next save.
* **The first pinned allocation.** The runtime allocates pinned host memory
  on first use and keeps it for reuse: the first save of a process blocked
  1.1 s (1.1 GB) / 4.1 s (4.2 GB) where later ones blocked 0.03 / 0.09 s.
  ``prepare`` allocates the same sizes on the background thread and frees
  them, so that the first save finds the memory ready.

Pure bookkeeping (``chunks``) is separate from the runtime calls, so the
CPU backend tests run every path (the CPU backend's devices have pinned host
memory too, and a test may route its arrays through it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import numpy as np

logger = logging.getLogger("jaxckpt")

PACK_LEAVES = 512  # shards per chunk: XLA's compile time grows faster than linearly with operands
PACK_BYTES = 64 << 20  # bytes per chunk: the device holds one packed copy of each chunk while it moves
PACK_MIN_LEAVES = 8  # a (device, dtype) group with fewer small shards goes shard by shard
MAX_PACKERS = 4096  # compiled chunk functions kept; past it new chunks go shard by shard

_NO_PINNED = object()
_pinned: dict[Any, Any] = {}  # device -> its pinned_host SingleDeviceSharding, or _NO_PINNED


def pinned_sharding(device: Any) -> Any:
    """The ``pinned_host`` sharding of ``device``, or None where it has none."""
    s = _pinned.get(device)
    if s is None:
        try:
            kinds = {m.kind for m in device.addressable_memories()}
        except Exception:  # noqa: BLE001 - a runtime without memory kinds
            kinds = set()
        s = _pinned[device] = (jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
                               if "pinned_host" in kinds else _NO_PINNED)
    return None if s is _NO_PINNED else s


class Chunk(NamedTuple):
    """Shards to pack into one buffer: their positions in the list given to
    ``chunks``, and the key of the function that packs them."""
    indices: tuple[int, ...]
    key: tuple  # (device, dtype, shapes)


def chunks(items: Sequence[tuple[Any, tuple[int, ...], np.dtype, int]], max_bytes: int) -> list[Chunk]:
    """The chunks of small shards among ``items`` ((device, shape, dtype,
    nbytes) per shard, in snapshot order): shards of 1..``max_bytes`` bytes,
    grouped by (device, dtype) in order of appearance, cut into chunks of at
    most ``PACK_LEAVES`` shards and ``PACK_BYTES`` bytes. Groups of fewer than
    ``PACK_MIN_LEAVES`` shards are left out. Pure: the same items give the
    same keys, whether they come from arrays or from abstract values."""
    if max_bytes <= 0:
        return []
    groups: dict[tuple, list[int]] = {}
    for i, (device, _, dtype, nbytes) in enumerate(items):
        if 0 < nbytes <= max_bytes:
            groups.setdefault((device, np.dtype(dtype)), []).append(i)
    out = []
    for (device, dtype), members in groups.items():
        if len(members) < PACK_MIN_LEAVES:
            continue
        start, size = 0, 0
        for j, i in enumerate(members):
            size += items[i][3]
            if j + 1 - start >= PACK_LEAVES or size >= PACK_BYTES or j + 1 == len(members):
                picked = tuple(members[start:j + 1])
                out.append(Chunk(picked, (device, dtype, tuple(tuple(items[k][1]) for k in picked))))
                start, size = j + 1, 0
    return out


def _concat(*xs: jax.Array) -> jax.Array:
    return jax.lax.concatenate([x.reshape(-1) for x in xs], 0)


class _Packers:
    """Compiled chunk functions by key, compiled on one background thread."""

    def __init__(self) -> None:
        self._ready: dict[tuple, Any] = {}  # key -> compiled function, or None once its compile failed
        self._pending: set[tuple] = set()
        self._lock = threading.Lock()
        self._thread: ThreadPoolExecutor | None = None

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._thread is None:
                self._thread = ThreadPoolExecutor(1, thread_name_prefix="jaxckpt-prepare")
            return self._thread

    def get(self, key: tuple) -> Any:
        """The compiled function of ``key`` if ready; else None, and its compile is queued."""
        fn = self._ready.get(key)
        if fn is not None or key in self._ready:
            return fn
        self.queue([key])
        return None

    def _claim(self, keys: Iterable[tuple]) -> list[tuple]:
        """The keys not compiled nor queued yet (within ``MAX_PACKERS``), now marked queued."""
        with self._lock:
            todo = [k for k in dict.fromkeys(keys) if k not in self._ready and k not in self._pending]
            todo = todo[:max(MAX_PACKERS - len(self._ready) - len(self._pending), 0)]
            self._pending.update(todo)
        return todo

    def queue(self, keys: Iterable[tuple]) -> Future:
        """Compile these keys' functions in the background (each once); the
        future resolves when all of them are done."""
        return self._pool().submit(self._compile, self._claim(keys))

    def compile_now(self, keys: Iterable[tuple]) -> None:
        """Compile, on this thread, the functions of these keys no one has queued yet."""
        self._compile(self._claim(keys))

    def _compile(self, keys: list[tuple]) -> None:
        for key in keys:
            device, dtype, shapes = key
            sharding = jax.sharding.SingleDeviceSharding(device)
            try:
                avals = [jax.ShapeDtypeStruct(s, dtype, sharding=sharding) for s in shapes]
                fn = jax.jit(_concat).lower(*avals).compile()
            except Exception as e:  # noqa: BLE001 - the chunk then goes shard by shard
                logger.info("jaxckpt: could not compile the packing of %d small %s shards (%s: %s); "
                            "they are copied one by one", len(shapes), dtype, type(e).__name__, e)
                fn = None
            with self._lock:
                self._ready[key] = fn
                self._pending.discard(key)

    def drop(self, key: tuple) -> None:
        """Never pack ``key``'s chunk again (its function failed on real arrays)."""
        with self._lock:
            self._ready[key] = None

    def submit(self, fn: Any, *args: Any) -> Future:
        """Run ``fn(*args)`` on the background thread, after what was queued before."""
        return self._pool().submit(fn, *args)

    def wait(self) -> None:
        """Wait for the compiles queued so far (tests, benchmarks)."""
        self._pool().submit(lambda: None).result()


packers = _Packers()


def unpack(host: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """The shards of a chunk as views of its flat host copy ``host``."""
    out = []
    pos = 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        out.append(host[pos:pos + n].reshape(shape))
        pos += n
    return out


def warm_pinned(sizes: Iterable[tuple[Any, int]]) -> None:
    """Allocate pinned host buffers of these (device, bytes) once and free them
    (on a background thread), so that the runtime's pinned allocator holds
    them for the next transfers of those sizes. Zero-filled host arrays go in:
    they cost the allocation, no device memory."""
    held = []
    for device, n in sizes:
        s = pinned_sharding(device)
        if s is not None and n > 0:
            held.append(jax.device_put(np.zeros(n, np.uint8), s))
    jax.block_until_ready(held)
    del held


def _warm_or_log(sizes: list[tuple[Any, int]]) -> None:
    try:
        warm_pinned(sizes)
    except Exception as e:  # noqa: BLE001 - e.g. pinned memory exhausted: the first save allocates it
        logger.warning("jaxckpt: could not prepare pinned host memory (%s: %s); the first save "
                       "allocates it", type(e).__name__, e)


def prepare(plan: Callable[[], tuple[Sequence[tuple], Sequence[tuple[Any, int]]]]) -> Future:
    """On the background thread: ``plan()`` gives (chunk keys, (device, bytes)
    pinned sizes); warm those sizes, then compile those chunk functions. The
    future resolves when both are done; failures are logged (saves work
    without them, only slower), a failing ``plan`` is the future's error."""

    def run() -> None:
        keys, sizes = plan()
        _warm_or_log(list(sizes))
        packers.compile_now(keys)

    return packers.submit(run)
