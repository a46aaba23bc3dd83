"""Flax msgpack files (``flax.serialization.to_bytes`` / ``msgpack_serialize``),
read without flax: a bounded walk over the file's msgpack bytes.

The format (flax's ``serialization.py``, defined there only by code): one msgpack
map, the state dict; nested maps are subtrees (flax writes lists, tuples and
namedtuples as maps keyed "0", "1", ... or by field name); leaves are

* ext 1, an ndarray: the msgpack of ``[shape, dtype name, raw C-order bytes]``
  in the writer's (little-endian) byte order;
* ext 3, a numpy scalar: the same, shape ``[]``;
* ext 2, a Python complex: the msgpack of ``[real, imag]``;
* msgpack ints, floats, bools, nil, str and bin;
* a map ``{"__msgpack_chunked_array__": True, "shape": {"0": d0, ...},
  "chunks": {"0": flat ndarray, ...}}``: an array above 2**30 bytes, split.

Why not ``msgpack.unpackb``: it would hold the whole file (and each array once
more) in memory, and skip nothing. Here a first pass reads only the structure and
the array headers, seeking over array bytes, into an index; then each array is
read into its own preallocated buffer. Memory is the index plus one array.

Reader rules (tagged ``# M1`` ...), every length checked before it is used:

* M1  the top level is one map, and nothing follows it;
* M2  every length (map, array, str, bin, ext) fits in the bytes left in the file;
* M3  at most ``MAX_NODES`` values, ``MAX_DEPTH`` levels of nesting, strings of at
      most ``MAX_STR`` bytes of valid UTF-8;
* M4  map keys are str or int (ints become their decimal string), none twice, and
      no two leaves flatten to the same "/"-joined key;
* M5  only ext codes 1, 2, 3; an ndarray's payload is exactly [shape (at most 64
      integers >= 0), dtype name (of the allow-list), bytes of shape x itemsize]
      and the array stays below 2**48 bytes; a numpy scalar has shape [];
* M6  a chunked array has exactly its three keys, its shape dims are keyed
      "0".."n-1", its chunks "0".."k-1" are 1-d arrays of one dtype whose sizes add
      up to the shape's;
* M7  a bool array holds only bytes 0 and 1; a read that comes back short is a
      truncated file.

Leaves come back as numpy arrays of the stored dtype; Python ints, floats (a
msgpack float32 as float32, a float64 as float64), bools and complex numbers as
0-d arrays (int64, or uint64 above 2**63 - 1; complex128). None leaves, str and
bin leaves and empty maps are left out of the tensors and listed by ``describe``.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

import ml_dtypes
import msgpack
import numpy as np

from jaxckpt import fmt_safetensors, prefetch, storage
from jaxckpt.errors import CorruptCheckpointError

NAME = "flax"
INSTALL = None  # read with msgpack and numpy, both core dependencies; flax is not needed

MAX_NODES = 1 << 18  # M3: >20x the leaves of a large MoE model and its optimizer; the cap costs ~90 MB, ~4 s
MAX_DEPTH = 100  # M3: flax state dicts nest < 20 levels; well inside Python's recursion limit
MAX_STR = 1 << 20  # M3: bytes of one str key or value
MAX_NDIM = 64  # M5: numpy's own limit
MAX_ARRAY_BYTES = 1 << 48  # M5: as jaxckpt.format
CHUNKED_KEY = "__msgpack_chunked_array__"

_NUMPY_NAMES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                "float16", "float32", "float64", "complex64", "complex128")
_ML_NAMES = ("bfloat16", "float8_e3m4", "float8_e4m3", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e4m3b11fnuz",
             "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "float6_e2m3fn", "float6_e3m2fn", "float4_e2m1fn",
             "int2", "int4", "uint2", "uint4")
# M5: the dtype names flax writes (``ndarray.dtype.name``) that this reader accepts.
DTYPES: dict[str, np.dtype] = {n: np.dtype(n) for n in _NUMPY_NAMES}
DTYPES.update({n: np.dtype(getattr(ml_dtypes, n)) for n in _ML_NAMES if hasattr(ml_dtypes, n)})
_NAMES = {dt: name for name, dt in DTYPES.items()}  # ``dtype.name`` costs microseconds


class ArrayRef(NamedTuple):
    """An ndarray's bytes in the file: ``nbytes`` from ``offset``."""

    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class ChunkedRef(NamedTuple):
    """A chunked array: its 1-d chunks, in order, fill ``shape``."""

    dtype: np.dtype
    shape: tuple[int, ...]
    chunks: tuple[ArrayRef, ...]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)


class _Skipped(NamedTuple):
    """A str or bin leaf: not a tensor, described only."""

    what: str


# --------------------------------------------------------------------- the byte walk
class _Stream:
    """Positioned reads of one open file with a read-ahead window; every length is
    checked against the bytes left (M2) before anything is read or skipped."""

    def __init__(self, src: storage.FileSource):
        self.src, self.size, self.where = src, src.size, src.where
        self.pos, self.base, self.buf = 0, 0, b""
        self.nodes = 0

    def fail(self, what: str) -> CorruptCheckpointError:
        """An error naming the file."""
        return CorruptCheckpointError(f"{self.where}: {what}")

    def need(self, n: int, what: str) -> None:
        """Refuse a length ``n`` beyond the end of the file (M2)."""
        if n > self.size - self.pos:  # M2
            raise self.fail(f"truncated or corrupt: {what} claims {n} bytes at offset {self.pos}, "
                            f"{self.size - self.pos} are left")

    def take(self, n: int, what: str = "a value") -> bytes:
        """The next ``n`` bytes (``what`` names them in errors)."""
        self.need(n, what)
        start = self.pos - self.base
        if start + n > len(self.buf):
            self.base, start = self.pos, 0
            self.buf = self.src.pread(max(n, self.src.read_ahead), self.pos)
            if len(self.buf) < n:  # M7: the file shrank under us
                raise self.fail(f"truncated: expected {n} bytes at offset {self.pos}, found {len(self.buf)}")
        self.pos += n
        return self.buf[start:start + n]

    def byte(self) -> int:
        """The next byte (the fast path of ``take(1)``: 10^5-10^6 calls per file)."""
        i = self.pos - self.base
        if i < len(self.buf):
            self.pos += 1
            return self.buf[i]
        return self.take(1, "a type byte")[0]

    def skip(self, n: int, what: str) -> None:
        """Step over ``n`` bytes without reading them."""
        self.need(n, what)
        self.pos += n

    def count(self, n: int) -> None:
        """Count ``n`` more values against MAX_NODES (M3)."""
        self.nodes += n
        if self.nodes > MAX_NODES:  # M3
            raise self.fail(f"more than {MAX_NODES} values (the cap)")


_UINT = {0xcc: ">B", 0xcd: ">H", 0xce: ">I", 0xcf: ">Q"}
_INT = {0xd0: ">b", 0xd1: ">h", 0xd2: ">i", 0xd3: ">q"}
_STR_LEN = {0xd9: ">B", 0xda: ">H", 0xdb: ">I"}
_BIN_LEN = {0xc4: ">B", 0xc5: ">H", 0xc6: ">I"}
_EXT_LEN = {0xc7: ">B", 0xc8: ">H", 0xc9: ">I"}
_FIXEXT = {0xd4: 1, 0xd5: 2, 0xd6: 4, 0xd7: 8, 0xd8: 16}
_ARRAY_LEN = {0xdc: ">H", 0xdd: ">I"}
_MAP_LEN = {0xde: ">H", 0xdf: ">I"}
_SIMPLE = {0xc0: None, 0xc2: False, 0xc3: True}


def _unpack(s: _Stream, fmt: str) -> int:
    return struct.unpack(fmt, s.take(struct.calcsize(fmt)))[0]


def _int_of(s: _Stream, b: int) -> int | None:
    """The integer whose type byte ``b`` was just read, or None if ``b`` is not one."""
    if b <= 0x7f:
        return b
    if b >= 0xe0:
        return b - 0x100
    fmt = _UINT.get(b) or _INT.get(b)
    return None if fmt is None else _unpack(s, fmt)


def _str_len(s: _Stream, b: int) -> int | None:
    if 0xa0 <= b <= 0xbf:
        return b & 0x1f
    fmt = _STR_LEN.get(b)
    return None if fmt is None else _unpack(s, fmt)


def _text(s: _Stream, n: int, what: str) -> str:
    """``n`` bytes of UTF-8 (M3)."""
    if n > MAX_STR:  # M3
        raise s.fail(f"{what} of {n} bytes at offset {s.pos}, above the cap of {MAX_STR}")
    try:
        return s.take(n, what).decode("utf-8")
    except UnicodeDecodeError as e:  # M3
        raise s.fail(f"{what} at offset {s.pos - n} is not UTF-8 ({e})") from None


def _container_len(s: _Stream, b: int) -> tuple[str, int] | None:
    """``("map"|"array", n)`` for a map or array type byte ``b``."""
    if 0x80 <= b <= 0x8f:
        return "map", b & 0x0f
    if 0x90 <= b <= 0x9f:
        return "array", b & 0x0f
    if b in _MAP_LEN:
        return "map", _unpack(s, _MAP_LEN[b])
    if b in _ARRAY_LEN:
        return "array", _unpack(s, _ARRAY_LEN[b])
    return None


def _value(s: _Stream, depth: int) -> Any:
    """One msgpack value: a dict for a map or array, a leaf otherwise (arrays as refs)."""
    s.count(1)
    at = s.pos
    b = s.byte()
    if (n := _int_of(s, b)) is not None:
        return n
    if (c := _container_len(s, b)) is not None:
        if depth >= MAX_DEPTH:  # M3
            raise s.fail(f"nested deeper than {MAX_DEPTH} levels at offset {at}")
        kind, n = c
        s.need(n * (2 if kind == "map" else 1), f"a {kind} of {n} entries")  # M2: each entry takes a byte or more
        if kind == "array":
            return {str(i): _value(s, depth + 1) for i in range(n)}
        return _map(s, n, depth)
    if (n := _str_len(s, b)) is not None:
        return _text(s, n, "a string")
    if b in _SIMPLE:
        return _SIMPLE[b]
    if b == 0xca:
        return np.float32(_unpack(s, ">f"))
    if b == 0xcb:
        return _unpack(s, ">d")
    if b in _BIN_LEN:
        n = _unpack(s, _BIN_LEN[b])
        s.skip(n, "a bin value")
        return _Skipped(f"bytes ({n} bytes)")
    if b in _EXT_LEN or b in _FIXEXT:
        n = _unpack(s, _EXT_LEN[b]) if b in _EXT_LEN else _FIXEXT[b]
        return _ext(s, _unpack(s, ">b"), n)
    raise s.fail(f"byte {b:#04x} at offset {at} is not a msgpack type")


def _map(s: _Stream, n: int, depth: int) -> dict[str, Any]:
    """The ``n`` entries of a map whose header was just read (M4)."""
    out: dict[str, Any] = {}
    for _ in range(n):
        at = s.pos
        b = s.byte()
        if (k := _int_of(s, b)) is not None:
            key = str(k)
        elif (m := _str_len(s, b)) is not None:
            key = _text(s, m, "a map key")
        else:  # M4
            raise s.fail(f"map key at offset {at} (type byte {b:#04x}) is not a str or int")
        if key in out:  # M4: msgpack alone keeps the last value silently
            raise s.fail(f"the key {key!r:.80} occurs twice in the map ending at offset {at}")
        out[key] = _value(s, depth + 1)
    return out


def _ext(s: _Stream, code: int, n: int) -> Any:
    """An extension value of ``n`` bytes (M5)."""
    s.need(n, f"an extension value (code {code})")
    end = s.pos + n
    if code == 2:  # a Python complex: msgpack [real, imag]
        try:
            parts = msgpack.unpackb(s.take(n), max_str_len=0, max_bin_len=0, max_array_len=2, max_map_len=0,
                                    max_ext_len=0)
        except Exception as e:  # msgpack raises many types
            raise s.fail(f"complex number at offset {end - n} does not decode ({type(e).__name__}: {e})") from None
        if type(parts) is not list or len(parts) != 2 or not all(type(p) in (int, float) for p in parts):
            raise s.fail(f"complex number at offset {end - n} is not [real, imag]")
        return complex(parts[0], parts[1])
    if code not in (1, 3):
        raise s.fail(f"msgpack extension code {code} at offset {end - n} is not flax's (1, 2 or 3)")
    ref = _ndarray(s, end)
    if code == 3:  # a numpy scalar: read now (at most 16 bytes)
        if ref.shape:
            raise s.fail(f"numpy scalar at offset {end - n} has shape {list(ref.shape)}, expected []")
        data = np.frombuffer(bytearray(s.src.pread(ref.nbytes, ref.offset)), np.uint8)  # writable
        return _from_bytes(s, ref, data)
    return ref


def _ndarray(s: _Stream, end: int) -> ArrayRef:
    """The header of an ndarray payload ending at ``end``; its bytes are skipped (M5)."""
    start = s.pos

    def header(b: int) -> int | None:
        c = _container_len(s, b)
        return c[1] if c is not None and c[0] == "array" else None

    if header(s.byte()) != 3:
        raise s.fail(f"ndarray at offset {start} is not [shape, dtype, bytes]")
    ndim = header(s.byte())
    if ndim is None or ndim > MAX_NDIM:
        raise s.fail(f"ndarray at offset {start}: shape is not a list of at most {MAX_NDIM} dimensions")
    shape = tuple(_int_of(s, s.byte()) for _ in range(ndim))
    if not all(d is not None and d >= 0 for d in shape):
        raise s.fail(f"ndarray at offset {start}: shape {list(shape)} is not integers >= 0")
    b = s.byte()  # the dtype name: str, or bin from writers of msgpack < 1.0
    m = _str_len(s, b) if b not in _BIN_LEN else _unpack(s, _BIN_LEN[b])
    name = s.take(m, "a dtype name").decode("ascii", "replace") if m is not None and m <= 64 else None
    dtype = DTYPES.get(name) if name is not None else None
    if dtype is None:
        raise s.fail(f"ndarray at offset {start}: dtype {name!r} is not in the allow-list")
    b = s.byte()
    nbytes = _unpack(s, _BIN_LEN[b]) if b in _BIN_LEN else _str_len(s, b)
    if nbytes is None or s.pos + nbytes != end:
        raise s.fail(f"ndarray at offset {start}: its bytes do not end its extension value")
    count = _count(shape)
    if _too_big(shape, dtype) or count * dtype.itemsize != nbytes:
        raise s.fail(f"ndarray at offset {start}: shape {list(shape)} x itemsize {dtype.itemsize} of {name} "
                     f"= {count * dtype.itemsize} bytes, but {nbytes} bytes are stored")
    ref = ArrayRef(dtype, shape, s.pos, nbytes)
    s.skip(nbytes, "ndarray bytes")
    return ref


def _count(shape: tuple[int, ...]) -> int:
    """The elements of ``shape``."""
    count = 1
    for d in shape:
        count *= d
    return count


def _too_big(shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """M5: above MAX_ARRAY_BYTES, zero dimensions aside (numpy refuses such an array even when empty)."""
    return _count(tuple(max(d, 1) for d in shape)) * dtype.itemsize > MAX_ARRAY_BYTES


def _from_bytes(s: _Stream, ref: ArrayRef, data: np.ndarray) -> np.ndarray:
    """``data`` (uint8, already read) as the array ``ref`` describes (M7)."""
    if data.size != ref.nbytes:
        raise s.fail(f"truncated: expected {ref.nbytes} bytes at offset {ref.offset}, found {data.size}")
    if ref.dtype == np.bool_ and data.size and data.max() > 1:
        raise s.fail(f"bool array at offset {ref.offset} holds bytes other than 0 and 1")
    return data.view(ref.dtype).reshape(ref.shape)


# --------------------------------------------------------------------- the tree
class _Index(NamedTuple):
    leaves: list[tuple[str, Any]]  # (key, ArrayRef | ChunkedRef | 0-d ndarray), in file order
    extra: dict[str, Any]


def _leaf_array(v: Any) -> np.ndarray | None:
    """A Python or numpy scalar as a 0-d array; None for anything else."""
    if isinstance(v, bool):
        return np.array(v, np.bool_)
    if isinstance(v, int):
        return np.array(v, np.int64 if v < (1 << 63) else np.uint64)
    if isinstance(v, (float, np.floating, np.ndarray)):
        return np.asarray(v)
    if isinstance(v, complex):
        return np.array(v, np.complex128)
    return None


def _flatten(s: _Stream, node: Any, key: str, out: _Index) -> None:
    """Depth-first, in file order: leaves to ``out.leaves``, the rest to ``out.extra``."""
    if isinstance(node, dict):
        if CHUNKED_KEY in node:
            out.leaves.append((key, _chunked(s, node, key)))
        elif not node:
            out.extra["empty_nodes"].append(key)
        for k, v in node.items() if CHUNKED_KEY not in node else ():
            _flatten(s, v, f"{key}/{k}" if key else k, out)
    elif isinstance(node, ArrayRef):
        out.leaves.append((key, node))
    elif node is None:
        out.extra["none_leaves"].append(key)
    elif isinstance(node, str):
        out.extra["skipped_leaves"][key] = f"str ({len(node)} characters)"
    elif isinstance(node, _Skipped):
        out.extra["skipped_leaves"][key] = node.what
    else:
        out.leaves.append((key, _leaf_array(node)))


def _chunked(s: _Stream, node: dict, key: str) -> ChunkedRef:
    """A chunked array's map checked (M6)."""
    ctx = f"chunked array {key!r:.200}"
    if set(node) != {CHUNKED_KEY, "shape", "chunks"} or node[CHUNKED_KEY] is not True:
        raise s.fail(f"{ctx}: expected exactly the keys {CHUNKED_KEY}=True, shape, chunks; found {sorted(node)}")
    shape, chunks = node["shape"], node["chunks"]
    if (not isinstance(shape, dict) or len(shape) > MAX_NDIM or set(shape) != {str(i) for i in range(len(shape))}
            or not all(type(d) is int and d >= 0 for d in shape.values())):
        raise s.fail(f"{ctx}: shape must be at most {MAX_NDIM} integers >= 0 keyed '0', '1', ...")
    dims = tuple(shape[str(i)] for i in range(len(shape)))
    if not isinstance(chunks, dict) or set(chunks) != {str(i) for i in range(len(chunks))}:
        raise s.fail(f"{ctx}: chunks must be keyed '0', '1', ...")
    parts = tuple(chunks[str(i)] for i in range(len(chunks)))
    if not all(isinstance(p, ArrayRef) and len(p.shape) == 1 for p in parts):
        raise s.fail(f"{ctx}: every chunk must be a 1-d array")
    dtypes = {p.dtype for p in parts}
    if len(dtypes) > 1:
        raise s.fail(f"{ctx}: chunks of different dtypes {sorted(d.name for d in dtypes)}")
    count = _count(dims)
    if not parts or sum(p.shape[0] for p in parts) != count or _too_big(dims, parts[0].dtype):
        raise s.fail(f"{ctx}: chunks hold {sum(p.shape[0] for p in parts)} elements, shape {list(dims)} "
                     f"has {count}")
    return ChunkedRef(parts[0].dtype, dims, parts)


def _index(src: storage.FileSource) -> _Index:
    """The whole file walked (M1-M6): its leaves in order, and what is not a tensor."""
    s, size = _Stream(src), src.size
    first = src.pread(1, 0)
    if not first or not (0x80 <= first[0] <= 0x8f or first[0] in (0xde, 0xdf)):  # M1
        raise s.fail("not a flax msgpack file: it does not start with a msgpack map")
    tree = _value(s, 0)
    if s.pos != size:  # M1
        raise s.fail(f"{size - s.pos} bytes after the end of the state dict (one map, nothing else)")
    out = _Index([], {"none_leaves": [], "empty_nodes": [], "skipped_leaves": {}})
    _flatten(s, tree, "", out)
    keys = [k for k, _ in out.leaves]
    if len(set(keys)) != len(keys):  # M4
        seen: set[str] = set()
        dup = next(k for k in keys if k in seen or seen.add(k))
        raise s.fail(f"two leaves flatten to the key {dup!r:.200} (a key holds '/')")
    return out


# --------------------------------------------------------------------- the contract
def sniff(size: int, head: bytes) -> bool:
    """Whether a ``size``-byte file starting with ``head`` looks like a flax msgpack file.

    The heuristic: the file starts with a msgpack map header (0x80-0x8f, 0xde,
    0xdf) whose first key (if any) is a str or int; and it is neither a jaxckpt
    manifest (a map whose first key is "format": jaxckpt checkpoints are
    directories, so a regular file that starts with a msgpack map is flax) nor a
    safetensors file (whose header length's low byte can fall in 0x80-0x8f).
    A full parse would be the only certain test, and it costs a pass over the file.
    """
    if not head or fmt_safetensors.sniff(size, head):
        return False
    b = head[0]
    if 0x80 <= b <= 0x8f:
        rest = head[1:] if b > 0x80 else None
    elif b in (0xde, 0xdf):
        rest = head[3:] if b == 0xde else head[5:]
    else:
        return False
    if rest is None:
        return len(head) == 1  # an empty state dict is the whole file
    if rest.startswith(b"\xa6format"):
        return False
    return bool(rest) and (rest[0] <= 0x7f or 0xa0 <= rest[0] <= 0xbf or 0xcc <= rest[0] <= 0xd3
                           or 0xd9 <= rest[0] <= 0xdb or rest[0] >= 0xe0)


def describe(path: str) -> tuple[list[tuple[str, str, tuple[int, ...], int]], dict]:
    """The leaves of ``path`` as ``(key, dtype name, shape, nbytes)`` in file order,
    and ``{"none_leaves": [key], "empty_nodes": [key], "skipped_leaves": {key: what}}``
    for what :func:`read` leaves out (None, empty maps, str and bin values)."""
    with storage.open_file(path) as src:
        index = _index(src)
    return [(k, _NAMES[v.dtype], tuple(v.shape), int(v.nbytes)) for k, v in index.leaves], index.extra


def iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """``(key, array)`` in file order (a chunked array assembled in place, chunk
    by chunk), the next ones read ahead while the caller holds one
    (``prefetch.ordered``: 64 MiB at most from a bucket, none from a disk)."""
    with storage.open_file(path) as src:
        index = _index(src)
        loads = ((int(leaf.nbytes), functools.partial(_load, src, leaf)) for _, leaf in index.leaves)
        for (key, _), array in zip(index.leaves, prefetch.ordered(loads, src.prefetch_bytes)):
            yield key, array


def read(path: str) -> dict[str, np.ndarray]:
    """Every leaf of ``path`` by "/"-joined key."""
    return dict(iter_tensors(path))


def _load(src: storage.FileSource, leaf: Any) -> np.ndarray:
    """One indexed leaf as a new array (a chunked one filled chunk by chunk)."""
    if isinstance(leaf, np.ndarray):
        return leaf
    parts = leaf.chunks if isinstance(leaf, ChunkedRef) else (leaf,)
    out = np.empty(leaf.shape, leaf.dtype)
    flat = out.reshape(-1).view(np.uint8)
    done = 0
    for p in parts:
        src.read_into(memoryview(flat[done:done + p.nbytes]), p.offset, src.where)  # M7
        done += p.nbytes
    if out.dtype == np.bool_ and out.size and flat.max() > 1:  # M7
        raise CorruptCheckpointError(f"{src.where}: bool array at offset {parts[0].offset} holds bytes other "
                                     "than 0 and 1")
    return out

