"""Damaged checkpoints: every kind of damage raises CorruptCheckpointError naming
the file (and the leaf for data errors); verify=False really skips the checks."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxckpt
from jaxckpt import format as fmt

from helpers import flip_bit, read_manifest

DATA = "data-00000.bin"


TREE = {
    "params": {"w": np.arange(64 * 1024, dtype=np.float32).reshape(256, 256), "b": np.linspace(0, 1, 7)},
    "step": np.int64(5),
    "note": "hello",
}
ALL_READERS = {
    "restore": lambda p: jaxckpt.restore(p),
    "restore_target": lambda p: jaxckpt.restore(p, TREE),
    "load_checkpoint": lambda p: jaxckpt.load_checkpoint(p),
    "load_into": lambda p: jaxckpt.load_into(TREE, p),
}


@pytest.fixture
def ckpt(ckdir):
    p = ckdir / "c"
    jaxckpt.save(p, TREE)
    return p


def leaf_record(p, path: str) -> fmt.LeafRecord:
    return next(x for x in read_manifest(p).leaves if x.path == path)


# ---------------------------------------------------------------- data file
@pytest.mark.parametrize("leaf", ["params/w", "params/b", "step"])
@pytest.mark.parametrize("how", sorted(ALL_READERS))
def test_flipped_bit_in_data_file_names_file_and_leaf(ckpt, leaf, how):
    s = leaf_record(ckpt, leaf).shards[0]
    flip_bit(ckpt / DATA, s.offset + s.length // 2, bit=3)
    with pytest.raises(jaxckpt.CorruptCheckpointError) as ei:
        ALL_READERS[how](ckpt)
    msg = str(ei.value)
    assert msg.startswith(f"{ckpt / DATA}: checksum mismatch in leaf {leaf!r}, chunk 0 (bytes at offset {s.offset}): "
                          "expected xxh3 0x"), msg
    assert re.fullmatch(r".*expected xxh3 0x[0-9a-f]{16}, found 0x[0-9a-f]{16}", msg)


def test_flipped_bit_in_a_sharded_leaf(ckdir):
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"))
    host = np.arange(8 * 16, dtype=np.int32).reshape(8, 16)
    arr = jax.device_put(host, NamedSharding(mesh, P("x", "y")))
    jaxckpt.save(ckdir / "c", {"sharded": arr, "other": np.ones(3)})
    s = leaf_record(ckdir / "c", "sharded").shards[5]
    flip_bit(ckdir / "c" / DATA, s.offset + 1, bit=7)
    with pytest.raises(jaxckpt.CorruptCheckpointError, match=re.escape(f"{ckdir / 'c' / DATA}: checksum mismatch in leaf 'sharded'")):
        jaxckpt.restore(ckdir / "c", {"sharded": arr, "other": np.ones(3)})
    # a leaf whose bytes are intact can still be restored on its own
    got = jaxckpt.restore(ckdir / "c", {"other": np.zeros(3)}, partial=True)
    np.testing.assert_array_equal(got["other"], np.ones(3))


def test_every_bit_of_a_small_leaf_is_covered(ckdir):
    a = np.arange(6, dtype=np.uint16)
    jaxckpt.save(ckdir / "c", {"a": a})
    s = leaf_record(ckdir / "c", "a").shards[0]
    for byte in range(s.length):
        for bit in range(8):
            flip_bit(ckdir / "c" / DATA, s.offset + byte, bit)
            with pytest.raises(jaxckpt.CorruptCheckpointError, match="checksum mismatch in leaf 'a'"):
                jaxckpt.restore(ckdir / "c")
            flip_bit(ckdir / "c" / DATA, s.offset + byte, bit)  # repair
    np.testing.assert_array_equal(jaxckpt.restore(ckdir / "c")["a"], a)


def test_verify_false_skips_checksums(ckpt):
    s = leaf_record(ckpt, "params/w").shards[0]
    flip_bit(ckpt / DATA, s.offset + 4 * 1000 + 1, bit=0)  # inside element 1000
    with pytest.raises(jaxckpt.CorruptCheckpointError, match="checksum mismatch"):
        jaxckpt.restore(ckpt)
    for got in (jaxckpt.restore(ckpt, verify=False)["params"]["w"],
                jaxckpt.restore(ckpt, TREE, verify=False)["params"]["w"],
                jaxckpt.load_checkpoint(ckpt, verify=False)["params/w"]):
        diff = np.flatnonzero(got.reshape(-1) != TREE["params"]["w"].reshape(-1))
        assert diff.tolist() == [1000]  # the damage went unnoticed and is visible in the values
        assert got.reshape(-1)[1000].view(np.uint32) == TREE["params"]["w"].reshape(-1)[1000].view(np.uint32) ^ (1 << 8)


@pytest.mark.parametrize("cut", [1, 4096, "all"])
def test_truncated_data_file(ckpt, cut):
    size = os.path.getsize(ckpt / DATA)
    os.truncate(ckpt / DATA, 0 if cut == "all" else size - cut)
    for how, fn in ALL_READERS.items():
        with pytest.raises(jaxckpt.CorruptCheckpointError) as ei:
            fn(ckpt)
        msg = str(ei.value)
        assert msg.startswith(f"{ckpt / DATA}: truncated: the manifest records {size} bytes, found "), (how, msg)
        assert re.search(r"while reading leaf '(params/w|params/b|step)'", msg), (how, msg)


def test_data_file_truncated_while_open_is_detected(ckpt, monkeypatch):
    # the size check at open passes, then the file shrinks: the short read is caught
    from jaxckpt import reader
    real = reader.CheckpointReader._file

    def open_then_truncate(self, file):
        f = real(self, file)
        os.truncate(ckpt / DATA, 100)
        return f

    monkeypatch.setattr(reader.CheckpointReader, "_file", open_then_truncate)
    with pytest.raises(jaxckpt.CorruptCheckpointError,
                       match=re.escape(f"{ckpt / DATA} (leaf 'params/w'): truncated: expected")):
        jaxckpt.restore(ckpt, {"params": {"w": TREE["params"]["w"]}}, partial=True)


def test_deleted_data_file(ckpt):
    os.unlink(ckpt / DATA)
    for how, fn in ALL_READERS.items():
        with pytest.raises(jaxckpt.CorruptCheckpointError) as ei:
            fn(ckpt)
        assert re.fullmatch(re.escape(f"{ckpt / DATA}: file is missing") + r" \(while reading leaf '[a-z/]+'\)",
                            str(ei.value)), (how, str(ei.value))
    # the manifest alone is still readable
    info = jaxckpt.inspect(ckpt)
    assert [x.path for x in info.leaves] == ["note", "params/b", "params/w", "step"]
    # a checkpoint of Python values only has no data file and needs none
    jaxckpt.save(ckpt.parent / "v", {"a": 1, "b": "x"})
    assert sorted(os.listdir(ckpt.parent / "v")) == [fmt.MANIFEST_NAME]
    assert jaxckpt.restore(ckpt.parent / "v") == {"a": 1, "b": "x"}


# ---------------------------------------------------------------- manifest
def manifest_error(ckpt) -> str:
    errors = []
    for fn in (jaxckpt.inspect, jaxckpt.restore, jaxckpt.load_checkpoint, lambda p: jaxckpt.restore(p, TREE)):
        with pytest.raises(jaxckpt.CorruptCheckpointError) as ei:
            fn(ckpt)
        errors.append(str(ei.value))
    assert len(set(errors)) == 1, errors
    assert errors[0].startswith(f"{ckpt / fmt.MANIFEST_NAME}: "), errors[0]
    return errors[0]


def test_flipped_bit_in_manifest(ckpt):
    data = (ckpt / fmt.MANIFEST_NAME).read_bytes()
    body_at = data.index(b"library")  # inside the checksummed body
    flip_bit(ckpt / fmt.MANIFEST_NAME, body_at, bit=1)
    assert re.fullmatch(r".*: manifest checksum mismatch: expected xxh3 0x[0-9a-f]{16}, found 0x[0-9a-f]{16}",
                        manifest_error(ckpt))


def test_every_single_bit_flip_of_a_manifest_is_caught(ckdir):
    jaxckpt.save(ckdir / "c", {"a": np.arange(3, dtype=np.int8), "b": [1.5, None]}, metadata={"k": 1})
    good = (ckdir / "c" / fmt.MANIFEST_NAME).read_bytes()
    fmt.decode_manifest(good, "m")
    kinds = set()
    for i in range(len(good)):
        for bit in range(8):
            bad = bytearray(good)
            bad[i] ^= 1 << bit
            with pytest.raises(jaxckpt.CorruptCheckpointError) as ei:
                fmt.decode_manifest(bytes(bad), "m")
            assert str(ei.value).startswith("m: ")
            kinds.add(str(ei.value).split(":")[1].split("(")[0].strip()[:20])
    assert len(kinds) > 3  # envelope, checksum, msgpack and version errors all occurred


@pytest.mark.parametrize("content", [b"garbage, not msgpack at all \x00\xff", bytes(range(256)) * 8, b"\xc1",
                                     b"\x93\x01\x02\x03", b"\x81\xa6format\xa7jaxckpt"],
                         ids=["text", "bytes", "reserved", "array", "no_version"])
def test_garbage_manifest(ckpt, content):
    (ckpt / fmt.MANIFEST_NAME).write_bytes(content)
    msg = manifest_error(ckpt)
    assert ("not a valid msgpack manifest" in msg or "not a jaxckpt manifest" in msg
            or "envelope: missing field 'version'" in msg), msg


def test_empty_manifest(ckpt):
    (ckpt / fmt.MANIFEST_NAME).write_bytes(b"")
    assert manifest_error(ckpt) == f"{ckpt / fmt.MANIFEST_NAME}: the manifest is empty (0 bytes)"


def test_truncated_manifest(ckpt):
    data = (ckpt / fmt.MANIFEST_NAME).read_bytes()
    (ckpt / fmt.MANIFEST_NAME).write_bytes(data[: len(data) // 2])
    assert "not a valid msgpack manifest" in manifest_error(ckpt)


def test_manifest_of_another_version(ckpt):
    import msgpack
    outer = msgpack.unpackb((ckpt / fmt.MANIFEST_NAME).read_bytes())
    outer["version"] = 2
    (ckpt / fmt.MANIFEST_NAME).write_bytes(msgpack.packb(outer, use_bin_type=True))
    assert manifest_error(ckpt) == (f"{ckpt / fmt.MANIFEST_NAME}: format version 2 is not supported "
                                    "(this reader knows version 1)")


def test_restore_into_jax_target_after_corruption(ckdir):
    tree = {"w": jnp.arange(1000, dtype=jnp.float32)}
    jaxckpt.save(ckdir / "c", tree)
    s = leaf_record(ckdir / "c", "w").shards[0]
    flip_bit(ckdir / "c" / DATA, s.offset + 3999, bit=6)
    with pytest.raises(jaxckpt.CorruptCheckpointError, match=re.escape(f"{ckdir / 'c' / DATA}: checksum mismatch in leaf 'w'")):
        jaxckpt.restore(ckdir / "c", tree)
    with pytest.raises(jaxckpt.CorruptCheckpointError, match="checksum mismatch in leaf 'w'"):
        jaxckpt.restore(ckdir / "c", {"w": jax.ShapeDtypeStruct((1000,), jnp.float32)})


def test_flipped_bit_in_a_later_chunk(ckdir):
    chunk = fmt.CHUNK_BYTES
    a = np.arange(chunk // 4 * 2 + 100, dtype=np.float32)  # 3 checksum chunks
    jaxckpt.save(ckdir / "c", {"big": a})
    s = leaf_record(ckdir / "c", "big").shards[0]
    assert len(s.checksums) == 3
    flip_bit(ckdir / "c" / DATA, s.offset + chunk + 5, bit=2)
    with pytest.raises(jaxckpt.CorruptCheckpointError,
                       match=re.escape(f"{ckdir / 'c' / DATA}: checksum mismatch in leaf 'big', chunk 1 "
                                       f"(bytes at offset {s.offset + chunk}): expected xxh3 0x")):
        jaxckpt.restore(ckdir / "c")
    # without verification the damage comes through, at exactly the flipped element
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    got = jaxckpt.restore(ckdir / "c", {"big": jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=NamedSharding(mesh, P()))},
                          verify=False)["big"]
    assert np.flatnonzero(np.asarray(got) != a).tolist() == [chunk // 4 + 1]
