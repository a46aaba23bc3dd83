"""Checkpoints in a GCS bucket (``gs://``) through the whole jaxckpt API,
against fake-gcs-server started here on 127.0.0.1 (issue 16). Objects are
listed with google-cloud-storage, independently of jaxckpt."""

from __future__ import annotations

import gc
import re
import threading
import time
import warnings

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import helpers
import jaxckpt
import objservers
from jaxckpt import cli, gcsclient
from jaxckpt.reader import CheckpointReader

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    srv = objservers.start_fake_gcs(tmp_path_factory.mktemp("gcs"))
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _collect_dropped_connections():
    """urllib3 frees a failed request's socket only when the pool is collected:
    collect here so its ResourceWarning cannot land in a later test."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


_buckets = iter(range(10**6))


@pytest.fixture
def bucket(gcs):
    name = f"gbucket-{next(_buckets)}"
    objservers.make_gcs_bucket(gcs.endpoint, name)
    return f"gs://{name}", {"endpoint": gcs.endpoint, "anonymous": True}, name


def names(gcs, bucket: str, prefix: str = "") -> list[str]:
    return sorted(b.name for b in objservers.gcs_client(gcs.endpoint).list_blobs(bucket, prefix=prefix))


def test_a_sharded_state_round_trips_on_gcs(gcs, bucket):
    url, opts, name = bucket
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2048, 2048), dtype=np.float32)  # 16 MiB: parts composed
    tree = {"w": jax.device_put(w, NamedSharding(mesh, P("a", "b"))), "step": 5, "key": jax.random.key(9),
            "small": [np.arange(i, dtype=np.uint8) for i in range(200)]}
    with jaxckpt.AsyncCheckpointer(storage_options=opts) as ck:
        ck.save(f"{url}/run/1", tree).result()
    found = names(gcs, name)
    assert len(found) == 2 and found[1] == "run/1/manifest.msgpack"
    assert re.fullmatch(r"run/1/data-00000-[0-9a-f]{16}\.bin", found[0])  # parts composed and deleted
    other = NamedSharding(Mesh(np.array(jax.devices()), ("x",)), P(None, "x"))
    target = {"w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=other), "step": 0,
              "key": jax.random.key(0), "small": [np.zeros(i, np.uint8) for i in range(200)]}
    out = jaxckpt.restore(f"{url}/run/1", target, storage_options=opts)
    assert out["w"].sharding == other and np.asarray(out["w"]).tobytes() == w.tobytes() and out["step"] == 5
    assert np.array_equal(jax.random.key_data(out["key"]), jax.random.key_data(tree["key"]))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(out["small"], tree["small"]))
    assert jaxckpt.inspect(f"{url}/run/1", storage_options=opts).total_bytes == w.nbytes + sum(range(200)) + 8


def test_each_process_data_is_cut_into_objects_of_about_file_bytes(gcs, bucket, monkeypatch):
    # GCS data objects go up in one request each, never composed: the writer
    # cuts the data between leaves into objects of about file_bytes (1 MiB here).
    monkeypatch.setattr(gcsclient.GcsClient, "file_bytes", 1 << 20)
    url, opts, name = bucket
    rng = np.random.default_rng(5)
    tree = {"a": [rng.standard_normal(150_000, dtype=np.float32) for _ in range(6)],  # 600 KB each
            "big": rng.integers(0, 255, 3 << 20, dtype=np.uint8),  # larger than file_bytes: one object of its own
            "small": [np.arange(i, dtype=np.int16) for i in range(50)], "step": 3}
    for path, key in (("plain", None), ("sealed", bytes(range(32)))):
        jaxckpt.save(f"{url}/{path}", tree, storage_options=opts, encryption_key=key)
        found = names(gcs, name, f"{path}/")
        data = [n for n in found if n != f"{path}/manifest.msgpack"]
        attempt = data[0][-20:-4]
        assert data == sorted([f"{path}/data-00000-{attempt}.bin"] + [
            f"{path}/data-00000-{k:05d}-{attempt}.bin" for k in range(1, len(data))]), found  # no parts
        with CheckpointReader(f"{url}/{path}", storage_options=opts, encryption_key=key) as r:
            sizes = [f.size for f in r.manifest.files]
        assert len(sizes) == 5 and 3 << 20 in sizes and all(s < 2 << 20 for s in sizes if s != 3 << 20), sizes
        out = jaxckpt.restore(f"{url}/{path}", storage_options=opts, encryption_key=key)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(out["a"] + out["small"] + [out["big"]],
                                                           tree["a"] + tree["small"] + [tree["big"]]))
        part = jaxckpt.restore(f"{url}/{path}", {"a": [np.zeros(150_000, np.float32)] * 6}, partial=True,
                               storage_options=opts, encryption_key=key)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(part["a"], tree["a"]))


def test_encrypted_uploads_holding_ciphertext_run_at_most_four_at_once(gcs, bucket, monkeypatch):
    # Each GCS data object is one request: an encrypted one holds its ciphertext
    # until sent, so at most 4 run at once; plain ones (views of the snapshot) are not held back.
    monkeypatch.setattr(gcsclient.GcsClient, "file_bytes", 64 << 10)
    url, opts, _ = bucket
    state = {"now": 0, "most": 0}
    lock = threading.Lock()
    put_stream = gcsclient.GcsClient.put_stream

    def counting(self, key, chunks, size):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        try:
            time.sleep(0.05)  # long enough for the others to start
            return put_stream(self, key, chunks, size)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(gcsclient.GcsClient, "put_stream", counting)
    tree = [np.full(20_000, i, np.float32) for i in range(24)]  # 80 KB each: 24 objects
    for key, most in ((bytes(range(32)), 4), (None, 8)):
        state["most"] = 0
        with jaxckpt.AsyncCheckpointer(max_workers=8, storage_options=opts, encryption_key=key) as ck:
            ck.save(f"{url}/conc-{most}", tree).result()
        assert state["most"] == most, (key is not None, state)
        out = jaxckpt.restore(f"{url}/conc-{most}", storage_options=opts, encryption_key=key)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(out, tree))


def test_manager_rotation_overwrite_and_lock_on_gcs(gcs, bucket):
    url, opts, name = bucket
    with jaxckpt.CheckpointManager(f"{url}/mgr", max_to_keep=2, storage_options=opts) as mgr:
        for step in range(4):
            mgr.save(step, {"x": np.full(100, step)}, force=True)
        with pytest.raises(jaxckpt.CheckpointLockedError, match=f"gs://{name}/mgr/.jaxckpt-lock: another writer"):
            jaxckpt.CheckpointManager(f"{url}/mgr", storage_options=opts)
        mgr.save(3, {"x": np.full(100, 33)}, force=True, overwrite=True)
        mgr.wait_until_finished()
        assert mgr.all_steps() == [2, 3]
    found = names(gcs, name, "mgr/")
    assert [n.split("/")[1] for n in found if n.endswith("manifest.msgpack")] == ["2", "3"]
    assert len([n for n in found if "/3/data-" in n]) == 1  # the overwritten version's data is gone
    assert "mgr/.jaxckpt-lock" not in found
    assert jaxckpt.CheckpointManager(f"{url}/mgr", read_only=True, storage_options=opts).restore()["x"][0] == 33


def test_the_manifest_commit_is_a_conditional_create_on_gcs(bucket):
    helpers.check_conditional_commit(bucket[0], bucket[1])


def test_missing_bucket_and_cli_on_gcs(gcs, bucket, monkeypatch, capsys):
    url, opts, _ = bucket
    with pytest.raises(jaxckpt.BucketNotFoundError, match="gs://no-such-gbucket"):
        jaxckpt.restore("gs://no-such-gbucket/x", storage_options=opts)
    jaxckpt.save(f"{url}/c/1", {"x": np.arange(7)}, storage_options=opts)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.endpoint)
    assert cli.main(["verify", f"{url}/c"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"OK  {url}/c/1  (1 leaf, 56 B)", "1 of 1 checkpoints OK"]


def test_two_processes_restore_only_the_byte_ranges_they_need(gcs, tmp_path):
    import test_objstore_multihost as mh
    objservers.make_gcs_bucket(gcs.endpoint, mh.BUCKET)
    env = {"OBJSTORE_TEST_SCHEME": "gs", "STORAGE_EMULATOR_HOST": gcs.endpoint}
    mh.check_reads_only_its_half(mh.run_job(None, "restore", tmp_path, env=env))


def test_missing_and_short_data_objects_on_gcs_are_named_by_the_reads(gcs, bucket):
    """No HEAD per data object: the GETs that need its bytes find a short or
    missing one (fake-gcs answers a range past the end with 416)."""
    url, opts, name = bucket
    jaxckpt.save(f"{url}/d", {"a": np.arange(256, dtype=np.int64), "b": np.arange(1000, dtype=np.float32)},
                 storage_options=opts)
    (data_key,) = [k for k in names(gcs, name, "d/") if "data-" in k]
    blob = objservers.gcs_client(gcs.endpoint).bucket(name).blob(data_key)
    body = blob.download_as_bytes()
    helpers.check_short_and_missing_data(f"{url}/d", opts, f"{url}/{data_key}", len(body),
                                         lambda n: blob.upload_from_string(body[:n]), blob.delete)
