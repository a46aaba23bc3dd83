"""On-disk format v1: the manifest <-> bytes, pure (no I/O, no jax).

``docs/FORMAT.md`` is the normative description; this module is its reference
implementation. Every number read from disk is checked against a hard cap
before it is used, so a hostile manifest costs at most a few megabytes and a
few milliseconds before :class:`CorruptCheckpointError` is raised.

Manifest file layout (``manifest.msgpack``): one msgpack map ::

    {"format": "jaxckpt", "version": 1, "body": <bin>, "xxh3": <uint64>}

where ``xxh3`` is XXH3-64 (seed 0) of the ``body`` bytes and ``body`` is itself
a msgpack map (see :func:`build_body`). The outer envelope lets a reader check
the version and the integrity of the whole manifest before decoding it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple

import msgpack
import numpy as np
import xxhash

from jaxckpt import gcpause
from jaxckpt.arrayinfo import DTYPES, ITEMSIZE
from jaxckpt.errors import CorruptCheckpointError

FORMAT_NAME = "jaxckpt"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.msgpack"
HASH_NAME = "xxh3-64"

# Checksums cover each shard in chunks of this many bytes (the last chunk may be
# shorter). 16 MiB keeps manifests small (256 entries for 4 GiB) while letting a
# resharding restore verify only the chunks it reads.
CHUNK_BYTES = 16 << 20

# Hard caps on everything read from disk.
MAX_MANIFEST_BYTES = 64 << 20  # ~500k leaves; decoded, a manifest costs ~50x its size in memory
MAX_LEAVES = 4_000_000
MAX_NDIM = 64
MAX_SHARDS_PER_LEAF = 1 << 17  # a leaf split over every chip of a large pod
MAX_BOX_ENTRIES = 1 << 18  # shards x ndim of one leaf: bounds the decoded boxes' memory
MAX_FILES = 65536
MAX_TREE_DEPTH = 256
MAX_ARRAY_BYTES = 1 << 48  # 256 TiB: far above any real leaf, far below int64 overflow
MAX_STR = 1 << 20
MAX_PAIRWISE_SHARDS = 256  # shards of one leaf that do not form a grid (see _check_cover)

_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}$")


def checksum(buf) -> int:
    """XXH3-64 of a bytes-like object (releases the GIL for large inputs)."""
    return xxhash.xxh3_64_intdigest(buf)


def chunk_count(length: int, chunk_bytes: int) -> int:
    return max(1, -(-length // chunk_bytes)) if length else 0


# --------------------------------------------------------------------- records
@dataclasses.dataclass(frozen=True)
class FileRecord:
    name: str
    size: int


# Shard and leaf records are NamedTuples, not frozen dataclasses: a manifest of
# a 10,000-leaf tree builds 20,000 of them per save and per restore.
class ShardRecord(NamedTuple):
    box: tuple[tuple[int, int], ...]  # per dimension [start, stop) in the global array
    file: int  # index into Manifest.files
    offset: int
    length: int
    checksums: tuple[int, ...]  # one per CHUNK of the shard's bytes

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.box)


class LeafRecord(NamedTuple):
    path: str
    kind: str  # "array" | "scalar" (a numpy scalar) | "key" (typed PRNG key) | "value"
    dtype: str | None = None
    shape: tuple[int, ...] = ()
    shards: tuple[ShardRecord, ...] = ()
    value: Any = None  # for kind "value": a Python int/float/bool/complex/str
    impl: str | None = None  # for kind "key": the PRNG implementation name

    @property
    def nbytes(self) -> int:
        if self.kind == "value":
            return 0
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclasses.dataclass(frozen=True)
class Manifest:
    version: int
    library: str
    created: float
    chunk_bytes: int
    files: tuple[FileRecord, ...]
    tree: Any  # a tree node, see docs/FORMAT.md
    leaves: tuple[LeafRecord, ...]
    metadata: Any

    @property
    def total_bytes(self) -> int:
        return sum(leaf.nbytes for leaf in self.leaves)


# --------------------------------------------------------------------- encode
def _encode_value(v: Any) -> Any:
    if isinstance(v, complex):
        return {"complex": [v.real, v.imag]}
    return v


def build_body(manifest: Manifest) -> dict:
    def leaf(rec: LeafRecord) -> dict:
        if rec.kind == "value":
            return {"path": rec.path, "kind": "value", "value": _encode_value(rec.value)}
        out = {"path": rec.path, "kind": rec.kind, "dtype": rec.dtype, "shape": list(rec.shape),
               "shards": [{"box": [list(b) for b in s.box], "file": s.file, "offset": s.offset, "length": s.length,
                           "xxh3": list(s.checksums)} for s in rec.shards]}
        if rec.impl is not None:
            out["impl"] = rec.impl
        return out

    return {
        "library": manifest.library,
        "created": manifest.created,
        "hash": HASH_NAME,
        "chunk_bytes": manifest.chunk_bytes,
        "files": [{"name": f.name, "size": f.size} for f in manifest.files],
        "tree": manifest.tree,
        "leaves": [leaf(r) for r in manifest.leaves],
        "metadata": manifest.metadata,
    }


def encode_manifest(manifest: Manifest) -> bytes:
    body = msgpack.packb(build_body(manifest), use_bin_type=True)
    return msgpack.packb(
        {"format": FORMAT_NAME, "version": FORMAT_VERSION, "body": body, "xxh3": checksum(body)},
        use_bin_type=True,
    )


def _utf8_over(text: str, cap: int) -> int | None:
    """The UTF-8 size of ``text`` if it is above ``cap`` bytes, else None (encodes only long strings)."""
    if len(text) * 4 <= cap:
        return None
    n = len(text.encode("utf-8", "surrogatepass"))
    return n if n > cap else None


def check_writable(manifest: Manifest, encoded: bytes, where: str) -> None:
    """The caps a correct writer can still exceed (sizes of what the user
    stored). Cheaper than a full :func:`decode_manifest`, which a writer needs
    only when the shard records come from elsewhere (other processes).

    What the user controls in the body: key paths, value leaves, PRNG
    implementation names (checked here against the string cap), the tree
    (keys, names, sizes, nesting) and the metadata (decoded here on their
    own with the reader's limits); checksum lists grow with a leaf's size.
    Everything else in the body is the writer's own bounded output."""
    c = _Checker(where)
    if len(encoded) > MAX_MANIFEST_BYTES:
        raise c.fail(f"manifest is {len(encoded)} bytes, above the cap of {MAX_MANIFEST_BYTES}")
    if len(manifest.leaves) > MAX_LEAVES:
        raise c.fail(f"{len(manifest.leaves)} leaves, above the cap of {MAX_LEAVES}")
    max_list = 2 * MAX_LEAVES  # the reader's msgpack array/map length cap
    for leaf in manifest.leaves:
        path = leaf.path
        n = _utf8_over(path, MAX_STR)
        if n is not None:
            raise c.fail(f"leaf {path[:80]!r}...: its key path is {n} bytes of UTF-8, above the cap of {MAX_STR}")
        if leaf.kind == "value":
            if isinstance(leaf.value, str) and (n := _utf8_over(leaf.value, MAX_STR)) is not None:
                raise c.fail(f"leaf {path!r}: a str of {n} bytes of UTF-8, above the cap of {MAX_STR}")
            continue
        if leaf.impl is not None and (n := _utf8_over(leaf.impl, MAX_STR)) is not None:
            raise c.fail(f"leaf {path!r}: a PRNG implementation name of {n} bytes, above the cap of {MAX_STR}")
        shards = leaf.shards
        if len(shards) > MAX_SHARDS_PER_LEAF or len(shards) * max(len(leaf.shape), 1) > MAX_BOX_ENTRIES:
            raise c.fail(f"leaf {path!r}: {len(shards)} shards of {len(leaf.shape)} dimensions, above the "
                         f"caps of {MAX_SHARDS_PER_LEAF} shards and {MAX_BOX_ENTRIES} box entries")
        if len(leaf.shape) > MAX_NDIM:
            raise c.fail(f"leaf {path!r}: {len(leaf.shape)} dimensions, above the cap of {MAX_NDIM}")
        for s in shards:
            if len(s.checksums) > max_list:
                raise c.fail(f"leaf {path!r}: {len(s.checksums)} checksums in one shard, above the cap of {max_list}")
    try:  # string, container and nesting caps on what the user shaped
        _unpack(msgpack.packb([manifest.tree, manifest.metadata, manifest.library], use_bin_type=True), len(encoded))
    except Exception as e:
        raise c.fail(f"manifest body would not decode ({type(e).__name__}: {e})") from None
    _check_tree(c, manifest.tree, len(manifest.leaves))


def check_metadata(metadata: Any) -> bytes:
    """Validate user metadata (msgpack-able plain values); returns its encoding."""
    def check(v: Any, where: str, depth: int) -> None:
        if depth > 64:
            raise TypeError(f"metadata{where}: nested deeper than 64 levels")
        if v is None or isinstance(v, (bool, int, float, str, bytes)):
            if isinstance(v, int) and not isinstance(v, bool) and not -(1 << 63) <= v < (1 << 64):
                raise TypeError(f"metadata{where}: integer {v} does not fit in 64 bits")
            return
        if isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                check(x, f"{where}[{i}]", depth + 1)
            return
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, (str, int)):
                    raise TypeError(f"metadata{where}: key {k!r} must be str or int")
                check(x, f"{where}[{k!r}]", depth + 1)
            return
        raise TypeError(
            f"metadata{where}: {type(v).__name__} is not storable; use str/int/float/bool/None/"
            "bytes and lists/dicts of them")

    check(metadata, "", 0)
    return msgpack.packb(metadata, use_bin_type=True)


# --------------------------------------------------------------------- decode
def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not part of the format")


def _unpack(data: bytes, max_bytes: int) -> Any:
    # The limits bound every container and string msgpack would allocate; the
    # C unpacker has a fixed stack, so deep nesting errors out instead of crashing.
    return msgpack.unpackb(
        data, raw=False, strict_map_key=False, ext_hook=_no_ext, use_list=True, max_str_len=MAX_STR, max_bin_len=max_bytes,
        max_array_len=MAX_LEAVES * 2, max_map_len=MAX_LEAVES * 2, max_ext_len=0,
    )


class _Checker:
    """Field access with typed, located errors."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.where}: {what}")

    def get(self, m: Any, key: str, types: type | tuple, ctx: str, optional: bool = False) -> Any:
        if not isinstance(m, dict):
            raise self.fail(f"{ctx}: expected a map, found {type(m).__name__}")
        if key not in m:
            if optional:
                return None
            raise self.fail(f"{ctx}: missing field {key!r}")
        v = m[key]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in _as_tuple(types)):
            raise self.fail(f"{ctx}: field {key!r} expected {_type_names(types)}, found {type(v).__name__}")
        return v

    def nonneg(self, v: Any, ctx: str, cap: int) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > cap:
            raise self.fail(f"{ctx}: expected an integer in [0, {cap}], found {v!r}")
        return v


def _as_tuple(t: type | tuple) -> tuple:
    return t if isinstance(t, tuple) else (t,)


def _type_names(t: type | tuple) -> str:
    return "/".join(x.__name__ for x in _as_tuple(t))


def decode_manifest(data: bytes, where: str) -> Manifest:
    with gcpause.paused():  # 10^5 acyclic objects for a 10^4-leaf manifest: see jaxckpt/gcpause.py
        return _decode_manifest(data, where)


def _decode_manifest(data: bytes, where: str) -> Manifest:
    """Decode and validate a manifest. ``where`` names the file in errors.

    Checks everything a reader needs to trust before touching data files:
    version, checksum, types, caps, dtype allow-list, shape x itemsize ==
    length without overflow, shard boxes inside the shape and covering it
    exactly once, file names plain, byte ranges non-overlapping per file and
    inside the recorded file sizes.
    """
    c = _Checker(where)
    if len(data) == 0:
        raise c.fail("the manifest is empty (0 bytes)")
    if len(data) > MAX_MANIFEST_BYTES:
        raise c.fail(f"manifest is {len(data)} bytes, above the cap of {MAX_MANIFEST_BYTES}")
    try:
        outer = _unpack(data, len(data))
    except Exception as e:  # msgpack raises many types (ValueError, StackError, ...)
        raise c.fail(f"not a valid msgpack manifest ({type(e).__name__}: {e})") from None
    if not isinstance(outer, dict) or outer.get("format") != FORMAT_NAME:
        raise c.fail("not a jaxckpt manifest (missing format: 'jaxckpt')")
    version = c.get(outer, "version", int, "envelope")
    if version != FORMAT_VERSION:
        raise c.fail(f"format version {version} is not supported (this reader knows version {FORMAT_VERSION})")
    body = c.get(outer, "body", bytes, "envelope")
    expected = c.get(outer, "xxh3", int, "envelope")
    found = checksum(body)
    if found != expected:
        raise c.fail(f"manifest checksum mismatch: expected xxh3 {expected:#018x}, found {found:#018x}")
    try:
        b = _unpack(body, len(body))
    except Exception as e:
        raise c.fail(f"manifest body is not valid msgpack ({type(e).__name__}: {e})") from None

    library = c.get(b, "library", str, "body")
    created = c.get(b, "created", (int, float), "body")
    if c.get(b, "hash", str, "body") != HASH_NAME:
        raise c.fail(f"unknown hash {b['hash']!r}, expected {HASH_NAME!r}")
    chunk_bytes = c.get(b, "chunk_bytes", int, "body")
    if not 4096 <= chunk_bytes <= (1 << 40):
        raise c.fail(f"chunk_bytes {chunk_bytes} outside [4096, 2**40]")

    raw_files = c.get(b, "files", list, "body")
    if len(raw_files) > MAX_FILES:
        raise c.fail(f"{len(raw_files)} data files, above the cap of {MAX_FILES}")
    files = []
    for i, f in enumerate(raw_files):
        name = c.get(f, "name", str, f"files[{i}]")
        if not _FILE_NAME_RE.fullmatch(name) or name == MANIFEST_NAME:  # fullmatch: '$' alone admits a final '\n'
            raise c.fail(f"files[{i}]: file name {name!r} is not a plain file name "
                         "(letters, digits, '.', '_', '-'; no separators, no leading dot)")
        files.append(FileRecord(name, c.nonneg(c.get(f, "size", int, f"files[{i}]"), f"files[{i}].size", 1 << 56)))
    if len({f.name for f in files}) != len(files):
        raise c.fail("a data file is listed twice")

    raw_leaves = c.get(b, "leaves", list, "body")
    if len(raw_leaves) > MAX_LEAVES:
        raise c.fail(f"{len(raw_leaves)} leaves, above the cap of {MAX_LEAVES}")
    leaves = tuple(_decode_leaf(c, i, r, files, chunk_bytes) for i, r in enumerate(raw_leaves))
    _check_extents(c, leaves, files)
    if len({leaf.path for leaf in leaves}) != len(leaves):
        raise c.fail("two leaves have the same path")
    tree = b.get("tree")
    _check_tree(c, tree, len(leaves))
    return Manifest(version, library, float(created), chunk_bytes, tuple(files), tree, leaves,
                    b.get("metadata"))


_U64 = 1 << 64


def _whole_leaf(r: dict, n_files: int, chunk_bytes: int) -> LeafRecord | None:
    """The record of the commonest leaf, an array or numpy scalar stored as
    one shard, if ``r`` is a well-formed one; else None (the general decoder
    then accepts it or raises the located error). Accepts exactly what the
    general path accepts for such a leaf and builds the same record; it only
    skips the general path's bookkeeping (10,000-leaf manifests: ~4 us per
    leaf instead of ~9)."""
    path, kind, dtype, raw_shape, raw_shards = (r.get("path"), r.get("kind"), r.get("dtype"), r.get("shape"),
                                                r.get("shards"))
    if not (type(path) is str and (kind == "array" or kind == "scalar") and type(dtype) is str
            and type(raw_shape) is list and type(raw_shards) is list and len(raw_shards) == 1
            and len(raw_shape) <= MAX_NDIM):
        return None
    itemsize = ITEMSIZE.get(dtype)
    s = raw_shards[0]
    if itemsize is None or type(s) is not dict or (kind == "scalar" and raw_shape):
        return None
    raw_box, file, offset, length, sums = s.get("box"), s.get("file"), s.get("offset"), s.get("length"), s.get("xxh3")
    if type(raw_box) is not list or len(raw_box) != len(raw_shape):
        return None
    count = itemsize
    for d, pair in zip(raw_shape, raw_box):  # one shard of an array is all of it: every box is [0, d]
        if not (type(d) is int and 0 < d <= MAX_ARRAY_BYTES and type(pair) is list and len(pair) == 2
                and pair[0] == 0 and type(pair[0]) is int and pair[1] == d and type(pair[1]) is int):
            return None
        count *= d
        if count > MAX_ARRAY_BYTES:
            return None
    if not (type(file) is int and 0 <= file < n_files and type(offset) is int and 0 <= offset <= (1 << 56)
            and type(length) is int and length == count and type(sums) is list
            and len(sums) == -(-length // chunk_bytes)):
        return None
    for x in sums:
        if type(x) is not int or not 0 <= x < _U64:
            return None
    shape = tuple(raw_shape)
    return LeafRecord(path, kind, dtype, shape,
                      (ShardRecord(tuple((0, d) for d in shape), file, offset, length, tuple(sums)),), None, None)


def _decode_leaf(c: _Checker, i: int, r: Any, files: list[FileRecord], chunk_bytes: int) -> LeafRecord:
    # Fast path for the common, well-formed leaf (plain dict, exact types); any
    # doubt goes through the checker, which accepts or raises the located error.
    if type(r) is dict:
        rec = _whole_leaf(r, len(files), chunk_bytes)
        if rec is not None:
            return rec
        path, kind, dtype, raw_shape = r.get("path"), r.get("kind"), r.get("dtype"), r.get("shape")
        if (type(path) is str and kind in ("array", "scalar") and type(dtype) is str and type(raw_shape) is list
                and len(raw_shape) <= MAX_NDIM and all(type(d) is int and 0 <= d <= MAX_ARRAY_BYTES for d in raw_shape)
                and dtype in DTYPES):
            return _decode_array_leaf(c, r, path, kind, dtype, tuple(raw_shape), files, chunk_bytes)
    path = c.get(r, "path", str, f"leaves[{i}]")
    ctx = f"leaf {path!r}"
    kind = c.get(r, "kind", str, ctx)
    if kind == "value":
        v = r.get("value")
        if isinstance(v, dict) and set(v) == {"complex"}:
            parts = v["complex"]
            if not (isinstance(parts, list) and len(parts) == 2 and all(isinstance(p, (int, float)) for p in parts)):
                raise c.fail(f"{ctx}: malformed complex value")
            v = complex(parts[0], parts[1])
        elif not (v is None or isinstance(v, (bool, int, float, str))):
            raise c.fail(f"{ctx}: value of type {type(v).__name__} is not a scalar")
        return LeafRecord(path, kind, value=v)
    if kind not in ("array", "scalar", "key"):
        raise c.fail(f"{ctx}: unknown leaf kind {kind!r}")
    dtype = c.get(r, "dtype", str, ctx)
    if dtype not in DTYPES:
        raise c.fail(f"{ctx}: dtype {dtype!r} is not in the allow-list")
    raw_shape = c.get(r, "shape", list, ctx)
    if len(raw_shape) > MAX_NDIM:
        raise c.fail(f"{ctx}: {len(raw_shape)} dimensions, above the cap of {MAX_NDIM}")
    shape = tuple(c.nonneg(d, f"{ctx} shape", MAX_ARRAY_BYTES) for d in raw_shape)
    return _decode_array_leaf(c, r, path, kind, dtype, shape, files, chunk_bytes)


def _decode_array_leaf(c: _Checker, r: dict, path: str, kind: str, dtype: str, shape: tuple[int, ...],
                       files: list[FileRecord], chunk_bytes: int) -> LeafRecord:
    """The rest of an array/scalar/key leaf, once path, kind, dtype (allow-listed)
    and shape (dimensions checked) are known good."""
    ctx = f"leaf {path!r}"
    itemsize = DTYPES[dtype].itemsize
    count = 1
    for d in shape:  # overflow-safe: stop as soon as the product exceeds the cap
        count *= d
        if count * itemsize > MAX_ARRAY_BYTES:
            raise c.fail(f"{ctx}: shape {list(shape)} x itemsize {itemsize} exceeds the cap of {MAX_ARRAY_BYTES} bytes")
    impl = None
    if kind == "key":
        impl = c.get(r, "impl", str, ctx)
        if not impl.isidentifier():
            raise c.fail(f"{ctx}: PRNG implementation name {impl!r} is not an identifier")
    if kind == "scalar" and shape != ():
        raise c.fail(f"{ctx}: a numpy scalar must have shape (), found {list(shape)}")
    raw_shards = c.get(r, "shards", list, ctx)
    if len(raw_shards) > MAX_SHARDS_PER_LEAF:
        raise c.fail(f"{ctx}: {len(raw_shards)} shards, above the cap of {MAX_SHARDS_PER_LEAF}")
    if len(raw_shards) * max(len(shape), 1) > MAX_BOX_ENTRIES:
        raise c.fail(f"{ctx}: {len(raw_shards)} shards x {len(shape)} dimensions, above the cap of "
                     f"{MAX_BOX_ENTRIES} box entries")
    # The loop below runs once per shard of every leaf (10^4-10^6 times for big
    # trees): checks are inline and messages are only formatted on failure.
    shards = []
    volume = 0
    n_files = len(files)
    ndim = len(shape)
    for j, s in enumerate(raw_shards):
        if type(s) is not dict:
            raise c.fail(f"{ctx} shard {j}: expected a map, found {type(s).__name__}")
        raw_box, file, offset, length, sums = (s.get("box"), s.get("file"), s.get("offset"), s.get("length"),
                                               s.get("xxh3"))
        if type(raw_box) is not list or len(raw_box) != ndim:
            raise c.fail(f"{ctx} shard {j}: box must be a list of {ndim} [start, stop] pairs, found {raw_box!r:.100}")
        box = []
        elems = 1
        for d, pair in enumerate(raw_box):
            if not (type(pair) is list and len(pair) == 2 and type(pair[0]) is int and type(pair[1]) is int
                    and 0 <= pair[0] <= pair[1] <= shape[d]):
                raise c.fail(f"{ctx} shard {j}: box dimension {d} must be [start, stop] with "
                             f"0 <= start <= stop <= {shape[d]}, found {pair!r:.100}")
            box.append((pair[0], pair[1]))
            elems *= pair[1] - pair[0]
        if type(file) is not int or not 0 <= file < n_files:
            raise c.fail(f"{ctx} shard {j}: file index {file!r:.40} but {n_files} data files are listed")
        if type(offset) is not int or not 0 <= offset <= (1 << 56):
            raise c.fail(f"{ctx} shard {j}: offset must be an integer in [0, 2**56], found {offset!r:.40}")
        expected = elems * itemsize
        if type(length) is not int or length != expected:
            raise c.fail(f"{ctx} shard {j}: length {length!r:.40} bytes but box {[list(x) for x in box]} x itemsize "
                         f"{itemsize} = {expected}")
        if type(sums) is not list or len(sums) != chunk_count(length, chunk_bytes):
            raise c.fail(f"{ctx} shard {j}: expected {chunk_count(length, chunk_bytes)} checksums for {length} bytes "
                         f"in chunks of {chunk_bytes}, found {sums!r:.100}")
        for x in sums:
            if type(x) is not int or not 0 <= x < (1 << 64):
                raise c.fail(f"{ctx} shard {j}: checksum {x!r:.40} is not a 64-bit unsigned integer")
        volume += elems
        shards.append(ShardRecord(tuple(box), file, offset, length, tuple(sums)))
    _check_cover(c, ctx, shape, shards, volume)
    return LeafRecord(path, kind, dtype, shape, tuple(shards), impl=impl)


def _check_cover(c: _Checker, ctx: str, shape: tuple[int, ...], shards: list[ShardRecord], vol: int) -> None:
    """The shard boxes tile the array exactly: volumes (``vol``) add up and no two overlap."""
    total = math.prod(shape)
    if total == 0:
        if len(shards) > 1:
            raise c.fail(f"{ctx}: an empty array has {len(shards)} shards")
        return
    if vol != total:
        raise c.fail(f"{ctx}: shards cover {vol} elements, the array has {total}")
    if len(shards) == 1:
        return  # one box inside the shape with the full volume is the whole array
    boxes = [s.box for s in shards if all(a < z for a, z in s.box)]  # empty boxes overlap nothing
    if len(boxes) < 2:
        return
    lo = np.array([[a for a, _ in b] for b in boxes], dtype=np.int64).reshape(len(boxes), -1)
    hi = np.array([[z for _, z in b] for b in boxes], dtype=np.int64).reshape(len(boxes), -1)
    # Fast path, O(n log n): the shards of a jax sharding form a grid, each box one cell
    # between consecutive boundaries; then boxes overlap only if they are the same cell.
    cells = np.empty_like(lo)
    for d in range(lo.shape[1]):
        edges = np.unique(np.concatenate([lo[:, d], hi[:, d]]))
        cells[:, d] = np.searchsorted(edges, lo[:, d])
        if np.any(np.searchsorted(edges, hi[:, d]) != cells[:, d] + 1):
            break
    else:
        _, first, counts = np.unique(cells, axis=0, return_index=True, return_counts=True)
        if np.any(counts > 1):
            a = int(first[np.argmax(counts > 1)])
            b = next(j for j in range(len(boxes)) if j != a and boxes[j] == boxes[a])
            raise c.fail(f"{ctx}: shards {a} and {b} overlap")
        return
    # Any other tiling is checked pairwise, which costs n^2: bounded so that a
    # hostile manifest cannot buy minutes of CPU with a few megabytes.
    if len(boxes) > MAX_PAIRWISE_SHARDS:
        raise c.fail(f"{ctx}: {len(boxes)} shards that do not form a grid (at most {MAX_PAIRWISE_SHARDS} allowed)")
    for i in range(0, len(boxes), 64):  # blocked: small temporaries
        over = np.all((lo[i:i + 64, None, :] < hi[None, :, :]) & (lo[None, :, :] < hi[i:i + 64, None, :]), axis=2)
        over[np.arange(over.shape[0]), np.arange(i, i + over.shape[0])] = False
        if over.any():
            a, b = np.argwhere(over)[0]
            raise c.fail(f"{ctx}: shards {i + a} and {b} overlap")


def _check_extents(c: _Checker, leaves: tuple[LeafRecord, ...], files: list[FileRecord]) -> None:
    """Byte ranges lie inside the recorded file sizes and never overlap."""
    per_file: dict[int, list[tuple[int, int, str]]] = {}
    for leaf in leaves:
        for s in leaf.shards:
            if s.offset + s.length > files[s.file].size:
                raise c.fail(f"leaf {leaf.path!r}: bytes [{s.offset}, {s.offset + s.length}) lie beyond the end "
                             f"of {files[s.file].name} ({files[s.file].size} bytes)")
            if s.length:
                per_file.setdefault(s.file, []).append((s.offset, s.offset + s.length, leaf.path))
    for f, ext in per_file.items():
        ext.sort()
        for (a0, a1, pa), (b0, _, pb) in zip(ext, ext[1:]):
            if b0 < a1:
                raise c.fail(f"leaves {pa!r} and {pb!r} overlap in {files[f].name} at byte {b0}")


def _check_tree(c: _Checker, tree: Any, n_leaves: int) -> None:
    """The tree references every leaf exactly once, is well formed and shallow enough."""
    seen = bytearray(n_leaves)
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_TREE_DEPTH:
            raise c.fail(f"tree nested deeper than {MAX_TREE_DEPTH} levels")
        if isinstance(node, int) and not isinstance(node, bool):
            if not 0 <= node < n_leaves or seen[node]:
                raise c.fail(f"tree references leaf {node} which is out of range or used twice")
            seen[node] = 1
            continue
        t = c.get(node, "t", str, "tree node")
        if t == "none":
            continue
        if t not in ("dict", "list", "tuple", "namedtuple", "custom"):
            raise c.fail(f"tree node kind {t!r} is unknown")
        children = c.get(node, "c", list, f"tree node {t}")
        if t in ("dict", "namedtuple", "custom"):
            keys = c.get(node, "k", list, f"tree node {t}")
            if len(keys) != len(children):
                raise c.fail(f"tree node {t}: {len(keys)} keys for {len(children)} children")
            for k in keys:
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise c.fail(f"tree node {t}: key {k!r} is not a str or int")
            if len(set(keys)) != len(keys):
                raise c.fail(f"tree node {t}: a key occurs twice")
        if t in ("namedtuple", "custom"):
            c.get(node, "n", str, f"tree node {t}")
        stack.extend((ch, depth + 1) for ch in children)
    if n_leaves and not all(seen):
        raise c.fail(f"tree does not reference leaf {seen.index(0)}")
