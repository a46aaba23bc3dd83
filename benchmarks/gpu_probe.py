"""Where jaxckpt's time goes on an accelerator: two probes the harness cannot run.

    python -m benchmarks.gpu_probe snapshot W1 [--quick] [OUT.json]
    python -m benchmarks.gpu_probe restore W3 [--quick] [OUT.json]
    python -m benchmarks.gpu_probe first W1 [--quick] [OUT.json]

Not comparisons between libraries (`benchmarks.run` does that); each asks
which of jaxckpt's own choices is faster on the default device.

snapshot: three consecutive `AsyncCheckpointer` saves per device -> host
    path, in one process, paths alternating over two rounds: every shard
    through pinned host memory (`config.Tuning.pinned_min_bytes = 0`), every shard with
    `copy_to_host_async` (no pinned memory), and shards under 1 MiB with
    `copy_to_host_async`, larger ones pinned. Each save is of FRESH device
    arrays (a device-side copy of the state, made outside the timing): a
    jax.Array caches its host copy after `copy_to_host_async`, so saving the
    same arrays again would time nothing. The first save of a path pays its
    one-time allocations; the later ones are what a training run sees.
restore: saves the workload with jaxckpt (and with orbax), then restores it
    in fresh processes from the page cache, as a resuming job does once:
    jaxckpt with host -> device transfers in windows of 256 MiB / 64 MiB /
    all at once (`config.Tuning.accel_window_bytes`), with 256 MiB windows from
    copy-on-write mappings of the file instead of fresh host memory
    (`config.Tuning.map_for_accelerators`), and orbax. Each restore is checked bit for
    bit against the workload's digests.

first: the first save of a process (fresh processes): jaxckpt as is,
    jaxckpt once `AsyncCheckpointer.prepare` of the abstract state has run in
    the background (pinned memory allocated, small-shard packing compiled),
    and orbax; then the second and third save of each. Saves are of fresh device copies.
restore also measures the limit (`_limit_step`): the files read from the
    page cache into reused host memory, and pinned host -> device bandwidth.

Prints a summary and writes JSON (default
`benchmarks/results/<timestamp>-gpu-probe-<probe>-<workload>.json`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1 << 20
ROUNDS = int(os.environ.get("GPU_PROBE_ROUNDS", "2"))
SNAPSHOT_PATHS = {"pinned": 0, "copy_to_host_async": 1 << 62, "hybrid_1MiB": MIB}
# label -> (config.Tuning.accel_window_bytes, map_for_accelerators, accel_put_threads)
# label: (accel_window_bytes, map_for_accelerators, accel_put_threads, accel_stage_pinned)
RESTORE_CONFIGS = {"window 256 MiB (default)": (256 * MIB, False, 1, False),
                   "window 256 MiB, mapped": (256 * MIB, True, 1, False),
                   "window 64 MiB, mapped, 4 threads": (64 * MIB, True, 4, False),
                   "window 64 MiB, 4 threads": (64 * MIB, False, 4, False),
                   "window 32 MiB, mapped, 8 threads": (32 * MIB, True, 8, False),
                   "window 256 MiB, mapped, pinned staging": (256 * MIB, True, 1, True),
                   "window 64 MiB, mapped, pinned staging, 4 threads": (64 * MIB, True, 4, True)}


def _fresh(state):
    """A device-side copy of every leaf: new buffers with no cached host copy.
    (Not ``jnp.copy`` per leaf: that compiles once per shape, minutes for
    W2's thousands of shapes; a first version of this probe ran out of time.)"""
    import jax

    return jax.block_until_ready(jax.device_put(state, may_alias=False))


def probe_snapshot(workload, device) -> dict:
    import jax

    import jaxckpt
    from jaxckpt import config

    from . import workloads

    state = jax.block_until_ready(workloads.build_state(workload, device))
    root = Path(tempfile.mkdtemp(prefix="jaxckpt-probe-", dir=".")).resolve()
    out: dict = {}
    try:
        for rnd in range(2):  # alternate so that no path always goes first
            order = list(SNAPSHOT_PATHS) if rnd == 0 else list(reversed(SNAPSHOT_PATHS))
            for name in order:
                config.configure(pinned_min_bytes=SNAPSHOT_PATHS[name])
                runs = []
                with jaxckpt.AsyncCheckpointer() as ck:
                    for i in range(3):
                        fresh = _fresh(state)
                        path = root / f"{name}-{rnd}-{i}"
                        t0 = time.perf_counter()
                        handle = ck.save(path, fresh)
                        t1 = time.perf_counter()
                        del fresh  # as a training step that donates its state would
                        handle.result()
                        runs.append({"blocking_s": t1 - t0, "total_s": time.perf_counter() - t0})
                        shutil.rmtree(path)
                out.setdefault(name, []).append(runs)
                print(f"save {name:20s} blocking " + " / ".join(f"{r['blocking_s']:.3f}" for r in runs)
                      + " s; total " + " / ".join(f"{r['total_s']:.3f}" for r in runs) + " s", flush=True)
    finally:
        config.configure(pinned_min_bytes=0)
        shutil.rmtree(root, ignore_errors=True)
    return out


def _child(argv: list[str]) -> dict:
    """Run one step of the restore probe in a fresh process; its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_probe", *argv],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-1500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def probe_restore(name: str, quick: bool, device) -> dict:
    from . import measure, workloads

    workload = workloads.get(name, quick)
    root = Path(tempfile.mkdtemp(prefix="jaxckpt-probe-", dir=".")).resolve()
    q = ["--quick"] if quick else []
    out: dict = {"runs": []}
    try:
        digests = root / "digests.json"
        digests.write_text(json.dumps(measure.reference_digests(workload)))
        for method in ("jaxckpt-sync", "orbax-async"):
            r = _child(["_save", name, str(root / method), method, *q])
            print(f"saved with {method}: {r}", flush=True)
        out["limit"] = _child(["_limit", str(root / "jaxckpt-sync")])
        print(f"limit: {out['limit']}", flush=True)
        for rnd in range(ROUNDS):
            for label, (window, mapped, threads, staged) in RESTORE_CONFIGS.items():
                r = _child(["_restore", name, str(root / "jaxckpt-sync"), "jaxckpt-sync", str(window),
                            str(digests), str(int(mapped)), str(threads), str(int(staged)), *q])
                r |= {"method": "jaxckpt", "config": label, "round": rnd}
                out["runs"].append(r)
                print(json.dumps(r), flush=True)
            r = _child(["_restore", name, str(root / "orbax-async"), "orbax-async", "0", str(digests), "0", "1", "0", *q])
            r |= {"method": "orbax", "config": "CheckpointManager", "round": rnd}
            out["runs"].append(r)
            print(json.dumps(r), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def _save_step(name: str, root: str, method: str, quick: bool) -> dict:
    import jax

    from . import methods, workloads

    workload = workloads.get(name, quick)
    state = jax.block_until_ready(workloads.build_state(workload))
    Path(root).mkdir(parents=True)
    m = methods.get(method)(Path(root))
    t0 = time.perf_counter()
    m.start_save(state, 0)()
    m.close()
    return {"save_s": time.perf_counter() - t0}


def _restore_step(name: str, root: str, method: str, window: int, digests: str, mapped: bool,
                  threads: int, staged: bool, quick: bool) -> dict:
    import jax

    from jaxckpt import config

    from . import measure, methods, workloads

    config.configure(accel_window_bytes=window, map_for_accelerators=mapped, accel_put_threads=threads,
                     accel_stage_pinned=staged)
    workload = workloads.get(name, quick)
    abstract = workloads.abstract_state(workload)
    m = methods.get(method)(Path(root))
    measure.read_tree(Path(root))  # into the page cache
    with measure.PeakRss() as rss:
        t0 = time.perf_counter()
        restored = jax.block_until_ready(m.restore(abstract, 0))
        seconds = time.perf_counter() - t0
    m.close()
    check = measure.verify_restore(workload, restored, json.loads(Path(digests).read_text()))
    return {"restore_s": seconds, "rss_restore_bytes": rss.extra, "verified": check}


def _limit_step(root: str) -> dict:
    """The restore's limit for these bytes: reading the checkpoint's files
    from the page cache into reused host memory (8 threads), and moving bytes
    from pinned host memory to the device; overlapped, the slower of the two."""
    import concurrent.futures

    import jax
    import numpy as np

    from jaxckpt import accelcopy

    from . import measure

    files = [p for p in Path(root).rglob("*") if p.is_file()]
    total = measure.read_tree(Path(root))  # into the page cache
    chunk = 64 * MIB
    bufs = [np.ones(chunk, np.uint8) for _ in range(8)]  # faulted in, reused

    def read(job):
        i, path, off = job
        with open(path, "rb", buffering=0) as f:
            return os.preadv(f.fileno(), [bufs[i % 8]], off)

    jobs = [(k, p, off) for k, (p, off) in enumerate((p, off) for p in files
                                                    for off in range(0, p.stat().st_size, chunk))]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        read_bytes = sum(pool.map(read, jobs))
    read_s = time.perf_counter() - t0
    dev = jax.devices()[0]
    out = {"bytes": total, "read_s": read_s, "read_GBps": read_bytes / read_s / 1e9}
    pinned = accelcopy.pinned_sharding(dev)
    if pinned is not None:
        on_device = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
        host = [jax.device_put(np.ones(256 * MIB, np.uint8), pinned) for _ in range(4)]
        jax.block_until_ready(jax.device_put(host[0], on_device, may_alias=False))
        t0 = time.perf_counter()
        jax.block_until_ready(jax.device_put(host, [on_device] * 4, may_alias=False))
        h2d = 4 * 256 * MIB / (time.perf_counter() - t0)
        out |= {"h2d_pinned_GBps": h2d / 1e9, "limit_s": max(read_s * total / max(read_bytes, 1), total / h2d)}
    return out


def probe_first(name: str, quick: bool) -> dict:
    """The first save of a process, in fresh processes: jaxckpt as is, jaxckpt
    after ``AsyncCheckpointer.prepare(abstract state)`` has finished in the
    background (its duration reported), and orbax; then a second and a third save of each."""
    root = Path(tempfile.mkdtemp(prefix="jaxckpt-probe-", dir=".")).resolve()
    q = ["--quick"] if quick else []
    runs = []
    try:
        for variant in ("jaxckpt", "jaxckpt-prepared", "orbax"):
            r = _child(["_first", name, str(root / variant), variant, *q]) | {"variant": variant}
            runs.append(r)
            print(json.dumps(r), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"runs": runs}


def _first_step(name: str, root: str, variant: str, quick: bool) -> dict:
    import jax

    import jaxckpt

    from . import methods, workloads, worker

    workload = workloads.get(name, quick)
    method_cls = methods.get("orbax-async" if variant == "orbax" else "jaxckpt-async")
    worker._warm_up(method_cls, Path(root), restore=False)  # imports, thread pools: not what is measured
    state = jax.block_until_ready(workloads.build_state(workload))
    Path(root).mkdir(parents=True)
    out: dict = {}
    m = method_cls(Path(root))
    if variant == "jaxckpt-prepared":
        m._ck = jaxckpt.AsyncCheckpointer()
        t0 = time.perf_counter()
        m._ck.prepare(workloads.abstract_state(workload)).result()
        out["prepare_s"] = time.perf_counter() - t0  # in the background, while a loop would train
    for i in range(3):
        fresh = _fresh(state)
        t0 = time.perf_counter()
        wait = m.start_save(fresh, i)
        t1 = time.perf_counter()
        del fresh
        wait()
        out[f"save{i + 1}"] = {"blocking_s": t1 - t0, "total_s": time.perf_counter() - t0}
    m.close()
    if variant != "orbax":  # both saves bit for bit (the second one went through the packed path)
        import numpy as np

        want = jax.tree.leaves(state)
        for slot in (0, 1, 2):
            got = jax.tree.leaves(jaxckpt.restore(Path(root) / f"ckpt_{slot}"))
            if len(got) != len(want) or any(not np.array_equal(np.asarray(a), np.asarray(b)) or
                                            np.asarray(a).dtype != np.asarray(b).dtype for a, b in zip(got, want)):
                raise SystemExit(f"{variant}: save {slot + 1} does not restore bit for bit")
        out["verified"] = True
    return out


def main(argv: list[str]) -> int:
    quick = "--quick" in argv  # tiny sizes, for a smoke test of the probe itself
    args = [a for a in argv if a != "--quick"]
    if args and args[0] == "_save":
        print(json.dumps(_save_step(args[1], args[2], args[3], quick)))
        return 0
    if args and args[0] == "_restore":
        print(json.dumps(_restore_step(args[1], args[2], args[3], int(args[4]), args[5], args[6] == "1",
                                       int(args[7]), args[8] == "1", quick)))
        return 0
    if args and args[0] == "_limit":
        print(json.dumps(_limit_step(args[1])))
        return 0
    if args and args[0] == "_first":
        print(json.dumps(_first_step(args[1], args[2], args[3], quick)))
        return 0
    if len(args) < 2 or args[0] not in ("snapshot", "restore", "first"):
        print(__doc__)
        return 2
    import jax

    from . import machine, workloads

    probe, name = args[0], args[1]
    out_path = Path(args[2]) if len(args) > 2 else Path("benchmarks/results") / (
        f"{time.strftime('%Y%m%dT%H%M%S')}-gpu-probe-{probe}-{name}.json")
    workload = workloads.get(name, quick)
    device = jax.devices()[0]
    print(f"{probe} {name}: {workload.describe()} on {device} ({device.device_kind})", flush=True)
    result = {"probe": probe, "workload": workload.describe(), "device": str(device),
              "device_kind": device.device_kind, "machine": machine.describe(Path(".")),
              "command": "python -m benchmarks.gpu_probe " + " ".join(argv)}
    if probe == "snapshot":
        result["saves"] = probe_snapshot(workload, device)
    elif probe == "first":
        result |= probe_first(name, quick)
    else:
        result |= probe_restore(name, quick, device)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
