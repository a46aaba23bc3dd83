"""safetensors files (https://github.com/huggingface/safetensors), read and written
with numpy alone: the ``safetensors`` package is not needed.

The format: 8 bytes, the header length N as a little-endian u64; N bytes of UTF-8
JSON, ``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]},
"__metadata__": {str: str}}`` (trailing spaces allowed); then the byte buffer, which
the offsets (relative to its start) must index entirely, little-endian, row-major.

Reader rules, each checked once (tagged ``# S1`` ...). The reference reader
(``safetensors/src/tensor.rs``) checks S1 and S3-S7 too, except that it keeps the
last of duplicate keys; S2, S8 and S10 are ours:

* S1  the header length is at most 100 MB (the reference's ``MAX_HEADER_SIZE``)
      and lies inside the file;
* S2  the header holds at most ``MAX_HEADER_ITEMS`` JSON containers and elements
      (counted as ``,`` ``{`` ``[`` bytes before parsing): a 100 MB header of
      ``[{},{},...]`` would otherwise cost 2 GB of Python objects and seconds;
* S3  the header is UTF-8 JSON: an object, no duplicate keys, no NaN/Infinity,
      integers of at most 20 digits, nesting as deep as Python's parser allows;
* S4  ``__metadata__`` is absent, null or an object of str -> str;
* S5  each tensor is an object with a known ``dtype`` string, a ``shape`` list of
      at most 64 integers >= 0 and ``data_offsets`` [begin, end] integers with
      0 <= begin <= end <= buffer length (a JSON ``true`` is not an integer);
      other fields are ignored, as the reference does;
* S6  shape x bits per element is whole bytes and equals end - begin, and the
      array's numpy size stays below 2**48 bytes;
* S7  sorted by offset, every tensor starts where the previous one ended and the
      last ends at the end of the file: no overlap, no hole, nothing after;
* S8  a BOOL tensor holds only bytes 0 and 1 (numpy misbehaves on other bytes);
* S9  a read that comes back short (the file shrank) is a truncated file;
* S10 6-bit floats (F6_*) are known but refused (UnsupportedValueError): the
      format does not say how their bits pack, and numpy has no packed type.

F4 (float4_e2m1fn, two per byte, the first element in the low nibble as in
PyTorch's ``Float4_e2m1fn_x2``) is unpacked to ml_dtypes' one-byte-per-element
``float4_e2m1fn`` on read and packed again on write.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from jaxckpt import prefetch, storage
from jaxckpt.errors import CorruptCheckpointError, UnsupportedValueError

NAME = "safetensors"
INSTALL = None  # read and written with numpy and ml_dtypes, both core dependencies

MAX_HEADER_BYTES = 100_000_000  # S1: the reference reader's cap
MAX_HEADER_ITEMS = 1 << 20  # S2: ~125k tensors; a 1M-item hostile header costs ~150 MB and ~2 s
MAX_INT_DIGITS = 20  # S3: a u64 has 20 digits
MAX_NDIM = 64  # S5: numpy's own limit
MAX_ARRAY_BYTES = 1 << 48  # S6: as jaxckpt.format
_METADATA_KEY = "__metadata__"
_LONG_DIGITS = re.compile(rb"[0-9]{%d}" % (MAX_INT_DIGITS + 1))

# safetensors dtype -> (numpy dtype, bits per element in the file), in the reference's order (``enum Dtype``).
DTYPES: dict[str, tuple[np.dtype, int]] = {
    "BOOL": (np.dtype(np.bool_), 8),
    "F4": (np.dtype(ml_dtypes.float4_e2m1fn), 4),
    "U8": (np.dtype(np.uint8), 8),
    "I8": (np.dtype(np.int8), 8),
    "F8_E5M2": (np.dtype(ml_dtypes.float8_e5m2), 8),
    "F8_E4M3": (np.dtype(ml_dtypes.float8_e4m3fn), 8),
    "F8_E8M0": (np.dtype(ml_dtypes.float8_e8m0fnu), 8),
    "F8_E4M3FNUZ": (np.dtype(ml_dtypes.float8_e4m3fnuz), 8),
    "F8_E5M2FNUZ": (np.dtype(ml_dtypes.float8_e5m2fnuz), 8),
    "I16": (np.dtype(np.int16), 16),
    "U16": (np.dtype(np.uint16), 16),
    "F16": (np.dtype(np.float16), 16),
    "BF16": (np.dtype(ml_dtypes.bfloat16), 16),
    "I32": (np.dtype(np.int32), 32),
    "U32": (np.dtype(np.uint32), 32),
    "F32": (np.dtype(np.float32), 32),
    "C64": (np.dtype(np.complex64), 64),
    "F64": (np.dtype(np.float64), 64),
    "I64": (np.dtype(np.int64), 64),
    "U64": (np.dtype(np.uint64), 64),
}
UNDECODABLE = ("F6_E2M3", "F6_E3M2")  # S10
NUMPY_TO_ST: dict[np.dtype, str] = {dt: name for name, (dt, _) in DTYPES.items()}
_RANK = {name: i for i, name in enumerate(DTYPES)}  # the reference's order of increasing alignment


class TensorInfo(NamedTuple):
    """One tensor of a header, checked: ``begin``/``end`` are absolute file offsets."""

    name: str
    st_dtype: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes of the array as numpy holds it (for F4 twice those in the file)."""
        return int(np.prod(self.shape, dtype=object)) * self.dtype.itemsize


class _HeaderError(Exception):
    """Raised by the JSON hooks; re-raised located by :func:`_parse_json`."""


# --------------------------------------------------------------------- reading
def sniff(size: int, head: bytes) -> bool:
    """Whether a ``size``-byte file starting with ``head`` looks like a safetensors
    file: a plausible header length (S1) that fits in the file, and a header that
    opens with ``{`` (and, when the header lies inside ``head``, closes with ``}``
    and trailing spaces)."""
    if len(head) < 10:
        return False
    n = int.from_bytes(head[:8], "little")
    if not 2 <= n <= MAX_HEADER_BYTES or head[8:9] != b"{":
        return False
    if 8 + n <= len(head) and not head[8:8 + n].rstrip(b" ").endswith(b"}"):
        return False
    return 8 + n <= size


def describe(path: Any) -> tuple[list[tuple[str, str, tuple[int, ...], int]], dict]:
    """The tensors of ``path`` (a local path or a URL) as ``(name, numpy dtype
    name, shape, nbytes)`` in file order, and ``{"metadata": the __metadata__
    dict or None}``."""
    with storage.open_file(path) as src:
        tensors, metadata = read_header(src)
    return [(t.name, t.dtype.name, t.shape, t.nbytes) for t in tensors], {"metadata": metadata}


def iter_tensors(path: Any) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, array)`` in file order; each array is freshly allocated (not a
    view of the file). From a bucket the next tensors are read ahead while the
    caller holds one (``prefetch.ordered``, 64 MiB at most); from a disk one
    tensor is in memory at a time."""
    with storage.open_file(path) as src:
        tensors, _ = read_header(src)
        loads = ((t.nbytes, functools.partial(_load, src, t)) for t in tensors)
        for t, array in zip(tensors, prefetch.ordered(loads, src.prefetch_bytes)):
            yield t.name, array


def read(path: Any) -> dict[str, np.ndarray]:
    """Every tensor of ``path``, by name."""
    return dict(iter_tensors(path))


def read_header(src: storage.FileSource) -> tuple[list[TensorInfo], dict[str, str] | None]:
    """The checked tensor table (sorted by offset) and ``__metadata__`` of an open file."""
    where, size = src.where, src.size
    if size < 8:  # S1
        raise CorruptCheckpointError(f"{where}: truncated: {size} bytes, a safetensors file has at least 8")
    n = int.from_bytes(src.pread(8, 0), "little")
    if n > MAX_HEADER_BYTES:  # S1
        raise CorruptCheckpointError(f"{where}: header length {n} is above the cap of {MAX_HEADER_BYTES} bytes")
    if 8 + n > size:  # S1
        raise CorruptCheckpointError(f"{where}: truncated: the header claims {n} bytes, the file has {size - 8} "
                                     "after the length")
    raw = bytearray(n)
    src.read_into(memoryview(raw), 8, where)  # S9
    top = _parse_json(raw, where)
    metadata = _check_metadata(top.pop(_METADATA_KEY, None), where)
    data_start = 8 + n
    tensors = [_check_tensor(name, info, data_start, size, where) for name, info in top.items()]
    tensors.sort(key=lambda t: (t.begin, t.end))
    _check_layout(tensors, data_start, size, where)
    return tensors, metadata


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):  # S3: Python's json keeps the last value silently
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _HeaderError(f"the key {key!r:.80} occurs twice in one object")
    return d


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:  # S3
        raise _HeaderError(f"an integer of {len(text)} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _no_constant(text: str) -> Any:
    raise _HeaderError(f"{text} is not JSON")  # S3


def _parse_json(raw: bytes | bytearray, where: str) -> dict[str, Any]:
    """The header decoded (S2, S3)."""
    items = raw.count(b",") + raw.count(b"{") + raw.count(b"[")
    if items > MAX_HEADER_ITEMS:  # S2
        raise CorruptCheckpointError(f"{where}: the header holds about {items} JSON items, above the cap of "
                                     f"{MAX_HEADER_ITEMS}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # S3
        raise CorruptCheckpointError(f"{where}: the header is not UTF-8 ({e})") from None
    try:
        # The digit cap as a predicate in front of the hook: a Python call per integer costs a third of the parse.
        long_digits = _LONG_DIGITS.search(raw) is not None
        top = json.loads(text, object_pairs_hook=_unique_pairs, parse_int=_parse_int if long_digits else None,
                         parse_constant=_no_constant)
    except _HeaderError as e:
        raise CorruptCheckpointError(f"{where}: header: {e}") from None
    except (ValueError, RecursionError) as e:  # S3: JSONDecodeError is a ValueError
        raise CorruptCheckpointError(f"{where}: the header is not valid JSON ({type(e).__name__}: {e})") from None
    if type(top) is not dict:  # S3
        raise CorruptCheckpointError(f"{where}: the header is a JSON {type(top).__name__}, expected an object")
    return top


def _check_metadata(meta: Any, where: str) -> dict[str, str] | None:
    """S4."""
    if meta is None:
        return None
    if type(meta) is not dict:
        raise CorruptCheckpointError(f"{where}: __metadata__ is a {type(meta).__name__}, expected an object")
    for k, v in meta.items():
        if type(v) is not str:
            raise CorruptCheckpointError(f"{where}: __metadata__[{k!r:.80}] is a {type(v).__name__}, "
                                         "expected a string (metadata is str -> str)")
    return meta


def _check_tensor(name: str, info: Any, data_start: int, size: int, where: str) -> TensorInfo:
    """One header entry checked (S5, S6, S10)."""
    ctx = f"{where}: tensor {name!r:.200}"
    if type(info) is not dict:  # S5
        raise CorruptCheckpointError(f"{ctx}: expected an object, found {type(info).__name__}")
    st_dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if st_dtype in UNDECODABLE:  # S10
        raise UnsupportedValueError(f"{ctx}: dtype {st_dtype} (6-bit floats) cannot be read: safetensors does not "
                                    "define their bit packing and numpy has no such type")
    if type(st_dtype) is not str or st_dtype not in DTYPES:  # S5
        raise CorruptCheckpointError(f"{ctx}: unknown dtype {st_dtype!r:.40} (known: {', '.join(DTYPES)})")
    if (type(shape) is not list or len(shape) > MAX_NDIM
            or not all(type(d) is int and d >= 0 for d in shape)):  # S5
        raise CorruptCheckpointError(f"{ctx}: shape must be a list of at most {MAX_NDIM} integers >= 0, "
                                     f"found {shape!r:.100}")
    buffer_len = size - data_start
    if (type(offsets) is not list or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):  # S5
        raise CorruptCheckpointError(f"{ctx}: data_offsets must be [begin, end] integers with 0 <= begin <= end, "
                                     f"found {offsets!r:.100}")
    begin, end = offsets
    if end > buffer_len:  # S5
        raise CorruptCheckpointError(f"{ctx}: data_offsets [{begin}, {end}] lie beyond the end of the "
                                     f"{buffer_len}-byte buffer (truncated file?)")
    dtype, bits = DTYPES[st_dtype]
    count, nonzero = 1, 1
    for d in shape:  # S6: the product so far, so that it cannot overflow numpy
        count *= d
        nonzero *= max(d, 1)
        if nonzero * dtype.itemsize > MAX_ARRAY_BYTES:
            raise CorruptCheckpointError(f"{ctx}: shape {shape} is above the cap of {MAX_ARRAY_BYTES} bytes")
    if count * bits % 8 or count * bits // 8 != end - begin:  # S6
        raise CorruptCheckpointError(f"{ctx}: shape {shape} x {bits} bits of {st_dtype} is {count * bits / 8:g} "
                                     f"bytes, but data_offsets [{begin}, {end}] hold {end - begin}")
    return TensorInfo(name, st_dtype, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_layout(tensors: list[TensorInfo], data_start: int, size: int, where: str) -> None:
    """S7: sorted by offset, the tensors tile the buffer exactly."""
    expected, prev = data_start, None
    for t in tensors:
        if t.begin < expected:
            raise CorruptCheckpointError(f"{where}: tensors {prev!r:.200} and {t.name!r:.200} overlap at buffer "
                                         f"byte {t.begin - data_start}")
        if t.begin > expected:
            raise CorruptCheckpointError(f"{where}: buffer bytes [{expected - data_start}, {t.begin - data_start}) "
                                         f"before tensor {t.name!r:.200} belong to no tensor (the buffer must be "
                                         "fully indexed)")
        expected, prev = t.end, t.name
    if expected != size:
        raise CorruptCheckpointError(f"{where}: {size - expected} bytes after the last tensor belong to no tensor "
                                     "(the buffer must be fully indexed)")


def _load(src: storage.FileSource, t: TensorInfo) -> np.ndarray:
    """Tensor ``t`` read into a new array (S8, S9)."""
    where = src.where
    if t.st_dtype == "F4":
        packed = np.empty(t.end - t.begin, np.uint8)
        src.read_into(memoryview(packed), t.begin, where)
        out = np.empty(2 * packed.size, np.uint8)
        out[0::2] = packed & 0x0F  # the first element in the low nibble
        out[1::2] = packed >> 4
        return out.view(t.dtype).reshape(t.shape)
    out = np.empty(t.shape, t.dtype)
    if out.size:
        src.read_into(memoryview(out.reshape(-1).view(np.uint8)), t.begin, where)
    if t.st_dtype == "BOOL" and out.size and out.view(np.uint8).max() > 1:  # S8
        raise CorruptCheckpointError(f"{where}: tensor {t.name!r:.200}: a BOOL tensor holds bytes other than 0 and 1")
    return out


# --------------------------------------------------------------------- writing
class _Planned(NamedTuple):
    name: str
    value: Any
    st_dtype: str
    shape: tuple[int, ...]
    file_bytes: int


def write(path: Any, items: Iterable[tuple[str, Any]] | Mapping[str, Any], *,
          metadata: dict[str, str] | None = None) -> None:
    """Write ``(name, array)`` pairs to a safetensors file at ``path`` (a local
    path or a URL), atomically (``storage.write_file``: a temporary file in the
    same directory, fsynced, renamed over ``path``; in a bucket one upload).

    The header is computed first from each array's dtype and shape, then the
    tensors are written one at a time: memory stays bounded by the largest tensor
    (when one needs a copy: non-contiguous, big-endian, F4). ``items`` is walked
    twice; an iterator is first collected into a list (of the arrays themselves,
    not copies); a mapping gives its items. ``metadata`` goes to ``__metadata__``.

    The order is the reference writer's: by element size, largest first, then by
    name. With the header padded to 8 bytes, every tensor then starts at a
    multiple of its element size, which mmap readers need (torch refuses a
    misaligned view; accelerators fault on one); pure name order would not.

    Raises UnsupportedValueError for a dtype safetensors cannot carry (complex128,
    int4, float6, a PRNG key ...), bad metadata, a duplicate or reserved name.
    """
    pairs = list(items.items()) if isinstance(items, Mapping) else items if isinstance(items, Sequence) \
        else list(items)
    plan = sorted((_plan_one(name, value) for name, value in pairs), key=lambda p: p.name)
    for a, b in zip(plan, plan[1:]):
        if a.name == b.name:
            raise UnsupportedValueError(f"tensor name {a.name!r} occurs twice")
    plan.sort(key=lambda p: -_RANK[p.st_dtype])  # stable: names stay sorted within a dtype
    header = _encode_header(plan, metadata)
    size = len(header) + sum(p.file_bytes for p in plan)  # written in order: a bucket streams it up
    storage.write_file(path, lambda f: _write_body(f, header, plan), size=size)


class _Shape(NamedTuple):
    """What the header needs of a tensor that has not arrived yet."""
    dtype: np.dtype
    shape: tuple[int, ...]


def write_streamed(path: Any, layout: Iterable[tuple[str, Any, tuple[int, ...]]],
                   items: Iterable[tuple[str, Any]], *, metadata: dict[str, str] | None = None,
                   in_order: bool = False) -> None:
    """``write`` for tensors that arrive one at a time (a conversion from another
    file): the header from ``layout`` (``(name, dtype, shape)`` of every tensor),
    then each tensor of ``items``, in any order, written at its offset as it
    arrives, so memory holds one tensor. Every name of ``layout`` must arrive
    exactly once, with that dtype and shape (``UnsupportedValueError``).
    ``in_order``: ``items`` come in ``layout``'s order; where that is also the
    file's order the file is written front to back (a bucket streams it up)."""
    layout = list(layout)
    plan = sorted((_plan_one(n, _Shape(np.dtype(d), tuple(sh))) for n, d, sh in layout), key=lambda p: p.name)
    for a, b in zip(plan, plan[1:]):
        if a.name == b.name:
            raise UnsupportedValueError(f"tensor name {a.name!r} occurs twice")
    plan.sort(key=lambda p: -_RANK[p.st_dtype])
    header = _encode_header(plan, metadata)
    where, pos = {}, len(header)
    for p in plan:
        where[p.name] = (pos, p)
        pos += p.file_bytes
    sequential = in_order and [p.name for p in plan] == [n for n, _, _ in layout]

    def fill(f: Any) -> None:
        f.write(header)
        if not sequential:
            f.truncate(pos)
        expected = len(header)  # where the next tensor starts, when they come in file order
        for name, value in items:
            start, p = where.pop(name, (None, None))
            if p is None:
                raise UnsupportedValueError(f"tensor {name!r}: not in the layout, or given twice")
            data = _tensor_bytes(p._replace(value=value))
            if not sequential:
                f.seek(start)
            elif start != expected:
                raise UnsupportedValueError(f"tensor {name!r} arrived out of the layout's order")
            expected += p.file_bytes
            f.write(data)
        if where:
            raise UnsupportedValueError(f"tensors never given: {sorted(where)[:10]}")
    storage.write_file(path, fill, size=pos if sequential else None)


def _plan_one(name: Any, value: Any) -> _Planned:
    """The header entry of one item, from its dtype and shape (not its bytes)."""
    if type(name) is not str:
        raise UnsupportedValueError(f"tensor name {name!r:.80} is a {type(name).__name__}; safetensors names are str")
    if name == _METADATA_KEY:
        raise UnsupportedValueError(f"{_METADATA_KEY!r} is reserved for the metadata and cannot name a tensor")
    raw_dtype = getattr(value, "dtype", None)
    if raw_dtype is None or not hasattr(value, "shape"):
        value = np.asarray(value)
        raw_dtype = value.dtype
    try:
        dtype = np.dtype(raw_dtype)
    except TypeError:
        dtype = None
    if dtype is None or str(raw_dtype).startswith("key<"):
        what = "a typed PRNG key array (store jax.random.key_data(key) instead)" if "key<" in str(raw_dtype) \
            else f"dtype {raw_dtype}"
        raise UnsupportedValueError(f"tensor {name!r}: safetensors cannot carry {what}")
    st_dtype = NUMPY_TO_ST.get(dtype.newbyteorder("="))  # either byte order: written little-endian
    if st_dtype is None:
        raise UnsupportedValueError(f"tensor {name!r}: safetensors cannot carry dtype {dtype.name} (it stores "
                                    f"{', '.join(dt.name for dt, _ in DTYPES.values())})")
    shape = tuple(int(d) for d in value.shape)
    count = int(np.prod(shape, dtype=object))
    bits = DTYPES[st_dtype][1]
    if count * bits % 8:
        raise UnsupportedValueError(f"tensor {name!r}: {count} elements of {dtype.name} ({bits} bits each) are "
                                    "not a whole number of bytes; safetensors packs F4 two to a byte")
    return _Planned(name, value, st_dtype, shape, count * bits // 8)


def _encode_header(plan: list[_Planned], metadata: dict[str, str] | None) -> bytes:
    """The header bytes, padded with spaces to a multiple of 8 as the reference does."""
    body: dict[str, Any] = {}
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise UnsupportedValueError(f"metadata must be a dict of str -> str, found {type(metadata).__name__}")
        for k, v in metadata.items():
            if type(k) is not str or type(v) is not str:
                raise UnsupportedValueError(f"metadata[{k!r:.80}]: safetensors metadata is str -> str, found "
                                            f"{type(k).__name__} -> {type(v).__name__}")
        body[_METADATA_KEY] = dict(metadata)
    offset = 0
    for p in plan:
        body[p.name] = {"dtype": p.st_dtype, "shape": list(p.shape), "data_offsets": [offset, offset + p.file_bytes]}
        offset += p.file_bytes
    try:
        raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError as e:
        raise UnsupportedValueError(f"a tensor name or metadata string is not valid Unicode ({e})") from None
    raw += b" " * (-len(raw) % 8)
    items = raw.count(b",") + raw.count(b"{") + raw.count(b"[")
    if len(raw) > MAX_HEADER_BYTES or items > MAX_HEADER_ITEMS:  # never write what S1/S2 refuse
        raise UnsupportedValueError(f"the header would be {len(raw)} bytes and {items} JSON items, above the "
                                    f"readers' caps of {MAX_HEADER_BYTES} bytes and {MAX_HEADER_ITEMS} items")
    return len(raw).to_bytes(8, "little") + raw


def _tensor_bytes(p: _Planned) -> np.ndarray:
    """The file bytes of one planned tensor, as a flat uint8 array (a view where possible)."""
    arr = np.asarray(p.value)
    if tuple(arr.shape) != p.shape or NUMPY_TO_ST.get(arr.dtype.newbyteorder("=")) != p.st_dtype:
        raise UnsupportedValueError(f"tensor {p.name!r} changed its dtype or shape while being written")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    if p.st_dtype == "F4":
        flat = (flat[0::2] & 0x0F) | ((flat[1::2] & 0x0F) << 4)  # the first element in the low nibble
    return flat


def _write_body(f: Any, header: bytes, plan: list[_Planned]) -> None:
    """The header, then each tensor's bytes in turn (one tensor's copy at most in memory)."""
    f.write(header)
    for p in plan:
        data = _tensor_bytes(p)
        if data.size:
            f.write(data)
