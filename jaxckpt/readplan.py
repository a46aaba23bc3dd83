"""Read planning: which bytes of which files fill each requested box, into
what memory. Pure bookkeeping over a validated manifest; ``reader.py`` runs
the plan (opens files, reads or maps, verifies) on its thread pool.

A request for a box (a sub-array) of a leaf becomes ops:

* when the caller allows it (the result stays in host memory or goes to a CPU
  device) and the box is exactly one saved shard of at least 1 MiB, the
  shard's file bytes are mapped copy-on-write (``storage.DataSource.map``) and
  populated, and the result is a view of the mapping: no fresh memory, no
  copy (a 4.2 GB restore from the page cache on a 2-core VM: 0.18 s instead
  of 2.5-4.5 s). The arrays then share the page cache's pages;
* when a whole saved shard lands contiguously in the destination (the shard is
  the whole leaf, or a slab along the first axis), its bytes are read straight
  into the final, 64-byte aligned buffer (which ``jax.device_put`` on the CPU
  backend then adopts without a copy);
* otherwise only the rows of the shard that intersect the box are read (rounded
  out to checksum chunks when verifying) into a temporary buffer, then copied
  (a "post" step, run after the reads).

Small whole leaves (under 1 MiB) are read in runs of neighbouring shards, one
read into one buffer per run (each result a view of it; a run of at least 1
MiB whose results may be mappings is one mapping of the file, as above);
other reads are cut into checksum chunks, and small reads close in a file are
grouped into one scatter read.
"""

from __future__ import annotations

import bisect
import functools
import math
import mmap
from typing import Callable, Container, Iterable

import numpy as np

from jaxckpt import arrayinfo
from jaxckpt import format as fmt
from jaxckpt.arrayinfo import Box

SMALL_READ = 1 << 20  # reads below this size are coalesced with their neighbours
GAP = 64 << 10  # ... when at most this many bytes apart (alignment padding)
_GROUP_BYTES = 8 << 20  # ... into reads of at most this size
MAP_MIN_BYTES = 1 << 20  # shards at least this large may be mapped instead of read

_PREFAULT_BYTES = 4 << 20


def empty_aligned(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-order array whose data starts on a 64-byte boundary.

    Buffers of 4 MiB or more are anonymous mappings whose pages each reader
    thread populates in one call just before reading into them
    (``memory.prefault``) instead of one page fault per 4 KiB inside the
    parallel reads, which contend on the process's memory map. On a 2-core VM
    this took a first restore of 0.86 GB from 2.0-3.1 s to about 0.5 s.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return np.empty(shape, dtype)
    if nbytes >= _PREFAULT_BYTES:
        m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return np.frombuffer(m, np.uint8).view(dtype).reshape(shape)  # page-aligned; the array keeps m alive
    raw = np.empty(nbytes + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off:off + nbytes].view(dtype).reshape(shape)


def _intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return None if any(lo >= hi for lo, hi in out) else out


# A small whole-shard request: (index in the results, leaf, its one shard, may be a mapping).
_Small = tuple[int, fmt.LeafRecord, fmt.ShardRecord, bool]


def _file_offset(item: _Small) -> tuple[int, int]:
    return item[2].file, item[2].offset


class Op:
    """Read ``dest.nbytes`` bytes at ``offset`` of file ``file`` (or, ``mapped``,
    populate the mapping ``dest`` of them) and check a chunk sum. An op with
    ``parts`` reads a run of small shards into one buffer and checks each
    part instead: (start, end) in ``dest``, checksum or None, leaf, chunk."""
    __slots__ = ("file", "offset", "dest", "checksum", "leaf", "chunk", "mapped", "parts")

    def __init__(self, file: int, offset: int, dest: memoryview, checksum: int | None, leaf: str, chunk: int,
                 mapped: bool = False):
        self.file, self.offset, self.dest, self.checksum, self.leaf, self.chunk = file, offset, dest, checksum, leaf, chunk
        self.mapped = mapped
        self.parts: list[tuple[int, int, int | None, str, int]] | None = None

    @property
    def joinable(self) -> bool:
        """A plain read into its own buffer (a mapping or a run is read alone)."""
        return not self.mapped and self.parts is None


def shard_starts(manifest: fmt.Manifest) -> dict[int, list[int]]:
    """Sorted offsets of the shards in each file (to tell padding from another shard's bytes)."""
    starts: dict[int, list[int]] = {}
    for leaf in manifest.leaves:
        for sh in leaf.shards:
            starts.setdefault(sh.file, []).append(sh.offset)
    return {f: sorted(v) for f, v in starts.items()}


MapFn = Callable[[int, str, int, int], "memoryview | None"]  # (file, leaf, offset, length) -> a mapping or None


class Plan:
    """The reads of one ``CheckpointReader.read`` call: ``add`` the requests,
    then run ``groups()`` (lists of ops, each list one read) and ``posts``
    (copies after the reads); ``outs`` are the results, in request order.

    ``map_fn`` makes a copy-on-write mapping of file bytes (or None: read
    instead); ``starts`` is ``shard_starts`` of the manifest."""

    def __init__(self, manifest: fmt.Manifest, starts: dict[int, list[int]], verify: bool, map_fn: MapFn):
        self.manifest = manifest
        self.chunk = manifest.chunk_bytes
        self.verify = verify
        self._starts = starts
        self._map = map_fn
        self.ops: list[Op] = []
        self.posts: list[Callable[[], None]] = []
        self.outs: list = []

    def add(self, requests: Iterable[tuple[int, Box | None]], mappable: list[bool], opened: Container[int],
            open_file: Callable[[int, str], object]) -> None:
        """Plan ``requests`` (leaf index, box or None for the whole leaf), each
        result a mapping only where ``mappable`` says so. A data file not yet
        in ``opened`` is opened (``open_file(file, leaf path)``) before a leaf's
        buffers are allocated: the reader checks the real file sizes then (a
        manifest must not claim more than is on disk)."""
        small: list[_Small] = []
        leaves, outs = self.manifest.leaves, self.outs
        for (li, box), may_map in zip(requests, mappable):
            leaf = leaves[li]
            shards = leaf.shards
            for s in shards:
                if s.length and s.file not in opened:
                    open_file(s.file, leaf.path)
            if len(shards) == 1:
                s = shards[0]
                # box None: the whole leaf, which one shard of nonzero length is (the manifest's shards tile it)
                if 0 < s.length < SMALL_READ and (box is None or s.box == box):
                    small.append((len(outs), leaf, s, may_map))
                    outs.append(None)
                    continue
            if box is None:
                box = arrayinfo.full_box(leaf.shape)
            outs.append(self._plan_leaf(leaf, box, may_map))
        self._plan_small([t for t in small if t[3]], mappable=True)
        self._plan_small([t for t in small if not t[3]], mappable=False)

    def groups(self) -> list[list[Op]]:
        """The ops in file order, small neighbours grouped: each group is one read."""
        self.ops.sort(key=lambda o: (o.file, o.offset))
        return self._groups(self.ops)

    def _plan_leaf(self, leaf: fmt.LeafRecord, box: Box, mappable: bool) -> np.ndarray:
        dtype = arrayinfo.DTYPES[leaf.dtype]
        itemsize = dtype.itemsize
        out_shape = tuple(hi - lo for lo, hi in box)
        if mappable:
            mapped = self._map_shard(leaf, box, out_shape, dtype)
            if mapped is not None:
                return mapped
        out = empty_aligned(out_shape, dtype)
        if out.nbytes == 0:
            return out
        out_bytes = out.reshape(-1).view(np.uint8)
        if len(leaf.shards) == 1 and leaf.shards[0].box == box:  # the common case: one shard, read in place
            self._chunk_ops(leaf, leaf.shards[0], 0, out.nbytes, memoryview(out_bytes))
            return out
        chunk = self.chunk
        for s in leaf.shards:
            inter = _intersect(s.box, box)
            if inter is None or s.length == 0:
                continue
            sshape = s.shape
            row_elems = math.prod(sshape[1:]) if sshape else 1
            row_bytes = row_elems * itemsize
            whole = inter == s.box
            slab = whole and all(s.box[d] == box[d] for d in range(1, len(box)))
            if slab:  # the shard's bytes are contiguous in ``out``: read in place
                start = ((s.box[0][0] - box[0][0]) * row_bytes) if box else 0
                dest = memoryview(out_bytes[start:start + s.length])
                self._chunk_ops(leaf, s, 0, s.length, dest)
                continue
            # Rows [r0, r1) of the shard hold everything we need.
            r0, r1 = inter[0][0] - s.box[0][0], inter[0][1] - s.box[0][0]
            lo, hi = r0 * row_bytes, r1 * row_bytes
            if self.verify:
                lo, hi = lo // chunk * chunk, min(-(-hi // chunk) * chunk, s.length)
            tmp = empty_aligned((hi - lo,), np.uint8)
            self._chunk_ops(leaf, s, lo, hi, memoryview(tmp))
            skip = r0 * row_bytes - lo
            rows = tmp[skip:skip + (r1 - r0) * row_bytes].view(dtype).reshape((r1 - r0,) + sshape[1:])
            src = rows[(slice(None),) + tuple(slice(a - sb[0], z - sb[0]) for (a, z), sb in zip(inter[1:], s.box[1:]))]
            dst = out[tuple(slice(a - bb[0], z - bb[0]) for (a, z), bb in zip(inter, box))]
            self.posts.append(functools.partial(np.copyto, dst, src))
        return out

    def _map_shard(self, leaf: fmt.LeafRecord, box: Box, shape: tuple[int, ...], dtype: np.dtype
                   ) -> np.ndarray | None:
        """The box as a view of a copy-on-write mapping of the one shard that is
        exactly that box, with the ops that populate (and verify) it; None where
        the box is not one shard, is small, or mapping is unavailable here."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < MAP_MIN_BYTES:
            return None
        for s in leaf.shards:
            # 64-byte aligned data: what XLA's CPU client adopts without a copy
            if s.box == box and s.length == nbytes and s.offset % 64 == 0:
                view = self._map(s.file, leaf.path, s.offset, s.length)
                if view is None:
                    return None
                self._chunk_ops(leaf, s, 0, s.length, view, mapped=True)
                return np.frombuffer(view, np.uint8).view(dtype).reshape(shape)
        return None

    def _chunk_ops(self, leaf: fmt.LeafRecord, s: fmt.ShardRecord, lo: int, hi: int, dest: memoryview,
                   mapped: bool = False) -> None:
        """Reads of shard bytes [lo, hi) into dest, one op per checksum chunk."""
        chunk = self.chunk
        pos = lo
        while pos < hi:
            end = min(hi, (pos // chunk + 1) * chunk)
            ci = pos // chunk
            checks = self.verify and pos == ci * chunk and end == min((ci + 1) * chunk, s.length)
            self.ops.append(Op(s.file, s.offset + pos, dest[pos - lo:end - lo],
                           s.checksums[ci] if checks else None, leaf.path, ci, mapped))
            pos = end

    def _joins(self, file: int, head: int, end: int, next_file: int, start: int, stop: int) -> bool:
        """Whether bytes [start, stop) of ``next_file`` can join a read of
        [head, end) of ``file``: same file, a gap of padding only (at most
        GAP bytes, no shard starts in it), at most _GROUP_BYTES in all."""
        return (next_file == file and 0 <= start - end <= GAP and stop - head <= _GROUP_BYTES
                and self._only_padding(file, end, start))

    def _only_padding(self, file: int, lo: int, hi: int) -> bool:
        """No shard starts in [lo, hi) of ``file`` (shards never overlap, so none lies there)."""
        starts = self._starts[file]
        return lo == hi or bisect.bisect_left(starts, lo) == bisect.bisect_left(starts, hi)

    def _plan_small(self, small: list[_Small], mappable: bool) -> None:
        """Small whole-shard requests (many-leaf trees: 10,000 leaves of a few
        KiB) are read in runs of neighbouring shards, each run with one read
        into one buffer; every result is a view of its run's buffer (64-byte
        aligned where the shard's offset is, as jaxckpt's writer places them),
        instead of a buffer, a read and a scatter entry per leaf. A run spans
        only padding between its shards, never another leaf's bytes; a result
        keeps its run's buffer (at most 8 MiB) alive. Where the results may be
        mappings (``mappable``) and a run holds at least MAP_MIN_BYTES, its
        buffer is a copy-on-write mapping of the file, as for large shards."""
        if not small:
            return
        small.sort(key=_file_offset)
        joins = self._joins
        first = small[0][2]
        begin, file, head, end = 0, first.file, first.offset, first.offset + first.length
        for k in range(1, len(small)):
            sh = small[k][2]
            if not joins(file, head, end, sh.file, sh.offset, sh.offset + sh.length):
                self._small_run(small[begin:k], head, end, mappable)
                begin, file, head = k, sh.file, sh.offset
            end = sh.offset + sh.length
        self._small_run(small[begin:], head, end, mappable)

    def _small_run(self, run: list[_Small], lo: int, hi: int, mappable: bool) -> None:
        """One op that reads file bytes [lo, hi) holding ``run``'s shards, and each result as a view of them."""
        file, leaf0 = run[0][2].file, run[0][1].path
        view = self._map(file, leaf0, lo, hi - lo) if mappable and hi - lo >= MAP_MIN_BYTES else None
        if view is None:
            buf = empty_aligned((hi - lo,), np.uint8)
            op = Op(file, lo, memoryview(buf), None, leaf0, 0)
        else:
            buf = np.frombuffer(view, np.uint8)
            op = Op(file, lo, view, None, leaf0, 0, mapped=True)
        chunk = self.chunk
        parts: list[tuple[int, int, int | None, str, int]] = []
        dtypes = arrayinfo.DTYPES
        ndarray = np.ndarray
        for idx, leaf, sh, _ in run:
            rel = sh.offset - lo
            self.outs[idx] = ndarray(sh.shape, dtypes[leaf.dtype], buffer=buf, offset=rel)
            n = sh.length
            if n <= chunk:
                parts.append((rel, rel + n, sh.checksums[0] if self.verify else None, leaf.path, 0))
            else:  # a chunk size below 1 MiB (possible in a foreign or hand-made manifest)
                for ci, start in enumerate(range(0, n, chunk)):
                    parts.append((rel + start, rel + min(n, start + chunk),
                                  sh.checksums[ci] if self.verify else None, leaf.path, ci))
        op.parts = parts
        self.ops.append(op)

    def _groups(self, ops: list[Op]) -> list[list[Op]]:
        """Coalesce small reads that are close in a file (10,000 leaves of a few
        KiB become a handful of reads instead of 10,000 syscalls and futures).
        A gap is bridged only when it holds padding, never another shard's
        bytes: a partial restore reads nothing of the leaves it leaves out."""
        groups: list[list[Op]] = []
        for op in ops:
            n = len(op.dest)
            if groups and n < SMALL_READ and op.joinable:
                g = groups[-1]
                head, tail = g[0], g[-1]
                if (len(tail.dest) < SMALL_READ and tail.joinable
                        and self._joins(tail.file, head.offset, tail.offset + len(tail.dest), op.file, op.offset,
                                        op.offset + n)):
                    g.append(op)
                    continue
            groups.append([op])
        return groups
