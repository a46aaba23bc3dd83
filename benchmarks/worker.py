"""One measurement, in a fresh process: `python -m benchmarks.worker SPEC_JSON`.

SPEC_JSON (see subproc.py) holds `phase`, `out` and, by phase, `workload`,
`quick`, `method` and `root`.  Phases:

  describe      backend, devices, library versions, which methods import
  reference     digests of every leaf (for checking restores), once per run
  limits        physical limits for the workload's byte count
  save          blocking and total time, peak extra RSS, files created
  restore_warm  restore with the checkpoint in the page cache
  restore_cold  restore after sync + drop_caches (root only)
  concurrent    step time of a jitted matmul loop during a background save

Save-type phases first do a tiny save (and restore phases a tiny restore)
in a sibling directory, so that imports and lazy one-time set-up are not
charged to the measured call: the figures describe a steady-state save as a
training job sees it, not the first one of a process.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

from . import limits, measure, methods, subproc, workloads

LOOP_BASELINE_S = 1.0  # compute-loop baseline, before and after the saves
LOOP_MIN_WINDOW_S = 2.0  # background-save time to accumulate for the loop
LOOP_MAX_SAVES = 10
LOOP_MAX_BYTES = 6 << 30  # on disk, summed over the loop's saves


def _block(tree):
    import jax

    return jax.block_until_ready(tree)


def _warm_up(method_cls: type[methods.Method], root: Path, restore: bool) -> None:
    """Save (and restore) a one-leaf tree in a sibling directory, then remove it."""
    import jax
    import jax.numpy as jnp

    scratch = root.with_name(root.name + "-warmup")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    tree = {"w": jnp.arange(1024, dtype=jnp.float32)}
    method = method_cls(scratch)
    try:
        method.start_save(tree, 0)()
        if restore:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            abstract = {"w": jax.ShapeDtypeStruct((1024,), jnp.float32, sharding=sharding)}
            _block(method.restore(abstract, 0))
    finally:
        method.close()
        shutil.rmtree(scratch, ignore_errors=True)


# --------------------------------------------------------------------------
# Phases


def phase_describe(spec: dict) -> dict:
    import jax

    devices = jax.devices()
    availability = {}
    for name, cls in methods.ALL.items():
        try:
            cls.check_available()
            availability[name] = None
        except Exception as e:  # any import-time failure means "not available"
            availability[name] = f"{type(e).__name__}: {e}"
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "unavailable": {k: v for k, v in availability.items() if v},
    }


def phase_limits(spec: dict) -> dict:
    workload = workloads.get(spec["workload"], spec["quick"])
    return limits.measure_all(Path(spec["root"]), workload.nbytes)


def phase_reference(spec: dict) -> dict:
    """Digests of every leaf, written to spec["digests"] for restore checks."""
    workload = workloads.get(spec["workload"], spec["quick"])
    t0 = time.perf_counter()
    digests = measure.reference_digests(workload)
    Path(spec["digests"]).write_text(json.dumps(digests))
    return {"seconds": time.perf_counter() - t0, "leaves": len(digests)}


def phase_save(spec: dict) -> dict:
    workload = workloads.get(spec["workload"], spec["quick"])
    method_cls = methods.get(spec["method"])
    root = Path(spec["root"])
    _warm_up(method_cls, root, restore=False)
    state = _block(workloads.build_state(workload))
    root.mkdir(parents=True, exist_ok=True)
    method = method_cls(root)
    threads_before = measure.thread_count()
    os.sync()
    with measure.PeakRss() as rss:
        t0 = time.perf_counter()
        wait = method.start_save(state, 0)
        t1 = time.perf_counter()
        wait()
        t2 = time.perf_counter()
    result = {
        "blocking_s": t1 - t0,
        "total_s": t2 - t0,
        "rss_save_bytes": rss.extra,
        "rss_method": rss.method,
        "threads_added": measure.thread_count() - threads_before,
        "library_stats": method.save_stats(),
    } | measure.footprint(root)
    # A second save of the same state in the same process: what every later
    # save of a training run costs, once first-use allocations (host pools,
    # pinned memory, thread pools) are made.
    t0 = time.perf_counter()
    wait = method.start_save(state, 1)
    t1 = time.perf_counter()
    wait()
    result |= {"blocking2_s": t1 - t0, "total2_s": time.perf_counter() - t0}
    method.close()
    return result


def _restore(spec: dict, cold: bool) -> dict:
    workload = workloads.get(spec["workload"], spec["quick"])
    method_cls = methods.get(spec["method"])
    root = Path(spec["root"])
    _warm_up(method_cls, root, restore=True)
    abstract = workloads.abstract_state(workload)
    method = method_cls(root)
    if cold:
        if not measure.drop_caches():
            method.close()
            return {"available": False, "note": "cannot drop the page cache (not root)"}
    else:
        measure.read_tree(root)
    with measure.PeakRss() as rss:
        t0 = time.perf_counter()
        restored = _block(method.restore(abstract, 0))
        t1 = time.perf_counter()
    method.close()
    digests = json.loads(Path(spec["digests"]).read_text())
    check = measure.verify_restore(workload, restored, digests)
    return {"available": True, "restore_s": t1 - t0, "rss_restore_bytes": rss.extra,
            "rss_method": rss.method, "verified": check}


def phase_restore_warm(spec: dict) -> dict:
    return _restore(spec, cold=False)


def phase_restore_cold(spec: dict) -> dict:
    return _restore(spec, cold=True)


class ComputeLoop:
    """A jitted matmul step on the default device, timed one step at a time."""

    def __init__(self):
        import jax
        import jax.numpy as jnp

        n = 1024 if jax.default_backend() == "cpu" else 8192
        key = jax.random.key(0)
        self.n = n
        self.w = jax.random.normal(key, (n, n), jnp.float32) / n**0.5
        self.x = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.float32)
        self._f = jax.jit(lambda x, w: jnp.tanh(x @ w))
        self.step()

    def step(self) -> float:
        t0 = time.perf_counter()
        self.x = self._f(self.x, self.w).block_until_ready()
        return time.perf_counter() - t0

    def run_for(self, seconds: float) -> list[float]:
        times: list[float] = []
        while sum(times) < seconds or len(times) < 10:
            times.append(self.step())
        return times

    def run_while(self, wait: methods.Wait) -> list[float]:
        """Step until wait() returns (it runs in a helper thread)."""
        done = threading.Event()
        errors: list[BaseException] = []

        def waiter():
            try:
                wait()
            except BaseException as e:  # re-raised on the main thread below
                errors.append(e)
            finally:
                done.set()

        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        times = []
        while not done.is_set():
            times.append(self.step())
        thread.join()
        if errors:
            raise errors[0]
        return times


def phase_concurrent(spec: dict) -> dict:
    workload = workloads.get(spec["workload"], spec["quick"])
    method_cls = methods.get(spec["method"])
    root = Path(spec["root"])
    _warm_up(method_cls, root, restore=False)
    state = _block(workloads.build_state(workload))
    root.mkdir(parents=True, exist_ok=True)
    method = method_cls(root)
    loop = ComputeLoop()
    before = loop.run_for(LOOP_BASELINE_S)
    during: list[float] = []
    saves = 0
    max_saves = max(1, min(LOOP_MAX_SAVES, LOOP_MAX_BYTES // max(1, workload.nbytes)))
    while saves < max_saves and sum(during) < LOOP_MIN_WINDOW_S:
        wait = method.start_save(state, saves)
        during += loop.run_while(wait)
        saves += 1
    after = loop.run_for(LOOP_BASELINE_S)
    method.close()
    base = statistics.fmean(before + after)
    result = {"matmul_n": loop.n, "saves": saves, "steps_during": len(during),
              "window_s": sum(during), "step_baseline_s": base,
              "step_before_s": statistics.fmean(before),
              "step_after_s": statistics.fmean(after)}
    if during:
        result["step_during_s"] = statistics.fmean(during)
        result["slowdown_pct"] = 100.0 * (result["step_during_s"] / base - 1.0)
    else:
        result["slowdown_pct"] = None
        result["note"] = "the save committed before the first step finished"
    return result


PHASES = {
    "describe": phase_describe,
    "reference": phase_reference,
    "limits": phase_limits,
    "save": phase_save,
    "restore_warm": phase_restore_warm,
    "restore_cold": phase_restore_cold,
    "concurrent": phase_concurrent,
}


def main(argv: list[str]) -> int:
    return subproc.child_main(argv, lambda spec: PHASES[spec["phase"]](spec))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
