"""What one process writes where, and how a run of it is written.

``plan`` lays every unique shard of a snapshot out in ONE data file per
process, or, where the storage asks for files of a target size (object
stores whose multipart uploads cost a compose: GCS), in several, cut between
leaves by ``file_groups``: shards of 64 KiB or more start on a 4096-byte boundary (O_DIRECT,
page-aligned reads), smaller ones on 64 bytes. Shards are cut into
``chunk_bytes`` units, each with its own checksum, and ``split_runs`` splits
the units into contiguous runs of nearly equal size, one per worker, cut only
at 4096-aligned offsets (the way torch DCP spreads work by size,
deterministically).

Each worker (``write_run``) hashes its units (xxh3 releases the GIL) and
writes its run with positioned writes: through a reused page-aligned staging
buffer with O_DIRECT where the storage allows (``write_direct``), else with
buffered gather writes (``write_buffered``). Nothing here touches jax: the
snapshot already holds host buffers.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Iterator, NamedTuple

import numpy as np

from jaxckpt import format as fmt
from jaxckpt import memory
from jaxckpt import storage
from jaxckpt.errors import CheckpointError
from jaxckpt.snapshot import Snapshot

_SMALL = 64 << 10
STAGING_BYTES = 8 << 20
def data_file_name(process_index: int, part: int = 0) -> str:
    """``data-<process>.bin``; the further files of a process split by ``file_groups``: ``data-<process>-<part>.bin``."""
    return f"data-{process_index:05d}.bin" if part == 0 else f"data-{process_index:05d}-{part:05d}.bin"


def file_groups(snap: Snapshot, file_bytes: int | None) -> list[range]:
    """The leaves (by index, consecutive) of each data file of this process:
    all in one file if ``file_bytes`` is None, else cut before a leaf where
    the file holds ``file_bytes`` or more (so a file exceeds the target by at
    most one leaf's shards: a shard never spans files)."""
    n = len(snap.leaves)
    if file_bytes is None:
        return [range(n)]
    groups, start, acc = [], 0, 0
    for li, leaf in enumerate(snap.leaves):
        if acc >= file_bytes:
            groups.append(range(start, li))
            start, acc = li, 0
        acc += sum(arr.nbytes for _, arr in leaf.shards)
    groups.append(range(start, n))
    return groups


def _align(x: int, a: int) -> int:
    return -(-x // a) * a


class Unit(NamedTuple):
    """A contiguous piece of one shard: bytes ``src`` go to ``offset`` in the file.
    (A tuple: plans of 10,000-leaf trees build one per leaf.)"""
    offset: int
    src: np.ndarray  # uint8, contiguous
    leaf: int
    shard: int
    chunk: int


@dataclasses.dataclass(frozen=True)
class Layout:
    units: tuple[Unit, ...]
    shard_offsets: tuple[tuple[int, ...], ...]  # per leaf, per shard (empty for leaves of other files)
    size: int  # data file size
    leaves: range  # the leaves whose shards this file holds


def plan(snap: Snapshot, chunk_bytes: int, leaves: range | None = None) -> Layout:
    """The layout of one data file holding the shards of ``leaves`` (default: all)."""
    leaves = range(len(snap.leaves)) if leaves is None else leaves
    units: list[Unit] = []
    offsets: list[tuple[int, ...]] = [()] * len(snap.leaves)
    pos = 0
    for li in leaves:
        leaf = snap.leaves[li]
        if not li & 31:
            let_others_run()
        offs = []
        for si, (_, arr) in enumerate(leaf.shards):
            n = arr.nbytes
            pos = _align(pos, memory.ALIGN if n >= _SMALL else 64)
            offs.append(pos)
            if n:
                raw = arr.reshape(-1).view(np.uint8)
                if n <= chunk_bytes:
                    units.append(Unit(pos, raw, li, si, 0))
                else:
                    for ci, a in enumerate(range(0, n, chunk_bytes)):
                        units.append(Unit(pos + a, raw[a:a + chunk_bytes], li, si, ci))
            pos += n
        offsets[li] = tuple(offs)
    return Layout(tuple(units), tuple(offsets), pos, leaves)


def let_others_run() -> None:
    """Release the GIL for a moment. Background loops over many small items
    call this every few items: a training loop's next dispatch otherwise
    waits up to the interpreter's 5 ms switch interval for the GIL each time
    (measured: a niced pure-Python thread slowed a 11 ms jitted step by 62%,
    the same thread sleeping 0 s every ~50 us by 9%). Each sleep costs 0.13-0.46
    ms of wall time on the benchmark VM; releasing at most every 0.5 ms instead
    made a 10,000-leaf save alone 26% faster (0.31 -> 0.23 s), but the
    benchmark's matmul loop 12% slower during saves, against 1% (W2, 3 rounds
    each, 2026-12-03): not kept, training comes first."""
    time.sleep(0)


_PYTHON_BOUND_UNIT = 256 << 10
_ZEROS = memoryview(bytes(memory.ALIGN))


def parallelism(layout: Layout, workers: int) -> int:
    """How many runs to write in parallel. Small units (many small leaves) are
    bound by Python work under the GIL, which more threads only contend for
    (a 10,000-leaf save took as long with one run as with four), and a
    training loop's dispatch waits behind every one of them."""
    if not layout.units or layout.size < len(layout.units) * _PYTHON_BOUND_UNIT:
        return min(2, workers)  # two: one run's Python work overlaps the other's disk writes
    return workers


def split_runs(units: tuple[Unit, ...], n: int) -> list[tuple[Unit, ...]]:
    """Contiguous runs of nearly equal bytes, cut only where a unit starts on an
    aligned offset (so each run can be written with O_DIRECT independently)."""
    total = sum(u.src.nbytes for u in units)
    target = max(total / max(n, 1), 1)
    runs: list[tuple[Unit, ...]] = []
    start, acc = 0, 0
    for i, u in enumerate(units):
        if acc >= target and len(runs) < n - 1 and u.offset % memory.ALIGN == 0:
            runs.append(units[start:i])
            start, acc = i, 0
        acc += u.src.nbytes
    if start < len(units):
        runs.append(units[start:])
    return runs


class Cancelled(CheckpointError):
    """Raised inside workers of a save that was abandoned (timeout or failure)."""


class Abort:
    def __init__(self) -> None:
        self.flag = False

    def check(self) -> None:
        if self.flag:
            raise Cancelled("save abandoned")


class StagingPool:
    """Page-aligned staging buffers, reused between saves (fresh pages cost a
    page fault each: reuse makes the copy run at memcpy speed)."""

    def __init__(self) -> None:
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def get(self) -> np.ndarray:
        with self._lock:
            if self._free:
                return self._free.pop()
        return np.frombuffer(memory.aligned_buffer(STAGING_BYTES), dtype=np.uint8)

    def put(self, buf: np.ndarray) -> None:
        with self._lock:
            if len(self._free) < 32:
                self._free.append(buf)


def write_run(f: storage.DataSink, run: tuple[Unit, ...], sums: list[list[list[int]]],
               staging: StagingPool, abort: Abort) -> None:
    for i, u in enumerate(run):
        if not i & 15:
            let_others_run()
        sums[u.leaf][u.shard][u.chunk] = fmt.checksum(u.src)
    if f.direct:
        write_direct(f, run, staging, abort)
    else:
        write_buffered(f, run, abort)


def stream_units(layout: Layout, sums: list[list[list[int]]], abort: Abort) -> Iterator[memoryview]:
    """The whole data file in order, ``layout.size`` bytes, for storage written
    as one stream (an object's upload): each unit's bytes (checksummed just
    before they are handed over), zeros for the alignment padding."""
    pos = 0
    for i, u in enumerate(layout.units):
        if not i & 15:
            abort.check()
            let_others_run()
        yield from _zeros(u.offset - pos)
        sums[u.leaf][u.shard][u.chunk] = fmt.checksum(u.src)
        yield memoryview(u.src)
        pos = u.offset + u.src.nbytes
    yield from _zeros(layout.size - pos)  # (empty shards at the end are aligned too)


def _zeros(n: int) -> Iterator[memoryview]:
    while n > 0:
        k = min(n, len(_ZEROS))
        yield _ZEROS[:k]
        n -= k


class Sealing(NamedTuple):
    """How an encrypted save writes one data file: its cipher (``crypto.FileCipher``)
    and the tag of each unit, by the unit's index in the layout (filled by the workers)."""
    cipher: Any
    tags: list


def write_sealed(f: storage.DataSink, run: tuple[Unit, ...], first: int, sums: list[list[list[int]]],
                 pool: StagingPool, abort: Abort, seal: Sealing) -> None:
    """``write_run`` of an encrypted save: each unit (``first`` is the layout index
    of ``run[0]``) checksummed and encrypted into a page-aligned staging buffer
    at its offset (zeros between units), written block-aligned (``O_DIRECT``
    where the storage allows)."""
    buf = pool.get()
    mv, size = memoryview(buf), buf.nbytes
    base, fill = run[0].offset, 0  # base: aligned (split_runs), and advanced by whole buffers
    try:
        for i, u in enumerate(run):
            if not i & 15:
                abort.check()
                let_others_run()
            sums[u.leaf][u.shard][u.chunk] = fmt.checksum(u.src)
            src, offset = memoryview(u.src), u.offset
            rel = offset - base
            if len(src) <= _PIECE and rel + len(src) + 16 <= size:  # the common small unit: one call
                buf[fill:rel] = 0
                seal.tags[first + i] = seal.cipher.encrypt_small(first + i, offset, src, mv[rel:])
                fill = rel + len(src)  # (the tag's 16 bytes after it are overwritten or zeroed)
                continue
            enc = seal.cipher.encryptor(first + i, u.offset, u.src.nbytes)
            while len(src):
                rel = offset - base
                if rel >= size:  # the buffer is full: write it, go on in the next one
                    buf[fill:] = 0
                    f.pwrite(mv, base, direct=f.direct)
                    base, fill = base + size, 0
                    continue
                buf[fill:rel] = 0  # alignment padding (less than a block)
                n = min(len(src), size - rel)
                for a in range(0, n, _PIECE):  # the cipher holds the GIL: pieces, others run between
                    enc.update_into(src[a:min(a + _PIECE, n)], mv[rel + a:rel + min(a + _PIECE, n)])
                    let_others_run()
                fill, offset, src = rel + n, offset + n, src[n:]
            enc.finalize()
            seal.tags[first + i] = enc.tag
        if fill:
            end = _align(fill, memory.ALIGN)  # up to the next block: before the next run's (aligned) start
            buf[fill:end] = 0
            f.pwrite(mv[:end], base, direct=f.direct)
    finally:
        pool.put(buf)


_PIECE = 1 << 20


def stream_sealed(layout: Layout, sums: list[list[list[int]]], abort: Abort, seal: Sealing) -> Iterator[bytes]:
    """``stream_units`` of an encrypted save: the data file in order, each unit
    encrypted in pieces of at most 1 MiB (fresh buffers: the upload may hold them)."""
    pos = 0
    for i, u in enumerate(layout.units):
        if not i & 15:
            abort.check()
            let_others_run()
        yield from _zeros(u.offset - pos)
        sums[u.leaf][u.shard][u.chunk] = fmt.checksum(u.src)
        src = memoryview(u.src)
        if len(src) <= _PIECE:
            out = bytearray(len(src) + 16)
            seal.tags[i] = seal.cipher.encrypt_small(i, u.offset, src, memoryview(out))
            yield memoryview(out)[:len(src)]
            pos = u.offset + u.src.nbytes
            continue
        enc = seal.cipher.encryptor(i, u.offset, u.src.nbytes)
        for a in range(0, len(src), _PIECE):
            piece = src[a:a + _PIECE]
            out = bytearray(len(piece))
            enc.update_into(piece, out)
            yield memoryview(out)
        enc.finalize()
        seal.tags[i] = enc.tag
        pos = u.offset + u.src.nbytes
    yield from _zeros(layout.size - pos)


def write_buffered(f: storage.DataSink, run: tuple[Unit, ...], abort: Abort) -> None:
    zeros = bytes(memory.ALIGN)
    batch: list = []
    batch_start = batch_end = run[0].offset
    for i, u in enumerate(run):
        if not i & 15:
            abort.check()
            let_others_run()
        gap = u.offset - batch_end
        if batch and (gap > len(zeros) or batch_end - batch_start >= (64 << 20)):
            f.pwritev(batch, batch_start)
            batch, batch_start = [], u.offset
        elif gap:
            batch.append(memoryview(zeros)[:gap])
        batch.append(u.src)
        batch_end = u.offset + u.src.nbytes
    if batch:
        f.pwritev(batch, batch_start)


def direct_ok(src: np.ndarray, offset: int) -> bool:
    """Whether ``src`` can go to ``offset`` with O_DIRECT straight from its own
    memory: page-aligned address and file offset, at least one whole block."""
    return (offset % memory.ALIGN == 0 and src.nbytes >= memory.ALIGN
            and src.ctypes.data % memory.ALIGN == 0)


def write_direct(f: storage.DataSink, run: tuple[Unit, ...], pool: StagingPool, abort: Abort) -> None:
    # long: one loop over the run's units, its three cases (small unit staged,
    # aligned memory written directly, the rest copied through the staging
    # buffer) sharing the staging state (base, fill); split, they would pass
    # it back and forth for every one of 10,000 small leaves.
    buf = pool.get()
    size = buf.nbytes
    mv = memoryview(buf)
    base = run[0].offset  # file offset of buf[0]; aligned by construction (split_runs)
    fill = 0  # bytes of buf holding data (or padding) to write

    def flush(end: int) -> None:
        """Write buf[:end] (``end`` a multiple of the block size) at ``base``, zero-padded after ``fill``."""
        buf[fill:end] = 0
        f.pwrite(mv[:end], base, direct=True)

    try:
        for i, u in enumerate(run):
            if not i & 15:
                abort.check()
                let_others_run()
            src, offset = u.src, u.offset
            rel = offset - base
            n = src.nbytes
            if n < _SMALL and rel + n <= size and 0 <= rel - fill <= memory.ALIGN:
                # The common case for small leaves, kept to a few memoryview
                # operations: 10,000 leaves of 1-16 KiB spent most of their
                # save time in the general path's numpy slicing below.
                mv[fill:rel] = _ZEROS[:rel - fill]
                mv[rel:rel + n] = memoryview(src)
                fill = rel + n
                continue
            if direct_ok(src, offset):
                if fill:  # write what is staged, up to this unit's (aligned) start if it is in buf
                    flush(rel if rel <= size else _align(fill, memory.ALIGN))
                    fill = 0
                # page-aligned source memory: no staging copy for the whole blocks
                n -= n % memory.ALIGN
                f.pwrite(memoryview(src[:n]), offset, direct=True)
                base = offset = offset + n
                src = src[n:]
            while src.nbytes:
                rel = offset - base
                if rel >= size:
                    flush(size)
                    base, fill = base + size, 0
                    continue
                n = min(src.nbytes, size - rel)
                buf[fill:rel] = 0
                np.copyto(buf[rel:rel + n], src[:n])
                fill = rel + n
                offset += n
                src = src[n:]
        if fill:
            flush(_align(fill, memory.ALIGN))
    finally:
        pool.put(buf)
