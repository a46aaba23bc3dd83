"""MindSpore ``.ckpt`` files written by hand (the reader and the format: :mod:`jaxckpt.fmt_mindspore`).

Each parameter becomes the top-level records MindSpore itself writes: its tag, dims, type name and
little-endian content, sliced every ``slice_bytes``; ``crc_check`` appends MindSpore's CRC-32 trailer and
``enc_key`` encrypts the stream in blocks (:mod:`jaxckpt.fmt_mindspore_crypto`). Given the ``layout`` of
what comes (name, dtype, shape), the file's exact size is known before its first byte, and a bucket
streams it up as it is written.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np

from jaxckpt import fmt_mindspore as ms
from jaxckpt import storage
from jaxckpt.errors import UnsupportedValueError
from jaxckpt.fmt_mindspore_crypto import BLOCK_BYTES, BlockWriter, check_enc_options, sealed_size


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
    return bytes(out + bytes([n]))


def _len_field(field: int, data: bytes) -> bytes:
    return _uvarint(field << 3 | 2) + _uvarint(len(data)) + data


def _tensor_parts(name: str, value: Any) -> tuple[bytes, list[int], memoryview]:
    """tensor_type, dims and little-endian content of one value, as MindSpore stores them."""
    arr = np.asarray(value)
    if arr.dtype.kind == "U":
        if arr.ndim:
            raise UnsupportedValueError(f"{name!r}: MindSpore stores a str as one value, not shape {arr.shape}")
        return b"str", [0], memoryview(np.array(str(arr.item())).tobytes())
    ttype = ms.TYPE_OF.get(arr.dtype.newbyteorder("="))
    if ttype is None:
        raise UnsupportedValueError(f"{name!r}: dtype {arr.dtype} cannot be stored in a MindSpore checkpoint; "
                                    f"it holds {', '.join(str(t) for t in ms.TYPE_OF)} and str")
    if arr.shape == (0,):
        raise UnsupportedValueError(f"{name!r}: shape (0,) is stored as dims [0], which MindSpore reads as 0-d")
    data = np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C")
    return ttype.encode(), list(arr.shape), memoryview(data.reshape(-1).view(np.uint8))


def _tag(name: Any) -> bytes:
    try:
        tag = name.encode("utf-8")
    except (AttributeError, UnicodeEncodeError) as e:
        raise UnsupportedValueError(f"key {name!r}: a MindSpore name is a str of UTF-8") from e
    if not 0 < len(tag) <= ms.MAX_TAG_BYTES:
        raise UnsupportedValueError(f"key {name[:80]!r}: {len(tag)} bytes of UTF-8, outside 1..{ms.MAX_TAG_BYTES}")
    return tag


def _records(tag: bytes, ttype: bytes, dims: list[int], n: int, slice_bytes: int) -> Iterator[tuple[bytes, int, int]]:
    """The top-level records of one parameter whose content is ``n`` bytes: each
    record's bytes before its content, and the content's [start, stop)."""
    item = ms.TYPES[ttype.decode()].itemsize if ttype != b"str" else 0  # MindSpore cannot read a sliced str
    step = max(item, slice_bytes // item * item) if item else max(n, 1)
    head = b"".join(b"\x08" + _uvarint(d) for d in dims) + _len_field(2, ttype)
    for start in range(0, max(n, 1), step):
        k = min(step, n - start)
        tensor = head + b"\x1a" + _uvarint(k)
        record = _len_field(1, tag) + b"\x12" + _uvarint(len(tensor) + k) + tensor
        yield b"\x0a" + _uvarint(len(record) + k) + record, start, start + k


def _encode(name: str, value: Any, slice_bytes: int) -> Iterator[bytes | memoryview]:
    """The top-level records of one parameter, as pieces to be written in order (content is not copied)."""
    tag = _tag(name)
    ttype, dims, content = _tensor_parts(name, value)
    for head, start, stop in _records(tag, ttype, dims, len(content), slice_bytes):
        yield head
        yield content[start:stop]


def _plain_size(layout: list[tuple[str, Any, tuple[int, ...]]], slice_bytes: int) -> int | None:
    """The bytes of the records of ``layout``'s parameters (name, dtype, shape);
    None where one's size depends on its value (a str)."""
    total = 0
    for name, dtype, shape in layout:
        ttype = ms.TYPE_OF.get(np.dtype(dtype).newbyteorder("="))
        if ttype is None or tuple(shape) == (0,):
            return None  # a str, or what _tensor_parts refuses (it raises, naming the key, when written)
        n = math.prod(shape) * np.dtype(dtype).itemsize
        total += sum(len(h) + stop - start for h, start, stop in _records(_tag(name), ttype.encode(), list(shape),
                                                                            n, slice_bytes))
    return total


def _as_laid_out(items: Iterable[tuple[str, Any]], layout: list[tuple[str, Any, tuple[int, ...]]]
                 ) -> Iterator[tuple[str, Any]]:
    """``items``, each checked to be the next of ``layout`` (name, dtype, shape) before it is written."""
    rest = iter(layout)
    for name, value in items:
        want = next(rest, None)
        arr = np.asarray(value)
        if want is None or want[0] != name or np.dtype(want[1]) != arr.dtype or tuple(want[2]) != arr.shape:
            announced = "nothing more" if want is None else f"{want[0]!r} ({np.dtype(want[1])}{list(want[2])})"
            raise UnsupportedValueError(f"tensor {name!r} ({arr.dtype}{list(arr.shape)}) came where the layout "
                                        f"announced {announced}")
        yield name, arr
    missing = [n for n, _, _ in rest]
    if missing:
        raise UnsupportedValueError(f"tensors never given: {missing[:10]}")


def _write_records(f: BinaryIO, items: Iterable[tuple[str, Any]], enc_key: bytes | None, enc_mode: str,
                   slice_bytes: int, block_bytes: int) -> int:
    """Every record to ``f``, plain or encrypted; returns the CRC-32 of the bytes written (if plain)."""
    cipher = BlockWriter(f, enc_key, enc_mode, block_bytes) if enc_key is not None else None
    crc, names = 0, set()
    for name, value in items:
        if isinstance(name, str) and name in names:
            raise UnsupportedValueError(f"key {name!r} appears twice")
        for piece in _encode(name, value, slice_bytes):
            if cipher is None:
                f.write(piece)
                crc = zlib.crc32(piece, crc)
            else:
                cipher.write(piece)
        names.add(name)
    if cipher is not None:
        cipher.flush()
    return crc


def write(path, items: Iterable[tuple[str, Any]], *, enc_key: bytes | None = None, enc_mode: str = "AES-GCM",
          crc_check: bool = False, slice_bytes: int = ms.SLICE_BYTES, block_bytes: int = BLOCK_BYTES,
          layout: Iterable[tuple[str, Any, tuple[int, ...]]] | None = None) -> None:
    """Write ``(name, array)`` pairs as a checkpoint that ``mindspore.load_checkpoint`` reads: arrays of bool,
    (u)int8-64, float16/32/64, bfloat16 (any shape but ``(0,)``) and 0-d str; anything else raises
    :class:`UnsupportedValueError` naming the key. ``enc_key`` (16/24/32 bytes; 16 for SM4-CBC) encrypts with
    ``enc_mode``; ``crc_check`` appends MindSpore's CRC-32 trailer (not with ``enc_key``). Slices of
    ``slice_bytes`` and blocks of ``block_bytes``, as MindSpore's. ``path``: a local path or a URL, written
    atomically (``storage.write_file``): a reader never sees a partial file. ``layout``: the ``(name, dtype,
    shape)`` of every item, in the order they come (``UnsupportedValueError`` otherwise, and nothing is
    written); the file's size is then known before its first byte, so a bucket streams it up with no local
    copy (a str among them: staged as without ``layout``)."""
    if enc_key is not None:
        check_enc_options(enc_key, enc_mode, block_bytes, crc_check)
    if not 1 <= slice_bytes <= 1 << 30:
        raise ValueError("slice_bytes must be in 1..2**30")
    size = None
    if layout is not None:
        layout = list(layout)
        items = _as_laid_out(items, layout)
        size = _plain_size(layout, slice_bytes)
        if size is not None:
            size = (sealed_size(size, enc_mode, block_bytes) if enc_key is not None
                    else size + (ms.CRC_TRAILER if crc_check else 0))

    def fill(f: BinaryIO) -> None:
        crc = _write_records(f, items, enc_key, enc_mode, slice_bytes, block_bytes)
        if crc_check:
            f.write(ms.CRC_MARK + crc.to_bytes(10, "big"))
    storage.write_file(path, fill, size)
