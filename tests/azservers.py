"""Azurite (the Azure Storage emulator) on 127.0.0.1 for the ``az://`` tests,
and a small Blob REST client of its own (SharedKey-signed requests through
urllib) so that tests create containers and look at blobs independently of
jaxckpt and obstore.

Azurite is a Node.js package: ``python3 dev.py test`` installs it with
``npm ci`` into ``.venv/azurite`` (pinned by
``tests/azurite/package-lock.json``). It runs with telemetry off
(``--disableTelemetry``: otherwise it reports to a host off this machine),
in memory, bound to 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

import objservers

ACCOUNT = "devstoreaccount1"  # Azurite's well-known account and key (public, in Azure's docs)
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_BIN = Path(__file__).resolve().parent.parent / ".venv" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
_API_VERSION = "2021-08-06"


def azurite_binary() -> str:
    if not _BIN.exists():
        raise objservers.ServerStartError(f"{_BIN} is missing: run `python3 dev.py test` once (it installs Azurite "
                                          "with npm ci into .venv/azurite; needs Node.js >= 18 and npm)")
    return str(_BIN)


@dataclass
class AzuriteServer:
    """Azurite's blob service on ``endpoint`` (``http://127.0.0.1:PORT/devstoreaccount1``)."""

    endpoint: str
    dir: Path
    startup_s: float
    _proc: objservers._Subprocess = field(repr=False)

    def options(self, **more) -> dict:
        """``storage_options`` for jaxckpt: this server, its account and key."""
        return {"account_name": ACCOUNT, "account_key": KEY, "endpoint": self.endpoint, **more}

    def log_tail(self, n: int = 3000) -> str:
        return self._proc.log_tail(n)

    def stop(self) -> None:
        self._proc.stop()


def start_azurite(tmpdir, timeout: float = 30.0, attempts: int = 3) -> AzuriteServer:
    """Start Azurite's blob service on a free port of 127.0.0.1 and wait until it answers."""
    for attempt in range(1, attempts + 1):
        d = objservers._fresh_dir(tmpdir, "azurite")
        (port,) = objservers.free_ports(1)
        argv = [azurite_binary(), "--blobHost", objservers.HOST, "--blobPort", str(port),
                "--inMemoryPersistence", "--disableTelemetry", "--skipApiVersionCheck", "--silent"]
        proc = objservers._Subprocess(argv, cwd=d, log_path=d / "azurite.log", env=objservers._child_env(d))
        base = f"http://{objservers.HOST}:{port}/{ACCOUNT}"
        try:
            took = proc.wait_ready(base + "?comp=list", timeout)
        except objservers.ServerStartError as e:
            proc.stop()
            if attempt == attempts or not e.exited:
                raise
            continue
        return AzuriteServer(base, d, took, proc)
    raise AssertionError("unreachable")


# ============================================================================ a Blob REST client

def _sign(method: str, url: str, headers: dict[str, str], length: int) -> str:
    """The SharedKey ``Authorization`` header of a request (Azure Storage's
    "Authorize with Shared Key" string-to-sign)."""
    u = urllib.parse.urlsplit(url)
    ms = "".join(f"{k}:{v}\n" for k, v in sorted((k.lower(), v) for k, v in headers.items()
                                                  if k.lower().startswith("x-ms-")))
    resource = f"/{ACCOUNT}{u.path}" + "".join(
        f"\n{k.lower()}:{v}" for k, v in sorted(urllib.parse.parse_qsl(u.query, keep_blank_values=True)))
    h = {k.lower(): v for k, v in headers.items()}
    fields = [method, "", "", str(length) if length else "", "", h.get("content-type", ""), "", "",
              h.get("if-match", ""), h.get("if-none-match", ""), "", h.get("range", "")]
    text = "\n".join(fields) + "\n" + ms + resource
    mac = hmac.new(base64.b64decode(KEY), text.encode(), hashlib.sha256).digest()
    return f"SharedKey {ACCOUNT}:{base64.b64encode(mac).decode()}"


def request(method: str, url: str, body: bytes = b"", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One signed request; returns (status, body), whatever the status."""
    headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": _API_VERSION, **(headers or {})}
    if method in ("PUT", "POST"):  # urllib would add a form Content-Type, unsigned
        headers.setdefault("Content-Type", "application/octet-stream")
    headers["Authorization"] = _sign(method, url, headers, len(body))
    req = urllib.request.Request(url, data=body if method in ("PUT", "POST") else None, method=method,
                                 headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1: never through a proxy
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def make_container(endpoint: str, name: str, exist_ok: bool = False) -> None:
    status, body = request("PUT", f"{endpoint}/{name}?restype=container")
    if status != 201 and not (exist_ok and status == 409):
        raise RuntimeError(f"creating container {name}: {status} {body[:300]!r}")


def blob_sizes(endpoint: str, container: str, prefix: str = "") -> dict[str, int]:
    """Every blob in ``container`` under ``prefix``: name -> size (all pages)."""
    out, marker = {}, ""
    while True:
        q = urllib.parse.urlencode({"restype": "container", "comp": "list", "prefix": prefix, "marker": marker})
        status, body = request("GET", f"{endpoint}/{container}?{q}")
        if status != 200:
            raise RuntimeError(f"listing {container}: {status} {body[:300]!r}")
        text = body.decode()
        for blob in re.findall(r"<Blob>(.*?)</Blob>", text, re.S):
            name = re.search(r"<Name>([^<]*)</Name>", blob)[1]
            out[name] = int(re.search(r"<Content-Length>(\d+)</Content-Length>", blob)[1])
        marker = (re.findall(r"<NextMarker>([^<]*)</NextMarker>", text) or [""])[0]
        if not marker:
            return out


def list_blobs(endpoint: str, container: str, prefix: str = "") -> list[str]:
    """Every blob name in ``container`` under ``prefix``, sorted."""
    return sorted(blob_sizes(endpoint, container, prefix))


def put_blob(endpoint: str, container: str, name: str, data: bytes) -> None:
    status, body = request("PUT", f"{endpoint}/{container}/{urllib.parse.quote(name)}", data,
                           {"x-ms-blob-type": "BlockBlob", "Content-Type": "application/octet-stream"})
    if status != 201:
        raise RuntimeError(f"writing {container}/{name}: {status} {body[:300]!r}")


def get_blob(endpoint: str, container: str, name: str) -> bytes:
    status, body = request("GET", f"{endpoint}/{container}/{urllib.parse.quote(name)}")
    if status != 200:
        raise RuntimeError(f"reading {container}/{name}: {status} {body[:300]!r}")
    return body


def delete_blob(endpoint: str, container: str, name: str) -> None:
    status, body = request("DELETE", f"{endpoint}/{container}/{urllib.parse.quote(name)}")
    if status != 202:
        raise RuntimeError(f"deleting {container}/{name}: {status} {body[:300]!r}")


def env_for(endpoint: str) -> dict[str, str]:
    """The environment a user sets for the Azurite at ``endpoint``: account, key, endpoint."""
    return {"AZURE_STORAGE_ACCOUNT_NAME": ACCOUNT, "AZURE_STORAGE_ACCOUNT_KEY": KEY, "AZURE_STORAGE_ENDPOINT": endpoint}
