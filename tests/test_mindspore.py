"""jaxckpt.fmt_mindspore: MindSpore .ckpt files, against files MindSpore 2.10 wrote (tests/data/mindspore,
made by make.py there) and against hostile ones."""

from __future__ import annotations

import json
import os
import sys
import tracemalloc
import zlib

import ml_dtypes
import numpy as np
import pytest

from jaxckpt import fmt_mindspore as ms
from jaxckpt import fmt_mindspore_crypto as crypto
from jaxckpt import fmt_mindspore_write as msw
from jaxckpt.errors import (CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, DecryptionError,
                            UnsupportedValueError)

DATA = os.path.join(os.path.dirname(__file__), "data", "mindspore")
with open(os.path.join(DATA, "expected.json"), encoding="utf-8") as _f:
    EXPECTED = json.load(_f)
CKPTS = sorted(name for name in EXPECTED["files"] if name.endswith(".ckpt"))
MODES = {"AES-GCM": (16, 24, 32), "AES-CBC": (16, 24, 32), "SM4-CBC": (16,)}


def _kwargs(name: str) -> dict:
    kw = EXPECTED["files"][name]["load_kwargs"]
    return {"dec_key": bytes.fromhex(kw["dec_key"]), "dec_mode": kw["dec_mode"]} if "dec_key" in kw else {}


def _bits(a: np.ndarray) -> bytes:
    return np.asarray(a, order="C").tobytes()


def _values() -> dict[str, np.ndarray]:
    f = np.array([[0.0, -0.0, 1.5, -2.25], [np.inf, -np.inf, np.nan, 5e-324]])
    out = {"f16": f.astype(np.float16), "f32": f.astype(np.float32), "f64": f, "bf16": f.astype(ml_dtypes.bfloat16),
           "bool": np.array([[True, False, True]]), "scalar": np.array(-1.25, np.float32), "u8_0d": np.uint8(200),
           "empty": np.zeros((3, 0, 2), np.int16), "note": np.array("héllo ✓")}
    for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64):
        out[np.dtype(t).name] = np.array([np.iinfo(t).min, np.iinfo(t).max, 0, 1], dtype=t).reshape(2, 1, 2)
    return out


def _same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k, w in want.items():
        w = np.asarray(w)
        assert got[k].dtype == w.dtype.newbyteorder("=") and got[k].shape == w.shape, k
        assert _bits(got[k]) == _bits(w.astype(w.dtype.newbyteorder("="))), k


# --------------------------------------------------------------------- MindSpore's own files
@pytest.mark.parametrize("name", CKPTS)
def test_fixture_matches_what_mindspore_loaded(name):
    entry, path = EXPECTED["files"][name], os.path.join(DATA, name)
    got = ms.read(path, **_kwargs(name))
    assert list(got) == entry["order"]
    with np.load(os.path.join(DATA, "expected", name + ".npz")) as want:
        for key in entry["order"]:
            arr, dtype = got[key], entry["dtypes"][key]
            assert list(arr.shape) == entry["shapes"][key], key
            if dtype == "str":
                assert arr.dtype.kind == "U" and str(arr) == str(want[key]), key
            elif dtype == "bfloat16":
                assert arr.dtype == ml_dtypes.bfloat16 and _bits(arr) == _bits(want[key]), key
            else:
                assert arr.dtype == np.dtype(dtype) and _bits(arr) == _bits(want[key]), key
    streamed = list(ms.iter_tensors(path, **_kwargs(name)))
    assert [k for k, _ in streamed] == entry["order"]
    assert [(i.name, i.dtype, i.shape, i.nbytes) for i in ms.describe(path, **_kwargs(name))] == \
        [(k, a.dtype, a.shape, a.nbytes) for k, a in got.items()]


def test_fixtures_cover_the_issue():
    train = EXPECTED["files"]["net-1_6.ckpt"]["order"]
    assert {"global_step", "bn.moving_mean", "bn.moving_variance", "moments.dense.weight"} <= set(train)
    dtypes = set(EXPECTED["files"]["dtypes.ckpt"]["dtypes"].values())
    assert dtypes == {"float16", "float32", "float64", "bfloat16", "bool", "int8", "int16", "int32", "int64",
                      "uint8", "uint16", "uint32", "uint64", "str"}
    assert EXPECTED["files"]["dtypes.ckpt"]["shapes"]["scalar_f32"] == []
    assert {"epoch", "step", "lr"} <= set(EXPECTED["files"]["append.ckpt"]["order"])
    ours = EXPECTED["ours_loaded_by_mindspore"]  # files our writer made, loaded by MindSpore (make.py verify)
    assert len(ours) >= 10 and {v["result"] for v in ours.values()} == {"loaded, all values bit-exact"}
    assert {v["load_kwargs"].get("dec_mode") for v in ours.values()} >= {"AES-CBC", "SM4-CBC"}
    assert EXPECTED["big_slices"]["mindspore_loaded_ours"] == "bit-exact"
    assert sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(DATA) for f in fs) < 2 << 20


def test_sliced_fixtures_have_slices_and_blocks():
    for name in ("sliced.ckpt", "sliced_split.ckpt"):  # raw 1 KiB chunks; np.array_split with empty slices
        with open(os.path.join(DATA, name), "rb") as f:
            assert len(_tiny_decode(f.read())) > 10
        assert ms.read(os.path.join(DATA, name))["big"].shape == (64, 40)
    with open(os.path.join(DATA, "enc_gcm_blocks.ckpt"), "rb") as f:
        assert f.read().count((0x7F3A5ED8).to_bytes(4, "little")) >= 16


def test_sniff():
    for name in CKPTS + ["enc_crc.ckpt"]:
        with open(os.path.join(DATA, name), "rb") as f:
            assert ms.sniff(f.read(4096)), name
            f.seek(0)
            assert ms.sniff(f.read(12)), name
    for name in ("net.safetensors", "expected.json", "make.py", "expected/dtypes.ckpt.npz"):
        with open(os.path.join(DATA, name), "rb") as f:
            assert not ms.sniff(f.read(4096)), name
    assert not any(ms.sniff(h) for h in (b"", b"\x0a", b"\x0a\x05\x12\x00", b"\x0a\x03\x0a\x05abc", b"\x89PNG\r\n"))


def test_mindspore_crc_with_encryption_is_refused_clearly():
    key = bytes.fromhex(EXPECTED["not_loadable"]["enc_crc.ckpt"]["dec_key"])
    with pytest.raises(CorruptCheckpointError, match="crc_num trailer follows the blocks"):
        ms.read(os.path.join(DATA, "enc_crc.ckpt"), dec_key=key)


# --------------------------------------------------------------------- our writer
ROUND_TRIPS = [{}, {"crc_check": True}, {"slice_bytes": 7}, {"slice_bytes": 64, "crc_check": True}] + [
    {"enc_key": bytes(range(n)), "enc_mode": m} for m, ns in MODES.items() for n in ns] + [
    {"enc_key": bytes(range(16)), "enc_mode": m, "block_bytes": 100, "slice_bytes": 50} for m in MODES]


@pytest.mark.parametrize("kw", ROUND_TRIPS, ids=lambda kw: ",".join(f"{k}={v if k != 'enc_key' else len(v)}"
                                                                      for k, v in kw.items()) or "plain")
def test_round_trip_every_dtype(tmp_path, kw):
    path, vals = tmp_path / "x.ckpt", _values()
    msw.write(path, vals.items(), **kw)
    dec = {"dec_key": kw["enc_key"], "dec_mode": kw["enc_mode"]} if "enc_key" in kw else {}
    got = ms.read(path, **dec)
    _same(got, vals)
    assert got["bf16"].dtype == ml_dtypes.bfloat16 and got["scalar"].shape == () and str(got["note"]) == "héllo ✓"
    assert all(a.flags.c_contiguous and a.flags.aligned for a in got.values())
    with open(path, "rb") as f:
        assert ms.sniff(f.read(64))
    assert not [p for p in os.listdir(tmp_path) if p != "x.ckpt"]  # the temporary file is gone


@pytest.mark.parametrize("kw", ROUND_TRIPS, ids=lambda kw: ",".join(f"{k}={v if k != 'enc_key' else len(v)}"
                                                                      for k, v in kw.items()) or "plain")
def test_a_layout_gives_the_exact_size_before_the_first_byte(tmp_path, kw, monkeypatch):
    """With ``layout`` the writer announces the file's size (what lets a bucket
    stream it up); the bytes are those written without it (same size and
    content when encrypted: the IVs differ)."""
    vals = {k: v for k, v in _values().items() if k != "note"}
    layout = [(k, np.asarray(v).dtype, np.asarray(v).shape) for k, v in vals.items()]
    sizes, write_file = [], msw.storage.write_file
    monkeypatch.setattr(msw.storage, "write_file", lambda p, fill, size=None: (sizes.append(size),
                                                                               write_file(p, fill, size))[1])
    msw.write(tmp_path / "plain.ckpt", vals.items(), **kw)
    msw.write(tmp_path / "laid.ckpt", vals.items(), layout=layout, **kw)
    plain, laid = (tmp_path / "plain.ckpt").read_bytes(), (tmp_path / "laid.ckpt").read_bytes()
    assert sizes == [None, len(laid)] and len(plain) == len(laid)
    if "enc_key" not in kw:
        assert plain == laid
    else:
        _same(ms.read(tmp_path / "laid.ckpt", dec_key=kw["enc_key"], dec_mode=kw["enc_mode"]), vals)
    # A str's bytes depend on its value: a layout holding one announces no size (the file is staged).
    notes = [("w", np.arange(3.0)), ("note", np.array("héllo ✓"))]
    msw.write(tmp_path / "note.ckpt", notes, layout=[(k, v.dtype, v.shape) for k, v in notes], **kw)
    assert sizes[-1] is None


def test_items_that_differ_from_the_layout_write_nothing(tmp_path):
    items = [("a", np.zeros(4, np.float32)), ("b", np.ones((2, 2), np.int8))]
    layout = [("a", "float32", (4,)), ("b", "int8", (2, 2))]
    for bad, why in [(layout[::-1], "tensor 'a' (float32[4]) came where the layout announced 'b' (int8[2, 2])"),
                     ([("a", "float32", (4,)), ("b", "int8", (4,))],
                      "tensor 'b' (int8[2, 2]) came where the layout announced 'b' (int8[4])"),
                     (layout[:1], "tensor 'b' (int8[2, 2]) came where the layout announced nothing more"),
                     (layout + [("c", "bool", ())], "tensors never given: ['c']")]:
        with pytest.raises(UnsupportedValueError) as e:
            msw.write(tmp_path / "x.ckpt", items, layout=bad)
        assert str(e.value) == why
        assert os.listdir(tmp_path) == []  # neither the file nor a temporary one


@pytest.mark.parametrize("mode", list(MODES))
def test_sealed_size_is_what_the_block_writer_writes(mode):
    import io
    for block in (16, 100, 4096):
        for n in (0, 1, 15, 16, 17, block - 1, block, block + 1, 3 * block + 5):
            f = io.BytesIO()
            w = crypto.BlockWriter(f, bytes(16), mode, block)
            w.write(bytes(n))
            w.flush()
            assert crypto.sealed_size(n, mode, block) == len(f.getvalue()), (block, n)


def test_many_records_across_read_buffers(tmp_path):
    """Records and varints straddle the reader's 64 KiB look-ahead and the encrypted blocks."""
    rng = np.random.default_rng(0)
    vals = {f"p{i}." + "n" * int(rng.integers(0, 300)): rng.integers(0, 255, int(rng.integers(1, 3000)), np.uint8)
            for i in range(300)}
    vals["big"] = rng.normal(size=70_000)
    for kw, dec in (({}, {}), ({"crc_check": True}, {}), ({"enc_key": bytes(16), "block_bytes": 40_000},
                                                           {"dec_key": bytes(16)})):
        msw.write(tmp_path / "m.ckpt", vals.items(), slice_bytes=100_000, **kw)
        _same(ms.read(tmp_path / "m.ckpt", **dec), {k: v for k, v in vals.items()})


@pytest.mark.parametrize("left", range(1, 12))
def test_varint_across_the_look_ahead(tmp_path, left):
    """A first record that leaves ``left`` bytes of the first look-ahead: the next key and length straddle it."""
    n = ms._LOOKAHEAD - left - 26  # 26: the framing of a record with a 1-byte tag and 3-byte varints
    msw.write(tmp_path / "v.ckpt", [("a", np.ones(n, np.uint8)), ("b", np.arange(3, dtype=np.int64))])
    data = (tmp_path / "v.ckpt").read_bytes()
    assert data[ms._LOOKAHEAD - left:ms._LOOKAHEAD - left + 1] == b"\x0a"
    got = ms.read(tmp_path / "v.ckpt")
    assert got["a"].shape == (n,) and got["b"].tolist() == [0, 1, 2]


def test_writer_normalises_inputs(tmp_path):
    vals = {"be": np.arange(6, dtype=">i4").reshape(2, 3), "strided": np.arange(40.0).reshape(5, 8)[::2, 1::3],
            "fortran": np.asfortranarray(np.arange(6, dtype=np.int8).reshape(2, 3)), "py": 3, "s": "x"}
    msw.write(tmp_path / "x.ckpt", vals.items())
    got = ms.read(tmp_path / "x.ckpt")
    assert got["be"].dtype == np.int32 and got["be"].tolist() == vals["be"].tolist()
    assert got["strided"].tolist() == vals["strided"].tolist() and got["fortran"].tolist() == vals["fortran"].tolist()
    assert got["py"].shape == () and int(got["py"]) == 3 and str(got["s"]) == "x"


def _tiny_decode(buf: bytes) -> list[tuple[str, list[int], str, bytes]]:
    """An independent protobuf-wire decoder for Checkpoint/Value/TensorProto (no unknown fields)."""
    def varint(b, i):
        shift = n = 0
        while True:
            n, i, shift = n | (b[i] & 0x7F) << shift, i + 1, shift + 7
            if b[i - 1] < 0x80:
                return n, i

    def fields(b):
        i, out = 0, []
        while i < len(b):
            key, i = varint(b, i)
            if (key & 7) == 0:
                v, i = varint(b, i)
            else:
                n, i = varint(b, i)
                v, i = b[i:i + n], i + n
            out.append((key >> 3, v))
        return out

    recs = []
    for _, value in fields(buf):
        v = dict(fields(value))
        t = fields(v[2])
        recs.append((v[1].decode(), [x for f, x in t if f == 1], dict(t)[2].decode(), dict(t)[3]))
    return recs


def test_layout_by_an_independent_decoder(tmp_path):
    msw.write(tmp_path / "x.ckpt", [("w", np.arange(6, dtype=np.float32).reshape(2, 3)), ("s", np.int64(-5)),
                                   ("t", np.array("ab")), ("sl", np.arange(30, dtype=np.int16))], slice_bytes=24)
    with open(tmp_path / "x.ckpt", "rb") as f:
        recs = _tiny_decode(f.read())
    assert recs == [("w", [2, 3], "Float32", np.arange(6, dtype="<f4").tobytes()),
                    ("s", [], "Int64", np.int64(-5).astype("<i8").tobytes()),
                    ("t", [0], "str", "ab".encode("utf-32-le")),
                    *[("sl", [30], "Int16", np.arange(30, dtype="<i2").tobytes()[i:i + 24]) for i in (0, 24, 48)]]


def test_layout_by_protobuf_itself(tmp_path):
    pytest.importorskip("google.protobuf")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    fdp = descriptor_pb2.FileDescriptorProto(name="jaxckpt_test_checkpoint.proto", package="jaxckpt_test")
    F = descriptor_pb2.FieldDescriptorProto
    specs = {"TensorProto": [("dims", 1, F.TYPE_INT64, F.LABEL_REPEATED, None), ("tensor_type", 2, F.TYPE_STRING,
             F.LABEL_REQUIRED, None), ("tensor_content", 3, F.TYPE_BYTES, F.LABEL_REQUIRED, None)],
             "Value": [("tag", 1, F.TYPE_STRING, F.LABEL_REQUIRED, None),
                       ("tensor", 2, F.TYPE_MESSAGE, F.LABEL_OPTIONAL, ".jaxckpt_test.TensorProto")],
             "Checkpoint": [("value", 1, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".jaxckpt_test.Value")]}
    for msg, fs in specs.items():
        m = fdp.message_type.add(name=msg)
        for name, num, typ, label, type_name in fs:
            m.field.add(name=name, number=num, type=typ, label=label, **({"type_name": type_name} if type_name else {}))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    Checkpoint = message_factory.GetMessageClass(pool.FindMessageTypeByName("jaxckpt_test.Checkpoint"))
    msw.write(tmp_path / "x.ckpt", [("a.b", np.arange(4, dtype=np.uint8)), ("c", np.float64(2.0))])
    ckpt = Checkpoint.FromString((tmp_path / "x.ckpt").read_bytes())
    assert [(v.tag, list(v.tensor.dims), v.tensor.tensor_type, v.tensor.tensor_content) for v in ckpt.value] == \
        [("a.b", [4], "UInt8", b"\0\1\2\3"), ("c", [], "Float64", np.float64(2.0).tobytes())]
    # and ours reads what protobuf writes
    v = ckpt.value.add(tag="z")
    v.tensor.dims.extend([2, 1])
    v.tensor.tensor_type, v.tensor.tensor_content = "Int8", b"\x01\xff"
    (tmp_path / "y.ckpt").write_bytes(ckpt.SerializeToString())
    got = ms.read(tmp_path / "y.ckpt")
    assert list(got) == ["a.b", "c", "z"] and got["z"].tolist() == [[1], [-1]]


@pytest.mark.parametrize("value, what", [
    (np.ones(2, np.complex64), "complex64"), (np.ones(2, "datetime64[s]"), "datetime64"), (np.array([b"x"]), "S1"),
    (np.array([None], dtype=object), "object"), (np.zeros((0,), np.float32), r"shape \(0,\)"),
    (np.array(["a", "b"]), "str only as a single value")])
def test_writer_refuses_what_mindspore_cannot_hold(tmp_path, value, what):
    with pytest.raises(UnsupportedValueError, match=f"'bad'.*{what}|{what}.*'bad'|'bad'"):
        msw.write(tmp_path / "x.ckpt", [("ok", np.ones(2)), ("bad", value)])
    assert not os.listdir(tmp_path)  # nothing half-written is left, not even the temporary file


def test_writer_is_atomic_and_checks_options(tmp_path):
    path = tmp_path / "x.ckpt"
    msw.write(path, [("a", np.ones(3))])
    before = path.read_bytes()

    def failing():
        yield "b", np.ones(3)
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError):
        msw.write(path, failing())
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["x.ckpt"]
    for bad in ([("a", 1), ("a", 2)], [(3, np.ones(1))], [("", np.ones(1))]):
        with pytest.raises(UnsupportedValueError):
            msw.write(path, bad)
    for kw in ({"enc_key": b"k" * 15}, {"enc_key": "k" * 16}, {"enc_key": b"k" * 24, "enc_mode": "SM4-CBC"},
               {"enc_key": b"k" * 16, "enc_mode": "AES-CTR"}, {"enc_key": b"k" * 16, "crc_check": True},
               {"slice_bytes": 0}, {"enc_key": b"k" * 16, "block_bytes": 65 << 20}):
        with pytest.raises(ValueError):
            msw.write(path, [("a", np.ones(1))], **kw)
    assert path.read_bytes() == before


# --------------------------------------------------------------------- keys and modes
def _enc_file(tmp_path, mode="AES-GCM", n=16, **kw):
    path = tmp_path / f"{mode}.ckpt"
    msw.write(path, [("w", np.arange(50, dtype=np.float32)), ("b", np.int32(3))], enc_key=bytes(range(n)),
             enc_mode=mode, **kw)
    return path, bytes(range(n))


@pytest.mark.parametrize("mode", MODES)
def test_key_errors(tmp_path, mode):
    path, key = _enc_file(tmp_path, mode)
    with pytest.raises(DecryptionError, match=f"encrypted \\({mode}\\); pass dec_key"):
        ms.read(path)
    with pytest.raises(DecryptionError, match="key is wrong"):
        ms.read(path, dec_key=bytes(reversed(key)), dec_mode=mode)
    with pytest.raises(DecryptionError, match="wrong key"):
        ms.read(path, dec_key=key + b"x", dec_mode=mode)
    other = "AES-CBC" if mode != "AES-CBC" else "AES-GCM"
    with pytest.raises(DecryptionError, match=f"encrypted with {mode}, but dec_mode is '{other}'"):
        ms.read(path, dec_key=key, dec_mode=other)
    with pytest.raises(ValueError):
        ms.read(path, dec_key=key, dec_mode="AES-XYZ")
    msw.write(tmp_path / "plain.ckpt", [("a", np.ones(1))])
    with pytest.raises(DecryptionError, match="not encrypted"):
        ms.read(tmp_path / "plain.ckpt", dec_key=key, dec_mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_wrong_key_is_found_on_the_first_block(tmp_path, mode, monkeypatch):
    path = tmp_path / "big.ckpt"
    msw.write(path, [("w", np.zeros(1 << 20, np.float32))], enc_key=bytes(16), enc_mode=mode, block_bytes=1 << 16)
    calls = []
    real = crypto._decrypt_block
    monkeypatch.setattr(crypto, "_decrypt_block", lambda *a: calls.append(1) or real(*a))
    with pytest.raises(DecryptionError):
        ms.read(path, dec_key=b"\x01" * 16, dec_mode=mode)
    assert len(calls) == 1  # 64 blocks in the file; one was decrypted


def test_missing_file_and_missing_cryptography(tmp_path, monkeypatch):
    with pytest.raises(CheckpointNotFoundError):
        ms.read(tmp_path / "nope.ckpt")
    path, key = _enc_file(tmp_path)
    for mod in [m for m in sys.modules if m == "cryptography" or m.startswith("cryptography.")]:
        monkeypatch.setitem(sys.modules, mod, None)
    for call in (lambda: ms.read(path, dec_key=key), lambda: msw.write(tmp_path / "e.ckpt", [], enc_key=key)):
        with pytest.raises(UnsupportedValueError, match=r"pip install 'jaxckpt\[mindspore\]'"):
            call()


# --------------------------------------------------------------------- damage
def _small(tmp_path, **kw):
    path = tmp_path / "s.ckpt"
    msw.write(path, [("a", np.arange(3, dtype=np.int16)), ("bb", np.float32(1.5)), ("c", np.array([True, False]))],
             **kw)
    return path, path.read_bytes()


def _outcome(path, allowed=(CorruptCheckpointError, DecryptionError), **kw):
    """read()'s result, or the type of the error it raised (anything not ``allowed`` fails the test)."""
    try:
        return ms.read(path, **kw)
    except allowed as e:
        assert str(path) in str(e)
        return type(e)


def test_truncation(tmp_path):
    path, data = _small(tmp_path, crc_check=True)
    want, ends = ms.read(path), []
    for n in range(len(data)):
        path.write_bytes(data[:n])
        got = _outcome(path)
        if isinstance(got, dict):  # only at a record boundary, as a prefix of the tensors
            assert list(got) == list(want)[:len(got)] and all(_bits(got[k]) == _bits(want[k]) for k in got), n
            ends.append(n)
    assert len(ends) <= 4  # 0 bytes and the ends of the three records
    for mode in MODES:
        path, data = _enc_file(tmp_path, mode, block_bytes=64)
        key = bytes(range(16))
        for n in range(1, len(data)):
            (tmp_path / "t.ckpt").write_bytes(data[:n])
            got = _outcome(tmp_path / "t.ckpt", dec_key=key, dec_mode=mode)
            assert not isinstance(got, dict) or list(got) == ["w"] or got == {}, (mode, n)


def test_every_bit_flip_of_a_crc_file_is_caught(tmp_path):
    path, data = _small(tmp_path, crc_check=True)
    for i in range(len(data)):
        for bit in range(8):
            path.write_bytes(data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1:])
            assert _outcome(path) is CorruptCheckpointError, (i, bit)


def test_every_bit_flip_of_a_gcm_file_is_caught(tmp_path):
    """...but for the last 4 bytes of each block's stored 16-byte IV, which MindSpore's AES-GCM never uses
    (it uses a 12-byte nonce): flipping them changes nothing."""
    path, data = _small(tmp_path, enc_key=bytes(16), block_bytes=20)
    want, unused, at = ms.read(path, dec_key=bytes(16)), set(), 0
    while at < len(data):  # block: magic, tag, size, 16, IV, length, ciphertext
        unused.update(range(at + 40, at + 44))
        at += 24 + int.from_bytes(data[at + 20:at + 24], "little")
    for i in range(len(data)):
        for bit in range(8):
            path.write_bytes(data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1:])
            got = _outcome(path, dec_key=bytes(16))
            if i in unused:
                _same(got, want)
            else:
                assert got in (CorruptCheckpointError, DecryptionError), (i, bit)


@pytest.mark.parametrize("kw", [{}, {"enc_key": bytes(16), "enc_mode": "AES-CBC"}])
def test_bit_flips_without_integrity_never_crash(tmp_path, kw):
    """Plain files without crc and CBC have no integrity check: a flip in a value is a wrong value, as for
    MindSpore; but no flip raises anything but a CheckpointError."""
    path, data = _small(tmp_path, **kw)
    dec = {"dec_key": kw["enc_key"], "dec_mode": kw["enc_mode"]} if kw else {}
    for i in range(len(data)):
        for bit in range(8):
            path.write_bytes(data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1:])
            _outcome(path, (CorruptCheckpointError, DecryptionError, UnsupportedValueError), **dec)


def test_fixture_bit_flips(tmp_path):
    for name in ("crc.ckpt", "enc_gcm.ckpt"):
        with open(os.path.join(DATA, name), "rb") as f:
            data = f.read()
        for i in range(0, len(data), 13):
            (tmp_path / name).write_bytes(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:])
            assert _outcome(tmp_path / name, **_kwargs(name)) in (CorruptCheckpointError, DecryptionError), (name, i)


# --------------------------------------------------------------------- hostile files
def _uv(n: int) -> bytes:
    out = b""
    while n >= 0x80:
        out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
    return out + bytes([n])


def _ld(field: int, data: bytes) -> bytes:
    return _uv(field << 3 | 2) + _uv(len(data)) + data


def _rec(tag=b"x", dims=(2,), ttype=b"Float32", content=b"\0" * 8, extra=b"") -> bytes:
    tensor = b"".join(b"\x08" + _uv(d) for d in dims) + _ld(2, ttype) + _ld(3, content) + extra
    return _ld(1, _ld(1, tag) + _ld(2, tensor))


HOSTILE = {
    "huge record length": b"\x0a" + _uv(1 << 62) + b"\0" * 20,
    "record longer than the file": b"\x0a" + _uv(10 ** 9) + b"\0" * 20,
    "varint of 11 bytes": b"\x0a" + b"\xff" * 10 + b"\x01",
    "varint above 2**64": b"\x0a" + b"\xff" * 9 + b"\x7f",
    "field of 10^9 bytes in a record": _ld(1, _ld(1, b"x") + b"\x12" + _uv(10 ** 9) + b"\0" * 8),
    "dims overflow": _rec(dims=(1 << 40, 1 << 40, 1 << 40)),
    "dims product above the file": _rec(dims=(1 << 20, 1 << 20)),
    "negative dims": _rec(dims=((1 << 64) - 1,)),
    "packed dims claiming 10^9 entries": _ld(1, _ld(1, b"x") + _ld(2, b"\x0a" + _uv(10 ** 9) + b"\x01" * 10)),
    "1000 packed dims": _ld(1, _ld(1, b"x") + _ld(2, _ld(1, b"\x01" * 1000) + _ld(2, b"Int8") + _ld(3, b"\1"))),
    "1000 dims": _rec(dims=(1,) * 1000, ttype=b"Int8", content=b"\1"),
    "content short": _rec(content=b"\0" * 7),
    "content long": _rec(content=b"\0" * 9),
    "unknown type": _rec(ttype=b"Float31"),
    "type name too long": _rec(ttype=b"F" * 100),
    "tag not UTF-8": _rec(tag=b"\xff\xfe"),
    "tag above the cap": _rec(tag=b"t" * ((1 << 16) + 1)),
    "no tag": _ld(1, _ld(2, _ld(2, b"Int8") + _ld(3, b"\0"))),
    "no tensor": _ld(1, _ld(1, b"x")),
    "no content": _ld(1, _ld(1, b"x") + _ld(2, _ld(2, b"Int8"))),
    "group wire type": _rec() + b"\x0b",
    "field number 0": _rec() + b"\x02\x00",
    "record with wire type 0": b"\x08\x01",
    "twice, apart": _rec() + _rec(tag=b"y") + _rec(),
    "slice disagrees": _rec(content=b"\0" * 4) + _rec(dims=(3,), content=b"\0" * 4),
    "bool not 0/1": _rec(ttype=b"Bool", dims=(1,), content=b"\x07"),
    "str not 4-byte": _rec(ttype=b"str", dims=(0,), content=b"abc"),
    "str sliced": _rec(ttype=b"str", dims=(0,), content=b"a\0\0\0") * 2,
    "dims [0] and no content": _rec(dims=(0,), content=b""),
    "bad crc": _rec() + b"crc_num" + (12345).to_bytes(10, "big"),
    "crc above 32 bits": _rec() + b"crc_num" + (1 << 70).to_bytes(10, "big"),
}


@pytest.mark.parametrize("name", HOSTILE)
@pytest.mark.timeout(20)  # a hang fails here; speed itself is not asserted (shared machines)
def test_hostile_file_is_refused_fast_in_small_memory(tmp_path, name):
    path = tmp_path / "h.ckpt"
    path.write_bytes(HOSTILE[name])
    tracemalloc.start()
    try:
        for call in (ms.read, ms.describe):
            with pytest.raises(CorruptCheckpointError) as e:
                call(path)
            assert str(path) in str(e.value)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < len(HOSTILE[name]) * 4 + (4 << 20), peak


def test_hostile_encrypted_headers(tmp_path):
    path, key = _enc_file(tmp_path)
    data = path.read_bytes()
    i32 = lambda n: n.to_bytes(4, "little", signed=True)  # noqa: E731
    for size in (0, -5, 1 << 30, (1 << 31) - 1, 24 + len(data)):
        bad = data[:20] + i32(size) + data[24:]
        (tmp_path / "h.ckpt").write_bytes(bad)
        with pytest.raises(CorruptCheckpointError, match="claims|truncated"):
            ms.read(tmp_path / "h.ckpt", dec_key=key)
    for at, value in ((24, 12), (44, 3)):  # the IV length; the ciphertext length
        (tmp_path / "h.ckpt").write_bytes(data[:at] + i32(value) + data[at + 4:])
        with pytest.raises(CorruptCheckpointError, match="inconsistent"):
            ms.read(tmp_path / "h.ckpt", dec_key=key)
    (tmp_path / "h.ckpt").write_bytes(data + data[:30])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        ms.read(tmp_path / "h.ckpt", dec_key=key)


def test_caps_on_records_and_unsupported_types(tmp_path, monkeypatch):
    monkeypatch.setattr(ms, "MAX_RECORDS", 100)
    path = tmp_path / "many.ckpt"
    path.write_bytes(b"".join(_rec(tag=b"t%d" % i, dims=(1,), ttype=b"Int8", content=b"\1") for i in range(101)))
    with pytest.raises(CorruptCheckpointError, match="more than 100 records"):
        ms.read(path)
    for ttype, what in ((b"Int4", "Int4"), (b"Complex64", "Complex64")):
        path.write_bytes(_rec(ttype=ttype, dims=(1,), content=b"\0" * 8))
        with pytest.raises(UnsupportedValueError, match=f"tensor 'x'.*{what}"):
            ms.read(path)
    path.write_bytes(_ld(1, _ld(1, b"m") + _ld(3, _ld(1, _ld(2, b"Int8") + _ld(3, b"")))))
    with pytest.raises(UnsupportedValueError, match="MapParameter"):
        ms.read(path)


def test_unknown_fields_are_skipped(tmp_path):
    extra = b"\x20\x05" + _ld(9, b"junk") + b"\x2d" + b"\0" * 4 + b"\x31" + b"\0" * 8  # varint, LEN, fixed32/64
    path = tmp_path / "u.ckpt"
    path.write_bytes(_rec(extra=extra) + b"\x10\x07" + _ld(5, b"top-level junk") + _rec(tag=b"y", dims=(),
                                                                                        content=b"\0" * 4))
    got = ms.read(path)
    assert list(got) == ["x", "y"] and got["x"].shape == (2,) and got["y"].shape == ()


def test_iter_tensors_streams(tmp_path):
    path = tmp_path / "s.ckpt"
    msw.write(path, [("a", np.ones(4)), ("b", np.zeros(4))])
    path.write_bytes(path.read_bytes()[:-3])  # the second tensor is truncated
    it = ms.iter_tensors(path)
    name, arr = next(it)  # the first comes before the damage is seen
    assert name == "a" and arr.tolist() == [1.0] * 4
    with pytest.raises(CorruptCheckpointError, match="record 1 at byte 52: truncated"):
        next(it)


def test_crc_damage_is_named_as_such(tmp_path):
    path, data = _small(tmp_path, crc_check=True)
    i = data.index(b"bb") + 1
    path.write_bytes(data[:i] + b"X" + data[i + 1:])  # a valid file otherwise
    with pytest.raises(CorruptCheckpointError, match="CRC-32 mismatch"):
        ms.read(path)
    assert zlib.crc32(data[:-17]) == int.from_bytes(data[-10:], "big") and data[-17:-10] == b"crc_num"


def test_errors_are_checkpoint_errors():
    assert issubclass(CorruptCheckpointError, CheckpointError) and issubclass(DecryptionError, CheckpointError)
