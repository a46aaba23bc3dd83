"""docs/FORMAT.md suffices: an independent reader, written from the spec alone,
reads what ``jaxckpt.save`` writes, bit-exactly.

The reader below uses only msgpack, numpy, ml_dtypes and xxhash. It imports
nothing from jaxckpt's format/reader/tree modules: jaxckpt is used only to
*write* checkpoints. Section and rule numbers (§8.3, R14...) refer to
docs/FORMAT.md; jaxckpt/format.py tags its checks with the same numbers.
"""

from __future__ import annotations

import math
import os
import re
import stat
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import pytest
import xxhash
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxckpt

# ============================================================ the spec reader
# §8.2: the dtype allow-list and bytes per element (R10).
ITEMSIZE = {
    "bool": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8,
    "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8,
    "float16": 2, "float32": 4, "float64": 8, "complex64": 8, "complex128": 16, "bfloat16": 2,
    "float8_e3m4": 1, "float8_e4m3": 1, "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e4m3b11fnuz": 1,
    "float8_e5m2": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1, "float6_e2m3fn": 1, "float6_e3m2fn": 1,
    "float4_e2m1fn": 1, "int4": 1, "uint4": 1, "int2": 1, "uint2": 1,
}
CAP_MANIFEST = 64 << 20         # R1
CAP_STR = 1 << 20               # R2
CAP_ITEMS = 8_000_000           # R2
CAP_FILES, CAP_LEAVES, CAP_SHARDS, CAP_BOX = 65536, 4_000_000, 131072, 262144  # R9
CAP_NDIM, CAP_BYTES = 64, 1 << 48                           # R11, R12
CAP_OFFSET = 1 << 56            # R18
CAP_DEPTH = 256                 # R23
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")  # R21, matched in full
U64 = (1 << 64) - 1


class SpecError(Exception):
    """The spec reader's only error."""


def np_dtype(name: str) -> np.dtype:
    """A §8.2 name as a little-endian numpy dtype."""
    if name in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                "float16", "float32", "float64", "complex64", "complex128"):
        return np.dtype(name).newbyteorder("<")
    return np.dtype(getattr(ml_dtypes, name))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # §3: a bool is never an int


def _int(v, lo: int, hi: int, what: str) -> int:
    if not _is_int(v) or not lo <= v <= hi:
        raise SpecError(f"{what}: expected an int in [{lo}, {hi}], found {v!r}")
    return v


def _field(m, key: str, check, what: str):
    if not isinstance(m, dict):
        raise SpecError(f"{what}: expected a map")
    if key not in m:
        raise SpecError(f"{what}: missing field {key!r}")
    v = m[key]
    if not check(v):
        raise SpecError(f"{what}: field {key!r} has the wrong type: {v!r}")
    return v


def _reject_ext(code, data):
    raise SpecError(f"msgpack extension type {code}")  # R3


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):  # R4
        raise SpecError(f"a map holds a key twice: {keys}")
    return dict(pairs)


def _unpack(data: bytes):
    try:  # R2, R3, R4
        return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_reject_ext, max_ext_len=0,
                               max_str_len=CAP_STR, max_bin_len=len(data), max_array_len=CAP_ITEMS,
                               max_map_len=CAP_ITEMS, object_pairs_hook=_unique_keys)
    except SpecError:
        raise
    except msgpack.ExtraData as e:  # R5
        raise SpecError(f"{len(e.extra)} bytes after the map") from None
    except Exception as e:
        raise SpecError(f"bad msgpack: {type(e).__name__}: {e}") from None


def open_regular(path: str) -> int:
    """R24: no symlinks, no blocking, regular files only."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise SpecError(f"{path}: cannot open: {e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SpecError(f"{path}: not a regular file")
    return fd


def read_manifest(ckpt: str) -> dict:
    """§4: the envelope, checked in the spec's order; returns the body map."""
    fd = open_regular(os.path.join(ckpt, "manifest.msgpack"))
    try:
        size = os.fstat(fd).st_size
        if not 0 < size <= CAP_MANIFEST:  # R1, before reading
            raise SpecError(f"manifest size {size}")
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    env = _unpack(data)
    if not isinstance(env, dict) or env.get("format") != "jaxckpt":
        raise SpecError("not a jaxckpt manifest")
    if _field(env, "version", _is_int, "envelope") != 1:  # R6
        raise SpecError(f"version {env['version']}")
    body = _field(env, "body", lambda v: isinstance(v, bytes), "envelope")
    want = _int(env.get("xxh3"), 0, U64, "envelope xxh3")
    if xxhash.xxh3_64_intdigest(body, seed=0) != want:  # R7: before decoding the body
        raise SpecError("manifest checksum mismatch")
    b = _unpack(body)
    _field(b, "library", lambda v: isinstance(v, str), "body")
    _field(b, "created", lambda v: _is_int(v) or isinstance(v, float), "body")
    if _field(b, "hash", lambda v: isinstance(v, str), "body") != "xxh3-64":  # R8
        raise SpecError("unknown hash")
    _int(b.get("chunk_bytes"), 4096, 1 << 40, "chunk_bytes")  # R8
    return b


def validate(b: dict) -> tuple[list[dict], list[dict]]:
    """§6-§8 and R8-R23 on the decoded body; returns (files, leaves)."""
    files = _field(b, "files", lambda v: isinstance(v, list) and len(v) <= CAP_FILES, "body")  # R9
    for f in files:
        name = _field(f, "name", lambda v: isinstance(v, str), "file")
        if not FILE_NAME.fullmatch(name) or name == "manifest.msgpack":  # R21
            raise SpecError(f"file name {name!r}")
        _int(f.get("size"), 0, CAP_OFFSET, "file size")  # R18
    if len({f["name"] for f in files}) != len(files):  # R21
        raise SpecError("a file is listed twice")
    leaves = _field(b, "leaves", lambda v: isinstance(v, list) and len(v) <= CAP_LEAVES, "body")  # R9
    chunk = b["chunk_bytes"]
    ranges: dict[int, list[tuple[int, int]]] = {}
    for leaf in leaves:
        path = _field(leaf, "path", lambda v: isinstance(v, str), "leaf")
        kind = _field(leaf, "kind", lambda v: v in ("array", "scalar", "key", "value"), path)  # R10
        if kind == "value":
            v = leaf.get("value")  # R13
            if isinstance(v, dict):
                parts = v.get("complex") if set(v) == {"complex"} else None
                if not (isinstance(parts, list) and len(parts) == 2
                        and all(isinstance(p, float) or _is_int(p) for p in parts)):
                    raise SpecError(f"{path}: bad complex value")
            elif not (v is None or isinstance(v, (bool, int, float, str))):
                raise SpecError(f"{path}: bad value")
            continue
        dtype = _field(leaf, "dtype", lambda v: isinstance(v, str) and v in ITEMSIZE, path)  # R10
        itemsize = ITEMSIZE[dtype]
        shape = _field(leaf, "shape", lambda v: isinstance(v, list) and len(v) <= CAP_NDIM, path)  # R11
        count, m = 1, CAP_BYTES // itemsize
        for d in shape:
            _int(d, 0, CAP_BYTES, f"{path} shape")  # R11
        for d in shape:  # R12 as a 64-bit reader would do it
            if count > 0 and d > m // count:
                raise SpecError(f"{path}: shape {shape} too large")
            count *= d
        if kind == "scalar" and shape != []:
            raise SpecError(f"{path}: scalar with shape {shape}")  # R13
        if kind == "key" and not _field(leaf, "impl", lambda v: isinstance(v, str), path).isidentifier():
            raise SpecError(f"{path}: bad impl")  # R13
        shards = _field(leaf, "shards", lambda v: isinstance(v, list) and len(v) <= CAP_SHARDS
                        and len(v) * max(len(shape), 1) <= CAP_BOX, path)  # R9
        boxes = []
        for s in shards:
            box = _field(s, "box", lambda v: isinstance(v, list) and len(v) == len(shape), path)
            for pair, dim in zip(box, shape):  # R14
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise SpecError(f"{path}: bad box")
                _int(pair[0], 0, dim, f"{path} box")
                _int(pair[1], pair[0], dim, f"{path} box")
            fi = _int(s.get("file"), 0, len(files) - 1, f"{path} file")  # R18
            offset = _int(s.get("offset"), 0, CAP_OFFSET, f"{path} offset")  # R18
            length = _int(s.get("length"), 0, CAP_BYTES, f"{path} length")
            if length != math.prod(z - a for a, z in box) * itemsize:  # R15
                raise SpecError(f"{path}: length {length} does not match box {box}")
            sums = _field(s, "xxh3", lambda v: isinstance(v, list), path)
            if len(sums) != -(-length // chunk):  # R16
                raise SpecError(f"{path}: {len(sums)} checksums for {length} bytes")
            for x in sums:
                _int(x, 0, U64, f"{path} checksum")  # R16
            if offset + length > files[fi]["size"]:  # R19
                raise SpecError(f"{path}: bytes beyond the end of {files[fi]['name']}")
            if length:
                ranges.setdefault(fi, []).append((offset, offset + length))
            boxes.append(box)
        # R17: the boxes tile the array
        if count == 0:
            if len(shards) > 1:
                raise SpecError(f"{path}: an empty array with {len(shards)} shards")
        else:
            if sum(math.prod(z - a for a, z in box) for box in boxes) != count:
                raise SpecError(f"{path}: shards do not cover the array")
            _check_disjoint(path, [b for b in boxes if all(a < z for a, z in b)])
    if len({leaf["path"] for leaf in leaves}) != len(leaves):  # R22
        raise SpecError("two leaves have the same path")
    for rs in ranges.values():  # R20
        rs.sort()
        if any(b0 < a1 for (_, a1), (b0, _) in zip(rs, rs[1:])):
            raise SpecError("byte ranges overlap")
    _check_tree(b.get("tree"), len(leaves))
    return files, leaves


def _check_disjoint(path: str, boxes: list) -> None:
    """R17: no two non-empty boxes overlap: a grid test, else pairwise for at most 256."""
    grid = True
    for d in range(len(boxes[0]) if boxes else 0):
        edges = sorted({x for b in boxes for x in b[d]})
        nxt = dict(zip(edges, edges[1:]))
        grid = grid and all(nxt.get(b[d][0]) == b[d][1] for b in boxes)
    if grid:  # each box is one cell of the grid: overlapping boxes are equal
        if len({tuple(map(tuple, b)) for b in boxes}) != len(boxes):
            raise SpecError(f"{path}: shards overlap")
        return
    if len(boxes) > 256:
        raise SpecError(f"{path}: {len(boxes)} shards that do not form a grid")
    for i, p in enumerate(boxes):
        for q in boxes[i + 1:]:
            if all(a0 < b1 and b0 < a1 for (a0, a1), (b0, b1) in zip(p, q)):
                raise SpecError(f"{path}: shards overlap")


def _check_tree(tree, n: int) -> None:
    """R23, iteratively."""
    seen = [False] * n
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > CAP_DEPTH:
            raise SpecError("tree too deep")
        if _is_int(node):
            if not 0 <= node < n or seen[node]:
                raise SpecError(f"leaf index {node} out of range or used twice")
            seen[node] = True
            continue
        t = _field(node, "t", lambda v: v in ("none", "dict", "list", "tuple", "namedtuple", "custom"), "tree")
        if t == "none":
            continue
        c = _field(node, "c", lambda v: isinstance(v, list), "tree")
        if t in ("dict", "namedtuple", "custom"):
            k = _field(node, "k", lambda v: isinstance(v, list) and len(v) == len(c), "tree")
            if not all(isinstance(x, str) or _is_int(x) for x in k) or len(set(k)) != len(k):
                raise SpecError("bad or repeated key")
        if t in ("namedtuple", "custom"):
            _field(node, "n", lambda v: isinstance(v, str), "tree")
        stack.extend((ch, depth + 1) for ch in c)
    if not all(seen):
        raise SpecError("a leaf is not in the tree")


def read_leaf(ckpt: str, files: list[dict], chunk: int, leaf: dict, fds: dict[int, int]):
    """§11: one leaf's value."""
    kind = leaf["kind"]
    if kind == "value":
        v = leaf.get("value")
        return complex(*v["complex"]) if isinstance(v, dict) else v
    dt = np_dtype(leaf["dtype"])
    shape = tuple(leaf["shape"])
    out = np.zeros(shape, dt)
    for s in leaf["shards"]:
        if s["length"] == 0:
            continue
        fi = s["file"]
        if fi not in fds:
            p = os.path.join(ckpt, files[fi]["name"])
            fds[fi] = open_regular(p)
            if os.fstat(fds[fi]).st_size < files[fi]["size"]:  # R25
                raise SpecError(f"{p}: truncated")
        data = os.pread(fds[fi], s["length"], s["offset"])
        if len(data) != s["length"]:
            raise SpecError(f"{files[fi]['name']}: short read")
        for i, want in enumerate(s["xxh3"]):  # R26: chunks restart at each shard
            if xxhash.xxh3_64_intdigest(data[i * chunk:(i + 1) * chunk]) != want:
                raise SpecError(f"{files[fi]['name']}: checksum mismatch in leaf {leaf['path']!r}, chunk {i}")
        box = s["box"]
        block = np.frombuffer(data, dtype=dt).reshape(tuple(z - a for a, z in box))
        out[tuple(slice(a, z) for a, z in box)] = block
    if kind == "scalar":
        return out[()]
    if kind == "key":
        return ("key", leaf["impl"], out)
    return out


def build(node, values: list, depth: int = 0):
    """§7 / §11: the pytree without a target."""
    if _is_int(node):
        return values[node]
    t = node["t"]
    if t == "none":
        return None
    kids = [build(c, values, depth + 1) for c in node["c"]]
    if t == "list":
        return kids
    if t == "tuple":
        return tuple(kids)
    return dict(zip(node["k"], kids))


def spec_read(ckpt: str):
    """(tree, metadata, body) of a checkpoint, read by the spec alone."""
    b = read_manifest(ckpt)
    files, leaves = validate(b)
    fds: dict[int, int] = {}
    try:
        values = [read_leaf(ckpt, files, b["chunk_bytes"], leaf, fds) for leaf in leaves]
    finally:
        for fd in fds.values():
            os.close(fd)
    return build(b["tree"], values), b.get("metadata"), b


# ============================================================ comparison
def _same(got, want, where: str = "") -> None:
    """Bit-exact equality, container types included."""
    if isinstance(want, jax.Array) and jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
        assert isinstance(got, tuple) and got[0] == "key", where
        assert got[1] == str(jax.random.key_impl(want)), where
        _same(got[2], np.asarray(jax.random.key_data(want)), where)
        return
    if isinstance(want, (jax.Array, np.ndarray, np.generic)):
        w = np.asarray(want)
        w = w.astype(w.dtype.newbyteorder("<")) if w.dtype.byteorder == ">" else w
        assert isinstance(got, np.generic if isinstance(want, np.generic) else np.ndarray), (where, type(got))
        assert got.dtype == w.dtype and got.shape == w.shape, (where, got.dtype, w.dtype, got.shape, w.shape)
        assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(w).tobytes(), where
        return
    assert type(got) is type(want), (where, type(got), type(want))
    if isinstance(want, dict):
        assert list(got) == sorted(want), where
        for k in want:
            _same(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{where}/{i}")
    elif isinstance(want, float):
        assert struct.pack("<d", got) == struct.pack("<d", want), where
    elif isinstance(want, complex):
        assert struct.pack("<dd", got.real, got.imag) == struct.pack("<dd", want.real, want.imag), where
    else:
        assert got == want, where


def _bits(rng, shape, dtype) -> np.ndarray:
    """Random bit patterns (NaNs and all) for a floating dtype."""
    dt = np.dtype(dtype)
    raw = rng.integers(0, 256, size=math.prod(shape) * dt.itemsize, dtype=np.uint8)
    return raw.view(dt).reshape(shape)


# ============================================================ tests
def test_nested_tree_of_many_dtypes_reads_bit_exactly(ckdir):
    rng = np.random.default_rng(0)
    base = np.arange(24, dtype=np.int32).reshape(4, 6)
    tree = {
        "np": {
            "bool": rng.random((3, 5)) < 0.5,
            "int8": rng.integers(-128, 128, (7,), dtype=np.int8),
            "uint16": rng.integers(0, 1 << 16, (2, 3), dtype=np.uint16),
            "int64": rng.integers(-(1 << 62), 1 << 62, (5,), dtype=np.int64),
            "uint64": np.array([0, 1, (1 << 64) - 1], np.uint64),
            "float16": _bits(rng, (3, 3), np.float16),
            "float32": _bits(rng, (2, 2, 2), np.float32),
            "float64": _bits(rng, (4,), np.float64),
            "complex64": _bits(rng, (3,), np.complex64),
            "complex128": _bits(rng, (2,), np.complex128),
            "bfloat16": _bits(rng, (5, 2), ml_dtypes.bfloat16),
            "float8_e4m3fn": _bits(rng, (9,), ml_dtypes.float8_e4m3fn),
            "float8_e5m2": _bits(rng, (9,), ml_dtypes.float8_e5m2),
            "int4": rng.integers(-8, 8, (11,)).astype(ml_dtypes.int4),
            "uint4": rng.integers(0, 16, (3, 2)).astype(ml_dtypes.uint4),
            "big": rng.standard_normal(20_000).astype(np.float32),  # 80 KB: a 4096-aligned shard
        },
        "jax": [jnp.asarray(_bits(rng, (4, 3), ml_dtypes.bfloat16)), jnp.array([True, False, True]),
                jnp.int32(-7), jnp.arange(5, dtype=jnp.int4)],
        "zero_d": np.array(3.5),
        "empty": np.zeros((0, 3), np.float32),
        "empty_bf16": np.zeros((2, 0, 4), ml_dtypes.bfloat16),
        "layouts": {"fortran": np.asfortranarray(base), "strided": base[::2, 1::2],
                    "big_endian": base.astype(">i4"), "big_endian_f8": np.arange(3, dtype=">f8")},
        "py": [7, -(1 << 63), (1 << 64) - 1, 1.25, float("nan"), -0.0, True, False, "héllo", 2.5 - 3j, None],
        "tuple": (np.float32(1.5), np.int64(-3), np.bool_(True)),
        "key": jax.random.key(42),
    }
    jaxckpt.save(ckdir / "c", tree, metadata={"step": 12, "tags": ["a", "b"], "nested": {"x": None}})

    got, metadata, body = spec_read(str(ckdir / "c"))
    _same(got, tree)
    assert metadata == {"step": 12, "tags": ["a", "b"], "nested": {"x": None}}
    kinds = {leaf["path"]: leaf["kind"] for leaf in body["leaves"]}
    assert (kinds["tuple/0"], kinds["key"], kinds["py/0"], kinds["zero_d"]) == ("scalar", "key", "value", "array")
    # §8.2: int4 is one element per byte, the value in the low 4 bits
    int4 = next(leaf for leaf in body["leaves"] if leaf["path"] == "np/int4")
    assert int4["dtype"] == "int4" and int4["shards"][0]["length"] == 11
    # §8.3: the writer writes no zero-length shard; an empty array has none
    assert [leaf["shards"] for leaf in body["leaves"] if leaf["path"].startswith("empty")] == [[], []]


def test_sharded_jax_array_is_read_from_its_shards(ckdir):
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    full = jax.device_put(jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6), NamedSharding(mesh, P("a", "b")))
    rows = jax.device_put(jnp.asarray(_bits(np.random.default_rng(1), (8, 3), ml_dtypes.bfloat16)),
                          NamedSharding(mesh, P("a", None)))
    repl = jax.device_put(jnp.arange(4, dtype=jnp.int16), NamedSharding(mesh, P()))
    empty = jax.device_put(jnp.zeros((0, 8), jnp.float32), NamedSharding(mesh, P(None, ("a", "b"))))
    tree = {"full": full, "rows": rows, "repl": repl, "empty": empty}
    jaxckpt.save(ckdir / "c", tree)

    got, _, body = spec_read(str(ckdir / "c"))
    _same(got, tree)
    shards = {leaf["path"]: leaf["shards"] for leaf in body["leaves"]}
    # each unique device shard is written once, with its box in the global array
    want_full = sorted([[s.index[0].start, s.index[0].stop], [s.index[1].start, s.index[1].stop]]
                       for s in full.addressable_shards)
    assert sorted(s["box"] for s in shards["full"]) == want_full and len(want_full) == 8
    assert sorted(s["box"] for s in shards["rows"]) == [[[2 * i, 2 * i + 2], [0, 3]] for i in range(4)]
    assert [s["box"] for s in shards["repl"]] == [[[0, 4]]]
    assert shards["empty"] == []


def test_checkpoint_holding_only_empty_arrays_lists_no_file(ckdir):
    tree = {"e": np.zeros((0, 3)), "v": 1}
    jaxckpt.save(ckdir / "c", tree)
    got, _, body = spec_read(str(ckdir / "c"))
    _same(got, tree)
    assert body["files"] == [] and sorted(os.listdir(ckdir / "c")) == ["manifest.msgpack"]


def test_multi_chunk_shard_checksums_and_corruption(ckdir):
    # 20 MiB: two checksum chunks of chunk_bytes (16 MiB) and 4 MiB
    a = np.random.default_rng(2).integers(0, 256, 20 << 20, dtype=np.uint8)
    jaxckpt.save(ckdir / "c", {"a": a, "b": np.arange(10, dtype=np.int16)})
    got, _, body = spec_read(str(ckdir / "c"))
    _same(got, {"a": a, "b": np.arange(10, dtype=np.int16)})
    (sa,) = body["leaves"][0]["shards"]
    cb = body["chunk_bytes"]
    assert cb == 16 << 20 and len(sa["xxh3"]) == 2
    assert sa["xxh3"] == [xxhash.xxh3_64_intdigest(a[:cb].tobytes()), xxhash.xxh3_64_intdigest(a[cb:].tobytes())]

    # one flipped bit in the second chunk: the spec reader names the chunk
    name = body["files"][sa["file"]]["name"]
    with open(ckdir / "c" / name, "r+b") as f:
        pos = sa["offset"] + cb + 5
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0x10]))
    with pytest.raises(SpecError, match=rf"{name}: checksum mismatch in leaf 'a', chunk 1"):
        spec_read(str(ckdir / "c"))


def test_manifest_checksum_is_checked_before_the_body_is_decoded(ckdir):
    jaxckpt.save(ckdir / "c", {"x": np.ones(3)})
    mpath = ckdir / "c" / "manifest.msgpack"
    env = msgpack.unpackb(mpath.read_bytes(), raw=False)
    body = bytearray(env["body"])
    body[0] = 0xC1  # 0xc1 is never valid msgpack: decoding the body would fail differently
    env["body"] = bytes(body)
    mpath.write_bytes(msgpack.packb(env, use_bin_type=True))
    with pytest.raises(SpecError, match="manifest checksum mismatch"):
        spec_read(str(ckdir / "c"))


def test_committed_directory_layout(ckdir):
    small = np.arange(3, dtype=np.uint8)
    big = np.arange(20_000, dtype=np.float32)
    jaxckpt.save(ckdir / "c", {"a": small, "b": big, "c": np.float64(2.0)})
    # §2: only the final directory remains; no temporary sibling
    assert os.listdir(ckdir) == ["c"]
    raw = (ckdir / "c" / "manifest.msgpack").read_bytes()
    # §4: a map of four fields, "format" first
    assert raw[:16] == b"\x84\xa6format\xa7jaxckpt"
    env = msgpack.unpackb(raw, raw=False)
    assert list(env) == ["format", "version", "body", "xxh3"] and env["version"] == 1
    body = msgpack.unpackb(env["body"], raw=False)
    assert sorted(os.listdir(ckdir / "c")) == sorted(["manifest.msgpack"] + [f["name"] for f in body["files"]])
    (f,) = body["files"]
    data = (ckdir / "c" / f["name"]).read_bytes()
    assert len(data) == f["size"]  # §6: the exact size
    covered = np.zeros(len(data), bool)
    for leaf in body["leaves"]:
        (s,) = leaf["shards"]
        # §6 (writer behaviour): >= 64 KiB on 4096 bytes, smaller on 64 bytes
        assert s["offset"] % (4096 if s["length"] >= 64 << 10 else 64) == 0
        covered[s["offset"]:s["offset"] + s["length"]] = True
    # padding is written as zeros, and the file ends with the last shard's last byte
    assert not np.frombuffer(data, np.uint8)[~covered].any() and covered[-1]


def _map(pairs) -> bytes:
    """A msgpack map of ``pairs`` in order, a repeated key included (msgpack.packb cannot write one)."""
    return bytes([0x80 | len(pairs)]) + b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in pairs)


def _seal(body: bytes) -> bytes:
    return _map([("format", "jaxckpt"), ("version", 1), ("body", body), ("xxh3", xxhash.xxh3_64_intdigest(body))])


def test_repeated_keys_and_trailing_bytes_are_refused(ckdir):
    """R4 and R5: the spec reader and jaxckpt both refuse a map that holds a key twice
    (msgpack alone would keep the last value) and bytes after the envelope or body map."""
    jaxckpt.save(ckdir / "c", {"a": np.arange(4, dtype=np.int32)})
    mpath = ckdir / "c" / "manifest.msgpack"
    body = msgpack.unpackb(msgpack.unpackb(mpath.read_bytes(), raw=False)["body"], raw=False)
    (shard,) = body["leaves"][0]["shards"]
    marker = msgpack.packb("@shard@")
    body["leaves"][0]["shards"] = ["@shard@"]
    raw = msgpack.packb(body, use_bin_type=True)
    good = raw.replace(marker, _map(list(shard.items())))
    mpath.write_bytes(_seal(good))  # the writer's own bytes, rebuilt: both readers accept them
    assert spec_read(str(ckdir / "c"))[0]["a"].tolist() == [0, 1, 2, 3]
    jaxckpt.restore(ckdir / "c")
    bad = {
        "a shard with 'offset' twice": _seal(raw.replace(marker, _map(list(shard.items()) + [("offset", 0)]))),
        "the body with 'leaves' twice": _seal(good[:1].replace(b"\x88", b"\x89") + good[1:]
                                              + msgpack.packb("leaves") + msgpack.packb([])),
        "the envelope with 'version' twice": _seal(good)[:1].replace(b"\x84", b"\x85") + _seal(good)[1:]
        + msgpack.packb("version") + msgpack.packb(1),
        "a byte after the envelope": _seal(good) + b"\xc0",
        "a byte after the body map": _seal(good + b"\xc0"),
    }
    for what, data in bad.items():
        mpath.write_bytes(data)
        with pytest.raises(SpecError, match=r"twice|bytes after the map"):
            spec_read(str(ckdir / "c"))
        with pytest.raises(jaxckpt.CorruptCheckpointError, match=r"occurs twice in one map|bytes after the end"):
            jaxckpt.restore(ckdir / "c")
