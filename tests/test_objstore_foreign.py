"""Foreign checkpoint files (safetensors, MindSpore, flax msgpack) in a bucket:
read, inspected, converted and written at s3://, az:// and gs:// URLs exactly
as at local paths, against real servers on 127.0.0.1 (moto, Azurite,
fake-gcs-server). Objects are put and looked at with each store's own client,
not jaxckpt's."""

from __future__ import annotations

import json
import os
import shutil
import types

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import serialization

import azservers
import jaxckpt
import objservers
from jaxckpt import cli, fmt_mindspore_write, fmt_safetensors, storage

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DATA = os.path.join(os.path.dirname(__file__), "data", "mindspore")
with open(os.path.join(DATA, "expected.json")) as _f:
    EXPECTED = json.load(_f)["files"]


class Store:
    """One bucket of one server: its URL, jaxckpt's storage_options, and the server's own client."""

    def __init__(self, scheme: str, endpoint: str, name: str):
        self.scheme, self.endpoint, self.name = scheme, endpoint, name
        self.url = f"{scheme}://{name}"
        if scheme == "s3":
            objservers.make_bucket(endpoint, name)
            self.options = {"endpoint": endpoint, "access_key_id": "testing", "secret_access_key": "testing",
                            "region": "us-east-1"}
            self._s3 = objservers.s3_client(endpoint)
        elif scheme == "az":
            azservers.make_container(endpoint, name)
            at = endpoint + "/" + azservers.ACCOUNT if endpoint.count("/") == 2 else endpoint
            self.options = {"account_name": azservers.ACCOUNT, "account_key": azservers.KEY, "endpoint": at}
        else:
            objservers.make_gcs_bucket(endpoint, name)
            self.options = {"endpoint": endpoint, "anonymous": True}
            self._gcs = objservers.gcs_client(endpoint).bucket(name)

    def put(self, key: str, body: bytes) -> None:
        if self.scheme == "s3":
            self._s3.put_object(Bucket=self.name, Key=key, Body=body)
        elif self.scheme == "az":
            azservers.put_blob(self.endpoint, self.name, key, body)
        else:
            self._gcs.blob(key).upload_from_string(body)

    def get(self, key: str) -> bytes:
        if self.scheme == "s3":
            return self._s3.get_object(Bucket=self.name, Key=key)["Body"].read()
        if self.scheme == "az":
            return azservers.get_blob(self.endpoint, self.name, key)
        return self._gcs.blob(key).download_as_bytes()

    def keys(self) -> list[str]:
        if self.scheme == "s3":
            return sorted(o["Key"] for o in self._s3.list_objects_v2(Bucket=self.name).get("Contents", []))
        if self.scheme == "az":
            return azservers.list_blobs(self.endpoint, self.name, "")
        return sorted(b.name for b in self._gcs.list_blobs())

    def environment(self) -> dict[str, str]:
        """What a user sets to reach this server with no storage_options (the conftest pins AWS's keys)."""
        if self.scheme == "s3":
            return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ALLOW_HTTP": "true"}
        if self.scheme == "az":
            return azservers.env_for(self.options["endpoint"])
        return {"STORAGE_EMULATOR_HOST": self.endpoint}


@pytest.fixture(scope="module", params=["s3", "az", "gs"])
def server(request, tmp_path_factory):
    if request.param == "s3":
        srv = objservers.start_moto()
    elif request.param == "az":
        srv = azservers.start_azurite(tmp_path_factory.mktemp("azurite"))
    else:
        srv = objservers.start_fake_gcs(tmp_path_factory.mktemp("gcs"))
    yield request.param, srv.endpoint
    srv.stop()


_names = iter(range(10**6))


@pytest.fixture
def store(server) -> Store:
    return Store(*server, f"foreign-{next(_names)}")


def same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def same_flat(a: dict, b: dict, ordered: bool = True) -> bool:
    return (list(a) == list(b) if ordered else sorted(a) == sorted(b)) and all(same(a[k], b[k]) for k in a)


def load_kwargs(name: str) -> dict:
    kw = EXPECTED[name]["load_kwargs"]
    return {"dec_key": bytes.fromhex(kw["dec_key"]), "dec_mode": kw["dec_mode"]} if "dec_key" in kw else {}


def sample_tree() -> dict:
    rng = np.random.default_rng(7)
    return {"dense": {"kernel": rng.standard_normal((64, 32), dtype=np.float32),
                      "bias": rng.standard_normal(32).astype(ml_dtypes.bfloat16)},
            "mask": rng.integers(0, 2, (5, 3)).astype(bool), "step": np.int64(12),
            "big": rng.standard_normal(9 << 20 >> 2, dtype=np.float32)}  # 9 MiB: several ranged GETs


# ----------------------------------------------------------------------------- reading
@pytest.mark.parametrize("name", ["net-1_6.ckpt", "crc.ckpt", "enc_gcm_blocks.ckpt", "enc_sm4.ckpt",
                                  "sliced.ckpt", "net.safetensors"])
def test_a_foreign_file_in_a_bucket_reads_as_the_local_one(store, name):
    with open(os.path.join(DATA, name), "rb") as f:
        store.put(f"models/{name}", f.read())
    url, kw = f"{store.url}/models/{name}", load_kwargs(name)
    local = jaxckpt.load_checkpoint(os.path.join(DATA, name), **kw)
    assert same_flat(jaxckpt.load_checkpoint(url, storage_options=store.options, **kw), local)
    info = jaxckpt.inspect(url, storage_options=store.options, **kw)
    assert info.path == url and info.library == ("safetensors" if name.endswith(".safetensors") else "mindspore")
    assert [(x.path, x.shape, x.dtype) for x in info.leaves] == \
        [(x.path, x.shape, x.dtype) for x in jaxckpt.inspect(os.path.join(DATA, name), **kw).leaves]


def test_safetensors_and_flax_files_restore_and_load_into_a_target(store, tmp_path):
    tree = sample_tree()
    flat = {"dense/kernel": tree["dense"]["kernel"], "dense/bias": tree["dense"]["bias"], "mask": tree["mask"],
            "big": tree["big"]}
    fmt_safetensors.write(tmp_path / "m.safetensors", flat)
    store.put("hf/m.safetensors", (tmp_path / "m.safetensors").read_bytes())
    store.put("flax/state.msgpack", serialization.to_bytes(tree))
    got = jaxckpt.load_checkpoint(f"{store.url}/hf/m.safetensors", storage_options=store.options)
    assert same_flat(got, jaxckpt.load_checkpoint(tmp_path / "m.safetensors"))
    restored = jaxckpt.restore(f"{store.url}/flax/state.msgpack", storage_options=store.options)
    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    assert all(same(a, b) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree)))
    target = {"dense": {"kernel": np.zeros((64, 32), np.float32), "bias": np.zeros(32, ml_dtypes.bfloat16)},
              "mask": np.zeros((5, 3), bool), "big": np.zeros_like(tree["big"])}
    filled, report = jaxckpt.load_into(target, f"{store.url}/hf/m.safetensors", storage_options=store.options)
    assert not report.missing and not report.unexpected
    assert same(filled["dense"]["kernel"], tree["dense"]["kernel"]) and same(filled["big"], tree["big"])


# ----------------------------------------------------------------------------- converting and writing
@pytest.mark.parametrize("to, suffix", [("safetensors", ".safetensors"), ("mindspore", ".ckpt")])
def test_convert_writes_the_same_bytes_into_a_bucket_as_to_disk(store, tmp_path, to, suffix, monkeypatch):
    from jaxckpt import objfiles

    tree = sample_tree()
    jaxckpt.save(tmp_path / "ck", tree)
    jaxckpt.convert(tmp_path / "ck", tmp_path / f"out{suffix}", to=to)

    def no_staging(*a, **kw):
        raise AssertionError("a checkpoint's values are at hand: the file streams up, no temporary file")
    monkeypatch.setattr(objfiles, "tempfile", types.SimpleNamespace(TemporaryFile=no_staging))
    jaxckpt.convert(tmp_path / "ck", f"{store.url}/exports/out{suffix}", to=to, storage_options=store.options)
    assert store.get(f"exports/out{suffix}") == (tmp_path / f"out{suffix}").read_bytes()
    assert store.keys() == [f"exports/out{suffix}"]  # no temporary object left behind


def test_bucket_to_bucket_conversions_stream_between_formats(store, tmp_path):
    with open(os.path.join(DATA, "sliced.ckpt"), "rb") as f:
        store.put("ms/sliced.ckpt", f.read())
    src = f"{store.url}/ms/sliced.ckpt"
    jaxckpt.convert(src, f"{store.url}/hf/sliced.safetensors", to="safetensors", storage_options=store.options)
    jaxckpt.convert(os.path.join(DATA, "sliced.ckpt"), tmp_path / "sliced.safetensors", to="safetensors")
    assert store.get("hf/sliced.safetensors") == (tmp_path / "sliced.safetensors").read_bytes()
    jaxckpt.convert(f"{store.url}/hf/sliced.safetensors", f"{store.url}/ck/sliced", storage_options=store.options)
    back = jaxckpt.load_checkpoint(f"{store.url}/ck/sliced", storage_options=store.options)
    assert same_flat(back, jaxckpt.load_checkpoint(os.path.join(DATA, "sliced.ckpt")))


@pytest.fixture(scope="module")
def other_gcs(tmp_path_factory):
    """A second fake-gcs-server, a store of its own for conversions between two stores."""
    srv = objservers.start_fake_gcs(tmp_path_factory.mktemp("other-gcs"))
    yield srv.endpoint
    srv.stop()


@pytest.mark.parametrize("to", ["jaxckpt", "safetensors"])
def test_a_conversion_between_two_stores_takes_each_ones_options(store, other_gcs, tmp_path, to):
    """s3:// -> gs://, az:// -> gs:// and gs:// -> another gs server: the source
    read with ``storage_options``, the destination written with ``dst_storage_options``."""
    dst = Store("gs", other_gcs, f"dest-{next(_names)}")
    with open(os.path.join(DATA, "sliced.ckpt"), "rb") as f:
        store.put("ms/sliced.ckpt", f.read())
    url = f"{dst.url}/out/model" + (".safetensors" if to == "safetensors" else "")
    jaxckpt.convert(f"{store.url}/ms/sliced.ckpt", url, to=to, storage_options=store.options,
                    dst_storage_options=dst.options)
    jaxckpt.convert(os.path.join(DATA, "sliced.ckpt"), tmp_path / "ref", to=to)
    if to == "safetensors":
        assert dst.keys() == ["out/model.safetensors"]
        assert dst.get("out/model.safetensors") == (tmp_path / "ref").read_bytes()
    else:
        assert "out/model/manifest.msgpack" in dst.keys()
        assert same_flat(jaxckpt.load_checkpoint(url, storage_options=dst.options),
                         jaxckpt.load_checkpoint(tmp_path / "ref"))
    assert store.keys() == ["ms/sliced.ckpt"]  # nothing written where the source is
    # Without dst_storage_options the source's options apply to both sides, as before.
    if store.scheme != "gs":
        with pytest.raises(jaxckpt.UnsupportedLocationError, match=rf"^gs://{dst.name}: unknown storage_options "):
            jaxckpt.convert(f"{store.url}/ms/sliced.ckpt", f"{dst.url}/again", to=to, storage_options=store.options)
    else:  # the same scheme: the destination is looked for on the source's server
        with pytest.raises(jaxckpt.BucketNotFoundError, match=rf"^gs://{dst.name}"):
            jaxckpt.convert(f"{store.url}/ms/sliced.ckpt", f"{dst.url}/again", to=to, storage_options=store.options)
    assert not [k for k in dst.keys() if k.startswith("again")]


def test_a_failed_write_leaves_the_old_object_whole(store, tmp_path):
    jaxckpt.save(tmp_path / "ck", {"w": np.arange(6, dtype=np.float32)})
    url = f"{store.url}/out.safetensors"
    jaxckpt.convert(tmp_path / "ck", url, to="safetensors", storage_options=store.options)
    before = store.get("out.safetensors")
    jaxckpt.save(tmp_path / "ck2", {"w": np.ones(3, np.float32), "k": jax.random.key(0)})
    with pytest.raises(jaxckpt.UnsupportedValueError, match="'k': a PRNG key cannot be carried into safetensors"):
        jaxckpt.convert(tmp_path / "ck2", url, to="safetensors", overwrite=True, storage_options=store.options)
    layout = [("a", "float32", (4,)), ("b", "float32", (2,))]
    with pytest.raises(jaxckpt.UnsupportedValueError, match=r"tensors never given: \['b'\]"):
        fmt_safetensors.write_streamed(jaxckpt.storage.Location.parse(url, store.options), layout,
                                       [("a", np.zeros(4, np.float32))])
    assert store.get("out.safetensors") == before and store.keys() == ["out.safetensors"]


# ----------------------------------------------------------------------------- errors and the CLI
def test_errors_name_the_url(store):
    opts = store.options
    store.put("notes.txt", b"hello")
    with pytest.raises(jaxckpt.UnsupportedValueError, match=rf"^{store.url}/notes.txt: not a checkpoint of a "
                                                            r"supported format \(found a 5-byte file"):
        jaxckpt.load_checkpoint(f"{store.url}/notes.txt", storage_options=opts)
    with open(os.path.join(DATA, "net.safetensors"), "rb") as f:
        store.put("cut.safetensors", f.read()[:-10])
    with pytest.raises(jaxckpt.CorruptCheckpointError, match=rf"^{store.url}/cut.safetensors: "):
        jaxckpt.load_checkpoint(f"{store.url}/cut.safetensors", storage_options=opts)
    with pytest.raises(jaxckpt.CheckpointNotFoundError, match=rf"^{store.url}/none.ckpt: no such object$"):
        jaxckpt.load_checkpoint(f"{store.url}/none.ckpt", format="mindspore", storage_options=opts)
    with open(os.path.join(DATA, "enc_gcm.ckpt"), "rb") as f:
        store.put("enc.ckpt", f.read())
    with pytest.raises(jaxckpt.DecryptionError, match=rf"^{store.url}/enc.ckpt: "):
        jaxckpt.load_checkpoint(f"{store.url}/enc.ckpt", storage_options=opts)
    keys = store.keys()
    with pytest.raises(jaxckpt.UnsupportedLocationError, match=rf"^{store.url}/orbax: orbax checkpoints are "
                                                               "written to local directories only"):
        jaxckpt.convert(os.path.join(DATA, "net-1_6.ckpt"), f"{store.url}/orbax", to="orbax", storage_options=opts)
    with pytest.raises(jaxckpt.CheckpointError, match="a file needs a name inside the bucket"):
        jaxckpt.convert(os.path.join(DATA, "net-1_6.ckpt"), f"{store.url}/", to="mindspore", storage_options=opts)
    assert store.keys() == keys  # nothing written by the refused calls


def test_the_cli_converts_and_shows_foreign_files_in_a_bucket(store, monkeypatch, capsys, tmp_path):
    for k, v in store.environment().items():
        monkeypatch.setenv(k, v)
    shutil.copy(os.path.join(DATA, "net-1_6.ckpt"), tmp_path / "net.ckpt")
    assert cli.main(["convert", "--no-progress", str(tmp_path / "net.ckpt"), f"{store.url}/net.safetensors",
                     "--to", "safetensors"]) == 0
    capsys.readouterr()
    assert cli.main(["show", f"{store.url}/net.safetensors"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{store.url}/net.safetensors\n") and "dense.weight" in out
    assert cli.main(["convert", "--no-progress", f"{store.url}/net.safetensors", str(tmp_path / "back.ckpt"),
                     "--to", "mindspore"]) == 0
    back = jaxckpt.load_checkpoint(tmp_path / "back.ckpt")
    assert same_flat(back, jaxckpt.load_checkpoint(tmp_path / "net.ckpt"), ordered=False)  # safetensors sorts


def upload_tree(store: Store, root, prefix: str) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            store.put(f"{prefix}/{p.relative_to(root).as_posix()}", p.read_bytes())


def orbax_state():
    rng = np.random.default_rng(3)
    return {"params": {"w": rng.standard_normal((16, 8), dtype=np.float32),
                       "b": rng.standard_normal(8).astype(ml_dtypes.bfloat16)},
            "step": np.int64(100), "big": rng.standard_normal(5 << 20 >> 2, dtype=np.float32)}


def test_an_orbax_checkpoint_in_a_bucket_reads_through_a_local_copy(store, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    state = orbax_state()
    with ocp.CheckpointManager(tmp_path / "orbax") as mgr:
        mgr.save(100, args=ocp.args.StandardSave(state))
    upload_tree(store, tmp_path / "orbax", "run")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR is read again
    url, opts = f"{store.url}/run/100", store.options
    local = jaxckpt.restore(tmp_path / "orbax" / "100")
    got = jaxckpt.restore(url, storage_options=opts)
    assert jax.tree.structure(got) == jax.tree.structure(local)
    assert all(same(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(local)))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), state)
    target["params"]["w"] = jax.ShapeDtypeStruct((16, 8), np.float32, sharding=shard)
    into = jaxckpt.restore(url, target, storage_options=opts)
    assert into["params"]["w"].sharding == shard and same(into["params"]["w"], state["params"]["w"])
    info = jaxckpt.inspect(url, storage_options=opts)
    assert info.path == url and info.library == "orbax" and info.total_bytes == local_bytes(local)
    jaxckpt.convert(url, f"{store.url}/jaxckpt/100", storage_options=opts)
    back = jaxckpt.restore(f"{store.url}/jaxckpt/100", storage_options=opts)
    assert all(same(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(local)))
    assert os.listdir(tmp_path / "tmp") == []  # every local copy removed
    with pytest.raises(jaxckpt.UnsupportedLocationError) as e:
        jaxckpt.convert(tmp_path / "orbax" / "100", f"{store.url}/out", to="orbax", storage_options=opts)
    up = {"s3": "aws s3 cp --recursive ./ck s3://", "gs": "gcloud storage cp -r ./ck gs://",
          "az": "azcopy copy --recursive ./ck https://<account>.blob.core.windows.net/"}[store.scheme]
    assert str(e.value) == (f"{store.url}/out: orbax checkpoints are written to local directories only; write it "
                            f"to one, then copy it up (e.g. {up}{store.name}/out)")


def local_bytes(tree) -> int:
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def test_a_bucket_copy_names_the_bucket_in_errors_and_checks_the_disk_first(store, tmp_path, monkeypatch):
    from jaxckpt import localcopy

    store.put("notorbax/_CHECKPOINT_METADATA", b"{}")
    store.put("notorbax/readme.txt", b"hello")
    with pytest.raises(jaxckpt.CheckpointNotFoundError) as e:
        jaxckpt.restore(f"{store.url}/notorbax", storage_options=store.options)
    message = str(e.value)
    assert message.startswith(f"{store.url}/notorbax is not an orbax checkpoint") and "jaxckpt-copy" not in message
    monkeypatch.setattr(localcopy.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 9, 1))
    with pytest.raises(jaxckpt.CheckpointError, match=rf"^{store.url}/notorbax: a local copy needs 7 bytes in "
                                                      r".*, 1 are free \(set TMPDIR to a disk with room for it\)$"):
        jaxckpt.restore(f"{store.url}/notorbax", storage_options=store.options)


def test_an_object_name_a_local_copy_cannot_hold_fails_cleanly(store, tmp_path):
    store.put("odd/_CHECKPOINT_METADATA", b"{}")
    store.put("odd/a//b", b"x")
    with pytest.raises(jaxckpt.CheckpointError) as e:
        jaxckpt.restore(f"{store.url}/odd", storage_options=store.options)
    if store.scheme == "gs":  # fake-gcs-server stores the name as odd/a/b: the copy holds it, orbax finds no item
        assert store.keys() == ["odd/_CHECKPOINT_METADATA", "odd/a/b"]
        assert type(e.value) is jaxckpt.CheckpointNotFoundError
        assert str(e.value) == f"{store.url}/odd is not an orbax checkpoint (no _METADATA, OCDBT or zarr item found)"
    else:  # obstore cannot hold an empty path segment: the listing fails, at once, naming it
        assert store.keys() == ["odd/_CHECKPOINT_METADATA", "odd/a//b"] and type(e.value) is jaxckpt.StorageError
        assert str(e.value) == (f"{store.url}/odd/: could not list: Encountered object with invalid path: "
                                'Path "odd/a//b" contained empty path segment')


def test_object_names_that_would_leave_a_local_copy_are_refused():
    from jaxckpt import localcopy

    loc = jaxckpt.storage.Location.parse("gs://bucket/run/100")
    assert localcopy.check_name(loc, "default/ocdbt.process_0/d/abc") == ["default", "ocdbt.process_0", "d", "abc"]
    for bad in ("../escape", "a/../../escape", "a//b", "./a", "a/", "a\0b"):
        with pytest.raises(jaxckpt.CorruptCheckpointError, match=r"^gs://bucket/run/100/.*: an object name that "
                                                                 "cannot be a local path"):
            localcopy.check_name(loc, bad)


def test_a_full_staging_disk_is_named_with_the_fix(store, tmp_path, monkeypatch):
    import errno
    import tempfile

    real = tempfile.TemporaryFile

    class Full:
        """A temporary file on a disk that fills up after 1 KiB."""

        def __init__(self, *a, **kw):
            self.f, self.n = real(*a, **kw), 0

        def write(self, b):
            self.n += len(b)
            if self.n > 1024:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    from jaxckpt import objfiles  # only jaxckpt's temporary files: moto, in this process, keeps objects in its own
    monkeypatch.setattr(objfiles, "tempfile", types.SimpleNamespace(TemporaryFile=Full, gettempdir=tempfile.gettempdir))
    with pytest.raises(jaxckpt.CheckpointError, match=rf"^{store.url}/big.safetensors: staging the upload in a "
                       rf"temporary file in {tempfile.gettempdir()} failed: \[Errno 28\] No space left on device "
                       r"\(set TMPDIR to a disk with room for the whole file\)$"):
        fmt_mindspore_write.write(jaxckpt.storage.Location.parse(f"{store.url}/big.safetensors", store.options),
                            [("w", np.zeros(4096, np.float32))])  # MindSpore's size is known only once written
    assert store.keys() == []


def test_a_file_of_known_size_streams_up_with_no_local_copy(store, monkeypatch, tmp_path):
    def no_staging(*a, **kw):
        raise AssertionError("a streamed upload must not stage a temporary file")
    rng = np.random.default_rng(5)
    flat = {f"w{i}": rng.standard_normal(5 << 20 >> 2, dtype=np.float32) for i in range(8)}  # 40 MiB: 3 parts
    fmt_safetensors.write(tmp_path / "m.safetensors", flat)
    from jaxckpt import objfiles
    monkeypatch.setattr(objfiles, "tempfile", types.SimpleNamespace(TemporaryFile=no_staging))
    fmt_safetensors.write(storage.Location.parse(f"{store.url}/m.safetensors", store.options), flat)
    assert store.get("m.safetensors") == (tmp_path / "m.safetensors").read_bytes()
    assert store.keys() == ["m.safetensors"]


@pytest.mark.parametrize("how", ["raises", "short", "long"])
def test_a_streamed_upload_that_goes_wrong_stores_nothing(store, how):
    loc = storage.Location.parse(f"{store.url}/f.bin", store.options)
    storage.write_file(loc, lambda f: f.write(b"old"), size=3)
    chunk = bytes(range(256)) * (1 << 12)  # 1 MiB

    def fill(f):
        for _ in range(20):  # 20 MiB: a part has gone up before anything goes wrong
            f.write(chunk)
        if how == "raises":
            raise RuntimeError("the converter failed")
        if how == "long":
            f.write(b"x")
    announced = 20 << 20 if how != "short" else (20 << 20) + 5
    expected = {"raises": "the converter failed",
                "short": f"{loc}: the writer wrote {20 << 20} bytes, not the {announced} it announced; nothing "
                         "was stored",
                "long": f"{loc}: the writer wrote more than the {announced} bytes it announced"}[how]
    with pytest.raises((RuntimeError, jaxckpt.CheckpointError)) as e:
        storage.write_file(loc, fill, size=announced)
    assert str(e.value) == expected
    assert store.get("f.bin") == b"old" and store.keys() == ["f.bin"]


def test_a_conversion_whose_source_is_in_file_order_streams_up(store, monkeypatch, tmp_path):
    from jaxckpt import objfiles

    rng = np.random.default_rng(6)
    flat = {f"layer{i}.w": rng.standard_normal(3 << 20 >> 2, dtype=np.float32) for i in range(7)}  # 21 MiB
    flat["norm"] = np.ones(64, ml_dtypes.bfloat16)
    fmt_safetensors.write(tmp_path / "in.safetensors", flat)  # our writer's order: the order a copy is written in
    jaxckpt.convert(tmp_path / "in.safetensors", tmp_path / "out.safetensors", to="safetensors")

    def no_staging(*a, **kw):
        raise AssertionError("a conversion in file order must not stage a temporary file")
    monkeypatch.setattr(objfiles, "tempfile", types.SimpleNamespace(TemporaryFile=no_staging))
    jaxckpt.convert(tmp_path / "in.safetensors", f"{store.url}/out.safetensors", to="safetensors",
                    storage_options=store.options)
    assert store.get("out.safetensors") == (tmp_path / "out.safetensors").read_bytes()
    layout = [(k, str(v.dtype), v.shape) for k, v in jaxckpt.load_checkpoint(tmp_path / "in.safetensors").items()]
    items = [(k, flat[k]) for k, _, _ in reversed(layout)]  # promised in order, given in reverse
    with pytest.raises(jaxckpt.UnsupportedValueError, match=f"tensor {layout[-1][0]!r} arrived out of the "
                                                            "layout's order"):
        fmt_safetensors.write_streamed(storage.Location.parse(f"{store.url}/bad.safetensors", store.options),
                                       layout, items, in_order=True)
    assert store.keys() == ["out.safetensors"]


@pytest.mark.parametrize("enc", [None, "AES-GCM", "SM4-CBC"])
def test_a_mindspore_conversion_from_a_file_streams_up(store, monkeypatch, tmp_path, enc):
    """To MindSpore from a safetensors file: its layout gives the exact size
    (encrypted too), so the file goes up front to back with no local copy."""
    from jaxckpt import objfiles

    rng = np.random.default_rng(8)
    flat = {f"layer{i}.w": rng.standard_normal(3 << 20 >> 2, dtype=np.float32) for i in range(6)}  # 18 MiB
    flat["norm"] = np.ones(64, ml_dtypes.bfloat16)
    flat["step"] = np.array(3, np.int64)
    fmt_safetensors.write(tmp_path / "in.safetensors", flat)
    key = {"enc_key": bytes(range(16)), "enc_mode": enc} if enc else {}
    jaxckpt.convert(tmp_path / "in.safetensors", tmp_path / "out.ckpt", to="mindspore", **key)

    def no_staging(*a, **kw):
        raise AssertionError("a conversion with a known layout must not stage a temporary file")
    monkeypatch.setattr(objfiles, "tempfile", types.SimpleNamespace(TemporaryFile=no_staging))
    url = f"{store.url}/ms/out.ckpt"
    jaxckpt.convert(tmp_path / "in.safetensors", url, to="mindspore", storage_options=store.options, **key)
    got, local = store.get("ms/out.ckpt"), (tmp_path / "out.ckpt").read_bytes()
    assert got == local if enc is None else len(got) == len(local)  # encrypted: fresh IVs, the same size
    dec = {"dec_key": key["enc_key"], "dec_mode": enc} if enc else {}
    assert same_flat(jaxckpt.load_checkpoint(url, storage_options=store.options, **dec), flat, ordered=False)
    assert store.keys() == ["ms/out.ckpt"]
