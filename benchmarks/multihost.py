"""Multi-process benchmark: W1 saved and restored by 1 process vs 2 processes.

    python -m benchmarks.multihost [--gb 1.1] [--rounds 3]

Each measurement starts fresh processes (a real ``jax.distributed`` job on
localhost, CPU devices, gloo), one device per process. The state is W1-shaped
(200 float32 leaves, mixed sizes): 2-D leaves are sharded along their first
axis over all devices, small leaves replicated. Methods, interleaved per round:
jaxckpt (AsyncCheckpointer, time until committed; restore into the sharded
target) and orbax-checkpoint (StandardCheckpointer, the same). Reported: the
job's wall time (slowest process) for save and restore, and the bytes each
process wrote. Results go to benchmarks/results/<timestamp>-multihost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRATCH = os.path.join(HERE, ".scratch", "multihost")


def _tree(gb: float, nproc: int):
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("x",))
    rows = np.geomspace(8, 40_000, 200).astype(int) // 2 * 2  # even: splits over 2 processes
    scale = gb * 1e9 / (rows.sum() * 1024 * 4)
    cols = max(int(1024 * scale) // 2 * 2, 2)
    tree, abstract = {}, {}
    for i, r in enumerate(rows):
        shape = (int(r), cols)
        sharding = NamedSharding(mesh, P("x") if r >= 64 else P())
        tree[f"layer_{i:03d}"] = jax.make_array_from_callback(
            shape, sharding, lambda idx, shape=shape, i=i: np.full(shape, i, np.float32)[idx])
        abstract[f"layer_{i:03d}"] = jax.ShapeDtypeStruct(shape, np.float32, sharding=sharding)
    return tree, abstract


def worker(method: str, pid: int, nproc: int, port: int, workdir: str, gb: float) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if nproc > 1:
        jax.distributed.initialize(f"127.0.0.1:{port}", nproc, pid)
    tree, abstract = _tree(gb, nproc)
    jax.block_until_ready(tree)
    path = os.path.join(workdir, "ckpt")
    out = {}
    if method == "jaxckpt":
        import jaxckpt

        with jaxckpt.AsyncCheckpointer() as ck:
            t0 = time.perf_counter()
            h = ck.save(path, tree)
            out["blocking_s"] = time.perf_counter() - t0
            h.result()
            out["save_s"] = time.perf_counter() - t0
        _sync(nproc, "saved")
        t0 = time.perf_counter()
        restored = jaxckpt.restore(path, abstract)
        jax.block_until_ready(restored)
        out["restore_s"] = time.perf_counter() - t0
        out["bytes_written"] = os.path.getsize(os.path.join(path, f"data-{pid:05d}.bin"))
    else:
        import orbax.checkpoint as ocp

        ck = ocp.StandardCheckpointer()
        t0 = time.perf_counter()
        ck.save(path, tree)
        out["blocking_s"] = time.perf_counter() - t0
        ck.wait_until_finished()
        out["save_s"] = time.perf_counter() - t0
        _sync(nproc, "saved")
        t0 = time.perf_counter()
        restored = ck.restore(path, abstract)
        jax.block_until_ready(restored)
        out["restore_s"] = time.perf_counter() - t0
        ck.close()
    leaf = restored["layer_100"]
    out["ok"] = all(bool((s.data == 100).all()) for s in leaf.addressable_shards)
    print("RESULT " + json.dumps(out), flush=True)
    _sync(nproc, "done")
    os._exit(0)


def _sync(nproc: int, name: str) -> None:
    if nproc > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(method: str, nproc: int, gb: float) -> dict:
    workdir = os.path.join(SCRATCH, f"{method}-{nproc}")
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.multihost", "--worker", method, str(i), str(nproc),
                               str(port), workdir, str(gb)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env, cwd=os.path.dirname(HERE)) for i in range(nproc)]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=900)
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            raise RuntimeError(f"{method} x{nproc} failed:\n{out[-3000:]}")
        results.append(json.loads(lines[-1][7:]))
    shutil.rmtree(workdir, ignore_errors=True)
    if not all(r["ok"] for r in results):
        raise RuntimeError(f"{method} x{nproc}: restored values differ")
    return {"save_s": max(r["save_s"] for r in results), "restore_s": max(r["restore_s"] for r in results),
            "blocking_s": max(r["blocking_s"] for r in results),
            "bytes_per_process": [r.get("bytes_written") for r in results]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        m, pid, n, port, wd, gb = args.worker
        worker(m, int(pid), int(n), int(port), wd, float(gb))
        return 0
    runs: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for method in ("jaxckpt", "orbax"):
            for nproc in (1, 2):
                res = run_job(method, nproc, args.gb)
                runs.setdefault(f"{method} x{nproc}", []).append(res)
                print(f"round {r}: {method} x{nproc}: {res}", flush=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    base = os.path.join(HERE, "results", f"{stamp}-multihost")
    with open(base + ".json", "w") as f:
        json.dump({"gb": args.gb, "rounds": args.rounds, "runs": runs}, f, indent=1)
    lines = [f"# Multi-process benchmark ({args.gb} GB W1-shaped state, {args.rounds} rounds, medians)", "",
             "One CPU device per process; wall time of the slowest process.", "",
             "| method | processes | total save | restore | save vs 1 process | restore vs 1 process | "
             "save vs orbax | restore vs orbax | bytes written per process |", "|---|---|---|---|---|---|---|---|---|"]
    med = {k: {f: statistics.median(x[f] for x in v) for f in ("save_s", "restore_s")} for k, v in runs.items()}
    for k, v in runs.items():
        method, n = k.split(" x")
        one, orb = med[f"{method} x1"], med[f"orbax x{n}"]
        per = v[-1]["bytes_per_process"]
        lines.append(f"| {method} | {n} | {med[k]['save_s']:.3f} s | {med[k]['restore_s']:.3f} s | "
                     f"{med[k]['save_s'] / one['save_s']:.2f}x | {med[k]['restore_s'] / one['restore_s']:.2f}x | "
                     f"{med[k]['save_s'] / orb['save_s']:.2f}x | {med[k]['restore_s'] / orb['restore_s']:.2f}x | "
                     f"{', '.join('-' if b is None else f'{b / 1e6:.0f} MB' for b in per)} |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
