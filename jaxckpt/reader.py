"""Reader: a committed checkpoint directory -> host arrays, on a thread pool.

``CheckpointReader`` decodes and validates the manifest once, then serves
requests for boxes (sub-arrays) of leaves. A request is planned into reads:

* when the caller allows it (the result stays in host memory or goes to a CPU
  device) and the box is exactly one saved shard of at least 1 MiB, the
  shard's file bytes are mapped copy-on-write (``memory.map_range``) and
  populated, and the result is a view of the mapping: no fresh memory, no
  copy (a 4.2 GB restore from the page cache on a 2-core VM: 0.18 s instead
  of 2.5-4.5 s). The arrays then share the page cache's pages;
* when a whole saved shard lands contiguously in the destination (the shard is
  the whole leaf, or a slab along the first axis), its bytes are read straight
  into the final, 64-byte aligned buffer (which ``jax.device_put`` on the CPU
  backend then adopts without a copy);
* otherwise only the rows of the shard that intersect the box are read (rounded
  out to checksum chunks when verifying) into a temporary buffer, then copied.

Small whole leaves (under 1 MiB) are read in runs of neighbouring shards, one
read into one buffer per run (each result a view of it; a run of at least 1
MiB whose results may be mappings is one mapping of the file, as above);
other reads are cut into checksum chunks. Reads run in parallel; each chunk is verified in the
thread that read it. Open files are checked to be regular files and at
least as large as the manifest says.
"""

from __future__ import annotations

import bisect
import functools
import math
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import numpy as np

from jaxckpt import arrayinfo
from jaxckpt import gcpause
from jaxckpt import config
from jaxckpt import format as fmt
from jaxckpt import memory
from jaxckpt import storage
from jaxckpt.arrayinfo import Box
from jaxckpt.errors import CorruptCheckpointError


_SMALL_READ = 1 << 20  # reads below this size are coalesced with their neighbours
_GAP = 64 << 10  # ... when at most this many bytes apart (alignment padding)
_GROUP_BYTES = 8 << 20  # ... into reads of at most this size
MAP_MIN_BYTES = 1 << 20  # shards at least this large may be mapped instead of read
MAX_MAPS = 16384  # mappings one reader makes at most (vm.max_map_count is 65530 by default)


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


class _Op:
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


class CheckpointReader:
    """A committed checkpoint opened for reading: its manifest, decoded and
    validated, and its data files, opened when first read (through the
    storage backend of its location)."""

    def __init__(self, path: str | os.PathLike | storage.Location, max_workers: int | None = None):
        self.location = storage.Location.parse(path)
        self.path = str(self.location)
        self._source = storage.backend(self.location).open(self.location)
        data = self._source.read_manifest(fmt.MAX_MANIFEST_BYTES)
        self.manifest = fmt.decode_manifest(data, self._source.describe(fmt.MANIFEST_NAME))
        self.by_path = {leaf.path: i for i, leaf in enumerate(self.manifest.leaves)}
        self.max_workers = max_workers or config.read_workers()
        self._files: dict[int, storage.DataSource] = {}
        self._starts: dict[int, list[int]] | None = None  # shard offsets per file, built on first use
        self._maps = 0  # mappings made (MAX_MAPS)
        self._lock = threading.Lock()

    # ------------------------------------------------------------ files
    def _file(self, file: int) -> storage.DataSource:
        """Data file ``file`` of the manifest, opened once (checked to hold at least the recorded size)."""
        with self._lock:
            f = self._files.get(file)
            if f is None:
                rec = self.manifest.files[file]
                f = self._files[file] = self._source.open_data(rec.name, rec.size)
            return f

    def _file_for(self, file: int, leaf: str) -> storage.DataSource:
        """``_file`` for reading ``leaf``: a missing or short file error names the leaf too."""
        try:
            return self._file(file)
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"{e} (while reading leaf {leaf!r})") from None

    def _name(self, file: int) -> str:
        return self._source.describe(self.manifest.files[file].name)

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()
            self._source.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ planning
    def _plan_leaf(self, leaf: fmt.LeafRecord, box: Box, verify: bool,
                   ops: list[_Op], posts: list[Callable[[], None]], mappable: bool) -> np.ndarray:
        dtype = arrayinfo.DTYPES[leaf.dtype]
        itemsize = dtype.itemsize
        out_shape = tuple(hi - lo for lo, hi in box)
        if mappable:
            mapped = self._map_shard(leaf, box, out_shape, dtype, verify, ops)
            if mapped is not None:
                return mapped
        out = empty_aligned(out_shape, dtype)
        if out.nbytes == 0:
            return out
        out_bytes = out.reshape(-1).view(np.uint8)
        if len(leaf.shards) == 1 and leaf.shards[0].box == box:  # the common case: one shard, read in place
            self._chunk_ops(leaf, leaf.shards[0], 0, out.nbytes, memoryview(out_bytes), verify, ops)
            return out
        chunk = self.manifest.chunk_bytes
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
                self._chunk_ops(leaf, s, 0, s.length, dest, verify, ops)
                continue
            # Rows [r0, r1) of the shard hold everything we need.
            r0, r1 = inter[0][0] - s.box[0][0], inter[0][1] - s.box[0][0]
            lo, hi = r0 * row_bytes, r1 * row_bytes
            if verify:
                lo, hi = lo // chunk * chunk, min(-(-hi // chunk) * chunk, s.length)
            tmp = empty_aligned((hi - lo,), np.uint8)
            self._chunk_ops(leaf, s, lo, hi, memoryview(tmp), verify, ops)
            skip = r0 * row_bytes - lo
            rows = tmp[skip:skip + (r1 - r0) * row_bytes].view(dtype).reshape((r1 - r0,) + sshape[1:])
            src = rows[(slice(None),) + tuple(slice(a - sb[0], z - sb[0]) for (a, z), sb in zip(inter[1:], s.box[1:]))]
            dst = out[tuple(slice(a - bb[0], z - bb[0]) for (a, z), bb in zip(inter, box))]
            posts.append(functools.partial(np.copyto, dst, src))
        return out

    def _map_shard(self, leaf: fmt.LeafRecord, box: Box, shape: tuple[int, ...], dtype: np.dtype,
                   verify: bool, ops: list[_Op]) -> np.ndarray | None:
        """The box as a view of a copy-on-write mapping of the one shard that is
        exactly that box, with the ops that populate (and verify) it; None where
        the box is not one shard, is small, or mapping is unavailable here."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < MAP_MIN_BYTES:
            return None
        for s in leaf.shards:
            # 64-byte aligned data: what XLA's CPU client adopts without a copy
            if s.box == box and s.length == nbytes and s.offset % 64 == 0:
                view = self._try_map(s.file, leaf.path, s.offset, s.length)
                if view is None:
                    return None
                self._chunk_ops(leaf, s, 0, s.length, view, verify, ops, mapped=True)
                return np.frombuffer(view, np.uint8).view(dtype).reshape(shape)
        return None

    def _try_map(self, file: int, leaf: str, offset: int, length: int) -> memoryview | None:
        """A copy-on-write mapping of file bytes [offset, offset + length)
        (``storage.DataSource.map``), or None where mapping is unavailable here or
        this reader has made MAX_MAPS already: the caller reads instead."""
        if self._maps >= MAX_MAPS:
            return None
        view = self._file_for(file, leaf).map(offset, length)
        if view is not None:
            self._maps += 1
        return view

    def _chunk_ops(self, leaf: fmt.LeafRecord, s: fmt.ShardRecord, lo: int, hi: int, dest: memoryview,
                   verify: bool, ops: list[_Op], mapped: bool = False) -> None:
        """Reads of shard bytes [lo, hi) into dest, one op per checksum chunk."""
        chunk = self.manifest.chunk_bytes
        pos = lo
        while pos < hi:
            end = min(hi, (pos // chunk + 1) * chunk)
            ci = pos // chunk
            checks = verify and pos == ci * chunk and end == min((ci + 1) * chunk, s.length)
            ops.append(_Op(s.file, s.offset + pos, dest[pos - lo:end - lo],
                           s.checksums[ci] if checks else None, leaf.path, ci, mapped))
            pos = end

    def _joins(self, file: int, head: int, end: int, next_file: int, start: int, stop: int) -> bool:
        """Whether bytes [start, stop) of ``next_file`` can join a read of
        [head, end) of ``file``: same file, a gap of padding only (at most
        _GAP bytes, no shard starts in it), at most _GROUP_BYTES in all."""
        return (next_file == file and 0 <= start - end <= _GAP and stop - head <= _GROUP_BYTES
                and self._only_padding(file, end, start))

    def _only_padding(self, file: int, lo: int, hi: int) -> bool:
        """No shard starts in [lo, hi) of ``file`` (shards never overlap, so none lies there)."""
        starts = self._starts[file]
        return lo == hi or bisect.bisect_left(starts, lo) == bisect.bisect_left(starts, hi)

    # ------------------------------------------------------------ executing
    def _verify(self, op: _Op, data) -> None:
        if op.checksum is not None:
            self._check(op.file, op.offset, data, op.checksum, op.leaf, op.chunk)

    def _check(self, file: int, offset: int, data, checksum: int, leaf: str, chunk: int) -> None:
        found = fmt.checksum(data)
        if found != checksum:
            raise CorruptCheckpointError(
                f"{self._name(file)}: checksum mismatch in leaf {leaf!r}, chunk {chunk} (bytes at offset {offset}): "
                f"expected xxh3 {checksum:#018x}, found {found:#018x}")

    @staticmethod
    def _fill_op(f: storage.DataSource, op: _Op, where: str) -> None:
        """Bring one op's bytes into its destination: populate a mapping (or,
        where the kernel refuses, read into its private pages), else read into
        the fresh buffer after backing its pages in one call."""
        if op.mapped:
            if not memory.populate(op.dest, where, op.offset):
                f.read_into(op.dest, op.offset, where)  # copy-on-write: private pages
        else:
            memory.prefault(op.dest)
            f.read_into(op.dest, op.offset, where)

    def _run(self, group: list[_Op]) -> int:
        """Read one group of ops; returns the bytes read. A group of several
        ops (small neighbours in one file) is read with one scatter read
        straight into the destinations; padding between them goes to scratch."""
        first, last = group[0], group[-1]
        f = self._file_for(first.file, first.leaf)
        name = self._name(first.file)
        if first.parts is not None:  # a run of small shards, read (or populated) at once, checked part by part
            parts, dest, base = first.parts, first.dest, first.offset
            which = (f"leaf {parts[0][3]!r}" if parts[0][3] == parts[-1][3]
                     else f"leaves {parts[0][3]!r} .. {parts[-1][3]!r}")
            self._fill_op(f, first, f"{name} ({which})")
            checksum = fmt.checksum
            for lo, hi, want, leaf, chunk in parts:
                if want is not None and checksum(dest[lo:hi]) != want:
                    self._check(first.file, base + lo, dest[lo:hi], want, leaf, chunk)  # raises
            return sum(hi - lo for lo, hi, *_ in parts)
        if len(group) == 1:
            self._fill_op(f, first, f"{name} (leaf {first.leaf!r})")
            self._verify(first, first.dest)
            return len(first.dest)
        scratch = memoryview(bytearray(_GAP))
        bufs: list[memoryview] = []
        pos = first.offset
        for op in group:
            if op.offset > pos:
                bufs.append(scratch[:op.offset - pos])
            bufs.append(op.dest)
            pos = op.offset + len(op.dest)
        f.readv_into(bufs, first.offset, f"{name} (leaves {first.leaf!r} .. {last.leaf!r})")
        for op in group:
            self._verify(op, op.dest)
        return sum(len(op.dest) for op in group)

    def _index_starts(self) -> None:
        if self._starts is None:
            starts: dict[int, list[int]] = {}
            for leaf in self.manifest.leaves:
                for sh in leaf.shards:
                    starts.setdefault(sh.file, []).append(sh.offset)
            self._starts = {f: sorted(v) for f, v in starts.items()}

    def _plan_small(self, small: list[_Small], outs: list, verify: bool, ops: list[_Op], mappable: bool) -> None:
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
        self._index_starts()
        small.sort(key=_file_offset)
        joins = self._joins
        first = small[0][2]
        begin, file, head, end = 0, first.file, first.offset, first.offset + first.length
        for k in range(1, len(small)):
            sh = small[k][2]
            if not joins(file, head, end, sh.file, sh.offset, sh.offset + sh.length):
                self._small_run(small[begin:k], head, end, outs, verify, ops, mappable)
                begin, file, head = k, sh.file, sh.offset
            end = sh.offset + sh.length
        self._small_run(small[begin:], head, end, outs, verify, ops, mappable)

    def _small_run(self, run: list[_Small], lo: int, hi: int, outs: list, verify: bool, ops: list[_Op],
                   mappable: bool) -> None:
        """One op that reads file bytes [lo, hi) holding ``run``'s shards, and each result as a view of them."""
        file, leaf0 = run[0][2].file, run[0][1].path
        view = self._try_map(file, leaf0, lo, hi - lo) if mappable and hi - lo >= MAP_MIN_BYTES else None
        if view is None:
            buf = empty_aligned((hi - lo,), np.uint8)
            op = _Op(file, lo, memoryview(buf), None, leaf0, 0)
        else:
            buf = np.frombuffer(view, np.uint8)
            op = _Op(file, lo, view, None, leaf0, 0, mapped=True)
        chunk = self.manifest.chunk_bytes
        parts: list[tuple[int, int, int | None, str, int]] = []
        dtypes = arrayinfo.DTYPES
        ndarray = np.ndarray
        for idx, leaf, sh, _ in run:
            rel = sh.offset - lo
            outs[idx] = ndarray(sh.shape, dtypes[leaf.dtype], buffer=buf, offset=rel)
            n = sh.length
            if n <= chunk:
                parts.append((rel, rel + n, sh.checksums[0] if verify else None, leaf.path, 0))
            else:  # a chunk size below 1 MiB (possible in a foreign or hand-made manifest)
                for ci, start in enumerate(range(0, n, chunk)):
                    parts.append((rel + start, rel + min(n, start + chunk),
                                  sh.checksums[ci] if verify else None, leaf.path, ci))
        op.parts = parts
        ops.append(op)

    def _groups(self, ops: list[_Op]) -> list[list[_Op]]:
        """Coalesce small reads that are close in a file (10,000 leaves of a few
        KiB become a handful of reads instead of 10,000 syscalls and futures).
        A gap is bridged only when it holds padding, never another shard's
        bytes: a partial restore reads nothing of the leaves it leaves out."""
        self._index_starts()
        groups: list[list[_Op]] = []
        for op in ops:
            n = len(op.dest)
            if groups and n < _SMALL_READ and op.joinable:
                g = groups[-1]
                head, tail = g[0], g[-1]
                if (len(tail.dest) < _SMALL_READ and tail.joinable
                        and self._joins(tail.file, head.offset, tail.offset + len(tail.dest), op.file, op.offset,
                                        op.offset + n)):
                    g.append(op)
                    continue
            groups.append([op])
        return groups

    def read(self, requests: Iterable[tuple[int, Box | None]], verify: bool = True,
             progress: Callable[[int], None] | None = None,
             mappable: Iterable[bool] | None = None) -> list[np.ndarray]:
        """Read boxes of leaves (``None`` = the whole leaf) in parallel; returns
        host arrays in the saved dtype, in request order.

        ``mappable`` (one flag per request; default none): the result of that
        request may be a copy-on-write view of the file's pages (see the module
        docstring), which suits results kept in host memory or on a CPU device;
        leave it False where the host copy is only staged for an accelerator."""
        with gcpause.paused():  # one array and a few records per leaf, no cycles: see jaxckpt/gcpause.py
            return self._read(requests, verify, progress, mappable)

    def _read(self, requests: Iterable[tuple[int, Box | None]], verify: bool,
              progress: Callable[[int], None] | None, mappable: Iterable[bool] | None) -> list[np.ndarray]:
        ops: list[_Op] = []
        posts: list[Callable[[], None]] = []
        outs = []
        requests = list(requests)
        flags = [False] * len(requests) if mappable is None else list(mappable)
        if len(flags) != len(requests):
            raise ValueError(f"read: {len(requests)} requests but {len(flags)} mappable flags")
        small: list[_Small] = []
        leaves, files = self.manifest.leaves, self._files
        for (li, box), may_map in zip(requests, flags):
            leaf = leaves[li]
            shards = leaf.shards
            for s in shards:  # real file sizes before allocating: a manifest must not claim more than is on disk
                if s.length and s.file not in files:
                    self._file_for(s.file, leaf.path)
            if len(shards) == 1:
                s = shards[0]
                # box None: the whole leaf, which one shard of nonzero length is (the manifest's shards tile it)
                if 0 < s.length < _SMALL_READ and (box is None or s.box == box):
                    small.append((len(outs), leaf, s, may_map))
                    outs.append(None)
                    continue
            if box is None:
                box = tuple((0, d) for d in leaf.shape)
            outs.append(self._plan_leaf(leaf, box, verify, ops, posts, may_map))
        self._plan_small([t for t in small if t[3]], outs, verify, ops, mappable=True)
        self._plan_small([t for t in small if not t[3]], outs, verify, ops, mappable=False)
        ops.sort(key=lambda o: (o.file, o.offset))
        groups = self._groups(ops)
        if len(groups) <= 2 or self.max_workers <= 1:
            for g in groups:
                n = self._run(g)
                if progress:
                    progress(n)
        else:
            with ThreadPoolExecutor(self.max_workers, thread_name_prefix="jaxckpt-read") as pool:
                futures = [pool.submit(self._run, g) for g in groups]
                try:
                    for fut in futures:
                        n = fut.result()
                        if progress:
                            progress(n)
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    raise
        for post in posts:
            post()
        return outs
