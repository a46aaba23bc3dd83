"""GcsClient (jaxckpt/gcsclient.py) against a real fake-gcs-server on 127.0.0.1.

Nothing here reaches Google or a metadata server: the environment is pinned by
``objservers.no_cloud_env`` and every client gets an explicit endpoint and
anonymous credentials.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import gc
import http.server
import json
import re
import sys
import threading
import urllib.parse
import uuid
import warnings

import numpy as np
import pytest

import objservers
from jaxckpt import errors, gcsclient, gcsupload, objclient

pytest.importorskip("google.cloud.storage")
import google.auth.credentials  # noqa: E402
import google.auth.exceptions  # noqa: E402
from google.auth.credentials import AnonymousCredentials  # noqa: E402

BUCKET = "jaxckpt-gcs-test"
MIB = 1 << 20


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        objservers.no_cloud_env(mp)
        srv = objservers.start_fake_gcs(tmp_path_factory.mktemp("gcs"))
        try:
            objservers.make_gcs_bucket(srv.endpoint, BUCKET)
            yield srv
        finally:
            srv.stop()


def make_client(endpoint, bucket=BUCKET, **options):
    return gcsclient.GcsClient(bucket, {"endpoint": endpoint, "credentials": AnonymousCredentials(), **options},
                               list_page_size=3)


@pytest.fixture(scope="module")
def client(gcs):
    c = make_client(gcs.endpoint)
    yield c
    c.close()


@pytest.fixture
def proxy(gcs):
    with objservers.FaultProxy(gcs.endpoint) as p:
        yield p


@pytest.fixture(autouse=True)
def _collect_dropped_connections():
    """After each test, let the garbage collector close the sockets of HTTP
    connection pools that failed requests' tracebacks kept alive (urllib3 2
    leaves a forgotten pool's sockets to the collector): here, not in
    whichever later test the collector happens to run in."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture
def prefix(request):
    """A key prefix of this test's own."""
    return f"{request.node.name}/"


def random_bytes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def keys(infos) -> list[str]:
    return sorted(i.key for i in infos)


# ---------------------------------------------------------------------- put / get / head
def test_put_get_head_round_trip(client, prefix):
    gen = client.put(prefix + "a", b"hello world")
    assert gen.isdigit()
    assert client.get(prefix + "a", cap=100) == (b"hello world", gen)
    assert client.head(prefix + "a") == objclient.ObjectInfo(prefix + "a", 11, gen)
    floats = np.arange(1000, dtype=np.float32)  # a non-byte buffer is stored as its bytes
    client.put(prefix + "f", memoryview(floats))
    assert client.get(prefix + "f", cap=4000)[0] == floats.tobytes()
    client.put(prefix + "empty", b"")
    assert client.get(prefix + "empty", cap=0)[0] == b""
    assert client.head(prefix + "missing") is None
    assert client.url == f"gs://{BUCKET}" and client.describe("k") == f"gs://{BUCKET}/k"


def test_create_is_refused_when_the_object_exists(client, prefix):
    gen = client.put(prefix + "m", b"first", create=True)
    with pytest.raises(objclient.Conflict, match=f"gs://{BUCKET}/{prefix}m: precondition failed"):
        client.put(prefix + "m", b"second", create=True)
    assert client.get(prefix + "m", cap=10) == (b"first", gen)


def test_if_match_updates_only_the_version_named(client, prefix):
    g1 = client.put(prefix + "lock", b"v1", create=True)
    g2 = client.put(prefix + "lock", b"v2", if_match=g1)
    assert g2 != g1
    with pytest.raises(objclient.Conflict):
        client.put(prefix + "lock", b"v3", if_match=g1)  # stale
    with pytest.raises(objclient.Conflict):
        client.put(prefix + "nothing-here", b"v", if_match=g2)
    assert client.get(prefix + "lock", cap=10) == (b"v2", g2)
    with pytest.raises(ValueError, match="generation"):
        client.put(prefix + "lock", b"v", if_match='"an-s3-etag"')


def test_a_retried_conditional_put_that_had_landed_is_not_a_conflict(client, prefix, monkeypatch):
    # A retry after a lost answer sends the same request (same token) again.
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=7))
    gen = client.put(prefix + "manifest", b"m", create=True)
    assert client.put(prefix + "manifest", b"m", create=True) == gen
    monkeypatch.undo()
    with pytest.raises(objclient.Conflict):  # another writer's request: a real conflict
        client.put(prefix + "manifest", b"m", create=True)


def test_get_checks_the_cap_before_fetching_the_bytes(gcs, proxy, prefix):
    c = make_client(proxy.endpoint)
    c.put(prefix + "big", bytes(1000))
    proxy.reset_counts()
    with pytest.raises(ValueError, match=f"{prefix}big: object of 1000 bytes, more than the 999"):
        c.get(prefix + "big", cap=999)
    assert proxy.counts == {"GET": 1}  # its body was not read
    proxy.reset_counts()
    data, generation = c.get(prefix + "big", cap=1000)
    assert data == bytes(1000) and generation == c.head(prefix + "big").etag
    assert proxy.counts == {"GET": 2}  # the get is one request (the head the other)
    with pytest.raises(objclient.NotFound, match=f"gs://{BUCKET}/{prefix}nope"):
        c.get(prefix + "nope", cap=10)
    c.close()


def test_a_damaged_upload_is_detected(client, prefix, monkeypatch):
    # GCS refuses a body that does not match the CRC32C sent; the emulator
    # stores it and answers its own CRC32C, which the client compares.
    monkeypatch.setattr(gcsupload, "crc32c", lambda views: "AAAAAA==")
    with pytest.raises(errors.StorageError, match="CRC32C"):
        client.put(prefix + "x", b"data")
    with pytest.raises(errors.StorageError, match=f"{prefix}y: the server stored 4 bytes with CRC32C "
                                                  r"\S+, the data has 4 with AAAAAA==: damaged in transit"):
        client.put_stream(prefix + "y", [memoryview(b"data")], 4)


# ---------------------------------------------------------------------- read_into
def test_read_into_fills_ranges_and_stops_at_the_end(client, prefix):
    data = random_bytes(1000).tobytes()
    client.put(prefix + "r", data)
    buf = bytearray(100)
    assert client.read_into(prefix + "r", memoryview(buf), 0) == 100 and buf == data[:100]
    assert client.read_into(prefix + "r", memoryview(buf), 450) == 100 and buf == data[450:550]
    buf = bytearray(b"\xee" * 100)
    assert client.read_into(prefix + "r", memoryview(buf), 950) == 50  # the object ends first
    assert buf[:50] == data[950:] and buf[50:] == b"\xee" * 50
    assert client.read_into(prefix + "r", memoryview(buf), 1000) == 0
    assert client.read_into(prefix + "r", memoryview(buf), 5000) == 0
    assert client.read_into(prefix + "r", memoryview(bytearray(0)), 10) == 0
    words = np.empty(250, dtype=np.uint32)  # a typed buffer is filled as bytes
    assert client.read_into(prefix + "r", memoryview(words), 0) == 1000
    assert words.tobytes() == data
    with pytest.raises(objclient.NotFound):
        client.read_into(prefix + "none", memoryview(buf), 0)


# ---------------------------------------------------------------------- read_into through obstore
class _Tokens(google.auth.credentials.Credentials):
    """Real google-auth credentials (no network): each refresh mints a new
    token, valid an hour; ``fail``: refreshes are refused."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.fail, self.refreshes = fail, 0

    def refresh(self, request):
        if self.fail:
            raise google.auth.exceptions.RefreshError("invalid_grant: refused by the test")
        self.refreshes += 1
        self.token = f"secret-token-{self.refreshes}"
        self.expiry = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) + datetime.timedelta(hours=1)


class _Recording(http.server.BaseHTTPRequestHandler):
    """Records each request (method, unquoted path, headers by lower-case
    name) in ``server.seen``; answers 403."""

    def do_GET(self):
        headers = {name.lower(): value for name, value in self.headers.items()}
        self.server.seen.append((self.command, urllib.parse.unquote(self.path), headers))
        body = b"<?xml version='1.0'?><Error><Code>AccessDenied</Code><Message>denied</Message></Error>"
        self.send_response(403)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def recording():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recording)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_read_into_is_bit_exact_at_any_offset(gcs, proxy, prefix):
    c = make_client(proxy.endpoint)
    data = random_bytes(3 * MIB + 12_345, seed=5)
    c.put(prefix + "obj", memoryview(data))
    size = data.nbytes
    for offset, n in [(0, MIB), (1, 4097), (123_457, 2 * MIB + 3), (size - MIB, MIB), (size - 777, 4096),
                      (size, 100), (size + 1, 100), (10 * size, 1)]:
        buf = np.full(n, 0xEE, dtype=np.uint8)
        proxy.reset_counts()
        got = c.read_into(prefix + "obj", memoryview(buf), offset)
        want = data[offset:offset + n]
        assert got == want.nbytes and np.array_equal(buf[:got], want), (offset, n)
        assert (buf[got:] == 0xEE).all() and proxy.counts == {"GET": 1}  # one ranged GET, no metadata
    c.close()


def test_reads_go_through_obstore(recording):
    # A ranged GET of the XML API (GET /<bucket>/<key>, Range: bytes=a-b) is
    # obstore's; google-cloud-storage reads /download/storage/v1/b/<bucket>/o/<key>.
    c = make_client(f"http://127.0.0.1:{recording.server_address[1]}")
    with pytest.raises(errors.StorageAccessError,
                       match=r"gs://jaxckpt-gcs-test/dir/k: access refused with storage_options\['credentials'\]"):
        c.read_into("dir/k", memoryview(bytearray(4)), 10)
    ((method, path, headers),) = recording.seen
    assert (method, path, headers.get("range")) == ("GET", f"/{BUCKET}/dir/k", "bytes=10-13")
    assert "authorization" not in headers  # anonymous: unsigned
    c.close()


def test_obstore_reads_carry_the_google_auth_token_refreshed_once(gcs, recording, prefix):
    creds = _Tokens()
    c = gcsclient.GcsClient(BUCKET, {"endpoint": gcs.endpoint, "credentials": creds})
    make_client(gcs.endpoint).put(prefix + "t", b"0123456789")  # the emulator ignores tokens
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        bufs = [bytearray(4) for _ in range(16)]
        assert list(pool.map(lambda b: c.read_into(prefix + "t", memoryview(b), 3), bufs)) == [4] * 16
    assert all(b == b"3456" for b in bufs) and creds.refreshes == 1  # one refresh, shared by every thread
    c.close()
    c = gcsclient.GcsClient(BUCKET, {"endpoint": f"http://127.0.0.1:{recording.server_address[1]}",
                                     "credentials": creds})
    with pytest.raises(errors.StorageAccessError) as info:
        c.read_into("k", memoryview(bytearray(4)), 0)
    assert recording.seen[-1][2]["authorization"] == "Bearer secret-token-1"
    assert "secret-token" not in str(info.value)
    c.close()


def test_refused_token_refresh_is_a_storage_access_error(gcs):
    c = gcsclient.GcsClient(BUCKET, {"endpoint": gcs.endpoint, "credentials": _Tokens(fail=True)})
    with pytest.raises(errors.StorageAccessError,
                       match=r"gs://jaxckpt-gcs-test/k: access refused with storage_options\['credentials'\].*invalid_grant"):
        c.read_into("k", memoryview(bytearray(4)), 0)
    c.close()


def test_obstore_read_errors(gcs, client, prefix):
    with pytest.raises(objclient.NotFound, match=f"^gs://{BUCKET}/{prefix}missing$"):
        client.read_into(prefix + "missing", memoryview(bytearray(4)), 0)
    c = make_client(gcs.endpoint, bucket="no-such-bucket-either")  # a read is its first request
    with pytest.raises(errors.BucketNotFoundError, match="gs://no-such-bucket-either: bucket does not exist"):
        c.read_into("k", memoryview(bytearray(4)), 0)
    c.close()
    with objservers.FaultProxy(gcs.endpoint, fail_fraction=1.0) as p:
        c = make_client(p.endpoint, retry_deadline=1.0)
        with pytest.raises(errors.StorageError, match=f"gs://{BUCKET}/k: could not read \\(after retries\\)"):
            c.read_into("k", memoryview(bytearray(4)), 0)
        assert p.counts["GET"] > 1  # retried
        c.close()


def test_keys_obstore_would_rewrite_are_read_by_google(client, prefix):
    for key in (prefix + "a//b", prefix + "s/./t", prefix + "u/../v", "/" + prefix + "w"):
        client.put(key, key.encode())
        buf = bytearray(100)
        assert client.read_into(key, memoryview(buf), 0) == len(key) and buf[:len(key)] == key.encode()


def test_without_obstore_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "obstore", None)
    with pytest.raises(errors.UnsupportedLocationError, match=r"gs://b: .*obstore.*pip install 'jaxckpt\[gcs\]'"):
        gcsclient.GcsClient("b", {"anonymous": True})


# ---------------------------------------------------------------------- list / delete
def test_list_returns_every_page_of_a_prefix(gcs, proxy, prefix):
    c = make_client(proxy.endpoint)  # 3 objects a page
    gens = {f"{prefix}x/{i}": c.put(f"{prefix}x/{i}", b"z" * i) for i in range(7)}
    c.put(prefix + "xy", b"not under x/")
    proxy.reset_counts()
    infos = c.list(prefix + "x/")
    assert proxy.counts == {"GET": 3}
    assert sorted(infos) == sorted(objclient.ObjectInfo(k, int(k[-1]), g) for k, g in gens.items())
    assert keys(c.list(prefix + "x")) == sorted([*gens, prefix + "xy"])
    assert c.list(prefix + "nothing/") == []
    c.close()


def test_delete_ignores_missing_objects(client, prefix):
    for name in "abc":
        client.put(prefix + name, b"1")
    client.delete([prefix + "a", prefix + "missing"])
    client.delete([prefix + "b", prefix + "c", prefix + "b", prefix + "gone"])
    client.delete([prefix + "missing"])
    client.delete([])
    assert client.list(prefix) == []


# ---------------------------------------------------------------------- put_stream
@pytest.mark.parametrize("single_mib, posts", [(64, 1), (32, 3 + 1)])  # (parts: then deleted)
def test_put_stream_of_40_mib_is_bit_exact(gcs, proxy, prefix, monkeypatch, single_mib, posts):
    # Up to SINGLE_BYTES one media upload; above, three part uploads and one compose.
    monkeypatch.setattr(gcsclient, "SINGLE_BYTES", single_mib * MIB)
    c = make_client(proxy.endpoint)
    data = random_bytes(40 * MIB, seed=1)
    view = memoryview(data)
    step = 3 * MIB + 7  # chunks that straddle the part boundaries
    c.put_stream(prefix + "ck", (view[i:i + step] for i in range(0, len(view), step)), data.nbytes)
    assert proxy.counts.get("POST") == posts and proxy.counts.get("DELETE", 0) == (posts > 1) * 3
    assert c.head(prefix + "ck").size == data.nbytes
    out = np.zeros_like(data)
    assert c.read_into(prefix + "ck", memoryview(out), 0) == data.nbytes
    assert np.array_equal(out, data)
    assert keys(c.list(prefix)) == [prefix + "ck"]  # the parts are gone
    c.close()


def test_put_stream_up_to_a_part_is_one_object(client, prefix):
    data = random_bytes(objclient.PART_BYTES, seed=2)
    view = memoryview(data)
    client.put_stream(prefix + "s", [view[:10], view[10:10], view[10:]], data.nbytes)
    assert client.get(prefix + "s", cap=data.nbytes)[0] == data.tobytes()
    client.put_stream(prefix + "e", [], 0)
    assert client.get(prefix + "e", cap=0)[0] == b""
    assert keys(client.list(prefix)) == [prefix + "e", prefix + "s"]


def test_put_stream_of_small_and_large_views_in_any_order_is_bit_exact(client, prefix):
    """Runs of small views go up joined into blocks, large ones as they are,
    the two mixed as a tree's leaves are: every byte in its place."""
    data = random_bytes(6 << 20, seed=4)
    view = memoryview(data)
    sizes = [1, 7, 8192, 300 << 10, 5, 1 << 20, (1 << 20) - 3, 2 << 20, 64 << 10] + [4000] * 300
    cuts = np.cumsum([0] + sizes)
    chunks = [view[a:b] for a, b in zip(cuts[:-1], cuts[1:])] + [view[cuts[-1]:]]
    client.put_stream(prefix + "mixed", chunks, data.nbytes)
    assert client.get(prefix + "mixed", cap=data.nbytes)[0] == data.tobytes()


def test_put_stream_composes_in_rounds(client, prefix, monkeypatch):
    monkeypatch.setattr(objclient, "PART_BYTES", 1000)
    monkeypatch.setattr(gcsclient, "SINGLE_BYTES", 1000)
    monkeypatch.setattr(gcsclient, "COMPOSE_MAX", 4)  # 19 parts -> 5 -> 2 -> the object
    data = random_bytes(18_500, seed=3).tobytes()
    client.put_stream(prefix + "r", [memoryview(data)], len(data))
    assert client.get(prefix + "r", cap=len(data))[0] == data
    assert keys(client.list(prefix)) == [prefix + "r"]


def test_put_stream_of_the_wrong_size_leaves_nothing(client, prefix):
    part = objclient.PART_BYTES
    data = memoryview(bytes(part + 100))
    with pytest.raises(ValueError, match=f"{prefix}w: the chunks hold {part + 100} bytes, not the {part + 10}"):
        client.put_stream(prefix + "w", [data], part + 10)
    with pytest.raises(ValueError, match="not the 200"):
        client.put_stream(prefix + "w", [data[:100]], 200)
    assert client.list(prefix) == []


def test_a_failed_put_stream_deletes_its_parts(client, prefix, monkeypatch):
    upload = client._upload_part

    def flaky(name, views):
        if name.endswith("part-00002"):
            raise errors.StorageError(f"{name}: injected")
        return upload(name, views)

    monkeypatch.setattr(client, "_upload_part", flaky)
    monkeypatch.setattr(gcsclient, "SINGLE_BYTES", objclient.PART_BYTES)
    data = memoryview(bytes(4 * objclient.PART_BYTES))
    with pytest.raises(errors.StorageError, match="injected"):
        client.put_stream(prefix + "f", [data], data.nbytes)
    assert client.list(prefix) == []  # no object, no part


# ---------------------------------------------------------------------- errors
def test_a_missing_bucket_is_bucket_not_found(gcs):
    c = make_client(gcs.endpoint, bucket="no-such-bucket")
    calls = [lambda: c.head("k"), lambda: c.get("k", 10), lambda: c.put("k", b"1", create=True),
             lambda: c.list(""), lambda: c.read_into("k", memoryview(bytearray(4)), 0),
             lambda: c.delete(["k"]), lambda: c.put_stream("k", [memoryview(b"12")], 2)]
    for call in calls:
        with pytest.raises(errors.BucketNotFoundError, match="gs://no-such-bucket: bucket does not exist"):
            call()
    c.close()


def test_transient_errors_are_retried(gcs, prefix):
    # 30% of the requests answered 500/503 by the proxy (seed 2: some uploads and some reads).
    with objservers.FaultProxy(gcs.endpoint, fail_fraction=0.3, seed=2) as p:
        c = make_client(p.endpoint)
        data = random_bytes(5000).tobytes()
        gens = [c.put(f"{prefix}{i}", data, create=True) for i in range(2)]
        assert [c.get(f"{prefix}{i}", cap=5000) for i in range(2)] == [(data, g) for g in gens]
        for i in range(4):  # media uploads, retried as a whole
            c.put_stream(f"{prefix}s{i}", [memoryview(data)[:100], memoryview(data)[100:]], len(data))
            assert c.get(f"{prefix}s{i}", cap=5000)[0] == data
        buf = bytearray(10)
        assert c.read_into(prefix + "0", memoryview(buf), 20) == 10 and buf == data[20:30]
        assert keys(c.list(prefix)) == [prefix + "0", prefix + "1"] + [f"{prefix}s{i}" for i in range(4)]
        assert p.faults.get("POST", 0) > 0 and p.faults.get("GET", 0) > 0
        c.close()


def test_errors_left_after_retries_are_storage_errors(gcs):
    with objservers.FaultProxy(gcs.endpoint, fail_fraction=1.0) as p:
        c = make_client(p.endpoint, retry_deadline=1.5)
        with pytest.raises(errors.StorageError, match=re.escape(
                f"gs://{BUCKET}/some/key: no success from {p.endpoint} after retrying for 1.5 s (retry_deadline); "
                "the last error: ") + r"(ServiceUnavailable|InternalServerError): GET "):
            c.head("some/key")  # google-cloud-storage's retries
        with pytest.raises(errors.StorageError, match=re.escape(f"gs://{BUCKET}/some/key: could not read (after "
                                                                "retries): ") + r".*after \d+ retries.*: 50[03] "):
            c.get("some/key", cap=10)  # obstore's
        c.close()


class _Refusing(http.server.BaseHTTPRequestHandler):
    """Answers every request 403, as GCS does for credentials without access."""

    def _refuse(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"error": {"code": 403, "message": "anon does not have storage.objects.get access"}})
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    do_GET = do_POST = do_PUT = do_DELETE = _refuse

    def log_message(self, *args):
        pass


def test_refused_credentials_are_storage_access_errors():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        c = make_client(f"http://127.0.0.1:{server.server_address[1]}")
        for call in (lambda: c.get("k", 10), lambda: c.put("k", b"1"), lambda: c.list(""),
                     lambda: c.read_into("k", memoryview(bytearray(4)), 0)):
            with pytest.raises(errors.StorageAccessError,
                               match=r"gs://jaxckpt-gcs-test/k?: access refused with storage_options\['credentials'\]"):
                call()
        c.close()
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------- options
def test_credential_sources_and_options(gcs, monkeypatch):
    objservers.no_cloud_env(monkeypatch)
    assert make_client(gcs.endpoint).credential_source == "storage_options['credentials']"
    sources = {
        "anonymous (plain-http endpoint)": {"endpoint": gcs.endpoint},
        "anonymous (storage_options['anonymous'])": {"endpoint": "https://127.0.0.1:1", "anonymous": True},
    }
    for source, options in sources.items():
        assert gcsclient.GcsClient(BUCKET, options).credential_source == source
    c = gcsclient.GcsClient(BUCKET, {"endpoint": gcs.endpoint, "anonymous": True, "timeout": [2, 30],
                                     "retry_deadline": 10, "project": "p"})
    assert c._client().project == "p" and c.head("nothing") is None
    c.close()
    with pytest.raises(ValueError, match=r"unknown storage_options \['region'\]"):
        gcsclient.GcsClient(BUCKET, {"region": "x"})
    with pytest.raises(ValueError, match="must be a google.auth.credentials.Credentials"):
        gcsclient.GcsClient(BUCKET, {"credentials": "/path/key.json"})


def test_application_default_credentials(monkeypatch):
    import google.auth
    import google.auth.exceptions

    # No real lookup: it would probe the metadata server.
    monkeypatch.setattr(google.auth, "default", lambda scopes=None: (AnonymousCredentials(), "adc-project"))
    c = gcsclient.GcsClient("b", {})
    assert c.credential_source == "application-default credentials"
    assert c._client().project == "adc-project"
    c.close()

    def missing(scopes=None):
        raise google.auth.exceptions.DefaultCredentialsError("Your default credentials were not found.")

    monkeypatch.setattr(google.auth, "default", missing)
    with pytest.raises(errors.StorageAccessError, match="gs://b: no application-default credentials"):
        gcsclient.GcsClient("b", {})


def test_storage_emulator_host_is_honoured(gcs, monkeypatch, prefix):
    objservers.no_cloud_env(monkeypatch)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.endpoint)
    c = gcsclient.GcsClient(BUCKET, {})
    assert c.credential_source == "anonymous (emulator STORAGE_EMULATOR_HOST)"
    gen = c.put(prefix + "e", b"via the emulator")
    assert c.get(prefix + "e", cap=100) == (b"via the emulator", gen)
    c.close()


def test_without_google_cloud_storage_the_error_says_what_to_install(monkeypatch):
    gcsclient._google.cache_clear()
    monkeypatch.setitem(sys.modules, "google.cloud.storage", None)
    try:
        with pytest.raises(errors.UnsupportedLocationError, match=r"gs://b: .*pip install 'jaxckpt\[gcs\]'"):
            gcsclient.GcsClient("b", {})
    finally:
        gcsclient._google.cache_clear()


def test_calls_from_many_threads_at_once(client, prefix):
    def work(i: int) -> bool:
        data = random_bytes(50_000 + i, seed=i).tobytes()
        gen = client.put(f"{prefix}{i}", data, create=True)
        buf = bytearray(1000)
        ok = client.read_into(f"{prefix}{i}", memoryview(buf), 49_000) == 1000 and buf == data[49_000:50_000]
        return ok and client.get(f"{prefix}{i}", cap=10**6) == (data, gen)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert all(pool.map(work, range(32)))
    client.delete([i.key for i in client.list(prefix)])
    assert client.list(prefix) == []


def test_an_endpoint_that_never_answers_is_named_with_the_last_error():
    """api_core's RetryError says only "Timeout of 120.0s exceeded": the
    message names the endpoint, the deadline that ran out and the cause."""
    (port,) = objservers.free_ports(1)  # nothing listens there
    endpoint = f"http://127.0.0.1:{port}"
    client = gcsclient.GcsClient("dead-bucket", {"endpoint": endpoint, "anonymous": True, "retry_deadline": 1})
    try:
        with pytest.raises(errors.StorageError) as e:
            client.head("ck/manifest.msgpack")
    finally:
        client.close()
    assert str(e.value).startswith(f"gs://dead-bucket/ck/manifest.msgpack: no success from {endpoint} after "
                                   "retrying for 1 s (retry_deadline); the last error: ConnectionError: ")
    assert "Connection refused" in str(e.value)
