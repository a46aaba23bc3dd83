"""What only ``az://`` (Azure Blob Storage) has, against Azurite started here on
127.0.0.1: its configuration, credentials and errors, large objects as blocks,
two processes saving to one container. (Everything a bucket does in common with S3 runs on
both in tests/test_objstore.py.) Blobs are looked at through Azure's REST API
(``azservers``), independently of jaxckpt."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import azservers
import jaxckpt
from jaxckpt import azclient, cli


@pytest.fixture(scope="module")
def azurite(tmp_path_factory):
    srv = azservers.start_azurite(tmp_path_factory.mktemp("azurite"))
    yield srv
    srv.stop()


_containers = iter(range(10**6))


@pytest.fixture
def container(azurite):
    """A fresh container: ``(url prefix, storage_options, name)``."""
    name = f"ckpts-{next(_containers)}"
    azservers.make_container(azurite.endpoint, name)
    return f"az://{name}", azurite.options(), name


def test_a_large_sharded_state_goes_up_as_blocks_of_one_object(azurite, container):
    url, opts, name = container
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    w = np.random.default_rng(1).standard_normal((2560, 2048), dtype=np.float32)  # 20 MiB: two blocks
    tree = {"w": jax.device_put(w, NamedSharding(mesh, P("a", "b"))), "step": 11, "key": jax.random.key(4)}
    with jaxckpt.AsyncCheckpointer(storage_options=opts) as ck:
        ck.save(f"{url}/run/1", tree).result()
    found = azservers.list_blobs(azurite.endpoint, name)
    assert len(found) == 2 and found[1] == "run/1/manifest.msgpack"
    assert re.fullmatch(r"run/1/data-00000-[0-9a-f]{16}\.bin", found[0])
    status, body = azservers.request("GET", f"{azurite.endpoint}/{name}/{found[0]}?comp=blocklist")
    assert status == 200 and body.count(b"<Block>") == 2, body[:500]  # 16 MiB parts, committed as one list
    other = NamedSharding(Mesh(np.array(jax.devices()), ("x",)), P(None, "x"))
    target = {"w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=other), "step": 0, "key": jax.random.key(0)}
    out = jaxckpt.restore(f"{url}/run/1", target, storage_options=opts)
    assert out["w"].sharding == other and np.asarray(out["w"]).tobytes() == w.tobytes() and out["step"] == 11
    assert np.array_equal(jax.random.key_data(out["key"]), jax.random.key_data(tree["key"]))


def test_refused_credentials_name_their_source_never_the_secret(azurite, container):
    url, opts, _ = container
    wrong = "A" * 20 + azservers.KEY[20:]
    with pytest.raises(jaxckpt.StorageAccessError) as e:
        jaxckpt.save(f"{url}/x", {"x": np.arange(3)}, storage_options=dict(opts, account_key=wrong))
    msg = str(e.value)
    assert msg.startswith(f"{url}/x/") and "access denied while trying to" in msg, msg
    assert "credentials from the account key (storage_options['account_key'])" in msg
    assert wrong not in msg and azservers.KEY not in msg


def test_credentials_from_the_environment_are_named_by_variable(azurite, container, monkeypatch):
    url, _, _ = container
    for k, v in azservers.env_for(azurite.endpoint).items():
        monkeypatch.setenv(k, v)
    jaxckpt.save(f"{url}/env", {"x": np.arange(4)})
    assert jaxckpt.restore(f"{url}/env")["x"].tolist() == [0, 1, 2, 3]
    # (a client is made once per container and options, and reads the environment then: another container)
    azservers.make_container(azurite.endpoint, "ckpts-wrong-key")
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", "B" * 20 + azservers.KEY[20:])
    with pytest.raises(jaxckpt.StorageAccessError, match=r"credentials from the account key "
                                                         r"\(AZURE_STORAGE_ACCOUNT_KEY\)"):
        jaxckpt.restore("az://ckpts-wrong-key/env")


@pytest.mark.timeout(60)  # the token requests give up (max_retries 1), not obstore's default 3 minutes
def test_no_account_and_no_credentials_are_access_errors(azurite, container):
    url, _, _ = container
    with pytest.raises(jaxckpt.StorageAccessError) as e:
        jaxckpt.restore(f"{url}/x")
    assert str(e.value) == (f"{url}: no Azure storage account named: set AZURE_STORAGE_ACCOUNT_NAME or "
                            "storage_options={'account_name': ...}")
    # An account but no credential: obstore asks the managed identity endpoint
    # (here a closed local port, set by the conftest) and gives up.
    with pytest.raises(jaxckpt.StorageAccessError) as e:
        jaxckpt.restore(f"{url}/x", storage_options={"account_name": azservers.ACCOUNT, "endpoint": azurite.endpoint,
                                                     "max_retries": 1, "retry_timeout": 2})
    assert f"could not obtain credentials from {azclient.MANAGED_IDENTITY}" in str(e.value)


def test_a_missing_container_and_bad_options_name_the_url(container):
    _, opts, _ = container
    with pytest.raises(jaxckpt.BucketNotFoundError, match="az://no-such-container: the container does not exist"):
        jaxckpt.CheckpointManager("az://no-such-container/run", storage_options=opts)
    with pytest.raises(jaxckpt.UnsupportedLocationError, match="az://no-such-container: bad storage_options: "):
        jaxckpt.restore("az://no-such-container/x", storage_options=dict(opts, no_such_option=1))


def test_cli_with_the_standard_environment(azurite, container, monkeypatch, capsys):
    url, opts, _ = container
    with jaxckpt.CheckpointManager(f"{url}/cli", storage_options=opts) as mgr:
        mgr.save(5, {"x": np.arange(7)}, force=True)
    for k, v in azservers.env_for(azurite.endpoint).items():
        monkeypatch.setenv(k, v)
    assert cli.main(["verify", f"{url}/cli"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"OK  {url}/cli/5  (1 leaf, 56 B)", "1 of 1 checkpoints OK"]


def test_two_processes_save_to_a_container_and_one_restores_resharded(azurite, tmp_path):
    # Real jax.distributed processes (tests/objstore_worker.py's "save"
    # scenario), each in its own empty directory, configured by the
    # environment alone: nothing shared but the container.
    import objstore_worker as ow
    import test_objstore_multihost as mh
    azservers.make_container(azurite.endpoint, mh.BUCKET, exist_ok=True)
    mh.run_job(None, "save", tmp_path, env={"OBJSTORE_TEST_SCHEME": "az", **azservers.env_for(azurite.endpoint)})
    names = azservers.list_blobs(azurite.endpoint, mh.BUCKET, "run/1/")
    attempts = mh.data_objects([n.rpartition("/")[2] for n in names])
    assert sorted(attempts) == [0, 1] and len(names) == 3, names  # one data object per process, the manifest
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    specs = {"w": P("b", "a"), "v": P(None, "a"), "b": P(("a", "b")), "replicated": P("a")}
    got = jaxckpt.restore(f"az://{mh.BUCKET}/run/1", mh.resharded_target(mesh, specs),
                          storage_options=azurite.options())
    assert mh.same(got, ow.global_values())
    got = jaxckpt.restore(f"az://{mh.BUCKET}/enc/1", storage_options=azurite.options(),
                          encryption_key=ow.ENCRYPTION_KEY)
    assert mh.same(got, ow.global_values())


def test_the_emulator_switch_needs_no_account_or_key(azurite, container, monkeypatch):
    # AZURE_STORAGE_USE_EMULATOR: Azurite's well-known account and key, at AZURITE_BLOB_STORAGE_URL.
    url, _, _ = container
    monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", azurite.endpoint.rpartition("/")[0])
    monkeypatch.setenv("AZURE_STORAGE_USE_EMULATOR", "true")
    jaxckpt.save(f"{url}/emu", {"x": np.arange(5)})
    assert jaxckpt.restore(f"{url}/emu")["x"].tolist() == [0, 1, 2, 3, 4]
    assert azclient.credential_source({}) == "the storage emulator's well-known account key (AZURE_STORAGE_USE_EMULATOR)"


def test_two_processes_restore_only_the_byte_ranges_they_need(azurite, tmp_path):
    import test_objstore_multihost as mh
    azservers.make_container(azurite.endpoint, mh.BUCKET, exist_ok=True)
    env = {"OBJSTORE_TEST_SCHEME": "az", **azservers.env_for(azurite.endpoint)}
    mh.check_reads_only_its_half(mh.run_job(None, "restore", tmp_path, env=env))
