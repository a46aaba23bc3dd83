"""Multi-process saves to an S3 bucket: real jax.distributed processes on
localhost (CPU, gloo, 4 devices each), one moto server run by this process.

The processes share nothing on disk: each runs in its own working directory
(and TMPDIR), and learns the bucket only from its endpoint
(``AWS_ENDPOINT_URL``, or ``storage_options``). What they leave in the bucket
is listed with boto3, not with jaxckpt, so the assertions do not rest on the
code under test; restores run here, in one process with 8 devices and other
shardings.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import helpers
import jaxckpt
from jaxckpt.reader import CheckpointReader

import objservers
import objstore_worker as ow

WORKER = os.path.join(os.path.dirname(__file__), "objstore_worker.py")
BUCKET = "mh-ckpt"
DATA_RE = re.compile(r"^data-(?P<process>\d{5})-(?P<attempt>[0-9a-f]{16})\.bin$")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def moto():
    srv = objservers.start_moto()
    objservers.make_bucket(srv.endpoint, BUCKET)
    yield srv
    srv.stop()


def options(moto) -> dict:
    return {"endpoint": moto.endpoint}


def list_bucket(moto, prefix: str = "") -> dict[str, int]:
    """Every object under ``prefix`` (key relative to it -> size), by boto3."""
    client = objservers.s3_client(moto.endpoint)
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix):]] = o["Size"]
    return out


def run_job(moto, scenario: str, tmp_path, nproc: int = 2, ndev: int = 4, timeout: float = 60,
            env: dict | None = None) -> list[dict]:
    """Run ``scenario`` in ``nproc`` processes, each in its own empty directory;
    return their results (failing with the logs if any process gave none).
    Afterwards every directory is still empty: nothing went to local disk.
    ``env``: the server's settings (default: ``AWS_ENDPOINT_URL``, moto's)."""
    port = objservers.free_ports(1)[0]
    env_extra = env
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs, logs, homes = [], [], []
    for i in range(nproc):
        home = tmp_path / f"{scenario}-p{i}" / "cwd"
        home.mkdir(parents=True)
        homes.append(home)
        env = dict(base, **(env_extra or {"AWS_ENDPOINT_URL": moto.endpoint}), TMPDIR=str(home))
        log = open(home.parent / "log.txt", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, WORKER, scenario, str(i), str(nproc), str(port), str(ndev),
                                       BUCKET], cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            p.kill()
            p.wait()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    results = []
    for text in texts:
        results.append(helpers.worker_result(text))
    assert all(r is not None for r in results), "\n----\n".join(t[-3000:] for t in texts)
    assert all(not r.get("error") for r in results), results
    for home in homes:
        assert not list(home.iterdir()), f"a process wrote to its local directory: {list(home.iterdir())}"
    return results


def same(got, want) -> bool:
    return ow.same(jax.device_get(got), want)


# ----------------------------------------------------------------------------- one sharded save
@pytest.fixture(scope="module")
def saved(moto, tmp_path_factory):
    return run_job(moto, "save", tmp_path_factory.mktemp("objmh"))


def data_objects(names) -> dict[int, str]:
    """process -> attempt, for every data object among ``names``."""
    out = {}
    for n in names:
        m = DATA_RE.match(n)
        if m:
            assert int(m["process"]) not in out, f"two data objects of process {m['process']}: {sorted(names)}"
            out[int(m["process"])] = m["attempt"]
    return out


def test_one_data_object_per_process_and_the_manifest_nothing_else(moto, saved):
    objs = list_bucket(moto, "run/1/")
    attempts = data_objects(objs)
    assert sorted(attempts) == [0, 1], sorted(objs)
    assert len(set(attempts.values())) == 1, f"the processes wrote different attempts: {sorted(objs)}"
    attempt = attempts[0]
    assert sorted(objs) == [f"data-00000-{attempt}.bin", f"data-00001-{attempt}.bin", "manifest.msgpack"]
    assert not [k for k in list_bucket(moto) if ".jaxckpt-tmp-" in k]
    # The manifest names exactly those objects, with their sizes; each process
    # wrote its own half of the sharded leaves, process 0 the replicated ones, once.
    v = ow.global_values()
    with CheckpointReader(f"s3://{BUCKET}/run/1", storage_options=options(moto)) as r:
        files = r.manifest.files
        per_file = [0] * len(files)
        for leaf in r.manifest.leaves:
            for s in leaf.shards:
                per_file[s.file] += s.length
    assert {f.name: f.size for f in files} == {n: s for n, s in objs.items() if n != "manifest.msgpack"}
    by_name = dict(zip((f.name for f in files), per_file))
    halves = (v["params"]["w"].nbytes + v["params"]["v"].nbytes) // 2
    assert by_name[f"data-00001-{attempt}.bin"] == halves
    assert by_name[f"data-00000-{attempt}.bin"] == halves + v["params"]["b"].nbytes + v["replicated"].nbytes + \
        v["host"].nbytes
    assert jaxckpt.inspect(f"s3://{BUCKET}/run/1", storage_options=options(moto)).metadata == {"by": 2}


def test_a_process_without_data_of_its_own_writes_no_object(moto, saved):
    objs = list_bucket(moto, "run/2/")
    attempts = data_objects(objs)
    assert sorted(objs) == [f"data-00000-{attempts[0]}.bin", "manifest.msgpack"]
    got = jaxckpt.restore(f"s3://{BUCKET}/run/2", storage_options=options(moto))
    assert same(got, ow.replicated_values())


def resharded_target(mesh, specs: dict) -> dict:
    v = ow.global_values()

    def sds(x, spec):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    return {"params": {k: sds(v["params"][k], specs[k]) for k in ("w", "v", "b")},
            "replicated": sds(v["replicated"], specs["replicated"]),
            "host": np.zeros_like(v["host"]), "step": 0}


@pytest.mark.parametrize("shape,specs", [
    ((4, 2), {"w": P("b", "a"), "v": P(None, "a"), "b": P(("a", "b")), "replicated": P("a")}),
    ((8,), {"w": P(None, "d"), "v": P("d"), "b": P(), "replicated": P("d", None)}),
], ids=["4x2-transposed", "8-one-axis"])
def test_restore_in_one_process_with_other_shardings(moto, saved, shape, specs):
    mesh = Mesh(np.array(jax.devices()).reshape(shape), ("a", "b") if len(shape) == 2 else ("d",))
    tgt = resharded_target(mesh, specs)
    got = jaxckpt.restore(f"s3://{BUCKET}/run/1", tgt, storage_options=options(moto))
    assert same(got, ow.global_values())
    for k in ("w", "v", "b"):
        assert got["params"][k].sharding == tgt["params"][k].sharding, k
    assert got["replicated"].sharding == tgt["replicated"].sharding


def test_an_encrypted_save_by_two_processes_restores_resharded(moto, saved):
    names = list_bucket(moto, "enc/1/")
    assert sorted(data_objects(names)) == [0, 1]  # each process encrypted and uploaded its own shards
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    specs = {"w": P("b", "a"), "v": P("a"), "b": P(None), "replicated": P("b")}
    got = jaxckpt.restore(f"s3://{BUCKET}/enc/1", resharded_target(mesh, specs),
                          storage_options=options(moto), encryption_key=ow.ENCRYPTION_KEY)
    assert same(got, ow.global_values())
    with pytest.raises(jaxckpt.DecryptionError):
        jaxckpt.restore(f"s3://{BUCKET}/enc/1", storage_options=options(moto))


def test_each_process_data_cut_into_several_objects_restores_resharded(moto, tmp_path):
    # The layout GCS uses (objects of about file_bytes, cut between leaves), on
    # two processes; here with 64-byte objects on S3 (set in the workers).
    run_job(moto, "split", tmp_path)
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    specs = {"w": P("b", "a"), "v": P(None, "a"), "b": P(("a", "b")), "replicated": P("a")}
    split_re = re.compile(r"^data-(?P<process>\d{5})(?:-(?P<part>\d{5}))?-(?P<attempt>[0-9a-f]{16})\.bin$")
    for prefix, key in (("split/1/", None), ("splitenc/1/", ow.ENCRYPTION_KEY)):
        objs = list_bucket(moto, prefix)
        data = {n: split_re.match(n) for n in objs if n != "manifest.msgpack"}
        assert all(data.values()), sorted(objs)
        per_process = [sorted(int(m["part"] or 0) for m in data.values() if int(m["process"]) == p) for p in (0, 1)]
        assert all(len(parts) >= 2 and parts == list(range(len(parts))) for parts in per_process), per_process
        assert len({m["attempt"] for m in data.values()}) == 1
        with CheckpointReader(f"s3://{BUCKET}/{prefix}", storage_options=options(moto), encryption_key=key) as r:
            assert {f.name: f.size for f in r.manifest.files} == {n: objs[n] for n in data}
        got = jaxckpt.restore(f"s3://{BUCKET}/{prefix}", resharded_target(mesh, specs), storage_options=options(moto),
                              encryption_key=key)
        assert same(got, ow.global_values()), prefix


def test_restore_without_target_as_numpy(moto, saved):
    got = jaxckpt.restore(f"s3://{BUCKET}/run/1", storage_options=options(moto))
    assert same(got, ow.global_values())
    assert isinstance(got["params"]["w"], np.ndarray) and type(got["step"]) is int


def test_a_process_that_calls_save_after_process_0_began_joins_the_save(moto, tmp_path):
    # Process 1 arrives once process 0's marker (.jaxckpt-tmp-<attempt>) is
    # under run/3/: nothing it does may mistake that save for a committed
    # checkpoint (it would refuse, and process 0 would wait in vain). (Only
    # process 0 checks whether a checkpoint is there, before it begins.)
    run_job(moto, "late_joiner", tmp_path)
    objs = list_bucket(moto, "run/3/")
    attempts = data_objects(objs)
    assert sorted(objs) == [f"data-00000-{attempts[0]}.bin", f"data-00001-{attempts[0]}.bin", "manifest.msgpack"]
    got = jaxckpt.restore(f"s3://{BUCKET}/run/3", storage_options=options(moto))
    assert same(got, {"w": ow.global_values()["params"]["w"], "step": 7})


def test_an_existing_checkpoint_is_refused_by_process_0_for_both(moto, tmp_path):
    """The check that nothing is there yet runs on process 0's save thread
    (a round trip the training loops do not wait for); process 1 gets its
    answer through the coordination service. Nothing is written."""
    results = run_job(moto, "refused", tmp_path)
    url = f"s3://{BUCKET}/run/4"
    exists = f"{url}: a checkpoint already exists (pass overwrite=True to replace it)"
    assert results[0]["refused"] == {"type": "CheckpointExistsError", "message": exists}, results
    assert results[1]["refused"] == {"type": "CheckpointExistsError",
                                     "message": f"[process=1] save of {url} refused by process 0: {exists}"}, results
    objs = list_bucket(moto, "run/4/")
    attempts = data_objects(objs)
    assert sorted(objs) == [f"data-00000-{attempts[0]}.bin", f"data-00001-{attempts[0]}.bin", "manifest.msgpack"]


# ----------------------------------------------------------------------------- a manager
def test_manager_across_two_processes_keeps_two_steps_and_releases_the_lock(moto, tmp_path):
    """Both processes keep the steps process 0's losses (the manifests')
    choose, though process 1 gave other losses, and neither reads a manifest
    back: process 1 has process 0's record with the commit's outcome. Process
    0 sees every process's data in one listing per save, not a HEAD each."""
    results = run_job(moto, "manager", tmp_path)
    # process 0's losses [3, 1, 4, 2]: the newest (3) and the two lowest (1, 3); by
    # process 1's [2, 4, 1, 3] step 3 would keep 0 and 2 as well
    assert [r["steps"] for r in results] == [[1, 3], [1, 3]], results
    assert [r["manifests_read"] for r in results] == [[], []], results
    assert [r["data_looked_up"] for r in results] == [[], []], results
    objs = list_bucket(moto, "mgr/")
    assert ".jaxckpt-lock" not in objs, sorted(objs)
    assert not [k for k in objs if ".jaxckpt-tmp-" in k], sorted(objs)
    assert {k.partition("/")[0] for k in objs} == {"1", "3"}, sorted(objs)
    with jaxckpt.CheckpointManager(f"s3://{BUCKET}/mgr", read_only=True, storage_options=options(moto)) as ro:
        assert ro.all_steps() == [1, 3]
        for step in (1, 3):
            mine = {k.partition("/")[2]: s for k, s in objs.items() if k.startswith(f"{step}/")}
            attempts = data_objects(mine)
            assert sorted(attempts) == [0, 1] and len(set(attempts.values())) == 1, sorted(mine)
            assert len(mine) == 3, sorted(mine)  # two data objects and the manifest
            assert same(ro.restore(step), ow.step_values(step))


def check_reads_only_its_half(results: list[dict]) -> None:
    """(``restore`` scenario) Each of 2 processes restored the rows the other
    saved, reading only that object, about half the 16 MiB."""
    half = 4096 * 1024 * 4 // 2
    for pid, r in enumerate(results):
        assert r["ok"], r
        assert r["first_rows"][0] == (1 - pid) * 2048, r  # the halves are swapped
        assert len(r["objects_read"]) == 1 and r["objects_read"][0].startswith(f"data-{1 - pid:05d}-"), r
        assert half <= r["read_bytes"] <= half + (1 << 20), r  # its half, not the whole 16 MiB


def test_two_processes_restore_only_the_byte_ranges_they_need(moto, tmp_path):
    check_reads_only_its_half(run_job(moto, "restore", tmp_path))
