"""The test object-storage servers of tests/objservers.py work as documented:
moto, SeaweedFS (signatures checked, conditional PUTs), fake-gcs-server and
the fault-injecting proxy. One server of each kind per module."""

import datetime
import socket
import time

import obstore
import pytest
from obstore.exceptions import AlreadyExistsError, PermissionDeniedError, PreconditionError

import objservers

# Fast retries for obstore through the fault proxy (its defaults back off from 100 ms).
FAST_RETRY = {"max_retries": 10, "retry_timeout": datetime.timedelta(seconds=20),
              "backoff": {"init_backoff": datetime.timedelta(milliseconds=5),
                          "max_backoff": datetime.timedelta(milliseconds=100), "base": 2}}
NO_RETRY = {"max_retries": 0}


@pytest.fixture(scope="module", autouse=True)
def _no_cloud():
    """Pinned dummy credentials, no metadata lookups, for the whole module."""
    with pytest.MonkeyPatch.context() as mp:
        objservers.no_cloud_env(mp)
        yield


@pytest.fixture(scope="module")
def moto(_no_cloud):
    srv = objservers.start_moto()
    objservers.make_bucket(srv.endpoint, "mb1")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def weed(tmp_path_factory, _no_cloud):
    srv = objservers.start_seaweedfs(tmp_path_factory.mktemp("weed"), buckets=("wb1",))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory, _no_cloud):
    srv = objservers.start_fake_gcs(tmp_path_factory.mktemp("gcs"))
    objservers.make_gcs_bucket(srv.endpoint, "gb1")
    yield srv
    srv.stop()


def weed_store(weed, endpoint=None, secret=None, **kwargs):
    return objservers.s3_store(endpoint or weed.endpoint, "wb1", weed.access_key,
                               secret or weed.secret_key, **kwargs)


# ============================================================================ environment

def test_no_cloud_env_pins_credentials(monkeypatch):
    import os
    monkeypatch.setenv("AWS_PROFILE", "someone")
    objservers.no_cloud_env(monkeypatch)
    assert os.environ["AWS_EC2_METADATA_DISABLED"] == "true"
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"
    assert os.environ["GOOGLE_CLOUD_PROJECT"] == "test"
    assert "AWS_PROFILE" not in os.environ and "GOOGLE_APPLICATION_CREDENTIALS" not in os.environ
    # every metadata endpoint we set points at 127.0.0.1
    for name in ("AWS_METADATA_ENDPOINT", "GCE_METADATA_HOST", "GCE_METADATA_IP", "AZURE_MSI_ENDPOINT"):
        assert "127.0.0.1" in os.environ[name]


# ============================================================================ moto

def test_moto_round_trip(moto):
    assert moto.endpoint.startswith("http://127.0.0.1:")
    store = objservers.s3_store(moto.endpoint, "mb1")
    obstore.put(store, "dir/a", b"moto bytes")
    assert bytes(obstore.get(store, "dir/a").bytes()) == b"moto bytes"
    assert bytes(obstore.get_range(store, "dir/a", start=5, end=10)) == b"bytes"
    names = [m["path"] for batch in obstore.list(store, prefix="dir/") for m in batch]
    assert names == ["dir/a"]


def test_make_bucket_rejects_short_names(moto):
    with pytest.raises(ValueError, match="3 to 63"):
        objservers.make_bucket(moto.endpoint, "ab")


# ============================================================================ SeaweedFS

def test_seaweedfs_listens_on_loopback_only(weed):
    assert weed.endpoint.startswith("http://127.0.0.1:")
    assert "-ip.bind=127.0.0.1" in weed.command and "-master.telemetry=false" in weed.command
    assert weed.startup_s < 60


def test_seaweedfs_round_trip(weed):
    store = weed_store(weed)
    data = bytes(range(256)) * 1000
    obstore.put(store, "rt/blob", data)
    assert bytes(obstore.get(store, "rt/blob").bytes()) == data
    assert bytes(obstore.get_range(store, "rt/blob", start=1000, length=300)) == data[1000:1300]
    obstore.delete(store, "rt/blob")
    with pytest.raises(FileNotFoundError):
        obstore.get(store, "rt/blob")


def test_seaweedfs_checks_signatures(weed):
    obstore.put(weed_store(weed), "sig/k", b"v")
    with pytest.raises(PermissionDeniedError, match="403"):
        obstore.get(weed_store(weed, secret="not-the-secret", retry_config=NO_RETRY), "sig/k")
    with pytest.raises(PermissionDeniedError, match="403"):
        obstore.put(weed_store(weed, secret="not-the-secret", retry_config=NO_RETRY), "sig/k", b"w")
    # anonymous requests too
    assert objservers.http_status(f"{weed.endpoint}/wb1/sig/k") == 403
    assert bytes(obstore.get(weed_store(weed), "sig/k").bytes()) == b"v"


def test_seaweedfs_conditional_create_412(weed):
    store = weed_store(weed)
    obstore.put(store, "cond/new", b"first", mode="create")
    with pytest.raises(AlreadyExistsError, match="412"):
        obstore.put(store, "cond/new", b"second", mode="create")
    assert bytes(obstore.get(store, "cond/new").bytes()) == b"first"


def test_seaweedfs_if_match(weed):
    store = weed_store(weed)
    etag = obstore.put(store, "cond/upd", b"v1")["e_tag"]
    with pytest.raises(PreconditionError, match="412"):
        obstore.put(store, "cond/upd", b"lost", mode={"e_tag": '"0123456789abcdef0123456789abcdef"'})
    etag2 = obstore.put(store, "cond/upd", b"v2", mode={"e_tag": etag})["e_tag"]
    assert etag2 != etag
    with pytest.raises(PreconditionError, match="412"):  # the old ETag is stale now
        obstore.put(store, "cond/upd", b"lost", mode={"e_tag": etag})
    assert bytes(obstore.get(store, "cond/upd").bytes()) == b"v2"


# ============================================================================ fake-gcs-server

def test_fake_gcs_round_trip_and_queries(gcs):
    from google.api_core.exceptions import NotFound

    assert gcs.endpoint.startswith("http://127.0.0.1:")
    bucket = objservers.gcs_client(gcs.endpoint).bucket("gb1")
    bucket.blob("d/x").upload_from_string(b"0123456789")
    bucket.blob("d/y").upload_from_string(b"Y")
    bucket.blob("other").upload_from_string(b"O")
    assert bucket.blob("d/x").download_as_bytes() == b"0123456789"
    assert bucket.blob("d/x").download_as_bytes(start=2, end=5) == b"2345"  # end is inclusive
    assert [b.name for b in bucket.client.list_blobs("gb1", prefix="d/")] == ["d/x", "d/y"]
    bucket.blob("other").delete()
    with pytest.raises(NotFound):
        bucket.blob("other").download_as_bytes()


def test_fake_gcs_conditional_create_412(gcs):
    from google.api_core.exceptions import PreconditionFailed

    bucket = objservers.gcs_client(gcs.endpoint).bucket("gb1")
    blob = bucket.blob("c/once")
    blob.upload_from_string(b"first", if_generation_match=0)
    with pytest.raises(PreconditionFailed) as err:
        bucket.blob("c/once").upload_from_string(b"second", if_generation_match=0)
    assert err.value.code == 412
    with pytest.raises(PreconditionFailed):  # a wrong generation is refused too
        bucket.blob("c/once").upload_from_string(b"second", if_generation_match=blob.generation + 1)
    bucket.blob("c/once").upload_from_string(b"third", if_generation_match=blob.generation)
    assert bucket.blob("c/once").download_as_bytes() == b"third"


def test_fake_gcs_compose(gcs):
    bucket = objservers.gcs_client(gcs.endpoint).bucket("gb1")
    parts = [bucket.blob(f"p/{i}") for i in range(3)]
    for i, part in enumerate(parts):
        part.upload_from_string(bytes([65 + i]) * (i + 1))
    bucket.blob("p/all").compose(parts)
    assert bucket.blob("p/all").download_as_bytes() == b"ABBCCC"


# ============================================================================ fault proxy

@pytest.fixture
def moto_proxy(moto):
    with objservers.FaultProxy(moto.endpoint, seed=1) as proxy:
        yield proxy


def test_proxy_relays_and_counts(moto, moto_proxy):
    store = objservers.s3_store(moto_proxy.endpoint, "mb1")
    data = b"x" * 300_000
    obstore.put(store, "px/a", data)
    assert moto_proxy.bytes_up == len(data)
    assert bytes(obstore.get(store, "px/a").bytes()) == data
    obstore.head(store, "px/a")
    obstore.delete(store, "px/a")  # obstore deletes with a bulk "POST ?delete"
    assert moto_proxy.counts == {"PUT": 1, "GET": 1, "HEAD": 1, "POST": 1}
    assert moto_proxy.faults == {}
    moto_proxy.reset_counts()
    assert moto_proxy.counts == {}


def test_proxy_faults_are_retried_by_obstore(moto, moto_proxy):
    moto_proxy.fail_fraction = 0.3
    store = objservers.s3_store(moto_proxy.endpoint, "mb1", retry_config=FAST_RETRY)
    for i in range(15):
        obstore.put(store, f"flaky/{i}", b"v%d" % i)
    for i in range(15):
        assert bytes(obstore.get(store, f"flaky/{i}").bytes()) == b"v%d" % i
    counts, faults = moto_proxy.counts, moto_proxy.faults
    assert faults.get("PUT", 0) + faults.get("GET", 0) > 0  # seeded: faults did happen
    assert counts["PUT"] == 15 + faults.get("PUT", 0)  # one request per put, plus each retry
    assert counts["GET"] == 15 + faults.get("GET", 0)


def test_proxy_fault_surfaces_without_retries(moto_proxy):
    moto_proxy.fail_fraction = 1.0
    store = objservers.s3_store(moto_proxy.endpoint, "mb1", retry_config=NO_RETRY)
    with pytest.raises(Exception, match="50[03]"):
        obstore.put(store, "never", b"v")
    assert moto_proxy.counts == {"PUT": 1} and moto_proxy.faults == {"PUT": 1}


def test_proxy_dies_mid_upload(moto, moto_proxy):
    moto_proxy.fail_after_bytes = 1000
    store = objservers.s3_store(moto_proxy.endpoint, "mb1", retry_config={"max_retries": 1})
    with pytest.raises(Exception):
        obstore.put(store, "died/a", b"z" * 100_000)
    assert moto_proxy.dead and moto_proxy.bytes_up == 1000
    with pytest.raises(FileNotFoundError):  # nothing reached the server
        obstore.get(objservers.s3_store(moto.endpoint, "mb1"), "died/a")
    moto_proxy.revive()
    moto_proxy.fail_after_bytes = None
    obstore.put(store, "died/a", b"z" * 100_000)
    assert bytes(obstore.get(store, "died/a").bytes()) == b"z" * 100_000


def test_proxy_stop_now_resets_connections(moto_proxy):
    port = int(moto_proxy.endpoint.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"PUT /mb1/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"a" * 1000)
        deadline = time.monotonic() + 5
        while moto_proxy.bytes_up < 1000 and time.monotonic() < deadline:
            time.sleep(0.01)  # until the proxy is forwarding this body
        moto_proxy.stop_now()
        with pytest.raises(ConnectionResetError):  # a RST, not a clean end of stream
            conn.recv(1)
    store = objservers.s3_store(moto_proxy.endpoint, "mb1", retry_config=NO_RETRY)
    with pytest.raises(Exception):  # new connections are refused while dead
        obstore.get(store, "anything")
    moto_proxy.revive()
    obstore.put(store, "alive", b"again")
    assert bytes(obstore.get(store, "alive").bytes()) == b"again"


def test_proxy_keeps_sigv4_valid_and_relays_multipart(weed):
    # SeaweedFS checks signatures: requests signed for the proxy's Host pass
    # only if the proxy forwards Host (and every signed header) unchanged.
    with objservers.FaultProxy(weed.endpoint) as proxy:
        store = weed_store(weed, endpoint=proxy.endpoint)
        data = bytes(range(256)) * (6 << 12)  # 6 MiB: two parts of 5 MiB + 1 MiB
        obstore.put(store, "mp/big", data, use_multipart=True, chunk_size=5 << 20)
        assert bytes(obstore.get(store, "mp/big").bytes()) == data
        with pytest.raises(PermissionDeniedError, match="403"):  # a bad key is still refused
            obstore.get(weed_store(weed, endpoint=proxy.endpoint, secret="bad", retry_config=NO_RETRY),
                        "mp/big")
        # create + complete are POSTs, the two parts PUTs
        assert proxy.counts == {"POST": 2, "PUT": 2, "GET": 2}


def test_proxy_in_front_of_fake_gcs(gcs):
    with objservers.FaultProxy(gcs.endpoint) as proxy:
        bucket = objservers.gcs_client(proxy.endpoint).bucket("gb1")
        bucket.blob("via/proxy").upload_from_string(b"through the proxy")
        assert bucket.blob("via/proxy").download_as_bytes() == b"through the proxy"
        assert [b.name for b in bucket.client.list_blobs("gb1", prefix="via/")] == ["via/proxy"]
        assert proxy.counts["POST"] == 1 and proxy.counts["GET"] >= 2


def test_proxy_relays_chunked_bodies(gcs):
    """A chunked upload reaches the server intact; a chunked answer is
    re-chunked to the client."""
    import http.client
    import json

    data = bytes(range(256)) * 1000
    with objservers.FaultProxy(gcs.endpoint) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", int(proxy.endpoint.rsplit(":", 1)[1]), timeout=10)
        pieces = (data[i:i + 7000] for i in range(0, len(data), 7000))
        conn.request("POST", "/upload/storage/v1/b/gb1/o?uploadType=media&name=ch/big", body=pieces,
                     encode_chunked=True, headers={"Content-Type": "application/octet-stream"})
        assert conn.getresponse().read() and proxy.bytes_up > len(data)  # chunk framing included
        for i in range(8):  # a listing of 9 is over 2 KiB: Go's net/http chunks it
            conn.request("POST", f"/upload/storage/v1/b/gb1/o?uploadType=media&name=ch/n{i:02d}", body=b"x")
            conn.getresponse().read()
        conn.request("GET", "/storage/v1/b/gb1/o?prefix=ch/")
        resp = conn.getresponse()
        assert resp.getheader("Transfer-Encoding") == "chunked"
        assert len(json.loads(resp.read())["items"]) == 9
        conn.close()
    assert objservers.gcs_client(gcs.endpoint).bucket("gb1").blob("ch/big").download_as_bytes() == data


def test_start_failure_is_reported_with_the_log(tmp_path):
    proc = objservers._Subprocess([objservers.weed_binary(), "mini", "-no-such-flag"], cwd=tmp_path,
                                  log_path=tmp_path / "weed.log", env=objservers._child_env(tmp_path))
    with pytest.raises(objservers.ServerStartError, match="(?s)exited with status.*no-such-flag") as err:
        proc.wait_ready("http://127.0.0.1:9/", timeout=10)
    assert err.value.exited
