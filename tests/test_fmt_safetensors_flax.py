"""jaxckpt.fmt_safetensors and jaxckpt.fmt_flax: files written by the real
libraries read back bit-exactly, our safetensors read by the real package, and
hostile files refused quickly, in small memory, with CorruptCheckpointError."""

import json
import os
import struct
import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import pytest

from jaxckpt import fmt_flax, fmt_safetensors
from jaxckpt.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedValueError

try:  # the reference implementation (pip install safetensors): the tests comparing with it need it
    import safetensors
    from safetensors.numpy import load_file, save_file
except ImportError:
    safetensors = None
needs_reference = pytest.mark.skipif(safetensors is None, reason="needs the safetensors package")

HEAD = 64 << 10
RNG = np.random.default_rng(0)

# numpy dtypes safetensors.numpy.save_file accepts, and those its load_file returns.
ST_SAVE_DTYPES = [np.bool_, np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
                  np.float16, np.float32, np.float64, np.complex64, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn,
                  ml_dtypes.float8_e4m3fnuz, ml_dtypes.float8_e5m2, ml_dtypes.float8_e5m2fnuz,
                  ml_dtypes.float8_e8m0fnu]
ST_LOAD_DTYPES = {np.dtype(t) for t in (np.bool_, np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32,
                                        np.int64, np.uint64, np.float16, np.float32, np.float64, np.complex64)}


def random_array(dtype, shape):
    """Random bits of ``dtype`` (NaN payloads included: the comparison is of bytes)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    if dtype == np.bool_:
        return RNG.integers(0, 2, n).astype(np.bool_).reshape(shape)
    return RNG.integers(0, 256, n * dtype.itemsize, dtype=np.uint8).view(dtype).reshape(shape)


def assert_bit_exact(got, want, key=""):
    want = np.asarray(want)
    assert got.dtype == want.dtype, (key, got.dtype, want.dtype)
    assert got.shape == want.shape, (key, got.shape, want.shape)
    assert got.tobytes() == want.tobytes(), key


def put(path, data):
    """Write ``data`` to ``path``; return ``path``."""
    with open(path, "wb") as f:
        f.write(data)
    return path


def head_of(path):
    """The head the dispatcher hands to sniff()."""
    with open(path, "rb") as f:
        return f.read(HEAD)


def bounded(fn, seconds=3.0, peak_bytes=32 << 20):
    """Run ``fn``; fail if it allocates more than given (traced, incl. numpy). A hang
    is caught by pytest-timeout, not by timing here (``seconds`` is kept for callers)."""
    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < peak_bytes, f"allocated {peak >> 20} MiB"


def assert_refused(fmt, path, data, match, case):
    """``data`` in ``path`` refused by describe() and read(), quickly, in small memory, naming the file
    (a READ_ONLY case is damage in the tensor bytes, which describe() does not read)."""
    for fn in (fmt.read,) if "READ_ONLY" in case else (fmt.describe, fmt.read):
        def go(fn=fn):
            with pytest.raises(CorruptCheckpointError, match=match) as e:
                fn(put(path, data))
            assert path in str(e.value)
        bounded(go)
    return path


# ===================================================================== safetensors
@needs_reference
def test_st_reads_reference_files_of_every_dtype(tmp_path):
    path = str(tmp_path / "ref.safetensors")
    arrays = {f"t{i}_{np.dtype(t).name}": random_array(t, (3, 5)) for i, t in enumerate(ST_SAVE_DTYPES)}
    arrays.update({"scalar": np.array(1.5, np.float32), "empty": np.zeros((0, 4), ml_dtypes.bfloat16),
                   "odd_bf16": random_array(ml_dtypes.bfloat16, (7,))})
    save_file(arrays, path, metadata={"format": "np", "note": "ünïcode"})
    size = os.path.getsize(path)
    assert fmt_safetensors.sniff(size, head_of(path)) and not fmt_flax.sniff(size, head_of(path))

    got = fmt_safetensors.read(path)
    assert set(got) == set(arrays)
    for k, v in arrays.items():
        assert_bit_exact(got[k], v, k)
    table, extra = fmt_safetensors.describe(path)
    assert extra == {"metadata": {"format": "np", "note": "ünïcode"}}
    assert {name: (dt, shape, n) for name, dt, shape, n in table} == {
        k: (v.dtype.name, v.shape, v.nbytes) for k, v in arrays.items()}
    assert [k for k, _ in fmt_safetensors.iter_tensors(path)] == [name for name, *_ in table]  # file order


@needs_reference
def test_st_f4_unpacked_low_nibble_first_and_packed_back(tmp_path):
    packed = np.array([0x21, 0x43, 0x65, 0x87, 0xA9, 0xCB], np.uint8)
    spec = safetensors.TensorSpec(dtype="float4_e2m1fn_x2", shape=[2, 3], data_ptr=packed.ctypes.data, data_len=6)
    path = str(tmp_path / "f4.safetensors")
    safetensors.serialize_file({"w": spec}, path)  # the header says F4, shape [2, 6]
    (name, dtype, shape, nbytes), = fmt_safetensors.describe(path)[0]
    assert (name, dtype, shape, nbytes) == ("w", "float4_e2m1fn", (2, 6), 12)
    w = fmt_safetensors.read(path)["w"]
    assert w.dtype == ml_dtypes.float4_e2m1fn
    assert w.view(np.uint8).ravel().tolist() == list(range(1, 13))  # low nibble, then high

    out = str(tmp_path / "f4-ours.safetensors")
    fmt_safetensors.write(out, [("w", w)])
    with open(out, "rb") as f:
        (_, info), = safetensors.deserialize(f.read())
    assert info["dtype"] == "F4" and info["shape"] == [2, 6] and bytes(info["data"]) == packed.tobytes()


def our_items():
    """Every dtype we write, plus byte orders, strides, 0-d, empty, jax and non-ASCII names; and
    the arrays as the file must hold them (C order, little-endian)."""
    items = [(f"{np.dtype(t).name}", random_array(t, (4, 3))) for t in ST_SAVE_DTYPES]
    items += [("big_endian", np.arange(6, dtype=">f4").reshape(2, 3)),
              ("strided", np.arange(20, dtype=np.int32).reshape(4, 5)[:, ::2]),
              ("scalar", np.array(7, np.int64)), ("empty", np.zeros((2, 0), np.float16)),
              ("jax_array", jnp.arange(5, dtype=jnp.bfloat16)), ("ünï", np.ones(1, np.uint8))]
    return items, {k: np.asarray(v).astype(np.asarray(v).dtype.newbyteorder("="), order="C") for k, v in items}


@needs_reference
def test_st_written_by_us_holds_the_bytes_the_reference_reads(tmp_path):
    path = str(tmp_path / "ours.safetensors")
    items, want = our_items()
    meta = {"format": "np", "step": "12"}
    fmt_safetensors.write(path, iter(items), metadata=meta)  # an iterator: collected once
    assert os.listdir(tmp_path) == ["ours.safetensors"]  # no temporary left behind
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    assert n % 8 == 0 and data[8:8 + n].rstrip(b" ").endswith(b"}")
    header = json.loads(data[8:8 + n])
    assert header.pop("__metadata__") == meta
    by_offset = sorted(header, key=lambda k: header[k]["data_offsets"])
    rank = {name: i for i, name in enumerate(fmt_safetensors.DTYPES)}  # the reference's order: alignment, name
    assert by_offset == sorted(want, key=lambda k: (-rank[header[k]["dtype"]], k))
    assert all((8 + n + header[k]["data_offsets"][0]) % want[k].dtype.itemsize == 0 for k in want)  # aligned
    raw = dict(safetensors.deserialize(data))  # every dtype, as raw bytes
    for k, v in want.items():
        assert bytes(raw[k]["data"]) == v.tobytes() and raw[k]["shape"] == list(v.shape), k
    got = fmt_safetensors.read(path)
    for k, v in want.items():
        assert_bit_exact(got[k], v, k)


@needs_reference
def test_st_written_by_us_loaded_by_the_reference_and_identical_to_its_file(tmp_path):
    path, ref = str(tmp_path / "ours.safetensors"), str(tmp_path / "ref.safetensors")
    # safetensors.numpy.load_file knows no bfloat16/float8: a file of the dtypes it knows
    known = [(k, v) for k, v in our_items()[1].items() if v.dtype in ST_LOAD_DTYPES]
    assert len(known) >= 15
    fmt_safetensors.write(path, known, metadata={"step": "12"})
    loaded = load_file(path)
    assert set(loaded) == {k for k, _ in known}
    for k, v in known:
        assert_bit_exact(loaded[k], v, k)
    with safetensors.safe_open(path, framework="np") as f:
        assert f.metadata() == {"step": "12"}
    # byte-identical to the reference writer's file (one metadata key: its HashMap has no fixed order)
    save_file(dict(known), ref, metadata={"step": "12"})
    with open(path, "rb") as ours, open(ref, "rb") as theirs:
        assert ours.read() == theirs.read()
    fmt_safetensors.write(path, {"only": np.ones(2, np.float32)})  # a mapping; replaces atomically
    assert list(load_file(path)) == ["only"]


@pytest.mark.parametrize("items, metadata, match", [
    ([("c", np.ones(2, np.complex128))], None, r"tensor 'c'.*complex128"),
    ([("q", np.ones(4, ml_dtypes.int4))], None, r"tensor 'q'.*int4"),
    ([("f6", np.ones(4, ml_dtypes.float6_e2m3fn))], None, r"tensor 'f6'.*float6_e2m3fn"),
    ([("rng", jax.random.key(0))], None, r"tensor 'rng'.*PRNG key.*key_data"),
    ([("obj", np.array([object()]))], None, r"tensor 'obj'.*object"),
    ([("s", np.array(["ab"]))], None, r"tensor 's'"),
    ([("f4", np.ones(3, ml_dtypes.float4_e2m1fn))], None, r"tensor 'f4'.*whole number of bytes"),
    ([("a", np.ones(1))], {"step": 3}, r"metadata\['step'\].*str -> str"),
    ([("a", np.ones(1))], {1: "x"}, r"metadata\[1\]"),
    ([("a", np.ones(1)), ("a", np.zeros(1))], None, r"'a' occurs twice"),
    ([("__metadata__", np.ones(1))], None, r"reserved"),
    ([(3, np.ones(1))], None, r"names are str"),
])
def test_st_write_refuses_what_safetensors_cannot_carry(tmp_path, items, metadata, match):
    path = tmp_path / "x.safetensors"
    with pytest.raises(UnsupportedValueError, match=match):
        fmt_safetensors.write(str(path), items, metadata=metadata)
    assert os.listdir(tmp_path) == []


def st_file(header, data=b"", length=None):
    """A safetensors file's bytes: ``header`` a dict (JSON-encoded) or raw bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def t(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


DEEP = b"[" * 100_000 + b"]" * 100_000
HOSTILE_ST = {  # name: (file bytes, expected message, whether the reference refuses it too)
    "too short": (b"\x05\x00\x00", r"truncated", True),
    "header length 2**64-1": (st_file(b"{}", length=2**64 - 1), r"above the cap", True),
    "header length 2**40": (st_file(b"{}", length=2**40), r"above the cap", True),
    "header length just above 100 MB": (st_file(b"{}", length=100_000_001), r"above the cap", True),
    "header longer than the file": (st_file(b"{}", length=5000), r"truncated", True),
    "header cut short": (st_file({"a": t()}, b"\0" * 8)[:30], r"truncated", True),
    "data cut short": (st_file({"a": t()}, b"\0" * 5), r"beyond the end", True),
    "overlap": (st_file({"a": t(offsets=(0, 8)), "b": t(offsets=(4, 12))}, b"\0" * 12), r"overlap", True),
    "same bytes twice": (st_file({"a": t(), "b": t()}, b"\0" * 8), r"overlap", True),
    "hole": (st_file({"a": t(offsets=(4, 12))}, b"\0" * 12), r"belong to no tensor", True),
    "trailing bytes": (st_file({"a": t()}, b"\0" * 9), r"after the last tensor", True),
    "shape mismatch": (st_file({"a": t(shape=(3,))}, b"\0" * 8), r"shape \[3\]", True),
    "negative dim": (st_file({"a": t(shape=(-2,))}, b"\0" * 8), r"shape must be", True),
    "bool dim": (st_file({"a": t(shape=(True, 2))}, b"\0" * 8), r"shape must be", True),
    "float dim": (st_file({"a": t(shape=(2.0,))}, b"\0" * 8), r"shape must be", True),
    "shape a string": (st_file({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, b"\0" * 8),
                       r"shape must be", True),
    "65 dims": (st_file({"a": t(shape=(1,) * 65, offsets=(0, 4))}, b"\0" * 4), r"at most 64", False),
    "zero-size but huge": (st_file({"a": t(shape=(0, 2**62), offsets=(0, 0))}), r"above the cap", False),
    "float offsets": (st_file({"a": t(offsets=(0.0, 8.0))}, b"\0" * 8), r"data_offsets must be", True),
    "bool offsets": (st_file({"a": t(dtype="U8", shape=(1,), offsets=(False, True))}, b"\0"),
                     r"data_offsets must be", True),
    "three offsets": (st_file({"a": t(offsets=(0, 8, 8))}, b"\0" * 8), r"data_offsets must be", True),
    "begin after end": (st_file({"a": t(offsets=(8, 0))}, b"\0" * 8), r"data_offsets must be", True),
    "offsets missing": (st_file({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), r"data_offsets must be", True),
    "unknown dtype": (st_file({"a": t(dtype="F128")}, b"\0" * 8), r"unknown dtype 'F128'", True),
    "dtype an int": (st_file({"a": t(dtype=7)}, b"\0" * 8), r"unknown dtype 7", True),
    "tensor not an object": (st_file({"a": [1, 2]}), r"expected an object", True),
    "duplicate tensor": (st_file(b'{"a":' + json.dumps(t()).encode() + b',"a":' + json.dumps(t()).encode()
                                 + b"}", b"\0" * 8), r"'a' occurs twice", False),
    "metadata value an int": (st_file({"__metadata__": {"k": 1}}), r"__metadata__\['k'\]", True),
    "metadata a list": (st_file({"__metadata__": ["k"]}), r"__metadata__ is a list", True),
    "top level a list": (st_file(b"[]"), r"JSON list", True),
    "not UTF-8": (st_file(b'{"\xff":1}'), r"not UTF-8", True),
    "NaN": (st_file({"a": t(shape=(float("nan"),))}, b"\0" * 8), r"NaN is not JSON", True),
    "30-digit integer": (st_file(b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,' + b"9" * 30 + b"]}}"),
                         r"30 digits", True),
    "deep nesting": (st_file(DEEP), r"not valid JSON|holds about", True),
    "too many items": (st_file(b"[" + b"0," * fmt_safetensors.MAX_HEADER_ITEMS + b"0]"), r"JSON items", False),
    "not JSON": (st_file(b"{'a': 1}"), r"not valid JSON", True),
    "BOOL bytes other than 0, 1 READ_ONLY": (st_file({"a": t(dtype="BOOL", shape=(2,), offsets=(0, 2))}, b"\x01\x02"),
                                   r"BOOL tensor holds", False),
}


@pytest.mark.parametrize("case", list(HOSTILE_ST))
def test_st_hostile_files_refused_quickly_in_small_memory(tmp_path, case):
    data, match, reference_refuses = HOSTILE_ST[case]
    path = assert_refused(fmt_safetensors, str(tmp_path / "bad.safetensors"), data, match, case)
    if reference_refuses and safetensors is not None:  # our reading of the spec agrees with the reference's
        with pytest.raises(Exception):
            load_file(path)


def test_st_six_bit_floats_missing_files_and_fifos(tmp_path):
    data = st_file({"w": t(dtype="F6_E2M3", shape=(4,), offsets=(0, 3))}, b"\0" * 3)
    with pytest.raises(UnsupportedValueError, match=r"tensor 'w'.*F6_E2M3"):  # known, but not decodable
        fmt_safetensors.read(put(str(tmp_path / "f6.safetensors"), data))
    with pytest.raises(CheckpointNotFoundError, match="no such file"):
        fmt_safetensors.read(str(tmp_path / "nope.safetensors"))
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    with pytest.raises(CorruptCheckpointError, match="not a regular file"):
        fmt_safetensors.describe(fifo)


# ===================================================================== flax
def test_flax_model_params_and_optax_state(tmp_path):
    import flax.linen as nn
    import optax
    from flax import serialization, traverse_util

    model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(3, param_dtype=jnp.bfloat16)])
    params = model.init(jax.random.PRNGKey(0), jnp.ones((2, 8)))
    opt_state = optax.adam(1e-3).init(params)
    state = {"params": params, "opt_state": opt_state, "step": 7}
    path = put(str(tmp_path / "model.msgpack"), serialization.to_bytes(state))
    size = os.path.getsize(path)
    assert fmt_flax.sniff(size, head_of(path)) and not fmt_safetensors.sniff(size, head_of(path))

    want = traverse_util.flatten_dict(serialization.to_state_dict(state), sep="/")  # drops empty maps
    got = fmt_flax.read(path)
    assert set(got) == set(want)
    assert "opt_state/0/mu/params/layers_0/kernel" in got and "opt_state/0/count" in got
    for k, v in want.items():
        assert_bit_exact(got[k], np.asarray(v) if not isinstance(v, int) else np.int64(v), k)
    table, extra = fmt_flax.describe(path)
    assert [k for k, *_ in table] == list(got) and extra["empty_nodes"] == ["opt_state/1"]  # optax's EmptyState()
    assert ("params/params/layers_2/kernel", "bfloat16", (16, 3), 96) in table


def test_flax_tree_of_every_leaf_kind(tmp_path):
    from flax import serialization

    tree = {"ints": [0, -1, 127, -33, 2**40, -(2**62), 2**64 - 1], "float": 1.25, "neg_zero": -0.0,
            "bool": False, "complex": 1 - 2.5j, "np_scalar": np.float16(3.5), "np_int": np.uint8(200),
            "none": None, "text": "hello", "blob": b"\x00\x01", "empty": {},
            "arrays": {"bf16": random_array(ml_dtypes.bfloat16, (3, 2)), "i4": np.array([-8, 7, 0], ml_dtypes.int4),
                       "f8": random_array(ml_dtypes.float8_e4m3fn, (5,)), "c128": random_array(np.complex128, (2,)),
                       "zero_d": np.array(5, np.int32), "empty": np.zeros((0, 3), np.float32),
                       "bool": np.array([True, False]), "f64": random_array(np.float64, (2, 2, 2))}}
    path = put(str(tmp_path / "tree.msgpack"), serialization.msgpack_serialize(tree))
    got = fmt_flax.read(path)
    for k, v in tree["arrays"].items():
        assert_bit_exact(got[f"arrays/{k}"], v, k)
    for i, v in enumerate(tree["ints"]):
        assert_bit_exact(got[f"ints/{i}"], np.array(v, np.uint64 if v >= 2**63 else np.int64))
    for k, v in {"float": np.array(1.25), "neg_zero": np.array(-0.0), "bool": np.array(False),
                 "complex": np.array(1 - 2.5j), "np_scalar": np.float16(3.5), "np_int": np.uint8(200)}.items():
        assert_bit_exact(got[k], v, k)
    _, extra = fmt_flax.describe(path)
    assert extra == {"none_leaves": ["none"], "empty_nodes": ["empty"],
                     "skipped_leaves": {"text": "str (5 characters)", "blob": "bytes (2 bytes)"}}


def test_flax_int_keys_and_lists_become_path_components(tmp_path):
    tree = {3: {"x": 1.5}, "layers": [{"w": ext_array((2,), "float32", b"\0" * 8)}, 2], -1: True}
    got = fmt_flax.read(put(str(tmp_path / "raw.msgpack"), pack(tree)))  # as msgpack_serialize keeps them
    assert list(got) == ["3/x", "layers/0/w", "layers/1", "-1"]
    assert_bit_exact(got["layers/0/w"], np.zeros(2, np.float32))


def test_flax_chunked_arrays_reassembled(tmp_path, monkeypatch):
    """flax splits arrays above ``flax.serialization.MAX_CHUNK_SIZE`` (2**30 bytes) into
    chunks; the threshold is a module global flax's own _chunk reads, lowered here."""
    from flax import serialization

    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 40)
    tree = {"big": random_array(np.float32, (7, 5)), "odd": random_array(ml_dtypes.bfloat16, (3, 3, 3)),
            "small": np.arange(3, dtype=np.float32)}
    encoded = serialization.msgpack_serialize(tree)
    raw = msgpack.unpackb(encoded, strict_map_key=False)
    assert raw["big"]["__msgpack_chunked_array__"] is True and len(raw["big"]["chunks"]) == 4  # 10+10+10+5
    path = put(str(tmp_path / "chunked.msgpack"), encoded)
    got = fmt_flax.read(path)
    assert set(got) == {"big", "odd", "small"}
    for k, v in tree.items():
        assert_bit_exact(got[k], v, k)
        assert_bit_exact(np.asarray(serialization.msgpack_restore(encoded)[k]), v, k)  # flax agrees
    table, _ = fmt_flax.describe(path)
    assert table[0] == ("big", "float32", (7, 5), 140)


def ext_array(shape, dtype, data, code=1, extra=()):
    return msgpack.ExtType(code, msgpack.packb([list(shape), dtype, data, *extra]))


def pack(tree):
    return msgpack.packb(tree, use_bin_type=True)


def chunked(shape, chunks):
    return {"__msgpack_chunked_array__": True, "shape": {str(i): d for i, d in enumerate(shape)},
            "chunks": {str(i): c for i, c in enumerate(chunks)}}


F4 = np.arange(4, dtype=np.float32)


HOSTILE_FLAX = {  # name: (file bytes, expected message)
    "empty file": (b"", r"does not start with a msgpack map"),
    "top level an array": (pack([1, 2]), r"does not start with a msgpack map"),
    "ext wrong size": (pack({"a": ext_array((2, 3), "float32", b"\0" * 20)}), r"24 bytes, but 20"),
    "ext longer than its array": (pack({"a": msgpack.ExtType(1, pack([[1], "float32", b"\0" * 4]) + b"\0")}),
                                  r"do not end its extension"),
    "ext a 4-list": (pack({"a": ext_array((1,), "float32", b"\0" * 4, extra=(0,))}), r"\[shape, dtype, bytes\]"),
    "ext unknown dtype": (pack({"a": ext_array((1,), "object", b"\0" * 8)}), r"'object' is not in the allow-list"),
    "ext str dtype": (pack({"a": ext_array((1,), "str128", b"\0" * 16)}), r"not in the allow-list"),
    "ext shape not ints": (pack({"a": ext_array((1.0,), "float32", b"\0" * 4)}), r"not integers"),
    "ext 65 dims": (pack({"a": ext_array((1,) * 65, "float32", b"\0" * 4)}), r"at most 64"),
    "ext zero-size but huge": (pack({"a": ext_array((0, 2**62), "float32", b"")}), r"bytes are stored"),
    "ext not a triple": (pack({"a": msgpack.ExtType(1, pack([[1], "float32"]))}), r"\[shape, dtype, bytes\]"),
    "numpy scalar with a shape": (pack({"a": ext_array((2,), "float32", b"\0" * 8, code=3)}), r"expected \[\]"),
    "unknown ext code": (pack({"a": msgpack.ExtType(9, b"xx")}), r"extension code 9"),
    "complex malformed": (pack({"a": msgpack.ExtType(2, pack(["re", "im"]))}), r"not \[real, imag\]|does not decode"),
    "bool array bytes READ_ONLY": (pack({"a": ext_array((2,), "bool", b"\x01\x05")}), r"bytes other than 0 and 1"),
    "deep nesting": (b"\x81\xa1a" * 100_000 + b"\xc0", r"nested deeper than 100"),
    "map32 claims 2**32-1": (b"\xdf\xff\xff\xff\xff\xa1a\xc0", r"claims"),
    "array32 claims 2**32-1": (b"\x81\xa1a\xdd\xff\xff\xff\xff\xc0", r"claims"),
    "str32 claims 2**32-1": (b"\x81\xa1a\xdb\xff\xff\xff\xff", r"above the cap of 1048576"),
    "bin32 claims 2**32-1": (b"\x81\xa1a\xc6\xff\xff\xff\xff", r"claims"),
    "ext32 claims 2**32-1": (b"\x81\xa1a\xc9\xff\xff\xff\xff\x01", r"claims"),
    "key longer than the cap": (b"\x81\xdb" + struct.pack(">I", fmt_flax.MAX_STR + 1) + b"a" * (fmt_flax.MAX_STR + 1)
                                + b"\xc0", r"above the cap"),
    "map16 of 65535 in a tiny file": (b"\xde\xff\xff\xa1a\xc0", r"claims"),
    "truncated map": (b"\x82\xa1a\xc0", r"claims|truncated"),
    "trailing bytes": (pack({"a": 1}) + b"\xc0", r"1 bytes after the end"),
    "duplicate keys": (b"\x82\xa1a\x01\xa1a\x02", r"'a' occurs twice"),
    "key a map": (b"\x81\x80\x01", r"is not a str or int"),
    "key nil": (b"\x81\xc0\x01", r"is not a str or int"),
    "never-used byte 0xc1": (b"\x81\xa1a\xc1", r"0xc1"),
    "key not UTF-8": (b"\x81\xa1\xff\x01", r"not UTF-8"),
    "flattened keys collide": (pack({"a/b": 1, "a": {"b": 2}}), r"flatten to the key 'a/b'"),
    "chunked: extra key": (pack({"a": {**chunked((4,), [ext_array((4,), "float32", F4.tobytes())]), "x": 1}}),
                           r"expected exactly the keys"),
    "chunked: flag not True": (pack({"a": {**chunked((4,), [ext_array((4,), "float32", F4.tobytes())]),
                                           "__msgpack_chunked_array__": 1}}), r"expected exactly the keys"),
    "chunked: total mismatch": (pack({"a": chunked((5,), [ext_array((4,), "float32", F4.tobytes())])}),
                                r"hold 4 elements, shape \[5\] has 5"),
    "chunked: 2-d chunk": (pack({"a": chunked((4,), [ext_array((2, 2), "float32", F4.tobytes())])}), r"1-d"),
    "chunked: dtypes differ": (pack({"a": chunked((6,), [ext_array((4,), "float32", F4.tobytes()),
                                                         ext_array((2,), "int32", b"\0" * 8)])}),
                               r"different dtypes"),
    "chunked: shape keys": (pack({"a": {"__msgpack_chunked_array__": True, "shape": {"1": 4},
                                        "chunks": {"0": ext_array((4,), "float32", F4.tobytes())}}}),
                            r"keyed '0', '1'"),
    "chunked: zero-size but huge": (pack({"a": chunked((0, 2**62), [ext_array((0,), "float32", b"")])}),
                                    r"shape \[0, 4611686018427387904\]"),
    "chunked: no chunks": (pack({"a": chunked((4,), [])}), r"hold 0 elements"),
}


@pytest.mark.parametrize("case", list(HOSTILE_FLAX))
def test_flax_hostile_files_refused_quickly_in_small_memory(tmp_path, case):
    data, match = HOSTILE_FLAX[case]
    assert_refused(fmt_flax, str(tmp_path / "bad.msgpack"), data, match, case)


@pytest.mark.parametrize("fmt", [fmt_flax, fmt_safetensors])
def test_every_truncation_and_random_damage_refused_with_our_errors(tmp_path, fmt):
    from flax import serialization
    tree = {"params": {"w": np.arange(64, dtype=np.float32).reshape(8, 8), "b": np.ones(8, ml_dtypes.bfloat16)},
            "step": 3, "opt": [{"mu": np.array([True, False]), "c": 1 + 2j, "s": np.float16(2)}, {}], "t": "x"}
    path = str(tmp_path / "f")
    if fmt is fmt_flax:
        put(path, serialization.to_bytes(tree))
    else:
        fmt.write(path, [("w", tree["params"]["w"]), ("b", tree["params"]["b"]), ("m", tree["opt"][0]["mu"])])
    with open(path, "rb") as f:
        data = f.read()
    for cut in range(len(data)):
        with pytest.raises(CorruptCheckpointError):
            fmt.read(put(path, data[:cut]))
    rng = np.random.default_rng(1)
    for _ in range(300):  # random bytes replaced: refused with our errors or read, never another exception
        damaged = bytearray(data)
        damaged[rng.integers(len(data))] = rng.integers(256)
        try:
            fmt.read(put(path, bytes(damaged)))
        except (CorruptCheckpointError, UnsupportedValueError):
            pass


def test_flax_value_count_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(fmt_flax, "MAX_NODES", 1000)
    path = put(str(tmp_path / "wide.msgpack"), pack({str(i): i for i in range(2000)}))
    with pytest.raises(CorruptCheckpointError, match="more than 1000 values"):
        fmt_flax.describe(path)


# ===================================================================== sniffing
@needs_reference
def test_sniff_tells_the_formats_apart(tmp_path):
    from jaxckpt import format as ckformat

    # a safetensors file whose header length's low byte (0x88) is a msgpack fixmap header
    buf = np.arange(6, dtype=np.uint8)
    st = str(tmp_path / "a.safetensors")
    for n in range(8, 200):
        safetensors.serialize_file({"y": safetensors.TensorSpec(dtype="uint8", shape=[6], data_ptr=buf.ctypes.data,
                                                                data_len=6)}, st, metadata={"a": "b" * n})
        if 0x80 <= head_of(st)[0] <= 0x8f:
            break
    assert 0x80 <= head_of(st)[0] <= 0x8f
    size = os.path.getsize(st)
    assert fmt_safetensors.sniff(size, head_of(st)) and not fmt_flax.sniff(size, head_of(st))

    manifest = ckformat.encode_manifest(ckformat.Manifest(1, "jaxckpt", 0.0, 4096, (), {"t": "none"}, (), None))
    mf = put(str(tmp_path / "manifest.msgpack"), manifest)
    assert not fmt_flax.sniff(len(manifest), manifest) and not fmt_safetensors.sniff(len(manifest), manifest)

    for name, data in {"empty": b"", "text": b"hello world", "npy": b"\x93NUMPY\x01\x00",
                       "map with a float key": b"\x81\xcb" + b"\0" * 8}.items():
        p = put(str(tmp_path / name), data)
        assert not fmt_flax.sniff(len(data), data) and not fmt_safetensors.sniff(len(data), data), name
    empty_state = put(str(tmp_path / "empty.msgpack"), b"\x80")
    assert fmt_flax.sniff(1, b"\x80") and fmt_flax.read(empty_state) == {}
    assert (fmt_safetensors.NAME, fmt_flax.NAME, fmt_safetensors.INSTALL, fmt_flax.INSTALL) == (
        "safetensors", "flax", None, None)
