"""jaxckpt against SeaweedFS (``weed mini``, started here on 127.0.0.1): a
real S3 server that checks signatures and serves concurrent requests
(issue 16). moto covers the rest of the behaviour (tests/test_objstore.py)."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxckpt
import objservers

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    srv = objservers.start_seaweedfs(tmp_path_factory.mktemp("weed"), buckets=["ckpts"])
    yield srv
    srv.stop()


def options(srv, secret=None) -> dict:
    return {"endpoint": srv.endpoint, "access_key_id": srv.access_key,
            "secret_access_key": secret or srv.secret_key, "region": "us-east-1"}


def test_a_large_sharded_state_round_trips_with_concurrent_parts(weed):
    mesh = Mesh(np.array(jax.devices()), ("x",))
    rng = np.random.default_rng(7)
    w = rng.standard_normal((4096, 4096), dtype=np.float32)  # 64 MiB: a multipart upload, parallel GETs
    tree = {"w": jax.device_put(w, NamedSharding(mesh, P("x"))), "b": rng.standard_normal(1000),
            "small": [np.arange(i, dtype=np.int16) for i in range(300)]}
    with jaxckpt.AsyncCheckpointer(storage_options=options(weed)) as ck:
        ck.save("s3://ckpts/big/1", tree).result()
    other = NamedSharding(Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b")), P("b", "a"))
    target = {"w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=other), "b": np.zeros(1000),
              "small": [np.zeros(i, np.int16) for i in range(300)]}
    out = jaxckpt.restore("s3://ckpts/big/1", target, storage_options=options(weed))
    assert out["w"].sharding == other and np.asarray(out["w"]).tobytes() == w.tobytes()
    assert out["b"].tobytes() == tree["b"].tobytes()
    assert all(a.tobytes() == b.tobytes() for a, b in zip(out["small"], tree["small"]))
    names = sorted(o["Key"] for o in objservers.s3_client(weed.endpoint, weed.access_key, weed.secret_key)
                   .list_objects_v2(Bucket="ckpts", Prefix="big/1/")["Contents"])
    assert len(names) == 2 and re.fullmatch(r"big/1/data-00000-[0-9a-f]{16}\.bin", names[0])


def test_a_second_commit_of_the_same_step_is_refused_by_the_server(weed):
    """The manifest PUT is a conditional create: the server itself refuses a
    second checkpoint at the same place (SeaweedFS honours If-None-Match)."""
    opts = options(weed)
    jaxckpt.save("s3://ckpts/once", {"x": np.arange(3)}, storage_options=opts)
    from jaxckpt import storage
    loc = storage.Location.parse("s3://ckpts/once", opts)
    staging = storage.backend(loc).begin_save(loc)  # as a racing writer that passed the exists check
    staging.write_manifest(b"another manifest")
    with pytest.raises(jaxckpt.CheckpointExistsError, match="s3://ckpts/once: a checkpoint was committed here by "
                                                            "another writer meanwhile"):
        staging.commit(overwrite=False)
    staging.abandon()
    assert jaxckpt.restore("s3://ckpts/once", storage_options=opts)["x"].tolist() == [0, 1, 2]


def test_wrong_credentials_say_which_source_and_never_the_secret(weed, monkeypatch):
    bad = options(weed, secret="not-the-secret-value")
    with pytest.raises(jaxckpt.StorageAccessError) as e:
        jaxckpt.save("s3://ckpts/denied", {"x": np.arange(3)}, storage_options=bad)
    msg = str(e.value)
    assert msg.startswith("s3://ckpts/denied/") and "access denied" in msg
    assert "credentials from storage_options['access_key_id']" in msg
    assert "not-the-secret-value" not in msg and weed.secret_key not in msg
    monkeypatch.setenv("AWS_ENDPOINT_URL", weed.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", weed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "also-wrong")
    with pytest.raises(jaxckpt.StorageAccessError, match=r"credentials from the environment \(AWS_ACCESS_KEY_ID\)"):
        jaxckpt.restore("s3://ckpts/denied")


def test_credentials_from_an_aws_profile_are_signed_and_named(weed, tmp_path, monkeypatch):
    """Keys in ~/.aws/credentials (AWS_PROFILE), keys from a credential_process
    (resolved by boto3), and a profile with a wrong secret, against a server that
    checks every signature."""
    from test_awsprofile import credential_process

    creds, conf = tmp_path / "credentials", tmp_path / "config"
    creds.write_text(f"[ci]\naws_access_key_id = {weed.access_key}\naws_secret_access_key = {weed.secret_key}\n"
                     f"[bad]\naws_access_key_id = {weed.access_key}\naws_secret_access_key = not-the-secret-value\n")
    conf.write_text("[profile proc]\n" + credential_process(tmp_path, weed.access_key, weed.secret_key))
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(conf))
    monkeypatch.setenv("AWS_PROFILE", "ci")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "left-over-from-another-login")  # must not mix with the profile's keys
    where = {"endpoint": weed.endpoint, "region": "us-east-1"}
    tree = {"w": np.arange(10_000, dtype=np.float32), "step": 7}
    jaxckpt.save("s3://ckpts/profile/1", tree, storage_options=where)
    out = jaxckpt.restore("s3://ckpts/profile/1", storage_options={**where, "profile": "proc"})
    assert out["w"].tobytes() == tree["w"].tobytes() and out["step"] == 7
    with pytest.raises(jaxckpt.StorageAccessError) as e:
        jaxckpt.restore("s3://ckpts/profile/1", storage_options={**where, "profile": "bad"})
    msg = str(e.value)
    assert msg.startswith("s3://ckpts/profile/1/manifest.msgpack: access denied while trying to read; credentials "
                          f"from AWS profile 'bad' (storage_options['profile']) in {creds}: ")
    assert "not-the-secret-value" not in msg and weed.secret_key not in msg
