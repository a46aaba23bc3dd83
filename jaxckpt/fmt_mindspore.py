"""MindSpore ``.ckpt`` files, read by hand (written by :mod:`jaxckpt.fmt_mindspore_write`): no protobuf, no
MindSpore.

The format, from MindSpore 2.x's ``checkpoint.proto`` and ``train/serialization.py``, checked against files
MindSpore 2.10 writes (``tests/data/mindspore/make.py``): a plain file is the proto2 encoding of ``Checkpoint
{repeated Value value = 1}``, ``Value {required string tag = 1; oneof {TensorProto tensor = 2; MapTensorProto
maptensor = 3}}``, ``TensorProto {repeated int64 dims = 1; required string tensor_type = 2; required bytes
tensor_content = 3}``, one ``Checkpoint`` per value, concatenated (protobuf merges repeated fields): a flat run
of field-1 records. Content is C-order little-endian; the type is MindSpore's name ("Float32", "BFloat16"...).
A 0-d tensor has no dims; MindSpore also reads ``dims == [0]`` as 0-d, so a shape ``(0,)`` cannot be stored. A
str (``append_dict``) has dims ``[0]``, type "str" and UTF-32-LE content. A parameter above 512 MiB is stored
in slices: consecutive records with the same tag, each with the full dims and type and the next piece of the
content (``np.array_split`` makes empty ones). ``crc_check`` appends ``b"crc_num"`` and the CRC-32 (zlib) of
all bytes before it, 10 bytes big-endian. ``enc_key`` encrypts the stream in blocks (AES-GCM, AES-CBC or
SM4-CBC): :mod:`jaxckpt.fmt_mindspore_crypto`. MindSpore writes crc_check with enc_key but cannot read it.

Every number read from disk is checked against a cap (below) before it is used: a damaged or hostile file
gives :class:`CorruptCheckpointError` naming the file (and the tensor when known), never a huge allocation.
"""

from __future__ import annotations

import codecs
import contextlib
import math
import zlib
from typing import Any, BinaryIO, Iterator, NamedTuple

import ml_dtypes
import numpy as np

from jaxckpt import storage
from jaxckpt.errors import CorruptCheckpointError, DecryptionError, UnsupportedValueError
from jaxckpt.fmt_mindspore_crypto import MODE_OF, BlockReader, check_key

# Hard caps on what is read from disk.
MAX_FILE_BYTES = 1 << 44  # 16 TiB
MAX_RECORDS = 1 << 20  # top-level records (each slice is one); real models hold ~10^4 parameters
MAX_VALUE_BYTES = (1 << 31) - 1  # one record: protobuf's own 2 GiB message limit, which MindSpore's parser has
MAX_TAG_BYTES = 1 << 16  # a parameter name
MAX_TYPE_BYTES = 32  # a tensor_type name
MAX_NDIM = 64  # numpy's own limit
SLICE_BYTES = 512 << 20  # MindSpore's SLICE_SIZE: parameters above it are stored in slices

CRC_MARK, CRC_TRAILER = b"crc_num", 17  # the crc_check trailer: the mark, then 10 bytes of CRC-32
_LOOKAHEAD = 1 << 16  # bytes the reader buffers ahead for varints and small records
TYPES = {name: np.dtype(t) for name, t in (
    ("Bool", np.bool_), ("Int8", np.int8), ("Int16", np.int16), ("Int32", np.int32), ("Int64", np.int64),
    ("UInt8", np.uint8), ("UInt16", np.uint16), ("UInt32", np.uint32), ("UInt64", np.uint64),
    ("Float16", np.float16), ("Float32", np.float32), ("Float64", np.float64), ("BFloat16", ml_dtypes.bfloat16))}
TYPE_OF = {dtype: name for name, dtype in TYPES.items()}
# Type names we know but do not read: packed 4-bit ints; complex, which MindSpore saves but cannot load.
_UNREAD = ("Int4", "Complex64", "Complex128")


class TensorInfo(NamedTuple):
    """What :func:`describe` tells of one parameter."""
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    nbytes: int


class _Bad(Exception):  # internal: a format violation, given its context (file, tensor) where caught
    def __init__(self, what: str, tag: str | None = None, unsupported: bool = False):
        super().__init__(what)
        self.tag, self.unsupported = tag, unsupported


# --------------------------------------------------------------------- protobuf wire format
def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``buf[pos:end]`` (at most 10 bytes, below 2**64) and the position after it."""
    value = 0
    for i in range(10):
        if pos >= end:
            raise _Bad("truncated varint")
        byte, pos = buf[pos], pos + 1
        if i == 9 and byte > 1:
            raise _Bad("varint above 2**64")
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return value, pos
    raise _Bad("varint longer than 10 bytes")  # not reached: a 10th byte below 2 ends the varint


def _fields(mv: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of a message: an int, or a memoryview for length-delimited fields."""
    pos, end = 0, len(mv)
    while pos < end:
        key, pos = _varint(mv, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0 or wire not in (0, 1, 2, 5):
            raise _Bad(f"field {field} of wire type {wire} (groups and types 6, 7 are not in this format)")
        if wire == 0:
            value, pos = _varint(mv, pos, end)
        else:
            n, pos = _varint(mv, pos, end) if wire == 2 else ({1: 8, 5: 4}[wire], pos)
            if n > end - pos:
                raise _Bad(f"a field of {n} bytes where {end - pos} remain")
            value, pos = mv[pos:pos + n], pos + n
        yield field, wire, value


# --------------------------------------------------------------------- records
class _Record(NamedTuple):
    tag: str
    dims: tuple[int, ...]
    ttype: str
    content: memoryview


def _text(value: Any, wire: int, what: str, cap: int) -> str:
    if wire != 2 or len(value) > cap:
        raise _Bad(f"{what} of wire type {wire}, expected 2" if wire != 2 else
                   f"{what} of {len(value)} bytes, above the cap of {cap}")
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad(f"{what} is not UTF-8") from e


def _decode_tensor(mv: memoryview) -> tuple[tuple[int, ...], str, memoryview]:
    """dims, tensor_type and tensor_content of a TensorProto."""
    dims: list[int] = []
    ttype = content = None
    for field, wire, value in _fields(mv):
        if field == 1 and wire == 0:
            dims.append(value)
        elif field == 1 and wire == 2:  # packed: proto2 writers do not pack, but protobuf's parser accepts it
            pos = 0
            while pos < len(value) and len(dims) <= MAX_NDIM:
                v, pos = _varint(value, pos, len(value))
                dims.append(v)
        elif field == 2:
            ttype = _text(value, wire, "tensor_type", MAX_TYPE_BYTES)
        elif field == 3:
            content = value if wire == 2 else None
        elif field == 1:
            raise _Bad(f"dims of wire type {wire}")
        if len(dims) > MAX_NDIM:
            raise _Bad(f"more than {MAX_NDIM} dims")
    if ttype is None or content is None:
        raise _Bad("TensorProto without its required " + ("tensor_type" if ttype is None else "tensor_content"))
    if any(d >= 1 << 63 for d in dims):
        raise _Bad(f"negative dimension in {[d - (1 << 64) if d >= 1 << 63 else d for d in dims]}")
    return tuple(dims), ttype, content


def _decode_record(buf: bytearray) -> _Record:
    """One ``Value`` message."""
    tag = tensor = kind = None
    for field, wire, value in _fields(memoryview(buf)):
        if field == 1:
            if tag is not None:
                raise _Bad("Value with two tags")
            tag = _text(value, wire, "tag", MAX_TAG_BYTES)
        elif field in (2, 3):
            if wire != 2 or kind is not None:
                raise _Bad("Value with a malformed or second tensor")
            tensor, kind = value, field
    if tag is None or kind is None:
        raise _Bad("Value without its required tag" if tag is None else "Value without a tensor", tag)
    if kind == 3:
        raise _Bad("a MapParameter (MapTensorProto), which jaxckpt does not read", tag, unsupported=True)
    try:
        return _Record(tag, *_decode_tensor(tensor))
    except _Bad as e:
        raise _Bad(str(e), tag) from None


class _Tensor:
    """A parameter being assembled from its slices; ``build=False`` only checks and counts (describe)."""

    def __init__(self, rec: _Record, room: int, build: bool):
        self.tag, self.dims, self.ttype, self.filled, self.done = rec.tag, rec.dims, rec.ttype, 0, False
        if rec.ttype == "str":
            if rec.dims != (0,) or len(rec.content) % 4:
                raise _Bad(f"a str with dims {list(rec.dims)} and {len(rec.content)} bytes", rec.tag)
            self.dtype, self.shape, self.nbytes = np.dtype(f"<U{len(rec.content) // 4}"), (), len(rec.content)
        elif rec.ttype in TYPES:
            self.dtype, self.shape = TYPES[rec.ttype], () if rec.dims == (0,) else rec.dims
            self.nbytes = math.prod(self.shape) * self.dtype.itemsize
        else:
            known = rec.ttype in _UNREAD
            raise _Bad(f"tensor_type {rec.ttype!r}" + (", which jaxckpt does not read" if known else " is unknown"),
                       rec.tag, unsupported=known)
        if self.nbytes > room:  # so never above MAX_FILE_BYTES
            raise _Bad(f"shape {list(self.shape)} of {rec.ttype} needs {self.nbytes} bytes; the file holds at "
                       f"most {room} more", rec.tag)
        self.out = np.empty(self.nbytes, np.uint8) if build else None
        self.add(rec)

    def add(self, rec: _Record) -> None:
        n = len(rec.content)
        if rec.dims != self.dims or rec.ttype != self.ttype or (self.filled and self.ttype == "str"):
            raise _Bad(f"slice with dims {list(rec.dims)} {rec.ttype} after {list(self.dims)} {self.ttype}", self.tag)
        if n > self.nbytes - self.filled:
            raise _Bad(f"{self.filled + n} bytes of content, its shape and type need {self.nbytes}", self.tag)
        if n and self.ttype == "Bool" and int(np.frombuffer(rec.content, np.uint8).max()) > 1:
            raise _Bad("a Bool byte other than 0 or 1", self.tag)
        if self.out is not None:
            self.out[self.filled:self.filled + n] = np.frombuffer(rec.content, np.uint8)
        self.filled += n

    def finish(self) -> tuple[str, np.ndarray] | TensorInfo:
        if self.filled != self.nbytes:
            raise _Bad(f"{self.filled} bytes of content, its shape {list(self.shape)} of {self.ttype} needs "
                       f"{self.nbytes}", self.tag)
        self.done = True
        if self.out is None:
            return TensorInfo(self.tag, self.dtype, self.shape, self.nbytes)
        return self.tag, self.out.view(self.dtype).reshape(self.shape)


# --------------------------------------------------------------------- byte sources
class _PlainSource:
    """The bytes of a plain file before its crc trailer."""

    def __init__(self, f: BinaryIO, end: int):
        self.f, self.left = f, end

    def bound(self) -> int:
        return self.left

    def readinto(self, mv: memoryview) -> int:
        n = self.f.readinto(mv[:min(len(mv), self.left)]) if self.left else 0
        self.left -= n
        return n


def _check_crc(f: BinaryIO, size: int, where: str) -> int:
    """The size of the data before a crc trailer (all of it if there is none), once the CRC-32 matches."""
    f.seek(max(0, size - CRC_TRAILER))
    tail = f.read(CRC_TRAILER)
    if len(tail) < CRC_TRAILER or tail[:7] != CRC_MARK:
        return size
    f.seek(0)
    crc, left = 0, size - CRC_TRAILER
    while left and (chunk := f.read(min(left, 1 << 22))):
        crc, left = zlib.crc32(chunk, crc), left - len(chunk)
    if crc != int.from_bytes(tail[7:], "big"):
        raise CorruptCheckpointError(f"{where}: CRC-32 mismatch: the trailer says {tail[7:].hex()}, the content "
                                     f"gives {crc:#010x}; the file is damaged")
    return size - CRC_TRAILER


# --------------------------------------------------------------------- the record stream
class _Stream:
    """Records, read from a source through a small look-ahead buffer; errors name the file and record."""

    def __init__(self, src, where: str):
        self.src, self.where = src, where
        self.buf, self.pos, self.offset, self.index, self.at = b"", 0, 0, -1, 0

    def bound(self) -> int:
        return len(self.buf) - self.pos + self.src.bound()

    def _fill(self, n: int) -> int:
        if len(self.buf) - self.pos < n:
            more = bytearray(max(n, _LOOKAHEAD))
            got = _read_full(self.src, memoryview(more))
            self.buf, self.pos = self.buf[self.pos:] + bytes(more[:got]), 0
        return len(self.buf) - self.pos

    def _varint(self) -> int:
        have = min(self._fill(10), 10)  # first: _fill moves the buffer
        value, end = _varint(self.buf, self.pos, self.pos + have)
        self.offset, self.pos = self.offset + end - self.pos, end
        return value

    def _read(self, n: int) -> bytearray:
        if n > self.bound():
            raise _Bad(f"truncated: a field of {n} bytes, but at most {self.bound()} remain")
        out, k = bytearray(n), min(n, len(self.buf) - self.pos)
        out[:k] = self.buf[self.pos:self.pos + k]
        self.pos, self.offset = self.pos + k, self.offset + n
        if k < n and _read_full(self.src, memoryview(out)[k:]) < n - k:
            raise _Bad("truncated file")
        return out

    def records(self) -> Iterator[bytearray]:
        """The bytes of each Value; other top-level fields are skipped (and count as records)."""
        while self._fill(1):
            self.index, self.at = self.index + 1, self.offset
            if self.index >= MAX_RECORDS:
                raise _Bad(f"more than {MAX_RECORDS} records")
            key = self._varint()
            field, wire = key >> 3, key & 7
            if field == 0 or wire not in (0, 1, 2, 5) or (field == 1 and wire != 2):
                raise _Bad(f"top-level field {field} of wire type {wire}")
            n = self._varint() if wire == 2 else {0: 0, 1: 8, 5: 4}[wire]
            if wire == 0:
                self._varint()
            elif field == 1:
                if n > MAX_VALUE_BYTES:
                    raise _Bad(f"a record of {n} bytes, above the cap of {MAX_VALUE_BYTES}")
                yield self._read(n)
            while field != 1 and n:
                n -= len(self._read(min(n, 1 << 20)))

    def error(self, e: _Bad) -> CorruptCheckpointError | UnsupportedValueError:
        byte = "plaintext byte" if isinstance(self.src, BlockReader) else "byte"
        place = f"tensor {e.tag!r}" if e.tag is not None else f"record {self.index} at {byte} {self.at}"
        return (UnsupportedValueError if e.unsupported else CorruptCheckpointError)(f"{self.where}: {place}: {e}")


def _read_full(src, mv: memoryview) -> int:
    got = 0
    while got < len(mv) and (n := src.readinto(mv[got:])):
        got += n
    return got


@contextlib.contextmanager
def _opened(path, dec_key: bytes | None, dec_mode: str) -> Iterator[_Stream]:
    with storage.open_file(path) as src, src.reader() as f:
        where, size = src.where, src.size
        if size > MAX_FILE_BYTES:
            raise CorruptCheckpointError(f"{where}: {size} bytes, above the cap of {MAX_FILE_BYTES}")
        mode = MODE_OF.get(int.from_bytes(f.read(4), "little")) if size >= 4 else None
        if mode is not None:
            check_key(where, dec_key, dec_mode, mode)
            f.seek(0)
            yield _Stream(BlockReader(f, size, dec_key, mode, where), where)
            return
        if dec_key is not None and size:
            raise DecryptionError(f"{where}: the file is not encrypted, but a dec_key was given")
        end = _check_crc(f, size, where)  # before any value is read: MindSpore's loader checks it first too
        f.seek(0)
        yield _Stream(_PlainSource(f, end), where)


def _tensors(stream: _Stream, build: bool) -> Iterator[tuple[str, np.ndarray] | TensorInfo]:
    """Each parameter, as soon as it is complete."""
    cur, seen = None, set()
    try:
        for buf in stream.records():
            rec = _decode_record(buf)
            if cur is not None and rec.tag == cur.tag:
                cur.add(rec)  # once complete, only an empty slice fits (np.array_split makes them)
            else:
                if cur is not None and not cur.done:
                    yield cur.finish()  # raises: incomplete
                if rec.tag in seen:
                    raise _Bad("stored twice, not in consecutive slices", rec.tag)
                seen.add(rec.tag)
                cur = _Tensor(rec, len(rec.content) + stream.bound(), build)
            del buf, rec
            if cur.filled == cur.nbytes and not cur.done:
                yield cur.finish()
        if cur is not None and not cur.done:
            yield cur.finish()
    except _Bad as e:
        raise stream.error(e) from None


# --------------------------------------------------------------------- reading
def sniff(head: bytes) -> bool:
    """Whether ``head``, the first bytes of a file (a few KiB), looks like a MindSpore checkpoint, plain or
    encrypted. An empty checkpoint (an empty file) is not recognised."""
    if len(head) >= 4 and int.from_bytes(head[:4], "little") in MODE_OF:
        return True
    try:  # a plain file opens with record 1 (LEN), whose Value opens with its tag (field 1, LEN)
        n, pos = _varint(head, 1, len(head)) if head[:1] == b"\x0a" else (0, 0)
        t, start = _varint(head, pos + 1, len(head)) if head[pos:pos + 1] == b"\x0a" else (0, 0)
        if not 0 < t < n or t > MAX_TAG_BYTES:
            return False
        tag = bytes(head[start:start + t])
        codecs.getincrementaldecoder("utf-8")().decode(tag, final=len(tag) == t)  # head may end in the tag
        return len(head) <= start + t or head[start + t] in (0x12, 0x1A)
    except (_Bad, UnicodeDecodeError):
        return False


def iter_tensors(path, *, dec_key: bytes | None = None, dec_mode: str = "AES-GCM") -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of each parameter in file order, one at a time: memory holds one parameter and one
    slice. A ``str`` is a 0-d ``<U`` array. A CRC-32 trailer is verified first, in a pass over the file."""
    with _opened(path, dec_key, dec_mode) as stream:
        yield from _tensors(stream, build=True)


def read(path, *, dec_key: bytes | None = None, dec_mode: str = "AES-GCM") -> dict[str, np.ndarray]:
    """Every parameter of a MindSpore checkpoint, by its name as stored: dtypes as stored (``BFloat16`` as
    ``ml_dtypes.bfloat16``), 0-d arrays for scalars, slices joined, the CRC-32 verified when present.

    An encrypted file needs ``dec_key`` and its ``dec_mode`` ("AES-GCM", "AES-CBC", "SM4-CBC"); without the
    key, with the wrong one or the wrong mode it raises :class:`DecryptionError` after one block at most."""
    return dict(iter_tensors(path, dec_key=dec_key, dec_mode=dec_mode))


def describe(path, *, dec_key: bytes | None = None, dec_mode: str = "AES-GCM") -> list[TensorInfo]:
    """(name, dtype, shape, nbytes) of each parameter, checked as :func:`read` checks them (the whole file
    is read, and decrypted, one record at a time) but without building the arrays."""
    with _opened(path, dec_key, dec_mode) as stream:
        return list(_tensors(stream, build=False))
