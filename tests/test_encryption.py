"""Encryption at rest (issue 18): round trips, wrong / missing / bad keys,
every bit flip of a small encrypted checkpoint, chunks swapped or copied from
another checkpoint, no plaintext in the files, and the same through a
bucket (moto on 127.0.0.1)."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxckpt
import objservers
from jaxckpt import cli, crypto
from jaxckpt.format import MANIFEST_NAME

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
KEY = bytes(range(32))
OTHER = bytes(range(1, 33))


def same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def tree():
    rng = np.random.default_rng(0)
    return {"params": {"kernel_secret_name": rng.standard_normal((64, 32), dtype=np.float32),
                       "bias": rng.standard_normal(32).astype(ml_dtypes.bfloat16)},
            "big": np.arange(5_000_000, dtype=np.int32), "step": 7, "tag": "run-name-secret",
            "key": jax.random.key(5), "small": [np.full(i + 1, i, np.int16) for i in range(40)],
            "i4": np.array([1, -2, 3], ml_dtypes.int4), "empty": np.zeros((0, 3))}


def check(out, want) -> None:
    flat_o, _ = jax.tree_util.tree_flatten(out)
    flat_w, _ = jax.tree_util.tree_flatten(want)
    for a, b in zip(flat_o, flat_w):
        if isinstance(b, jax.Array) and jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
            assert same(jax.random.key_data(a), jax.random.key_data(b))
        elif isinstance(b, (np.ndarray, jax.Array)):
            assert same(a, b)
        else:
            assert a == b


def all_bytes(d) -> bytes:
    out = b""
    for f in sorted(os.listdir(d)):
        with open(os.path.join(d, f), "rb") as fh:
            out += fh.read()
    return out


def test_round_trip_of_every_kind_and_no_plaintext_in_the_files(tmp_path):
    t = tree()
    jaxckpt.save(tmp_path / "ck", t, metadata={"user": "secret-metadata"}, encryption_key=KEY)
    check(jaxckpt.restore(tmp_path / "ck", encryption_key=KEY), t)
    flat = jaxckpt.load_checkpoint(tmp_path / "ck", encryption_key=KEY)
    assert same(flat["params/kernel_secret_name"], t["params"]["kernel_secret_name"])
    raw = all_bytes(tmp_path / "ck")
    for needle in (b"kernel_secret_name", b"run-name-secret", b"secret-metadata", b"params",
                   t["big"][1000:1004].tobytes(), t["params"]["kernel_secret_name"][3].tobytes()[:16], KEY):
        assert needle not in raw, needle
    assert sorted(os.listdir(tmp_path / "ck")) == ["data-00000.bin", MANIFEST_NAME]
    info = crypto.envelope((tmp_path / "ck" / MANIFEST_NAME).read_bytes(), "m")  # readable without the key
    assert (info["version"], info["cipher"], info["key"]) == (2, "AES-GCM/HKDF-SHA256", crypto.fingerprint(KEY))


def test_sharded_partial_async_and_a_key_from_a_callable(tmp_path):
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    x = jax.device_put(np.arange(256 * 64, dtype=np.float32).reshape(256, 64), NamedSharding(mesh, P("a", "b")))
    calls = []

    def kms():
        calls.append(1)
        return KEY

    with jaxckpt.AsyncCheckpointer(encryption_key=kms) as ck:
        ck.save(tmp_path / "s", {"x": x, "y": np.ones(10)}).result()
    assert calls == [1]  # asked when the save started
    other = NamedSharding(Mesh(np.array(jax.devices()).reshape(2, 4), ("p", "q")), P("q", None))
    got = jaxckpt.restore(tmp_path / "s", {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=other)},
                          partial=True, encryption_key=KEY)
    assert got["x"].sharding == other and same(got["x"], x)
    new, report = jaxckpt.load_into({"y": np.zeros(10)}, tmp_path / "s", strict=False, encryption_key=KEY)
    assert same(new["y"], np.ones(10)) and report.unexpected == ["x"]


@pytest.mark.parametrize("key_len", [16, 24, 32])
def test_every_aes_key_length(tmp_path, key_len):
    key = os.urandom(key_len)
    jaxckpt.save(tmp_path / "k", {"a": np.arange(100)}, encryption_key=key)
    assert same(jaxckpt.restore(tmp_path / "k", encryption_key=key)["a"], np.arange(100))


def test_missing_wrong_and_malformed_keys(tmp_path):
    jaxckpt.save(tmp_path / "ck", {"a": np.arange(10)}, encryption_key=KEY)
    fp = crypto.fingerprint(KEY)
    for call in (jaxckpt.restore, jaxckpt.inspect, jaxckpt.load_checkpoint):
        with pytest.raises(jaxckpt.DecryptionError, match=f"the checkpoint is encrypted \\(key fingerprint {fp}\\)"):
            call(tmp_path / "ck")
    with pytest.raises(jaxckpt.DecryptionError, match=f"wrong key: the checkpoint was encrypted with the key whose "
                                                      f"fingerprint is {fp}; the key given has fingerprint "
                                                      f"{crypto.fingerprint(OTHER)}"):
        jaxckpt.restore(tmp_path / "ck", encryption_key=OTHER)
    with pytest.raises(jaxckpt.DecryptionError, match="found 20 bytes"):
        jaxckpt.restore(tmp_path / "ck", encryption_key=bytes(20))
    with pytest.raises(jaxckpt.DecryptionError, match="found 20 bytes"):
        jaxckpt.save(tmp_path / "x", {"a": 1}, encryption_key=bytes(20))
    with pytest.raises(jaxckpt.DecryptionError, match="found str"):
        jaxckpt.AsyncCheckpointer(encryption_key="a passphrase")


def test_every_single_bit_flip_is_detected(tmp_path):
    """Each flipped bit of a small encrypted checkpoint's files raises
    CorruptCheckpointError (or DecryptionError for the key fingerprint);
    never a silently wrong value."""
    small = {"w": np.arange(24, dtype=np.float32).reshape(4, 6), "n": np.int64(3)}
    jaxckpt.save(tmp_path / "ck", small, encryption_key=KEY)
    for name in ("data-00000.bin", MANIFEST_NAME):
        data = (tmp_path / "ck" / name).read_bytes()
        for i in range(len(data) * 8):
            if name == "data-00000.bin" and not any(data[i // 8 - 64:i // 8 + 64]):
                continue  # alignment padding between shards is not data (no reader reads it)
            d = tmp_path / "flip"
            shutil.copytree(tmp_path / "ck", d)
            b = bytearray(data)
            b[i // 8] ^= 1 << (i % 8)
            (d / name).write_bytes(bytes(b))
            try:
                out = jaxckpt.restore(d, encryption_key=KEY)
            except (jaxckpt.CorruptCheckpointError, jaxckpt.DecryptionError):
                pass
            else:  # only bits no reader uses may pass: then the values are right
                assert same(out["w"], small["w"]) and same(out["n"], small["n"]), (name, i)
            shutil.rmtree(d)


def test_swapped_and_foreign_chunks_fail_their_tags(tmp_path):
    chunk = 16 << 20
    big = {"a": np.full(chunk // 4 * 2, 1, np.int32), "b": np.full(chunk // 4, 2, np.int32)}  # 3 chunks
    jaxckpt.save(tmp_path / "one", big, encryption_key=KEY)
    jaxckpt.save(tmp_path / "two", {"a": big["b"], "b": big["a"][:chunk // 4]}, encryption_key=KEY)
    path = tmp_path / "one" / "data-00000.bin"
    data = bytearray(path.read_bytes())
    data[0:chunk], data[chunk:2 * chunk] = data[chunk:2 * chunk], data[0:chunk]  # two chunks of one leaf swapped
    path.write_bytes(bytes(data))
    with pytest.raises(jaxckpt.CorruptCheckpointError, match="fails its authentication tag"):
        jaxckpt.restore(tmp_path / "one", encryption_key=KEY)
    shutil.rmtree(tmp_path / "one")
    jaxckpt.save(tmp_path / "one", big, encryption_key=KEY)
    foreign = (tmp_path / "two" / "data-00000.bin").read_bytes()[:chunk]  # same offset, other checkpoint
    data = bytearray((tmp_path / "one" / "data-00000.bin").read_bytes())
    data[:chunk] = foreign
    (tmp_path / "one" / "data-00000.bin").write_bytes(bytes(data))
    with pytest.raises(jaxckpt.CorruptCheckpointError, match=r"data-00000.bin: leaf 'a'.*authentication tag"):
        jaxckpt.restore(tmp_path / "one", encryption_key=KEY)


def test_truncated_files(tmp_path):
    jaxckpt.save(tmp_path / "ck", {"w": np.arange(1000, dtype=np.float64)}, encryption_key=KEY)
    for name in ("data-00000.bin", MANIFEST_NAME):
        d = tmp_path / f"t-{name}"
        shutil.copytree(tmp_path / "ck", d)
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[:len(data) // 2])
        with pytest.raises(jaxckpt.CorruptCheckpointError):
            jaxckpt.restore(d, encryption_key=KEY)


def test_manager_rotation_ls_and_key_rotation(tmp_path, capsys, monkeypatch):
    with jaxckpt.CheckpointManager(tmp_path / "run", max_to_keep=2, encryption_key=KEY) as mgr:
        for step in range(4):
            mgr.save(step, {"w": np.full(8, step)}, metrics={"loss": 1.0 / (step + 1)}, force=True)
    assert sorted(os.listdir(tmp_path / "run")) == ["2", "3"]
    assert same(jaxckpt.CheckpointManager(tmp_path / "run", read_only=True, encryption_key=KEY).restore()["w"],
                np.full(8, 3))
    assert cli.main(["ls", str(tmp_path / "run")]) == 0  # no key: steps listed, metadata not shown
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["2", "3"] and "encrypted" in out
    (tmp_path / "key").write_bytes(KEY)
    (tmp_path / "new").write_bytes(OTHER)
    monkeypatch.setenv("JAXCKPT_KEY_FILE", str(tmp_path / "key"))
    assert cli.main(["ls", str(tmp_path / "run")]) == 0
    assert "loss=0.25" in capsys.readouterr().out
    assert cli.main(["verify", str(tmp_path / "run" / "3")]) == 0
    assert cli.main(["convert", str(tmp_path / "run" / "3"), str(tmp_path / "rotated"), "--new-key-file",
                     str(tmp_path / "new"), "--no-progress"]) == 0
    capsys.readouterr()
    assert same(jaxckpt.restore(tmp_path / "rotated", encryption_key=OTHER)["w"], np.full(8, 3))
    with pytest.raises(jaxckpt.DecryptionError, match="wrong key"):
        jaxckpt.restore(tmp_path / "rotated", encryption_key=KEY)
    assert np.full(8, 3).tobytes() not in all_bytes(tmp_path / "rotated")


def test_encrypted_checkpoints_in_a_bucket(tmp_path):
    srv = objservers.start_moto()
    try:
        objservers.make_bucket(srv.endpoint, "enc-bucket")
        opts = {"endpoint": srv.endpoint, "access_key_id": "testing", "secret_access_key": "testing",
                "region": "us-east-1"}
        t = {"w": np.arange(6_000_000, dtype=np.float32), "name": "secret"}  # a multipart upload
        jaxckpt.save("s3://enc-bucket/run/1", t, storage_options=opts, encryption_key=KEY)
        out = jaxckpt.restore("s3://enc-bucket/run/1", storage_options=opts, encryption_key=KEY)
        assert same(out["w"], t["w"]) and out["name"] == "secret"
        s3 = objservers.s3_client(srv.endpoint)
        body = b"".join(s3.get_object(Bucket="enc-bucket", Key=o["Key"])["Body"].read()
                        for o in s3.list_objects_v2(Bucket="enc-bucket")["Contents"])
        assert b"secret" not in body and t["w"][5000:5004].tobytes() not in body
        with pytest.raises(jaxckpt.DecryptionError):
            jaxckpt.restore("s3://enc-bucket/run/1", storage_options=opts)
    finally:
        srv.stop()


def _mode(p) -> int:
    return os.stat(p).st_mode & 0o7777


def test_file_and_directory_modes_as_requested(tmp_path):
    old = os.umask(0o022)
    try:
        jaxckpt.save(tmp_path / "a" / "ck", {"w": np.arange(10)}, file_mode=0o640, dir_mode=0o750)
        assert _mode(tmp_path / "a") == 0o750 and _mode(tmp_path / "a" / "ck") == 0o750
        assert {f: _mode(tmp_path / "a" / "ck" / f) for f in os.listdir(tmp_path / "a" / "ck")} == {
            "data-00000.bin": 0o640, MANIFEST_NAME: 0o640}
        with jaxckpt.AsyncCheckpointer(file_mode=0o600, dir_mode=0o700) as ck:
            ck.save(tmp_path / "b", {"w": np.arange(10)}).result()
        assert _mode(tmp_path / "b") == 0o700 and _mode(tmp_path / "b" / MANIFEST_NAME) == 0o600
        jaxckpt.save(tmp_path / "c", {"w": np.arange(10)})  # default: the umask, as before
        assert _mode(tmp_path / "c" / MANIFEST_NAME) == 0o644 and _mode(tmp_path / "c") == 0o755
        with pytest.raises(ValueError, match="file_mode must be permission bits"):
            jaxckpt.save(tmp_path / "d", {"w": 1}, file_mode=0o10000)
    finally:
        os.umask(old)


def test_lock_and_marker_files_follow_the_modes(tmp_path):
    from jaxckpt import lock, posixdirs
    old = os.umask(0o022)
    try:
        with jaxckpt.CheckpointManager(tmp_path / "run", file_mode=0o600, dir_mode=0o700) as mgr:
            assert _mode(tmp_path / "run") == 0o700 and _mode(tmp_path / "run" / lock.LOCK_NAME) == 0o600
            mgr.save(1, {"w": np.arange(4)}, force=True)
            mgr.wait_until_finished()
        assert _mode(tmp_path / "run" / "1") == 0o700 and _mode(tmp_path / "run" / "1" / MANIFEST_NAME) == 0o600
        tmp = posixdirs.make_temp_dir(str(tmp_path / "x"), None, 0o600, 0o700)  # the owner marker of a save
        assert _mode(tmp) == 0o700 and _mode(os.path.join(tmp, posixdirs.OWNER_FILE)) == 0o600
    finally:
        os.umask(old)
