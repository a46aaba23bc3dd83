"""CPU copies: when a background save copies CPU jax arrays at snapshot time,
into which memory, and when that memory is prepared.

``snapshot.take`` holds CPU ``jax.Array`` leaves by zero-copy view (see
``jaxckpt/snapshot.py``): safe, free, but while the write runs a training step
that donates its state cannot reuse the viewed buffers and allocates fresh
ones. With a 360 MiB state and 15 ms steps this doubled the step time during
saves on a 2-core VM (+115%), where a copy at snapshot time cost +13%. This
module decides, per ``AsyncCheckpointer``, whether the snapshot's views are
replaced by copies (``CpuCopies``), and keeps the memory those copies go into
(``HostPool``):

* Copies go only into buffers that are ready (``copy_views``): fresh memory
  faults in every page on the training thread (a first 1.1 GB copy blocked a
  save for 2.5 s on a 2-core VM). A leaf without a ready buffer stays a view
  for that save and a buffer of its size is prepared once the save ends, on a
  background thread at the lowest priority (``CpuCopies.prepare``).
* Small leaves share one buffer, an arena (``ARENA_LEAF_BYTES``).
* ``copy=None`` decides by watching (``Watch``): saves take views until one
  finds, when it ends, that the caller let go of arrays it viewed (donated,
  deleted or replaced them, as a training loop does); from then on saves copy.

Call order (one ``CpuCopies`` per checkpointer; the thread that runs each step):

1. ``take(tree)`` (training thread): the snapshot to write, as a ``Copied``.
2. The writer writes ``copied.snapshot`` (writer pool).
3. ``committed(copied, label)`` (save thread), only once the checkpoint
   committed: every writer is done with the pooled buffers, which go back to
   the pool; the decision is revisited. Returns the sizes of buffers to
   prepare. After a failure or a timeout it is not called: an abandoned
   writer may still read the buffers, which are dropped.
4. ``prepare(sizes)`` (save thread), once the save is done, before its handle
   resolves: whoever waits on the handle can then wait on this too.
5. ``close()`` once, after the last save ended.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import mmap
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

from jaxckpt import gcpause
from jaxckpt import memory
from jaxckpt import snapshot as snapshot_mod
from jaxckpt.snapshot import Snapshot

logger = logging.getLogger("jaxckpt")


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
    (the tree changed) are let go (``end_save``). Thread-safe."""

    KEEP_SAVES = 4

    def __init__(self) -> None:
        self._free: dict[int, list[np.ndarray]] = {}
        self._asked: dict[int, int] = {}  # size -> number of the save that last asked for it
        self._saves = 0
        self._lock = threading.Lock()

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

    def warm(self, sizes: Iterable[int]) -> None:
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

    def put(self, arrays: Iterable[np.ndarray]) -> None:
        """Give back buffers ``take`` returned, once nothing reads them any more."""
        with self._lock:
            for a in arrays:
                raw = a.base if a.base is not None else a
                while raw.base is not None and isinstance(raw.base, np.ndarray):
                    raw = raw.base
                self._free.setdefault(a.nbytes, []).append(raw)


class Watch:
    """Tells whether the caller let go of the arrays a snapshot views: donated
    or deleted them, or dropped its references (a loop that went on to the
    next state). A view then holds memory the loop would have reused; with
    donation a step cannot reuse its buffers and allocates fresh ones.
    Uses CPython reference counts, taken by the same code at both times.
    Filled by ``snapshot.take(..., watch=)``, which calls ``start``."""

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


# CPU views smaller than this are copied into one shared pooled buffer (an
# arena, each at a 64-byte aligned offset) instead of a pooled buffer each:
# a 10,000-leaf tree then costs one buffer, not 10,000 mappings and lookups.
ARENA_LEAF_BYTES = 64 << 10
_ARENA_ALIGN = 64


def _cpu_views(snap: Snapshot) -> Iterator[np.ndarray]:
    """The host arrays of ``snap`` that are views of CPU jax buffers (not the
    pinned-host copies of accelerator arrays, which are views too). Marked
    when taken: a view's ``base`` does not always lead back to its array
    (bfloat16 views hold a capsule)."""
    for leaf in snap.leaves:
        if leaf.cpu_view:
            for _, a in leaf.shards:
                yield a


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


@dataclasses.dataclass(frozen=True)
class Copied:
    """The snapshot of one save as the writer is to write it, and what the
    copy policy needs back when the save committed."""
    snapshot: Snapshot
    pooled: tuple[np.ndarray, ...] = ()  # the pool's buffers the snapshot's copies are in
    missing: tuple[int, ...] = ()  # bytes of each buffer a copy wanted and found no ready one for
    watch: Watch | None = None  # the viewed arrays, when the policy decides by watching


def copy_views(snap: Snapshot, pool: HostPool) -> Copied:
    """``snap`` with its views of CPU jax buffers replaced by copies, in
    buffers ``pool`` has ready; never allocates. A leaf without a ready
    buffer stays a view for this save (safe: the runtime keeps a viewed
    buffer) and the size it needed is in ``missing``, to be prepared."""
    offsets, arena_bytes = _arena_offsets(list(_cpu_views(snap)))
    pooled: list[np.ndarray] = []
    missing: list[int] = []

    def buffer(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        buf = pool.take(shape, dtype)
        if buf is None:
            missing.append(math.prod(shape) * np.dtype(dtype).itemsize)
        else:
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
    return Copied(Snapshot(snap.treedef, tuple(leaves)), tuple(pooled), tuple(missing))


class CpuCopies:
    """The CPU-copy policy of one checkpointer; see the module docstring for
    the call order.

    ``copy``: ``True``/``False`` always/never copy; ``None`` decides by
    watching. ``pool``: where copies go (default: a new ``HostPool``).
    ``thread_setup``: run first on the thread that prepares buffers (the
    checkpointer lowers its priority)."""

    def __init__(self, copy: bool | None, *, pool: HostPool | None = None,
                 thread_setup: Callable[[], None] | None = None):
        self.choice = None if copy is None else bool(copy)
        self._copying = bool(copy)  # what the next snapshot does
        self.pool = HostPool() if pool is None else pool
        # Prepares host buffers for later snapshots' copies, one request at a time (so a
        # request sees the buffers the one before it made), beside the saves.
        self._warmer = ThreadPoolExecutor(1, thread_name_prefix="jaxckpt-warm", initializer=thread_setup)

    @property
    def copying(self) -> bool:
        """Whether the next snapshot copies CPU arrays."""
        return self._copying

    def take(self, tree: Any, *, process_index: int = 0, process_count: int = 1) -> Copied:
        """(training thread) Snapshot ``tree`` for a background save (``snapshot.take``),
        with CPU jax arrays copied or viewed as decided so far."""
        copying = self._copying  # read once: a save that ends meanwhile may switch it
        watch = Watch() if self.choice is None and not copying else None
        snap = snapshot_mod.take(tree, process_index=process_index, process_count=process_count, watch=watch)
        if not copying:
            return Copied(snap, watch=watch)
        with gcpause.paused():  # a view and a tuple or two per leaf
            return copy_views(snap, self.pool)

    def committed(self, copied: Copied, label: str) -> tuple[int, ...]:
        """(save thread) The save of ``copied`` committed: its buffers go back to the
        pool, and a save that watched switches later saves to copies if the caller
        let go of what it viewed. Returns the byte sizes of buffers to ``prepare``:
        those this save wanted and found none ready for, or, on the switch, all."""
        # Every worker is done with the copies: the next save reuses them.
        self.pool.put(copied.pooled)
        self.pool.end_save()
        to_warm = copied.missing  # leaves this save kept as views for want of a ready buffer
        watch = copied.watch
        if watch is not None and not self._copying and watch.moved_on():
            to_warm = tuple(cpu_view_sizes(copied.snapshot))
            self._copying = True
            logger.info("the caller let go of (donated, deleted or replaced) arrays the save of %s "
                        "held by zero-copy view: later saves copy CPU arrays at snapshot time "
                        "(set copy_cpu_arrays to choose)", label)
        return to_warm

    def prepare(self, sizes: Iterable[int]) -> None:
        """(save thread) Queue the preparation of buffers of these byte sizes, on the
        background thread; returns at once."""
        sizes = list(sizes)
        if sizes:
            self._warmer.submit(self._warm, sizes)

    def wait_prepared(self) -> None:
        """Wait until the preparations queued so far have run (tests, benchmarks)."""
        self._warmer.submit(lambda: None).result()

    def close(self) -> None:
        """Stop the background thread; preparations not started are dropped."""
        self._warmer.shutdown(wait=True, cancel_futures=True)

    def _warm(self, sizes: list[int]) -> None:
        """Fault in host buffers for later snapshots' copies, off the training thread and
        beside the next save's write (the first allocation of a state's worth can wait
        on the kernel reclaiming page cache: 2.4 s for 1.1 GB on a 2-core VM)."""
        try:
            self.pool.warm(sizes)
        except (MemoryError, OSError) as e:
            logger.warning("could not prepare host buffers for later snapshots (%s: %s); "
                           "they keep zero-copy views", type(e).__name__, e)
