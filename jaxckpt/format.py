"""On-disk format v1: the manifest <-> bytes, pure (no I/O, no jax). ``docs/FORMAT.md``
is the normative description, this module its reference implementation: the decoder
checks each reader rule once, tagged with its number (``# R12``), and every number read
from disk against a cap before using it (``docs/RATIONALE.md`` says why)."""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from typing import Any, NamedTuple

import msgpack
import numpy as np
import xxhash

from jaxckpt import gcpause
from jaxckpt.arrayinfo import ITEMSIZE
from jaxckpt.errors import CorruptCheckpointError

FORMAT_NAME = "jaxckpt"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.msgpack"
HASH_NAME = "xxh3-64"
CHUNK_BYTES = 16 << 20  # checksummed chunks of a shard: 256 sums for 4 GiB; a restore verifies what it reads

# Hard caps on everything read from disk, with the rule of docs/FORMAT.md that states each.
MAX_MANIFEST_BYTES = 64 << 20  # R1: ~500k leaves; decoded, a manifest costs ~50x its size in memory
MAX_STR = 1 << 20  # R2: bytes of UTF-8 in one msgpack str; an array or map holds at most 2 * MAX_LEAVES entries
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 4096, 1 << 40  # R8: a tiny chunk would need a huge checksum list
MAX_FILES, MAX_LEAVES = 65536, 4_000_000  # R9
MAX_SHARDS_PER_LEAF = 1 << 17  # R9: a leaf split over every chip of a large pod
MAX_BOX_ENTRIES = 1 << 18  # R9: shards x ndim of one leaf: bounds the decoded boxes' memory
MAX_NDIM = 64  # R11: numpy's own limit
MAX_ARRAY_BYTES = 1 << 48  # R11, R12: 256 TiB: far above any real leaf, far below int64 overflow
MAX_U64 = (1 << 64) - 1  # R16: a checksum
MAX_PAIRWISE_SHARDS = 256  # R17: shards of one leaf that do not form a grid (see _check_cover)
MAX_OFFSET = 1 << 56  # R18: a shard's offset, a data file's size
MAX_TREE_DEPTH = 256  # R23
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}$")  # R21


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


# NamedTuples, not frozen dataclasses: a 10,000-leaf tree builds 20,000 per save and per restore.
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
        return 0 if self.kind == "value" else math.prod(self.shape) * ITEMSIZE[self.dtype]


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
def build_body(manifest: Manifest) -> dict:
    def leaf(rec: LeafRecord) -> dict:
        if rec.kind == "value":
            v = {"complex": [rec.value.real, rec.value.imag]} if isinstance(rec.value, complex) else rec.value
            return {"path": rec.path, "kind": "value", "value": v}
        out = {"path": rec.path, "kind": rec.kind, "dtype": rec.dtype, "shape": list(rec.shape),
               "shards": [{"box": [list(b) for b in s.box], "file": s.file, "offset": s.offset, "length": s.length,
                           "xxh3": list(s.checksums)} for s in rec.shards]}
        return out if rec.impl is None else {**out, "impl": rec.impl}

    return {"library": manifest.library, "created": manifest.created, "hash": HASH_NAME,
            "chunk_bytes": manifest.chunk_bytes, "files": [{"name": f.name, "size": f.size} for f in manifest.files],
            "tree": manifest.tree, "leaves": [leaf(r) for r in manifest.leaves], "metadata": manifest.metadata}


def encode_manifest(manifest: Manifest) -> bytes:
    body = msgpack.packb(build_body(manifest), use_bin_type=True)
    return msgpack.packb({"format": FORMAT_NAME, "version": FORMAT_VERSION, "body": body, "xxh3": checksum(body)},
                         use_bin_type=True)  # "format" first: docs/FORMAT.md, the envelope


def _utf8_over(text: str, cap: int) -> int | None:
    """The UTF-8 size of ``text`` if it is above ``cap`` bytes, else None (encodes only long strings)."""
    if len(text) * 4 <= cap:
        return None
    n = len(text.encode("utf-8", "surrogatepass"))
    return n if n > cap else None


def check_writable(manifest: Manifest, encoded: bytes, where: str) -> None:
    """The reader's caps that a correct writer can exceed (key paths, values, PRNG names, tree,
    metadata, checksum lists); cheaper than :func:`decode_manifest`, needed for other processes' shards."""
    c = _Checker(where)
    if len(encoded) > MAX_MANIFEST_BYTES:
        raise c.fail(f"manifest is {len(encoded)} bytes, above the cap of {MAX_MANIFEST_BYTES}")
    if len(manifest.leaves) > MAX_LEAVES:
        raise c.fail(f"{len(manifest.leaves)} leaves, above the cap of {MAX_LEAVES}")
    for leaf in manifest.leaves:
        path, shards, ndim = leaf.path, leaf.shards, len(leaf.shape)
        if (n := _utf8_over(path, MAX_STR)) is not None:
            raise c.fail(f"leaf {path[:80]!r}...: its key path is {n} bytes of UTF-8, above the cap of {MAX_STR}")
        if isinstance(leaf.value, str) and (n := _utf8_over(leaf.value, MAX_STR)) is not None:
            raise c.fail(f"leaf {path!r}: a str of {n} bytes of UTF-8, above the cap of {MAX_STR}")
        if leaf.impl is not None and (n := _utf8_over(leaf.impl, MAX_STR)) is not None:
            raise c.fail(f"leaf {path!r}: a PRNG implementation name of {n} bytes, above the cap of {MAX_STR}")
        if len(shards) > MAX_SHARDS_PER_LEAF or len(shards) * max(ndim, 1) > MAX_BOX_ENTRIES:
            raise c.fail(f"leaf {path!r}: {len(shards)} shards of {ndim} dimensions, above the "
                         f"caps of {MAX_SHARDS_PER_LEAF} shards and {MAX_BOX_ENTRIES} box entries")
        if ndim > MAX_NDIM:
            raise c.fail(f"leaf {path!r}: {ndim} dimensions, above the cap of {MAX_NDIM}")
        if shards and (n := max(len(s.checksums) for s in shards)) > 2 * MAX_LEAVES:  # the reader's list cap
            raise c.fail(f"leaf {path!r}: {n} checksums in one shard, above the cap of {2 * MAX_LEAVES}")
    user = msgpack.packb([manifest.tree, manifest.metadata, manifest.library], use_bin_type=True)
    _unpack(c, user, "body", "manifest body would not decode")  # string, container and nesting caps
    _check_tree(c, manifest.tree, len(manifest.leaves))


def check_metadata(metadata: Any) -> bytes:
    """Validate user metadata (msgpack-able plain values); returns its encoding."""
    def check(v: Any, where: str, depth: int) -> None:
        if depth > 64:
            raise TypeError(f"metadata{where}: nested deeper than 64 levels")
        if isinstance(v, int) and not -(1 << 63) <= v < (1 << 64):
            raise TypeError(f"metadata{where}: integer {v} does not fit in 64 bits")
        if isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                check(x, f"{where}[{i}]", depth + 1)
        elif isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, (str, int)):
                    raise TypeError(f"metadata{where}: key {k!r} must be str or int")
                check(x, f"{where}[{k!r}]", depth + 1)
        elif not (v is None or isinstance(v, (bool, int, float, str, bytes))):
            raise TypeError(f"metadata{where}: {type(v).__name__} is not storable; use str/int/float/bool/None/"
                            "bytes and lists/dicts of them")

    check(metadata, "", 0)
    return msgpack.packb(metadata, use_bin_type=True)


# --------------------------------------------------------------------- decode
# Leaf and shard checks run 10^4-10^6 times: inline, on msgpack's exact types, messages formatted on failure.
class _Checker:
    """Typed, located errors."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.where}: {what}")

    def bad(self, m: Any, key: str, types: type | tuple, ctx: str) -> CorruptCheckpointError:
        if not isinstance(m, dict):
            return self.fail(f"{ctx}: expected a map, found {type(m).__name__}")
        if key not in m:
            return self.fail(f"{ctx}: missing field {key!r}")
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        return self.fail(f"{ctx}: field {key!r} expected {names}, found {type(m[key]).__name__}")

    def get(self, m: Any, key: str, types: type | tuple, ctx: str) -> Any:
        """Field ``key`` of map ``m``, of one of ``types`` (a bool only where bool is one, R8); else ``bad``."""
        v = m.get(key) if isinstance(m, dict) else None
        ok = types if isinstance(types, tuple) else (types,)
        if not isinstance(v, ok) or (type(v) is bool and bool not in ok):
            raise self.bad(m, key, types, ctx)
        return v


def _no_duplicate_keys(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):  # R4: msgpack alone keeps the last value silently
        seen: set = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise CorruptCheckpointError(f"the key {key!r:.80} occurs twice in one map")  # located by _unpack
    return d


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not part of the format")  # R3


def _unpack(c: _Checker, data: bytes, name: str, invalid: str) -> Any:
    """``data`` decoded (R2-R5); ``name`` (envelope, body) or ``invalid`` open the error messages."""
    try:  # R2: caps on every container and string msgpack would allocate; its fixed C stack bounds nesting
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True, max_str_len=MAX_STR,
                               max_bin_len=len(data), max_array_len=2 * MAX_LEAVES, max_map_len=2 * MAX_LEAVES,
                               ext_hook=_no_ext, max_ext_len=0, object_pairs_hook=_no_duplicate_keys)
    except msgpack.ExtraData as e:  # R5: msgpack refuses trailing bytes; say where they are
        if not isinstance(e.unpacked, dict):
            raise c.fail(f"{invalid} (ExtraData: {e})") from None
        raise c.fail(f"{name}: {len(e.extra)} bytes after the end of the {name} map (one map, nothing else)") from None
    except CorruptCheckpointError as e:  # R4
        raise c.fail(f"{name}: {e}") from None
    except Exception as e:  # msgpack raises many types (ValueError, StackError, ...)
        raise c.fail(f"{invalid} ({type(e).__name__}: {e})") from None


def decode_manifest(data: bytes, where: str) -> Manifest:
    """Decode and check a manifest (R1-R23 of docs/FORMAT.md); ``where`` names the file in errors."""
    c = _Checker(where)
    if len(data) == 0:  # R1
        raise c.fail("the manifest is empty (0 bytes)")
    if len(data) > MAX_MANIFEST_BYTES:
        raise c.fail(f"manifest is {len(data)} bytes, above the cap of {MAX_MANIFEST_BYTES}")
    outer = _unpack(c, data, "envelope", "not a valid msgpack manifest")  # R2-R5
    if not isinstance(outer, dict) or outer.get("format") != FORMAT_NAME:  # R6
        raise c.fail("not a jaxckpt manifest (missing format: 'jaxckpt')")
    version = c.get(outer, "version", int, "envelope")  # R8
    if version != FORMAT_VERSION:  # R6
        raise c.fail(f"format version {version} is not supported (this reader knows version {FORMAT_VERSION})")
    body = c.get(outer, "body", bytes, "envelope")  # R8
    expected = c.get(outer, "xxh3", int, "envelope")
    if (found := checksum(body)) != expected:  # R7: before the body is parsed
        raise c.fail(f"manifest checksum mismatch: expected xxh3 {expected:#018x}, found {found:#018x}")
    with gcpause.paused():  # 10^5 acyclic objects for a 10^4-leaf manifest: see jaxckpt/gcpause.py
        return _decode_body(c, _unpack(c, body, "body", "manifest body is not valid msgpack"))  # R2-R5


def _decode_body(c: _Checker, b: Any) -> Manifest:
    library = c.get(b, "library", str, "body")  # R8
    created = c.get(b, "created", (int, float), "body")
    if c.get(b, "hash", str, "body") != HASH_NAME:  # R8
        raise c.fail(f"unknown hash {b['hash']!r}, expected {HASH_NAME!r}")
    chunk_bytes = c.get(b, "chunk_bytes", int, "body")
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:  # R8
        raise c.fail(f"chunk_bytes {chunk_bytes} outside [4096, 2**40]")
    raw_files = c.get(b, "files", list, "body")  # R8
    if len(raw_files) > MAX_FILES:  # R9
        raise c.fail(f"{len(raw_files)} data files, above the cap of {MAX_FILES}")
    files = []
    for i, f in enumerate(raw_files):
        name = c.get(f, "name", str, f"files[{i}]")  # R8
        if not _FILE_NAME_RE.fullmatch(name) or name == MANIFEST_NAME:  # R21 (fullmatch: '$' admits a final '\n')
            raise c.fail(f"files[{i}]: file name {name!r} is not a plain file name "
                         "(letters, digits, '.', '_', '-'; no separators, no leading dot)")
        size = c.get(f, "size", int, f"files[{i}]")  # R8
        if not 0 <= size <= MAX_OFFSET:  # R18
            raise c.fail(f"files[{i}].size: expected an integer in [0, {MAX_OFFSET}], found {size!r}")
        files.append(FileRecord(name, size))
    if len({f.name for f in files}) != len(files):  # R21
        raise c.fail("a data file is listed twice")
    raw_leaves = c.get(b, "leaves", list, "body")  # R8
    if len(raw_leaves) > MAX_LEAVES:  # R9
        raise c.fail(f"{len(raw_leaves)} leaves, above the cap of {MAX_LEAVES}")
    extents: list[tuple[int, int, int, str]] = []  # (file, start, stop, leaf path) of each byte range
    leaves = tuple([_decode_leaf(c, i, r, files, chunk_bytes, extents) for i, r in enumerate(raw_leaves)])
    extents.sort()
    for (fa, _, a1, pa), (fb, b0, _, pb) in zip(extents, extents[1:]):
        if b0 < a1 and fa == fb:  # R20
            raise c.fail(f"leaves {pa!r} and {pb!r} overlap in {files[fa].name} at byte {b0}")
    if len(set(map(operator.attrgetter("path"), leaves))) != len(leaves):  # R22
        raise c.fail("two leaves have the same path")
    _check_tree(c, b.get("tree"), len(leaves))  # R23
    return Manifest(FORMAT_VERSION, library, float(created), chunk_bytes, tuple(files), b.get("tree"), leaves,
                    b.get("metadata"))


_new = tuple.__new__  # builds a NamedTuple without its Python-level __new__ (2 records per leaf)
_LEAF_KEYS, _SHARD_KEYS = ("path", "kind", "dtype", "shape", "shards"), ("box", "file", "offset", "length", "xxh3")
_leaf_fields, _shard_fields = operator.itemgetter(*_LEAF_KEYS), operator.itemgetter(*_SHARD_KEYS)  # 1 C call each


def _decode_leaf(c: _Checker, i: int, r: Any, files: list[FileRecord], chunk_bytes: int,
                 extents: list[tuple[int, int, int, str]]) -> LeafRecord:
    """The record of leaf ``i`` (R8-R19); its byte ranges go to ``extents`` (R20)."""
    if type(r) is not dict:  # R8
        raise c.fail(f"leaves[{i}]: expected a map, found {type(r).__name__}")
    try:
        path, kind, dtype, raw_shape, raw_shards = _leaf_fields(r)
    except KeyError:  # a missing field is None: refused below
        path, kind, dtype, raw_shape, raw_shards = map(r.get, _LEAF_KEYS)
    if type(path) is not str:  # R8
        raise c.bad(r, "path", str, f"leaves[{i}]")
    if kind not in ("array", "scalar", "key"):  # the kinds with bytes in data files
        return _value_leaf(c, r, path, kind)
    itemsize = ITEMSIZE.get(dtype) if type(dtype) is str else None
    if itemsize is None:  # R8, R10
        raise c.bad(r, "dtype", str, f"leaf {path!r}") if type(dtype) is not str else c.fail(
            f"leaf {path!r}: dtype {dtype!r} is not in the allow-list")
    if type(raw_shape) is not list:  # R8
        raise c.bad(r, "shape", list, f"leaf {path!r}")
    if len(raw_shape) > MAX_NDIM:  # R11
        raise c.fail(f"leaf {path!r}: {len(raw_shape)} dimensions, above the cap of {MAX_NDIM}")
    for d in raw_shape:  # R11
        if type(d) is not int or not 0 <= d <= MAX_ARRAY_BYTES:
            raise c.fail(f"leaf {path!r} shape: expected an integer in [0, {MAX_ARRAY_BYTES}], found {d!r}")
    count = 1
    for d in raw_shape:  # R12: the product so far, so that it cannot overflow
        count *= d
        if count * itemsize > MAX_ARRAY_BYTES:
            raise c.fail(f"leaf {path!r}: shape {raw_shape} x itemsize {itemsize} exceeds the cap of "
                         f"{MAX_ARRAY_BYTES} bytes")
    if kind == "scalar" and raw_shape:  # R13
        raise c.fail(f"leaf {path!r}: a numpy scalar must have shape (), found {raw_shape}")
    impl = c.get(r, "impl", str, f"leaf {path!r}") if kind == "key" else None  # R8
    if impl is not None and not impl.isidentifier():  # R13
        raise c.fail(f"leaf {path!r}: PRNG implementation name {impl!r} is not an identifier")
    if type(raw_shards) is not list:  # R8
        raise c.bad(r, "shards", list, f"leaf {path!r}")
    shape = tuple(raw_shape)
    shards, volume = _decode_shards(c, path, raw_shards, shape, itemsize, files, chunk_bytes, extents)
    # The fast path is this predicate in front of the one tiling check: a single shard
    # holding every element (its box inside the shape, R14) is the whole array.
    if len(shards) != 1 or volume != count:
        _check_cover(c, f"leaf {path!r}", count, shards, volume)
    return _new(LeafRecord, (path, kind, dtype, shape, shards, None, impl))


def _value_leaf(c: _Checker, r: dict, path: str, kind: Any) -> LeafRecord:
    """A leaf without bytes: a Python scalar stored inline (R10, R13)."""
    if kind != "value":
        raise c.bad(r, "kind", str, f"leaf {path!r}") if type(kind) is not str else c.fail(  # R8, R10
            f"leaf {path!r}: unknown leaf kind {kind!r}")
    v = r.get("value")
    if isinstance(v, dict) and set(v) == {"complex"}:  # R13
        parts = v["complex"]
        if not (type(parts) is list and len(parts) == 2 and all(type(p) in (int, float) for p in parts)):
            raise c.fail(f"leaf {path!r}: malformed complex value")
        v = complex(parts[0], parts[1])
    elif not (v is None or isinstance(v, (bool, int, float, str))):  # R13
        raise c.fail(f"leaf {path!r}: value of type {type(v).__name__} is not a scalar")
    return LeafRecord(path, kind, value=v)


def _decode_shards(c: _Checker, path: str, raw_shards: list, shape: tuple[int, ...], itemsize: int,
                   files: list[FileRecord], chunk_bytes: int, extents: list) -> tuple[tuple[ShardRecord, ...], int]:
    """The shard records of an array leaf (R9, R14-R16, R18, R19) and the sum of their box volumes."""
    shards, volume, ndim, n_files, n = [], 0, len(shape), len(files), len(raw_shards)
    if n > MAX_SHARDS_PER_LEAF:  # R9
        raise c.fail(f"leaf {path!r}: {n} shards, above the cap of {MAX_SHARDS_PER_LEAF}")
    if n * (ndim or 1) > MAX_BOX_ENTRIES:  # R9
        raise c.fail(f"leaf {path!r}: {n} shards x {ndim} dimensions, above the cap of {MAX_BOX_ENTRIES} box entries")
    for j, s in enumerate(raw_shards):
        if type(s) is not dict:  # R8
            raise c.fail(f"leaf {path!r} shard {j}: expected a map, found {type(s).__name__}")
        try:
            raw_box, file, offset, length, sums = _shard_fields(s)
        except KeyError:
            raw_box, file, offset, length, sums = map(s.get, _SHARD_KEYS)
        if type(raw_box) is not list or len(raw_box) != ndim:  # R14
            raise c.fail(f"leaf {path!r} shard {j}: box must be a list of {ndim} [start, stop] pairs, "
                         f"found {raw_box!r:.100}")
        box, elems = [], 1
        for d, pair in enumerate(raw_box):  # R14
            if type(pair) is list and len(pair) == 2:
                start, stop = pair
                if type(start) is int and type(stop) is int and 0 <= start <= stop <= shape[d]:
                    elems *= stop - start
                    box.append((start, stop))
                    continue
            raise c.fail(f"leaf {path!r} shard {j}: box dimension {d} must be [start, stop] with "
                         f"0 <= start <= stop <= {shape[d]}, found {pair!r:.100}")
        if type(file) is not int or not 0 <= file < n_files:  # R18
            raise c.fail(f"leaf {path!r} shard {j}: file index {file!r:.40} but {n_files} data files are listed")
        if type(offset) is not int or not 0 <= offset <= MAX_OFFSET:  # R18
            raise c.fail(f"leaf {path!r} shard {j}: offset must be an integer in [0, 2**56], found {offset!r:.40}")
        if type(length) is not int or length != elems * itemsize:  # R15
            raise c.fail(f"leaf {path!r} shard {j}: length {length!r:.40} bytes but box {raw_box} x itemsize "
                         f"{itemsize} = {elems * itemsize}")
        if type(sums) is not list or len(sums) != -(-length // chunk_bytes):  # R16
            raise c.fail(f"leaf {path!r} shard {j}: expected {chunk_count(length, chunk_bytes)} checksums for "
                         f"{length} bytes in chunks of {chunk_bytes}, found {sums!r:.100}")
        for x in sums:  # R16
            if type(x) is not int or not 0 <= x <= MAX_U64:
                raise c.fail(f"leaf {path!r} shard {j}: checksum {x!r:.40} is not a 64-bit unsigned integer")
        if offset + length > files[file].size:  # R19
            raise c.fail(f"leaf {path!r}: bytes [{offset}, {offset + length}) lie beyond the end of "
                         f"{files[file].name} ({files[file].size} bytes)")
        if length:
            extents.append((file, offset, offset + length, path))
        volume += elems
        shards.append(_new(ShardRecord, (tuple(box), file, offset, length, tuple(sums))))
    return tuple(shards), volume


def _check_cover(c: _Checker, ctx: str, total: int, shards: tuple[ShardRecord, ...], vol: int) -> None:
    """R17: the boxes tile an array of ``total`` elements: volumes (``vol``) add up, no two overlap."""
    if total == 0 and len(shards) > 1:
        raise c.fail(f"{ctx}: an empty array has {len(shards)} shards")
    if total and vol != total:
        raise c.fail(f"{ctx}: shards cover {vol} elements, the array has {total}")
    boxes = [s.box for s in shards if all(a < z for a, z in s.box)]  # empty boxes overlap nothing
    if len(boxes) < 2:  # (an empty array's one shard is empty)
        return
    lo, hi = np.moveaxis(np.array(boxes, dtype=np.int64).reshape(len(boxes), -1, 2), 2, 0)
    # O(n log n) when the boxes form a grid (every jax sharding does), each box one cell
    # between consecutive boundaries: then boxes overlap only if they are the same cell.
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
    # Any other tiling is compared pairwise, n^2: capped, so that a few megabytes cannot buy minutes of CPU.
    if len(boxes) > MAX_PAIRWISE_SHARDS:
        raise c.fail(f"{ctx}: {len(boxes)} shards that do not form a grid (at most {MAX_PAIRWISE_SHARDS} allowed)")
    for i in range(0, len(boxes), 64):  # blocked: small temporaries
        over = np.all((lo[i:i + 64, None, :] < hi[None, :, :]) & (lo[None, :, :] < hi[i:i + 64, None, :]), axis=2)
        over[np.arange(over.shape[0]), np.arange(i, i + over.shape[0])] = False
        if over.any():
            a, b = np.argwhere(over)[0]
            raise c.fail(f"{ctx}: shards {i + a} and {b} overlap")


_NODE_KINDS = ("dict", "list", "tuple", "namedtuple", "custom")
_KEY_TYPES, _INT = {str, int}, {int}


def _check_tree(c: _Checker, tree: Any, n_leaves: int) -> None:
    """R23: the tree references every leaf exactly once, is well formed and shallow enough."""
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [({"t": "list", "c": [tree]}, -1)]  # the root, as the child of a list
    while stack:
        node, depth = stack.pop()
        t = c.get(node, "t", str, "tree node")
        if t == "none":
            continue
        if t not in _NODE_KINDS:
            raise c.fail(f"tree node kind {t!r} is unknown")
        children = c.get(node, "c", list, f"tree node {t}")
        if children and depth >= MAX_TREE_DEPTH:
            raise c.fail(f"tree nested deeper than {MAX_TREE_DEPTH} levels")
        if t in ("dict", "namedtuple", "custom"):
            keys = c.get(node, "k", list, f"tree node {t}")
            if len(keys) != len(children):
                raise c.fail(f"tree node {t}: {len(keys)} keys for {len(children)} children")
            if not set(map(type, keys)) <= _KEY_TYPES:
                raise c.fail(f"tree node {t}: key {next(k for k in keys if type(k) not in _KEY_TYPES)!r} "
                             "is not a str or int")
            if len(set(keys)) != len(keys):
                raise c.fail(f"tree node {t}: a key occurs twice")
            if t != "dict":
                c.get(node, "n", str, f"tree node {t}")
        if set(map(type, children)) == _INT:  # a node of leaves only, checked in bulk; the loop locates an error
            new = set(children)
            if len(new) == len(children) and new.isdisjoint(seen) and min(new) >= 0 and max(new) < n_leaves:
                seen |= new
                continue
        for ch in children:
            if type(ch) is not int:
                stack.append((ch, depth + 1))
            elif not 0 <= ch < n_leaves or ch in seen:
                raise c.fail(f"tree references leaf {ch} which is out of range or used twice")
            else:
                seen.add(ch)
    if len(seen) != n_leaves:
        raise c.fail(f"tree does not reference leaf {next(i for i in range(n_leaves) if i not in seen)}")
