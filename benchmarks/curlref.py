"""The servers' own limit, measured with curl: the ``curl-<store>`` method of ``benchmarks.objstore``.

The client-alone reference of ``benchmarks.objstore`` is a Python client
(obstore, google-cloud-storage) on the same two cores as the server. This
one takes every Python library out: curl (C, libcurl) uploads the state's
bytes as 16 MiB objects over several connections at once and downloads them
again into ``/dev/null``, nothing kept in memory. The best time over a few
connection counts is the most any client of this server can expect on this
machine, the ceiling a target like "save 2x faster than orbax" has to fit
under.

* s3: ``PUT /<bucket>/<key>`` signed by curl itself (``--aws-sigv4``, with
  ``x-amz-content-sha256: UNSIGNED-PAYLOAD``), ``GET`` back the same way.
* gs: the JSON API's media upload (``POST /upload/storage/v1/b/<bucket>/o?uploadType=media``)
  and ``GET /storage/v1/b/<bucket>/o/<key>?alt=media``, anonymous.

Every URL points at the loopback server the run started; curl gets no
proxy (``--noproxy '*'``) and no configuration file (``-q``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse

PART = 16 << 20
CONNECTIONS = (4, 8, 16)


def unavailable() -> str | None:
    """Why the curl reference cannot run here (None when it can)."""
    curl = shutil.which("curl")
    if curl is None:
        return "no curl on PATH"
    out = subprocess.run([curl, "--version"], capture_output=True, text=True).stdout
    m = re.match(r"curl (\d+)\.(\d+)", out)
    if not m or (int(m[1]), int(m[2])) < (7, 75):  # --aws-sigv4 arrived in 7.75
        return f"curl {out.split()[1] if out else '?'} has no --aws-sigv4 (7.75 or later needed)"
    if "--parallel" not in subprocess.run([curl, "--help", "all"], capture_output=True, text=True).stdout:
        return "curl without --parallel"
    return None


def _urls(spec: dict, bucket: str, keys: list[str], upload: bool) -> tuple[list[str], list[str]]:
    """The URLs of ``keys`` and curl's options for the store in ``spec``."""
    if spec["store"] == "s3":
        s3 = spec["servers"]["s3"]
        options = ["--aws-sigv4", f"aws:amz:{spec['region']}:s3", "--user", f"{s3['access_key']}:{s3['secret_key']}",
                   "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"]
        return [f"{s3['endpoint']}/{bucket}/{k}" for k in keys], options
    endpoint = spec["servers"]["gs"]["endpoint"]
    if upload:
        return ([f"{endpoint}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={urllib.parse.quote(k, safe='')}"
                 for k in keys], ["-X", "POST", "-H", "Content-Type: application/octet-stream"])
    return [f"{endpoint}/storage/v1/b/{bucket}/o/{urllib.parse.quote(k, safe='')}?alt=media" for k in keys], []


def _curl(urls: list[str], options: list[str], connections: int, upload: str | None) -> float:
    """One curl process moving every URL, ``connections`` at a time; its wall time."""
    # Uploads send their body at once: curl would otherwise wait up to a second for a
    # "100 Continue" that a server may never send. (Dropping the Expect header instead
    # breaks curl's own SigV4 signature: it signs the header list it was given.)
    argv = ["curl", "-q", "-s", "-S", "-f", "--noproxy", "*", "--expect100-timeout", "0.001", "--parallel",
            "--parallel-max", str(connections), *options]
    for u in urls:
        argv += (["-T", upload] if upload else []) + ["-o", "/dev/null", u]
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"curl exited with {done.returncode}: {done.stderr.strip()[-300:]}")
    return seconds


def phase_curl(spec: dict, nbytes: int, bucket: str) -> dict:
    """Upload ``nbytes`` (rounded up to whole 16 MiB objects) with each connection
    count, download the last upload with each; the best of each is the record."""
    n = max(1, -(-nbytes // PART))
    with tempfile.TemporaryDirectory(prefix="jaxckpt-curl-") as tmp:
        payload = os.path.join(tmp, "part.bin")
        with open(payload, "wb") as f:
            f.write(os.urandom(PART))
        puts: dict[str, float] = {}
        gets: dict[str, float] = {}
        keys: list[str] = []
        for c in CONNECTIONS:
            keys = [f"{spec['prefix']}/c{c}/part-{i:05d}" for i in range(n)]
            urls, options = _urls(spec, bucket, keys, upload=True)
            puts[str(c)] = _curl(urls, options, c, payload)
        for c in CONNECTIONS:
            urls, options = _urls(spec, bucket, keys, upload=False)
            gets[str(c)] = _curl(urls, options, c, None)
    moved = n * PART
    best_put, best_get = min(puts.values()), min(gets.values())
    return {"bytes": moved, "objects": n, "puts": puts, "gets": gets,
            # Scaled to the state's bytes, so that they compare with the other methods' seconds.
            "total_s": best_put * nbytes / moved, "restore_s": best_get * nbytes / moved,
            "put_mibps": moved / best_put / 2**20, "get_mibps": moved / best_get / 2**20}
