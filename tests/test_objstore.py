"""Checkpoints in an S3 bucket (issue 16) and an Azure container, against
real servers on 127.0.0.1 (moto's ThreadedMotoServer; Azurite), started
here; nothing mocked in process. Each test that is not about one store runs on
both. The objects are looked at with the store's own client (boto3; Azure's
REST API signed in ``azservers``), independently of jaxckpt."""

from __future__ import annotations

import logging
import re
import threading
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import azservers
import helpers
import jaxckpt
import objservers
from jaxckpt import cli, config
from jaxckpt.format import MANIFEST_NAME
from jaxckpt.reader import CheckpointReader

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class Objects:
    """One bucket's objects, through the server's own client, not jaxckpt's."""

    def __init__(self, scheme: str, endpoint: str, name: str):
        self.scheme, self.endpoint, self.name = scheme, endpoint, name
        self.s3 = objservers.s3_client(endpoint) if scheme == "s3" else None

    def keys(self, prefix: str = "") -> list[str]:
        if self.s3 is None:
            return azservers.list_blobs(self.endpoint, self.name, prefix)
        out, token = [], None
        while True:
            kw = {"Bucket": self.name, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            r = self.s3.list_objects_v2(**kw)
            out += [o["Key"] for o in r.get("Contents", [])]
            if not r.get("IsTruncated"):
                return sorted(out)
            token = r["NextContinuationToken"]

    def put(self, key: str, body: bytes) -> None:
        if self.s3 is None:
            azservers.put_blob(self.endpoint, self.name, key, body)
        else:
            self.s3.put_object(Bucket=self.name, Key=key, Body=body)

    def get(self, key: str) -> bytes:
        if self.s3 is None:
            return azservers.get_blob(self.endpoint, self.name, key)
        return self.s3.get_object(Bucket=self.name, Key=key)["Body"].read()

    def delete(self, key: str) -> None:
        if self.s3 is None:
            azservers.delete_blob(self.endpoint, self.name, key)
        else:
            self.s3.delete_object(Bucket=self.name, Key=key)


@pytest.fixture(scope="module")
def moto():
    srv = objservers.start_moto()
    yield srv
    srv.stop()


@pytest.fixture(scope="module", params=["s3", "az"])
def store(request, tmp_path_factory):
    """moto (``s3://``) or Azurite (``az://``): ``(scheme, endpoint, options for an endpoint)``."""
    if request.param == "s3":
        srv = request.getfixturevalue("moto")

        def options(endpoint: str) -> dict:
            return {"endpoint": endpoint, "access_key_id": "testing", "secret_access_key": "testing",
                    "region": "us-east-1"}
        yield "s3", srv.endpoint, options
        return
    srv = azservers.start_azurite(tmp_path_factory.mktemp("azurite"))

    def options(endpoint: str) -> dict:
        return {"account_name": azservers.ACCOUNT, "account_key": azservers.KEY,
                "endpoint": endpoint + "/" + azservers.ACCOUNT if endpoint.count("/") == 2 else endpoint}
    yield "az", srv.endpoint, options
    srv.stop()


_buckets = iter(range(10**6))


def _bucket(scheme: str, endpoint: str, options) -> tuple:
    name = f"bucket-{next(_buckets)}"
    if scheme == "s3":
        objservers.make_bucket(endpoint, name)
    else:
        azservers.make_container(endpoint, name)
    return f"{scheme}://{name}", options(endpoint), Objects(scheme, endpoint, name), name


@pytest.fixture
def bucket(store):
    """A fresh bucket (container); ``(url prefix, storage_options, Objects, name)``."""
    return _bucket(*store)


@pytest.fixture
def s3bucket(moto):
    """A fresh S3 bucket on moto, for what only S3 has (multipart uploads)."""
    return _bucket("s3", moto.endpoint, lambda e: {"endpoint": e, "access_key_id": "testing",
                                                   "secret_access_key": "testing", "region": "us-east-1"})


def upstream(store) -> str:
    """The server's scheme, host and port (what a FaultProxy forwards to)."""
    return "/".join(store[1].split("/")[:3])


def same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


DTYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16",
          "float32", "float64", "bfloat16", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "int4"]


def every_dtype_tree():
    rng = np.random.default_rng(0)
    leaves = {}
    for name in DTYPES:
        dt = np.dtype(getattr(ml_dtypes, name, name))
        if name in ("bool", "int4"):
            leaves[name] = rng.integers(0, 2, (3, 5)).astype(dt)
        else:
            leaves[name] = np.frombuffer(rng.bytes(15 * dt.itemsize), dtype=dt).reshape(3, 5)
    return {"arrays": leaves, "scalar": np.float32(2.5), "py": 7, "s": "text", "none": None,
            "tuple": (jnp.arange(4), [np.zeros(0, np.float32)]), "key": jax.random.key(3),
            "big": np.arange(5_000_000, dtype=np.int32)}


# ----------------------------------------------------------------------------- round trips
def test_every_dtype_and_container_round_trips_bit_exactly(bucket):
    url, opts, objs, name = bucket
    tree = every_dtype_tree()
    jaxckpt.save(f"{url}/run/1", tree, storage_options=opts)
    out = jaxckpt.restore(f"{url}/run/1", storage_options=opts)
    for k, v in tree["arrays"].items():
        assert same(out["arrays"][k], v), k
    assert (out["py"], out["s"], out["none"]) == (7, "text", None)
    assert same(out["scalar"], tree["scalar"]) and same(out["big"], tree["big"])
    assert same(out["tuple"][0], tree["tuple"][0]) and out["tuple"][1][0].shape == (0,)
    assert same(jax.random.key_data(out["key"]), jax.random.key_data(tree["key"]))
    found = objs.keys()
    assert len(found) == 2 and found[1] == "run/1/manifest.msgpack"
    assert re.fullmatch(r"run/1/data-00000-[0-9a-f]{16}\.bin", found[0])  # one data object, named per attempt
    flat = jaxckpt.load_checkpoint(f"{url}/run/1", storage_options=opts)
    assert same(flat["arrays/bfloat16"], tree["arrays"]["bfloat16"])
    info = jaxckpt.inspect(f"{url}/run/1", storage_options=opts)
    assert info.path == f"{url}/run/1" and len(info.leaves) == len(flat)


def test_sharded_partial_and_load_into_on_a_bucket(bucket):
    url, opts, _, _ = bucket
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    x = jax.device_put(np.arange(64 * 48, dtype=np.float32).reshape(64, 48), NamedSharding(mesh, P("a", "b")))
    tree = {"w": x, "b": np.ones(7, np.float32), "opt": {"m": np.full((5, 5), 3.0)}}
    jaxckpt.save(f"{url}/sh", tree, storage_options=opts)
    other = NamedSharding(Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y")), P("y", None))
    target = {"w": jax.ShapeDtypeStruct((64, 48), jnp.float32, sharding=other)}
    got = jaxckpt.restore(f"{url}/sh", target, partial=True, storage_options=opts)
    assert got["w"].sharding == other and same(got["w"], x)
    new, report = jaxckpt.load_into({"b": np.zeros(7, np.float32), "opt": {"m": np.zeros((5, 5))}}, f"{url}/sh",
                                    strict=False, storage_options=opts)
    assert same(new["b"], tree["b"]) and same(new["opt"]["m"], tree["opt"]["m"]) and report.unexpected == ["w"]


def test_async_checkpointer_and_overwrite_replace_the_manifest_atomically(store, bucket):
    """An existing checkpoint is refused by the save thread (on a bucket the
    check is a round trip, which save() does not wait for): the handle raises,
    nothing is written; overwrite=True replaces it."""
    url, opts, objs, name = bucket
    proxy = objservers.FaultProxy(upstream(store))
    with jaxckpt.AsyncCheckpointer(storage_options=store[2](proxy.endpoint)) as ck:
        ck.save(f"{url}/a", {"x": np.arange(10)}).wait()
        old = objs.keys()
        proxy.reset_counts()
        refused = ck.save(f"{url}/a", {"x": np.arange(3)})
        assert proxy.counts == {}  # save() returned without a request
        with pytest.raises(jaxckpt.CheckpointExistsError) as e:
            refused.result()
        assert str(e.value) == f"{url}/a: a checkpoint already exists (pass overwrite=True to replace it)"
        assert objs.keys() == old and set(proxy.counts) == {"GET"}  # one listing, nothing written
        ck.save(f"{url}/a", {"x": np.arange(3)}, overwrite=True).wait()
    proxy.stop()
    new = objs.keys()
    assert len(new) == 2 and set(new) & set(old) == {"a/manifest.msgpack"}  # old data deleted after the commit
    assert same(jaxckpt.restore(f"{url}/a", storage_options=opts)["x"], np.arange(3))


def environment(scheme: str, endpoint: str) -> dict[str, str]:
    """What a user sets to reach this server with no storage_options (the
    conftest has set fixed AWS credentials already)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true"} if scheme == "s3" else azservers.env_for(endpoint)


def test_options_from_the_standard_environment(bucket, monkeypatch):
    url, opts, objs, _ = bucket
    for k, v in environment(objs.scheme, opts["endpoint"]).items():
        monkeypatch.setenv(k, v)
    jaxckpt.save(f"{url}/env", {"x": np.arange(4)})
    assert same(jaxckpt.restore(f"{url}/env")["x"], np.arange(4))


# ----------------------------------------------------------------------------- errors
def test_missing_bucket_and_missing_checkpoint_name_the_url(bucket):
    _, opts, _, _ = bucket
    scheme = bucket[2].scheme
    missing = f"{scheme}://no-such-bucket: the {'bucket' if scheme == 's3' else 'container'} does not exist"
    with pytest.raises(jaxckpt.BucketNotFoundError, match=missing):
        jaxckpt.save(f"{scheme}://no-such-bucket/run/1", {"x": np.arange(3)}, storage_options=opts)
    with pytest.raises(jaxckpt.BucketNotFoundError, match=missing):
        jaxckpt.restore(f"{scheme}://no-such-bucket/run/1", storage_options=opts)
    url = bucket[0]
    with pytest.raises(jaxckpt.CheckpointNotFoundError) as e:
        jaxckpt.restore(f"{url}/nothing", storage_options=opts)
    assert str(e.value) == f"{url}/nothing: no committed checkpoint here (manifest.msgpack is missing)"


def test_a_corrupted_object_names_the_object_and_the_leaf(bucket):
    url, opts, objs, name = bucket
    jaxckpt.save(f"{url}/c", {"w": np.arange(100_000, dtype=np.int64)}, storage_options=opts)
    data_key = next(k for k in objs.keys() if "data-" in k)
    body = bytearray(objs.get(data_key))
    body[12345] ^= 1
    objs.put(data_key, bytes(body))
    with pytest.raises(jaxckpt.CorruptCheckpointError) as e:
        jaxckpt.restore(f"{url}/c", storage_options=opts)
    assert f"{url}/{data_key.partition('/')[2]}" in str(e.value).replace(f"{url}/c/", f"{url}/") or \
        f"{url}/{data_key}" in str(e.value)
    assert "'w'" in str(e.value) and "checksum" in str(e.value)
    objs.put(data_key, bytes(body[:1000]))  # truncated
    with pytest.raises(jaxckpt.CorruptCheckpointError, match=rf"{url}/{data_key}: truncated"):
        jaxckpt.restore(f"{url}/c", storage_options=opts)


def test_missing_and_short_data_objects_are_named_by_the_reads_that_need_them(bucket):
    """Opening a data object sends nothing (no HEAD): a missing or short one is
    found by the GET that needs its bytes, named with the leaf."""
    url, opts, objs, name = bucket
    tree = {"a": np.arange(256, dtype=np.int64), "b": np.arange(1000, dtype=np.float32)}
    jaxckpt.save(f"{url}/d", tree, storage_options=opts)
    data_key = next(k for k in objs.keys("d/") if "data-" in k)
    where, body = f"{url}/{data_key}", objs.get(data_key)
    with CheckpointReader(f"{url}/d", storage_options=opts) as r:
        (size,) = [f.size for f in r.manifest.files]
    helpers.check_short_and_missing_data(f"{url}/d", opts, where, size, lambda n: objs.put(data_key, body[:n]),
                                         lambda: objs.delete(data_key))
    # The manifest gone too, after the reader read it: the checkpoint was deleted (a rotation) mid-restore.
    with CheckpointReader(f"{url}/d", storage_options=opts) as r:
        objs.delete("d/manifest.msgpack")
        with pytest.raises(jaxckpt.CheckpointNotFoundError) as e:
            r.read([(r.by_path["a"], None)])
    assert str(e.value) == f"{where}: the checkpoint was deleted or replaced while being read (leaf 'a')"
    with pytest.raises(jaxckpt.CheckpointNotFoundError) as e:
        jaxckpt.restore(f"{url}/d", storage_options=opts)
    assert str(e.value) == f"{url}/d: no committed checkpoint here (manifest.msgpack is missing)"
    # Overwritten after the reader read the manifest (the old data deleted after the new commit): replaced.
    jaxckpt.save(f"{url}/r", tree, storage_options=opts)
    with CheckpointReader(f"{url}/r", storage_options=opts) as r:
        old_key = next(k for k in objs.keys("r/") if "data-" in k)
        jaxckpt.save(f"{url}/r", tree, storage_options=opts, overwrite=True)
        assert old_key not in objs.keys("r/")
        with pytest.raises(jaxckpt.CheckpointNotFoundError) as e:
            r.read([(r.by_path["a"], None)])
    assert str(e.value) == f"{url}/{old_key}: the checkpoint was deleted or replaced while being read (leaf 'a')"


def test_the_manifest_commit_is_a_conditional_create(bucket):
    helpers.check_conditional_commit(bucket[0], bucket[1])


def test_a_prefix_without_manifest_is_not_a_checkpoint(bucket):
    url, opts, objs, name = bucket
    objs.put("run/5/data-00000-0123456789abcdef.bin", b"x" * 10)
    objs.put("run/6/manifest.msgpack", b"junk")
    mgr = jaxckpt.CheckpointManager(f"{url}/run", read_only=True, storage_options=opts)
    assert mgr.all_steps() == [6]  # 5 has no manifest: never listed
    with pytest.raises(jaxckpt.CorruptCheckpointError, match=f"{url}/run/6/manifest.msgpack"):
        jaxckpt.restore(f"{url}/run/6", storage_options=opts)


# ----------------------------------------------------------------------------- manager, lock, cleaning
def test_manager_policies_rotation_and_metadata_on_a_bucket(bucket):
    url, opts, objs, name = bucket
    with jaxckpt.CheckpointManager(f"{url}/mgr", save_interval_steps=2, max_to_keep=2, storage_options=opts) as mgr:
        for step in range(7):
            mgr.save(step, {"x": np.full(1000, step)}, metrics={"loss": 1.0 / (step + 1)})
        mgr.wait_until_finished()
        assert mgr.all_steps() == [4, 6]
        assert mgr.metadata(6).metrics == {"loss": 1.0 / 7}
        assert ".jaxckpt-lock" in [k.rpartition("/")[2] for k in objs.keys()]
    assert same(jaxckpt.CheckpointManager(f"{url}/mgr", read_only=True, storage_options=opts)
                .restore()["x"], np.full(1000, 6))
    found = objs.keys()
    assert [k.split("/")[1] for k in found if k.endswith(MANIFEST_NAME)] == ["4", "6"]
    assert "mgr/.jaxckpt-lock" not in found and not any(".jaxckpt-tmp-" in k for k in found)


def test_a_second_writer_is_refused_and_an_expired_lease_is_taken_over(bucket, caplog):
    url, opts, objs, name = bucket
    with config.tuned(lease_seconds=1.0):
        first = jaxckpt.CheckpointManager(f"{url}/lk", storage_options=opts)
        with pytest.raises(jaxckpt.CheckpointLockedError, match=rf"{url}/lk/.jaxckpt-lock: another writer "
                                                                 r"holds this directory \(host "):
            jaxckpt.CheckpointManager(f"{url}/lk", storage_options=opts)
        time.sleep(2.5)  # still renewed by its holder: still refused
        with pytest.raises(jaxckpt.CheckpointLockedError):
            jaxckpt.CheckpointManager(f"{url}/lk", storage_options=opts)
        first.close()
    # A lease left by a holder on another host that stopped renewing: taken over once expired (plus grace).
    rec = {"kind": "jaxckpt-lease", "host": "elsewhere", "pid": 1, "start": 1, "token": "t" * 32,
           "time": time.time() - 160, "expires": time.time() - 100}  # a 60 s lease, run out 100 s ago
    objs.put("lk/.jaxckpt-lock", msgpack.packb(rec))
    with caplog.at_level(logging.WARNING, logger="jaxckpt"):
        with jaxckpt.CheckpointManager(f"{url}/lk", storage_options=opts) as mgr:
            mgr.save(1, {"x": np.arange(3)}, force=True)
    assert "took over the lock of a writer that is gone (host 'elsewhere', pid 1)" in caplog.text
    rec["expires"] = time.time() + 60  # a live lease elsewhere: refused
    objs.put("lk/.jaxckpt-lock", msgpack.packb(rec))
    with pytest.raises(jaxckpt.CheckpointLockedError, match="host 'elsewhere', pid 1, lease until"):
        jaxckpt.CheckpointManager(f"{url}/lk", storage_options=opts)


@pytest.mark.parametrize("env_changed", [False, True])
def test_a_holder_that_lost_its_lease_does_not_commit(bucket, caplog, monkeypatch, env_changed):
    url, opts, objs, name = bucket
    with config.tuned(lease_seconds=0.6):  # renewed every 0.2 s
        mgr = jaxckpt.CheckpointManager(f"{url}/lost", storage_options=opts, async_save=False)
    if env_changed:  # the bucket's client is rebuilt for the saves: the lease this process holds goes with it
        monkeypatch.setenv("AWS_DEFAULT_OUTPUT", "json")
    rec = {"kind": "jaxckpt-lease", "host": "elsewhere", "pid": 1, "start": 1, "token": "u" * 32,
           "time": time.time(), "expires": time.time() + 60}
    objs.put("lost/.jaxckpt-lock", msgpack.packb(rec))  # taken over meanwhile
    time.sleep(1.0)  # the holder's next renewal finds the lock changed
    assert f"lost the writer lock {url}/lost/.jaxckpt-lock: another writer took the lock over" in caplog.text
    with pytest.raises(jaxckpt.CheckpointLockedError, match=f"{url}/lost/.jaxckpt-lock: this writer lost "
                                                            "the lock"):
        mgr.save(1, {"x": np.arange(3)}, force=True)
    assert not any(k.endswith(MANIFEST_NAME) for k in objs.keys("lost/"))
    mgr.close()
    assert msgpack.unpackb(objs.get("lost/.jaxckpt-lock"))["host"] == \
        "elsewhere"  # closing did not delete the new holder's lock


def test_leftovers_of_abandoned_saves_are_cleaned_by_the_next_manager(bucket):
    url, opts, objs, name = bucket
    with jaxckpt.CheckpointManager(f"{url}/cl", storage_options=opts) as mgr:
        mgr.save(1, {"x": np.arange(5)}, force=True)
    dead = {"kind": "jaxckpt-save", **_dead_process(), "time": time.time(), "lock": None}
    objs.put("cl/2/.jaxckpt-tmp-00000000000000aa", msgpack.packb(dead))
    objs.put("cl/2/data-00000-00000000000000aa.bin", b"partial")
    objs.put("cl/2/data-00000-00003-00000000000000aa.bin", b"partial, 4th object")
    objs.put("cl/1/data-00000-00000000000000bb.bin", b"old version")
    objs.put("cl/1/data-00001-00002-00000000000000bb.bin", b"old version")
    objs.put("cl/3/data-00001-00000000000000cc.bin", b"deleting")  # no manifest, no marker
    objs.put("cl/1/notes.txt", b"the user's")  # not ours: kept
    with jaxckpt.CheckpointManager(f"{url}/cl", storage_options=opts) as mgr:
        assert mgr.all_steps() == [1]
    left = objs.keys("cl/")
    # Only the data the committed manifest names is left (matched by name: a
    # random attempt may itself contain "bb", which made a filter on it flaky).
    with CheckpointReader(f"{url}/cl/1", storage_options=opts) as r:
        named = [f"cl/1/{f.name}" for f in r.manifest.files]
    assert len(named) == 1 and [k for k in left if "data-" in k] == named
    assert "cl/1/notes.txt" in left and not any("tmp" in k or k.startswith(("cl/2/", "cl/3/")) for k in left)
    assert same(jaxckpt.restore(f"{url}/cl/1", storage_options=opts)["x"], np.arange(5))


def test_opening_a_manager_reads_no_manifest_of_a_cleanly_committed_step(store, bucket):
    """The cleaner reads a step's manifest only where another attempt's objects
    lie beside it (to learn which it names); requests at start do not grow
    with the steps. The leftover of an overwrite killed before its commit is
    still found and deleted."""
    url, opts, objs, name = bucket
    proxy = objservers.FaultProxy(upstream(store))
    try:
        popts = store[2](proxy.endpoint)
        counts = []
        for steps in (2, 6):
            with jaxckpt.CheckpointManager(f"{url}/open{steps}", storage_options=popts) as mgr:
                for step in range(steps):
                    mgr.save(step, {"x": np.arange(3) + step}, force=True)
            proxy.reset_counts()
            jaxckpt.CheckpointManager(f"{url}/open{steps}", storage_options=popts).close()
            counts.append(proxy.counts)
        assert counts[0] == counts[1]
        dead = {"kind": "jaxckpt-save", **_dead_process(), "time": time.time(), "lock": None}
        objs.put("open6/3/.jaxckpt-tmp-00000000000000dd", msgpack.packb(dead))
        objs.put("open6/3/data-00000-00000000000000dd.bin", b"an overwrite killed before its commit")
        with jaxckpt.CheckpointManager(f"{url}/open6", storage_options=popts) as mgr:
            assert mgr.all_steps() == list(range(6))
            assert same(mgr.restore(3)["x"], np.arange(3) + 3)
    finally:
        proxy.stop()
    left = objs.keys("open6/3/")
    assert "open6/3/data-00000-00000000000000dd.bin" not in left and "open6/3/.jaxckpt-tmp-00000000000000dd" not in left
    assert sum("data-" in k for k in left) == 1


def test_a_manager_reads_no_manifest_of_what_it_saved(store, bucket):
    """A rotation ranks the steps this manager committed by the records it
    wrote (no GET of their manifests, which was a round trip per save), and
    deletes a step with a LIST and its DELETEs (no HEAD of the manifest
    first); the steps of an earlier run are read once each. Opening a
    manager lists its directory once. The best-metric rule keeps what the
    metrics say."""
    url, opts, objs, name = bucket
    proxy = objservers.FaultProxy(upstream(store))
    read = re.compile(r"/rot/(\d+)/manifest\.msgpack")

    def manifests_read() -> list[int]:
        return sorted(int(m.group(1)) for method, path in proxy.requests if method in ("GET", "HEAD")
                      if (m := read.search(path)))
    try:
        popts = store[2](proxy.endpoint)
        with jaxckpt.CheckpointManager(f"{url}/rot", max_to_keep=2, best_metric="loss", storage_options=popts) as mgr:
            for step, loss in enumerate([3.0, 1.0, 4.0, 5.0, 2.0]):
                proxy.reset_counts()
                mgr.save(step, {"x": np.arange(3) + step}, metrics={"loss": loss}, force=True)
                mgr.wait_until_finished()
                assert manifests_read() == [], proxy.requests
            assert mgr.all_steps() == [1, 4]  # the newest, and the two lowest losses (1.0, 2.0)
        proxy.reset_counts()
        with jaxckpt.CheckpointManager(f"{url}/rot", max_to_keep=2, best_metric="loss", storage_options=popts) as mgr:
            root_lists = [p for _, p in proxy.requests if re.search(r"prefix=rot(/|%2F)(&|$)", p)]
            assert len(root_lists) == 1, proxy.requests  # the cleaning's listing serves the step list too
            proxy.reset_counts()
            mgr.save(5, {"x": np.arange(3) + 5}, metrics={"loss": 0.5}, force=True)
            mgr.wait_until_finished()
            assert manifests_read() == [1, 4]  # the earlier run's steps, once; not step 5
            assert mgr.all_steps() == [1, 5]
            assert same(mgr.restore(1)["x"], np.arange(3) + 1)
    finally:
        proxy.stop()
    assert sorted({k.split("/")[1] for k in objs.keys("rot/") if k.count("/") >= 2}) == ["1", "5"]


def test_a_save_to_an_empty_prefix_lists_it_once(store, bucket):
    """The existence check's LIST tells the commit whether anything was there
    before the save: into an empty prefix, the commit deletes the save's
    marker without listing again. Where a crashed deletion left data behind,
    the commit lists and deletes it as before."""
    url, opts, objs, name = bucket
    proxy = objservers.FaultProxy(upstream(store))

    def lists() -> int:
        return sum(1 for method, path in proxy.requests if method == "GET" and re.search(r"[?&]prefix=", path))
    try:
        popts = store[2](proxy.endpoint)
        jaxckpt.save(f"{url}/fresh", {"x": np.arange(4)}, storage_options=popts)
        assert lists() == 1, proxy.requests
        assert sum(proxy.counts.values()) == 5, proxy.requests  # LIST, marker, data, manifest, marker's DELETE
        objs.put("left/data-00000-00000000000000ee.bin", b"a deletion killed after its manifest went")
        proxy.reset_counts()
        jaxckpt.save(f"{url}/left", {"x": np.arange(4)}, storage_options=popts)
        assert lists() == 2, proxy.requests
    finally:
        proxy.stop()
    assert [k for k in objs.keys("fresh/") if ".jaxckpt-tmp-" in k] == []
    left = objs.keys("left/")
    assert "left/data-00000-00000000000000ee.bin" not in left and sum("data-" in k for k in left) == 1, left
    assert same(jaxckpt.restore(f"{url}/left", storage_options=opts)["x"], np.arange(4))


def test_no_checkpoint_at_a_url_is_told_after_one_probe_of_the_bucket(store, bucket):
    """A restore where nothing is: the manifest's GET, one probe that the bucket
    exists (the error says which is missing), then a HEAD per file that another
    format would have; a missing bucket is still named as such."""
    url, opts, objs, name = bucket
    proxy = objservers.FaultProxy(upstream(store))
    try:
        popts = store[2](proxy.endpoint)
        with pytest.raises(jaxckpt.CheckpointNotFoundError, match=r"/nope: no committed checkpoint here"):
            jaxckpt.restore(f"{url}/nope", storage_options=popts)
        probes = [path for _, path in proxy.requests if ".jaxckpt-probe" in path]
        assert len(probes) == 1 and len(proxy.requests) == 6, proxy.requests  # GET, probe, 4 HEADs
        with pytest.raises(jaxckpt.BucketNotFoundError, match="does not exist"):
            jaxckpt.restore(f"{url}-missing/x", storage_options=popts)
    finally:
        proxy.stop()


def _hold_uploads(monkeypatch, until: threading.Event, after_s: float = 0.0) -> list[bool]:
    """Make each data upload read its whole stream (every checksum computed),
    then wait for ``until`` (at most 10 s) and ``after_s`` more before it
    sends the bytes; returns, per upload, whether ``until`` came in time."""
    from jaxckpt import objstore
    came: list[bool] = []
    send = objstore.ObjectSink.write_stream

    def held(self, chunks, size):
        chunks = list(chunks)
        came.append(until.wait(10))
        time.sleep(after_s)
        send(self, iter(chunks), size)

    monkeypatch.setattr(objstore.ObjectSink, "write_stream", held)
    return came


def test_the_manifest_is_built_while_the_data_is_still_uploading(bucket, monkeypatch):
    """The manifest (all of a 10,000-leaf tree's records) is encoded as soon as
    every checksum is known, not after the uploads: here no upload is sent
    before it is, and the save still commits and restores bit-exactly."""
    from jaxckpt import format as fmt
    url, opts, objs, name = bucket
    encoded = threading.Event()
    encode = fmt.encode_manifest

    def encode_then_tell(manifest):
        out = encode(manifest)
        encoded.set()
        return out

    monkeypatch.setattr(fmt, "encode_manifest", encode_then_tell)
    came = _hold_uploads(monkeypatch, encoded)
    rng = np.random.default_rng(3)
    tree = {f"l{i}": rng.random(int(rng.integers(4, 64)), dtype=np.float32) for i in range(10_000)}
    jaxckpt.save(f"{url}/early", tree, storage_options=opts)
    assert came == [True]
    out = jaxckpt.restore(f"{url}/early", storage_options=opts)
    assert all(same(out[k], tree[k]) for k in tree)


def test_a_manifest_refused_during_the_upload_leaves_no_object(bucket, monkeypatch):
    """Metadata above the manifest's caps fails the save while its data is
    still on its way: the save waits for that upload, then removes it."""
    from jaxckpt import manifests
    url, opts, objs, name = bucket
    refused = threading.Event()
    build = manifests.encode

    def build_then_tell(*args, **kwargs):
        try:
            return build(*args, **kwargs)
        finally:
            refused.set()

    monkeypatch.setattr(manifests, "encode", build_then_tell)
    came = _hold_uploads(monkeypatch, refused, after_s=0.3)  # lands after a cleanup that did not wait
    with pytest.raises(jaxckpt.UnsupportedValueError, match="cannot be read back"):
        jaxckpt.save(f"{url}/big-meta", {"w": np.arange(1000.0)}, metadata={"note": "m" * (2**20 + 1)},
                     storage_options=opts)
    assert came == [True]
    time.sleep(0.5)
    assert objs.keys() == []


def _dead_process() -> dict:
    import socket
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return {"host": socket.gethostname(), "pid": p.pid, "start": None}


# ----------------------------------------------------------------------------- requests, faults
def test_requests_scale_with_bytes_not_leaves(store, bucket):
    url, _, _, _ = bucket
    proxy = objservers.FaultProxy(upstream(store))
    try:
        popts = store[2](proxy.endpoint)
        rng = np.random.default_rng(1)
        tree = {f"l{i}": rng.random(int(rng.integers(16, 512)), dtype=np.float32) for i in range(10_000)}
        jaxckpt.save(f"{url}/w2", tree, storage_options=popts)
        saved = dict(proxy.counts)
        out = jaxckpt.restore(f"{url}/w2", storage_options=popts)
        read = {k: proxy.counts.get(k, 0) - saved.get(k, 0) for k in proxy.counts}
        with jaxckpt.CheckpointManager(f"{url}/mgr", storage_options=popts) as mgr:
            mgr.save(7, {"w": tree["l0"], "b": tree["l1"]})
        before = dict(proxy.counts)
        with jaxckpt.CheckpointManager(f"{url}/mgr", read_only=True, storage_options=popts) as mgr:
            back = mgr.restore()
        by_manager = {k: proxy.counts.get(k, 0) - before.get(k, 0) for k in proxy.counts}
    finally:
        proxy.stop()
    assert all(same(out[k], tree[k]) for k in tree)
    assert sum(saved.values()) <= 12, saved  # exists check, marker, data upload, manifest, cleanup
    assert sum(read.values()) <= 12, read
    # GETs alone: the reader's manifest GET is jaxckpt.restore's format detection too, and
    # opening a data object sends nothing; a manager lists its steps and reads the latest.
    assert set(k for k, v in read.items() if v) == {"GET"}, read
    assert same(back["w"], tree["l0"]) and same(back["b"], tree["l1"])
    assert set(k for k, v in by_manager.items() if v) == {"GET"}, by_manager


def test_transient_server_errors_are_retried(store, bucket):
    url, _, _, _ = bucket
    proxy = objservers.FaultProxy(upstream(store), fail_fraction=0.3, seed=5)
    try:
        popts = dict(store[2](proxy.endpoint), retry_timeout=30)
        tree = {"w": np.arange(3_000_000, dtype=np.float32), "s": [np.arange(i) for i in range(20)]}
        for i in range(3):
            jaxckpt.save(f"{url}/flaky/{i}", tree, storage_options=popts)
            out = jaxckpt.restore(f"{url}/flaky/{i}", storage_options=popts)
            assert same(out["w"], tree["w"]) and all(same(a, b) for a, b in zip(out["s"], tree["s"]))
        assert sum(proxy.faults.values()) > 5  # failures were injected, and retried through
    finally:
        proxy.stop()


def test_a_server_that_dies_mid_upload_fails_the_save_cleanly_within_its_timeout(store, bucket):
    url, opts, objs, name = bucket
    proxy = objservers.FaultProxy(upstream(store), fail_after_bytes=20 << 20)
    try:
        popts = dict(store[2](proxy.endpoint), retry_timeout=3, max_retries=2)
        with jaxckpt.AsyncCheckpointer(storage_options=popts, timeout=30) as ck:
            t0 = time.monotonic()
            h = ck.save(f"{url}/dies", {"w": np.ones(64 << 20, np.uint8)})
            with pytest.raises(jaxckpt.CheckpointError) as e:
                h.result()
            assert time.monotonic() - t0 < 30
            assert f"{url}/dies" in str(e.value)
    finally:
        proxy.stop()
    assert not any(k.endswith(MANIFEST_NAME) for k in objs.keys("dies/"))
    with pytest.raises(jaxckpt.CheckpointNotFoundError):
        jaxckpt.restore(f"{url}/dies", storage_options=opts)


def test_a_save_whose_part_uploads_fail_leaves_no_unfinished_multipart_upload(moto, s3bucket):
    """Every part upload refused (5xx, past the retries): the save fails, and
    its multipart upload is aborted, not left behind to bill."""
    url, opts, objs, name = s3bucket
    proxy = objservers.FaultProxy(moto.endpoint, fail_fraction=1.0, fail_methods={"PUT"}, fail_query="partNumber")
    try:
        popts = dict(opts, endpoint=proxy.endpoint, retry_timeout=2, max_retries=2)
        with pytest.raises(jaxckpt.CheckpointError) as e:
            jaxckpt.save(f"s3://{name}/refused", {"w": np.ones(40 << 20, np.uint8)}, storage_options=popts)
        assert f"s3://{name}/refused" in str(e.value)
        assert proxy.faults.get("PUT", 0) > 0 and proxy.counts.get("POST", 0) >= 1  # parts refused, upload begun
        assert objs.s3.list_multipart_uploads(Bucket=name).get("Uploads", []) == []
    finally:
        proxy.stop()
    assert not any(k.endswith(MANIFEST_NAME) or "data-" in k for k in objs.keys("refused/"))


# ----------------------------------------------------------------------------- CLI
def test_cli_ls_show_verify_on_a_bucket(bucket, monkeypatch, capsys):
    url, opts, objs, name = bucket
    with jaxckpt.CheckpointManager(f"{url}/cli", storage_options=opts) as mgr:
        for step in (1, 2):
            mgr.save(step, {"x": np.arange(10) * step}, force=True)
    for k, v in environment(objs.scheme, opts["endpoint"]).items():
        monkeypatch.setenv(k, v)
    assert cli.main(["ls", f"{url}/cli"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["STEP", "EPOCH", "TIME", "SIZE", "METRICS", "REASON"]
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["1", "2"]
    assert cli.main(["show", f"{url}/cli/2"]) == 0
    assert capsys.readouterr().out.startswith(f"{url}/cli/2\n")
    assert cli.main(["verify", f"{url}/cli"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 of 2 checkpoints OK"
    data_key = next(k for k in objs.keys("cli/1/") if "data-" in k)
    objs.put(data_key, b"\0" * 80)
    assert cli.main(["verify", f"{url}/cli"]) == 1
    assert f"FAILED  {url}/cli/1: " in capsys.readouterr().out


def test_ls_and_rotation_read_the_manifests_of_many_steps_at_once(store, bucket, monkeypatch, capsys):
    """In a bucket each manifest is a round trip (0.1 s through this proxy):
    `jaxckpt ls` and the first rotation of a resumed run read a dozen of them
    several at a time, not one after the other (which would keep one request
    in flight at most)."""
    url, opts, objs, name = bucket
    with jaxckpt.CheckpointManager(f"{url}/many", storage_options=opts) as mgr:
        for step in range(12):
            mgr.save(step, {"x": np.arange(4) + step}, metrics={"loss": float(12 - step)}, force=True)
    proxy = objservers.FaultProxy(upstream(store), latency_s=0.1)
    try:
        popts = store[2](proxy.endpoint)
        for k, v in environment(objs.scheme, popts["endpoint"]).items():
            monkeypatch.setenv(k, v)
        assert cli.main(["ls", f"{url}/many"]) == 0
        rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
        assert [(r[0], r[-2]) for r in rows] == [(str(s), f"loss={12 - s}") for s in range(12)]
        assert proxy.peak_in_flight >= 4
        with jaxckpt.CheckpointManager(f"{url}/many", max_to_keep=10, storage_options=popts) as mgr:
            proxy.reset_counts()
            mgr.save(12, {"x": np.arange(4) + 12}, metrics={"loss": 0.0}, force=True)
            mgr.wait_until_finished()
            assert proxy.peak_in_flight >= 4  # the save itself sends one request at a time
            assert mgr.all_steps() == list(range(3, 13))
    finally:
        proxy.stop()
    assert sorted(int(k.split("/")[1]) for k in objs.keys("many/") if k.endswith(MANIFEST_NAME)) == list(range(3, 13))


def test_a_get_body_is_copied_into_place_and_a_longer_one_is_refused():
    from jaxckpt import objclient

    out = memoryview(bytearray(10))
    assert objclient.copy_into(out, b"abcdef", "s3://b/k") == 6
    assert bytes(out) == b"abcdef\0\0\0\0"
    with pytest.raises(jaxckpt.StorageError) as e:
        objclient.copy_into(out, bytes(11), "s3://b/k")
    assert str(e.value) == "s3://b/k: the server sent 11 bytes, 10 were asked for"


def test_parts_grow_past_16_mib_where_the_part_count_would_not_suffice(s3bucket, monkeypatch):
    # S3 takes 10,000 parts of an upload: 16 MiB parts end at 156 GiB per
    # process. Here with the count made 3: a 100 MiB object goes up in 3 parts
    # of 34 MiB, and one that 3 largest parts cannot hold fails before a byte is sent.
    from jaxckpt import obstoreclient
    url, opts, objs, name = s3bucket
    monkeypatch.setattr(obstoreclient.ObstoreClient, "MAX_PARTS", 3)
    w = np.random.default_rng(2).integers(0, 255, 100 << 20, dtype=np.uint8)
    jaxckpt.save(f"{url}/big", {"w": w}, storage_options=opts)
    data_key = next(k for k in objs.keys("big/") if "data-" in k)
    head = objs.s3.head_object(Bucket=name, Key=data_key, PartNumber=1)
    assert (head["PartsCount"], head["ContentLength"]) == (3, 34 << 20)
    assert same(jaxckpt.restore(f"{url}/big", storage_options=opts)["w"], w)
    monkeypatch.setattr(obstoreclient.ObstoreClient, "MAX_PART_BYTES", 32 << 20)
    with pytest.raises(jaxckpt.StorageError, match=rf"{url}/big2/data-00000-[0-9a-f]{{16}}\.bin: {w.nbytes} bytes "
                                                   r"is more than one object can hold here \(3 parts of at most 32 MiB, "):
        jaxckpt.save(f"{url}/big2", {"w": w}, storage_options=opts)
    assert objs.keys("big2/") == []


def test_a_bucket_in_another_region_names_the_region_to_set(moto, s3bucket, monkeypatch):
    """S3 answers a request signed for another region than the bucket's with
    301 PermanentRedirect and no Location (the proxy answers so for region
    eu-west-1); the error says which region is in use, where it came from, and
    the bucket's own, asked of the server."""
    url, opts, _, _ = s3bucket
    tree = {"w": np.arange(1000, dtype=np.float32), "n": 3}
    proxy = objservers.FaultProxy(moto.endpoint, bucket_region="eu-west-1")
    try:
        popts = dict(opts, endpoint=proxy.endpoint)
        fix = "set AWS_REGION=eu-west-1 or storage_options={'region': 'eu-west-1'}"
        with pytest.raises(jaxckpt.StorageError) as e:
            jaxckpt.save(f"{url}/r/1", tree, storage_options=popts)
        assert type(e.value) is jaxckpt.StorageError
        assert str(e.value) == (f"{url}/r/1/: could not list: the bucket is in region "
                                f"'eu-west-1', not 'us-east-1' (from storage_options): {fix}")
        monkeypatch.setenv("AWS_REGION", "ap-south-1")
        no_region = {k: v for k, v in popts.items() if k != "region"}
        with pytest.raises(jaxckpt.StorageError, match=r"^" + re.escape(
                f"{url}/r/: could not list: the bucket is in region 'eu-west-1', not 'ap-south-1' "
                f"(from AWS_REGION): {fix}") + "$"):
            jaxckpt.CheckpointManager(f"{url}/r", read_only=True, storage_options=no_region).all_steps()
        monkeypatch.setenv("AWS_REGION", "eu-west-1")  # the first fix the message names, in the same process
        assert jaxckpt.CheckpointManager(f"{url}/r", read_only=True, storage_options=no_region).all_steps() == []
        monkeypatch.setenv("AWS_REGION", "ap-south-1")
        fixed = dict(no_region, region="eu-west-1")  # the second fix it names
        with jaxckpt.CheckpointManager(f"{url}/r", storage_options=fixed) as mgr:
            mgr.save(1, tree, force=True)
        out = jaxckpt.restore(f"{url}/r/1", storage_options=fixed)
        assert same(out["w"], tree["w"]) and out["n"] == 3
        assert proxy.counts.get("PUT", 0) >= 2  # the save went through the proxy, signed for eu-west-1
    finally:
        proxy.stop()
